"""FSDP2 on the CPU with gloo, for real: two processes must train exactly like one.

Each case runs the same seed and global batch (8 rows, 4 steps) once in one process and once in two
FSDP2 processes, and compares every step's loss and the final weights."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import trainers
from training import launch as launcher, modeling
from utils import REPO_DIR

from conftest import launch_run, make_cfg
from tiny_architectures import build_model_dir

STEPS = ["n_examples=32", "batch_size=8", "eval_batch_size=8", "n_eval_examples=8", "eval_every=1000",
         "do_first_eval=false", "warmup_steps=0", "max_grad_norm=1.0", "optimizer=AdamW", "lr=1e-3"]
LOSSES = {
    "sft": ["loss=sft"],
    "ift": ["loss=ift", "gamma=0.9", "loss.min_lambda=0.3", "loss.max_lambda=0.3"],
    "dpo": ["loss=dpo", "datasets=[ultrafeedback_sample]"],
    "dft": ["loss=dft"],
    "asft": ["loss=asft", "loss.kl_weight=0.5"],
    "simpo": ["loss=simpo", "datasets=[ultrafeedback_sample]"],
}


def launch(run_dir, *overrides):
    return launch_run(run_dir, *STEPS, *overrides)


def adam_reach(lr, steps, betas=(0.9, 0.999)):
    """The most T = `steps` AdamW updates of peak rate `lr` can move one element, whatever its gradients.
    At step t, m̂ = Σ a_i g_i and v̂ = Σ b_i g_i² with a_i = (1-β1)β1^(t-i)/(1-β1^t), b_i = (1-β2)β2^(t-i)/(1-β2^t),
    so by Cauchy-Schwarz |m̂| ≤ sqrt(Σ a_i²/b_i)·sqrt(v̂) = C_t·sqrt(v̂), and |update| = lr_t|m̂|/(sqrt(v̂)+ε) < lr·C_t
    (every schedule here stays at or below lr). Decoupled weight decay multiplies both runs' weights by
    the same 1 - lr_t·λ ≤ 1, which only shrinks a difference. Returns Σ_t lr·C_t."""
    (b1, b2), total = betas, 0.0
    for t in range(1, steps + 1):
        a = [(1 - b1) * b1 ** (t - i) / (1 - b1 ** t) for i in range(1, t + 1)]
        b = [(1 - b2) * b2 ** (t - i) / (1 - b2 ** t) for i in range(1, t + 1)]
        total += lr * sum(x * x / y for x, y in zip(a, b)) ** 0.5
    return total


def assert_same_run(a, b, lr=1e-3):
    """Two runs of STEPS (AdamW, lr) that differ only in how the global batch is split over ranks and
    micro-batches, so only in the order (and threading) of float32 sums.

    Per-step rows: tight (rel 1e-5). Each is a sum over the whole model and batch; float32 sums in two
    orders differ by a few units of 2^-24 ≈ 6e-8 relative per term, grown over 4 steps and 4 layers, far
    below 1e-5. The loss is first-order blind to the elements that Adam amplifies (below): their gradient
    is near zero, and |δloss| ≈ Σ|g_i||δw_i|.

    Weights: each element within 2·adam_reach. Adam divides each gradient element by its own RMS, so an
    element whose gradient is at the level of the rounding noise (a rare token's embedding row: a sum of
    cancelling terms, or below ε = 1e-8 where the update is ≈ lr·g/ε) takes an update whose size or sign is
    set by that noise, different in two summation orders: up to what Adam can move any element, in each
    run. Which elements, and how many, depends on the CPU's kernels (AVX-512 vs AVX2 blockings), so no
    norm bound chosen on one machine holds (1e-5·‖w‖ failed on an Intel Xeon: 8.9e-5 vs 6.9e-5 for
    embed_tokens). The bound holds on any CPU; the rows above carry the tight comparison."""
    (rows_a, weights_a), (rows_b, weights_b) = a, b
    assert len(rows_a) == len(rows_b) == 4
    for ra, rb in zip(rows_a, rows_b):
        for key in ra:
            if key not in ("step_time_s", "tokens_per_s", "tflops", "mfu", "split"):  # timings
                assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), key
    assert weights_a.keys() == weights_b.keys()
    reach = adam_reach(lr, len(rows_a))
    for k in weights_a:  # + 4 roundings of w (one per update) in each run: 8·2^-24·|w|
        slack = 8 * 2.0 ** -24 * torch.maximum(weights_a[k].abs(), weights_b[k].abs())
        assert ((weights_a[k] - weights_b[k]).abs() <= 2 * reach + slack).all(), k


@pytest.mark.distributed
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_two_ranks_times_two_accumulation_steps_equal_one_process_with_four(loss, tmp_path):
    one = launch(tmp_path / "one", *LOSSES[loss], "gradient_accumulation_steps=4")
    two = launch(tmp_path / "two", *LOSSES[loss], "trainer=FSDPTrainer", "nproc=2", "gradient_accumulation_steps=2")
    assert_same_run(one, two)


@pytest.mark.distributed
def test_any_causal_lm_trains_under_fsdp2_with_the_blocks_it_names_itself(tmp_path):
    """A Qwen2 directory (tied embeddings) with model.block_name left null: FSDP2 shards the blocks that
    transformers names in _no_split_modules (Qwen2DecoderLayer), and 2 ranks x 2 accumulation steps train
    as one process with 4 (assert_same_run's tolerances, as above). Before: a traceback after the weights
    loaded (block_name defaulted to MistralDecoderLayer)."""
    directory = build_model_dir("Qwen2ForCausalLM", tmp_path / "qwen2", tie_word_embeddings=True)
    run = [f"model.name_or_path={directory}", *LOSSES["ift"], "device=cpu", "max_length=128", "max_prompt_length=64"]
    one = launch(tmp_path / "one", *run, "gradient_accumulation_steps=4")
    two = launch(tmp_path / "two", *run, "trainer=FSDPTrainer", "nproc=2", "gradient_accumulation_steps=2")
    # FSDP's full state dict also names the tied head (the same tensor), so FSDPTrainer's final/ holds it twice
    weights = dict(two[1])
    assert torch.equal(weights.pop("lm_head.weight", weights["model.embed_tokens.weight"]),
                       weights["model.embed_tokens.weight"])
    # Qwen2's k_proj bias has a gradient of exactly 0 in exact arithmetic (it adds q.b to every key's score
    # of a query, which softmax ignores): what it gets is float32 rounding, which follows the order of the
    # sums and which AdamW scales up to steps of about lr. It is compared with the lr-sized bound instead.
    for name in [k for k in weights if k.endswith("k_proj.bias")]:
        assert (weights.pop(name) - one[1].pop(name)).abs().max() <= 4 * 1e-3  # 4 steps of lr=1e-3
    assert_same_run(one, (two[0], weights))


@pytest.fixture(scope="module")
def ift_one_process(tmp_path_factory):
    """The IFT run of STEPS in one plain process (global batch 8, no accumulation): (train rows, weights)."""
    return launch(tmp_path_factory.mktemp("ift") / "one", *LOSSES["ift"])


@pytest.mark.distributed
def test_torchrun_launch_equals_one_plain_process_and_saves_a_loadable_model(tmp_path, ift_one_process):
    """The same command under torchrun joins its process group instead of starting processes."""
    one = ift_one_process
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_port", str(launcher.free_port()), "train.py", f"run_dir={tmp_path / 'two'}", *STEPS,
           *LOSSES["ift"], "trainer=FSDPTrainer", "device=cpu"]
    proc = subprocess.run(cmd, cwd=REPO_DIR, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    two = [r for r in rows if r["split"] == "train"], load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert_same_run(one, two)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")  # one process, no FSDP
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, two[1][name])


@pytest.mark.distributed
def test_activation_checkpointing_recomputes_each_block_and_changes_no_gradient(tmp_path, monkeypatch):
    """With checkpointing every decoder block runs its forward once more in backward, and the run's
    losses, gradient norms and weights equal those without it. Counted: calls of each block's MLP
    forward, which runs inside the checkpointed region (module hooks do not run again in the recompute)."""
    calls = []
    wrap = trainers.FSDPTrainer.wrap

    def counting(forward):
        return lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)

    def counting_wrap(self, model, trainable):
        for block in modeling.decoder_blocks(model, self.cfg.model.block_name):
            block.mlp.forward = counting(block.mlp.forward)
        return wrap(self, model, trainable)

    monkeypatch.setattr(trainers.FSDPTrainer, "wrap", counting_wrap)
    sft = ["loss=sft", "trainer=FSDPTrainer", "nproc=1"]  # one forward per micro-batch; nproc=1 runs in this process
    plain = launch(tmp_path / "plain", *sft, "gradient_accumulation_steps=2")
    plain_calls, calls[:] = len(calls), []
    checkpointed = launch(tmp_path / "ckpt", *sft, "gradient_accumulation_steps=2", "activation_checkpointing=true")
    assert_same_run(plain, checkpointed)
    n_blocks = 4  # the bundled model's layers
    assert len(calls) - plain_calls == n_blocks * 4 * 2  # one recompute per block, training micro-batch (4 steps x 2)
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ  # an in-process launch leaves no trace


@pytest.mark.distributed
def test_bf16_mixed_precision_trains_float32_master_weights_and_saves_bf16(tmp_path, ift_one_process):
    """policy_dtype=bfloat16 under FSDP2: compute in bf16, parameters and gradient reduction in float32,
    final/ in bf16. The losses follow the float32 run closely but not exactly (bf16 compute). The float32
    run is the plain process's, which two float32 ranks equal (the tests above)."""
    exact = ift_one_process
    mixed = launch(tmp_path / "bf16", *LOSSES["ift"], "trainer=FSDPTrainer", "nproc=2", "model.policy_dtype=bfloat16",
                   "save_every=16")
    assert all(w.dtype == torch.bfloat16 for w in mixed[1].values())
    from training import \
        checkpoints  # the sharded state the optimizer updated (both ranks' shards): float32 master weights
    state = checkpoints.read_checkpoint(tmp_path / "bf16" / "checkpoints" / "step-2")
    assert {v.dtype for v in state["model"].values()} == {torch.float32}
    moments = [v for per_param in state["optimizer"]["state"].values() for k, v in per_param.items() if k != "step"]
    assert moments and {v.dtype for v in moments} == {torch.float32}
    a, b = [r["loss"] for r in exact[0]], [r["loss"] for r in mixed[0]]
    assert a != b and all(abs(x - y) < 0.05 * x for x, y in zip(a, b))


@pytest.mark.unit
def test_only_rank_zero_reads_the_weights_under_fsdp(monkeypatch):
    """Ranks other than 0 build the model on the meta device (no memory); the equivalence tests above
    show they then receive exactly rank 0's weights and buffers."""
    cfg = make_cfg("trainer=FSDPTrainer", "nproc=2")
    monkeypatch.setattr(modeling.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(modeling.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(modeling, "is_main", lambda: False)
    other = modeling.load_model(cfg, "float32")
    assert all(p.is_meta for p in other.parameters())
    monkeypatch.setattr(modeling, "is_main", lambda: True)
    assert not any(p.is_meta for p in modeling.load_model(cfg, "float32").parameters())
    plain = make_cfg()  # BasicTrainer: always real weights
    monkeypatch.setattr(modeling, "is_main", lambda: False)
    assert not any(p.is_meta for p in modeling.load_model(plain, "float32").parameters())


@pytest.mark.unit
@pytest.mark.parametrize("device, torchrun", [("cuda", False), ("cuda", True), ("cpu", False)])
def test_the_process_group_gets_the_timeout_and_each_rank_its_gpu(device, torchrun, monkeypatch):
    """init_process_group gets dist_timeout_minutes (NCCL's own 10 minutes would kill the waiting ranks
    while rank 0 downloads and loads alone) and, on CUDA, device_id = this rank's GPU. A mock records
    the call: no GPU or process group is needed."""
    import datetime

    from training import launch
    calls = []
    monkeypatch.setattr(launch.dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(launch.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # leave this process's thread count alone
    if torchrun:
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = make_cfg(f"device={device}", "dist_timeout_minutes=45")
    with launch.process_group(cfg, 1, 2, None if torchrun else 29500) as got:
        pass
    (args, kwargs), cuda = calls[-1], device == "cuda"
    assert args == ("nccl" if cuda else "gloo",) and got == torch.device("cuda:1" if cuda else "cpu")
    assert kwargs["timeout"] == datetime.timedelta(minutes=45)
    assert kwargs["device_id"] == (torch.device("cuda:1") if cuda else None)
    assert (("set_device", 1) in calls) == cuda


@pytest.mark.unit
def test_the_default_timeout_is_an_hour():
    assert make_cfg().dist_timeout_minutes == 60
