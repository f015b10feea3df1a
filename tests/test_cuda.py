"""What only a GPU can show, in a few seconds: the tests marked `cuda` (skipped without a CUDA device).
benchmarks/gpu_check.py runs them with `pytest -m cuda` while CUDA is visible; the CPU suite hides CUDA."""

import importlib.util

import pytest
import torch

import losses
from forward import ModelCall
from training import checkpoints, launch, lora

from conftest import make_cfg
from test_forward import sft_batch, tiny_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
# bf16 autocast keeps 8 significant bits (u = 2^-8 = 3.9e-3); each row's loss is a mean over its target
# tokens of values that passed a few bf16 roundings: a few u. 2e-2 (5u) bounds it with room (the same
# rows under CPU bf16 autocast differ from float64 by 5.7e-3); a row that saw another row differs by far more.
BF16_RTOL = 2e-2
ATTENTION = ["sdpa", pytest.param("flash_attention_2", marks=pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed"))]


@pytest.mark.unit
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("packing", [False, True])
def test_rows_on_cuda_in_bf16_match_float64_on_the_cpu(attn, packing):
    """Per-row SFT losses of rows of very different lengths, padded or packed (flash-attn's varlen path,
    sdpa's block-diagonal mask), under bf16 autocast on the GPU, against float64 on the CPU."""
    batch = sft_batch()
    expected = losses.sft_rows(ModelCall(packing=False), tiny_model(), *batch.values())[0].detach()
    model = tiny_model(dtype=torch.float32).cuda()
    model.set_attn_implementation(attn)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        got = losses.sft_rows(ModelCall(packing=packing), model, *(v.cuda() for v in batch.values()))[0]
    torch.testing.assert_close(got.double().cpu(), expected, rtol=BF16_RTOL, atol=0)


@pytest.mark.distributed
def test_the_nccl_group_binds_the_rank_gpu_and_reduces_on_it():
    import torch.distributed as dist
    with launch.process_group(make_cfg("device=cuda"), 0, 1, launch.free_port()) as device:
        assert dist.get_backend() == "nccl" and device == torch.device("cuda:0")
        x = torch.ones(3, device=device)
        dist.all_reduce(x)
        dist.barrier()
        assert x.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.unit
def test_cuda_dropout_noise_continues_after_the_rng_state_is_restored():
    torch.manual_seed(0)
    state = checkpoints.rng_state()
    first = torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5)
    torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5)
    checkpoints.set_rng_state(state)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5), first)


@pytest.mark.unit
def test_our_dequantisation_equals_bitsandbytes_on_cuda():
    """QLoRA's final/ without a base: a Linear4bit quantised by bitsandbytes' CUDA kernels, read back
    from its state dict by lora.dequantize_4bit, equals bitsandbytes' own dequantisation."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(256, 128, bias=False, compress_statistics=True, quant_type="nf4",
                              compute_dtype=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(torch.randn(128, 256, dtype=torch.bfloat16), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
    layer = layer.cuda()
    state = layer.state_dict()
    quant = {k.removeprefix("weight."): v for k, v in state.items() if k != "weight"}
    expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    # the same float32 products; bitsandbytes returns them rounded to bf16: at most one bf16 rounding apart
    torch.testing.assert_close(lora.dequantize_4bit(state["weight"], quant).cpu(), expected.cpu(), rtol=2 ** -8,
                               atol=0)
