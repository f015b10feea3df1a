"""The efficiency options change how the model is called, never the numbers.

- The chunked output head (loss_chunk_tokens): log-probs, argmax and every gradient against a full
  float64 log-softmax, and every loss against the unchunked path, in one process and under FSDP2.
- Padding-free packing (packing): per-row losses, metrics and gradients against padded batches, for
  every loss, with rows of very different lengths.
- attn_implementation and compile: passed through, checked, and giving the same loss.
"""

import pytest
import torch
import torch.nn.functional as F

import forward
import losses
import trainers
from forward import ModelCall
from training import launch, modeling, pipeline
from utils import ConfigError

import conftest
from conftest import FAST, ift_loss, make_cfg, run_inprocess, sft_loss

CONFIGS = {
    "sft": {"name": "sft"},
    "ift": {"name": "ift", "gamma": 0.95, "propagation_type": "loss", "propagation_side": "right",
            "propagation_norm": "softmax"},
    "dpo": {"name": "dpo", "beta": 0.5, "label_smoothing": 0.1, "reference_free": False},
    "ipo": {"name": "ipo", "beta": 0.5, "reference_free": False},
    "orpo": {"name": "orpo", "beta": 0.5},
    "dft": {"name": "dft"},
    "asft": {"name": "asft", "kl_weight": 0.5},
    "simpo": {"name": "simpo", "beta": 2.0, "gamma_margin": 0.5},
}
LAM = 0.4


def tiny_model(tie=False, seed=0, dtype=torch.float64):
    """conftest's random 2-layer Mistral (vocab 64), in `dtype`."""
    return conftest.tiny_model(tie=tie, seed=seed).to(dtype)


# (prompt length, answer length) of each row: very different lengths, right-padded to the longest.
SFT_ROWS = [(2, 1), (5, 30), (1, 4), (9, 12)]
PAIR_ROWS = [((3, 20), (3, 2)), ((1, 1), (1, 33)), ((7, 5), (7, 9))]


def _rows(spans, generator, T):
    ids = torch.zeros(len(spans), T, dtype=torch.long)
    attention = torch.zeros(len(spans), T, dtype=torch.long)
    labels = torch.full((len(spans), T), -100)
    for b, (prompt, answer) in enumerate(spans):
        n = prompt + answer
        ids[b, :n] = torch.randint(1, 64, (n,), generator=generator)
        attention[b, :n] = 1
        labels[b, prompt:n] = ids[b, prompt:n]
    return ids, attention, labels


def sft_batch():
    ids, attention, labels = _rows(SFT_ROWS, torch.Generator().manual_seed(3), 35)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def pair_batch():
    g = torch.Generator().manual_seed(4)
    batch = {}
    for i, side in enumerate(("chosen", "rejected")):
        ids, attention, labels = _rows([row[i] for row in PAIR_ROWS], g, 35)
        if side == "rejected":  # the same prompts
            for b, row in enumerate(PAIR_ROWS):
                ids[b, :row[0][0]] = batch["chosen_input_ids"][b, :row[0][0]]
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_labels": labels})
    return batch


def batch_for(name):
    return pair_batch() if losses.build(CONFIGS[name]).needs_pairs else sft_batch()


def row_coefficients(n):
    """Distinct positive weights per row, so a gradient that mixed rows up would show."""
    return torch.linspace(0.5, 2.0, n, dtype=torch.float64)


def loss_rows_and_grads(name, settings, tie=False, shard=None):
    """Per-row losses, metrics and the gradient of sum(c_b * row_loss_b) on a fresh float64 model."""
    policy = tiny_model(tie=tie)
    reference = tiny_model(seed=1) if losses.build(CONFIGS[name]).needs_reference else None
    if shard is not None:
        shard(policy, trainable=True)
        if reference is not None:
            shard(reference, trainable=False)
    loss = losses.build({**CONFIGS[name], **({"min_lambda": LAM, "max_lambda": LAM} if name == "ift" else {})})
    out = losses.batch_loss(loss, policy, reference, batch_for(name), losses.ONE_STEP, ModelCall(**settings))
    row_losses, valid, metrics = out.row_losses, out.valid, out.metrics
    (row_losses * row_coefficients(len(row_losses))).sum().backward()
    grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for k, p in policy.named_parameters()}
    return row_losses.detach(), valid, {k: v.detach() for k, v in metrics.items()}, grads


def assert_same(a, b, rtol, atol):
    (rows_a, valid_a, metrics_a, grads_a), (rows_b, valid_b, metrics_b, grads_b) = a, b
    assert torch.equal(valid_a, valid_b) and bool(valid_a.all())
    torch.testing.assert_close(rows_a, rows_b, rtol=rtol, atol=atol)
    assert metrics_a.keys() == metrics_b.keys()
    for k in metrics_a:
        torch.testing.assert_close(metrics_a[k], metrics_b[k], rtol=rtol, atol=atol, msg=k)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=rtol, atol=atol, msg=k)


UNCHUNKED = {"loss_chunk_tokens": None, "packing": False}


# ------------------------------------------------------------------ the chunked head on its own

@pytest.mark.unit
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_head_matches_a_full_log_softmax_in_values_argmax_and_gradients(chunk, bias):
    g = torch.Generator().manual_seed(0)
    N, H, V = 7, 5, 11
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(N, generator=g, dtype=torch.float64)

    logps, best = forward.ChunkedTargetLogps.apply(hidden, weight, b, targets, chunk, True)
    got = torch.autograd.grad((logps * upstream).sum(), [hidden, weight] + ([b] if bias else []))

    logits = hidden @ weight.T + (b if bias else 0)
    full = torch.log_softmax(logits, -1)
    expected = torch.stack([full[n, targets[n]] for n in range(N)])
    want = torch.autograd.grad((expected * upstream).sum(), [hidden, weight] + ([b] if bias else []))
    torch.testing.assert_close(logps, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(best, logits.argmax(-1))
    assert logps._base is None  # a new tensor, not a view: FSDP2 warns about a model output that is a view
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.unit
def test_chunked_head_in_bfloat16_matches_the_unchunked_float32_upcast():
    """bf16 products, float32 log-softmax, gradients back in bf16: as the unchunked head does it."""
    g = torch.Generator().manual_seed(1)
    N, H, V = 40, 16, 300
    hidden = torch.randn(N, H, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(V, H, generator=g).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    logps, _ = forward.ChunkedTargetLogps.apply(hidden, weight, None, targets, 8, False)
    assert logps.dtype == torch.float32
    logps.sum().backward()
    expected = forward.gather_logps(F.linear(hidden, weight), targets)
    torch.testing.assert_close(logps, expected, rtol=1e-6, atol=1e-6)
    want = torch.autograd.grad(expected.sum(), [hidden, weight])
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.grad.float(), want[0].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(weight.grad.float(), want[1].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.unit
def test_chunked_head_under_bfloat16_autocast_is_as_accurate_as_the_unchunked_head():
    """The trainer's mixed precision: float32 parameters, forward under autocast to bf16. Both heads
    round their bf16 products differently, so each is compared with the same model in float64: the
    chunked head's gradients must be no further from it than the unchunked head's."""
    results = {}
    for chunk, autocast in ((None, True), (3, True), (None, False)):
        model = tiny_model(dtype=torch.float32 if autocast else torch.float64)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = ift_loss(model, *sft_batch().values(), lam=LAM, call=ModelCall(loss_chunk_tokens=chunk))
        loss.backward()
        assert loss.dtype == next(model.parameters()).grad.dtype
        results[chunk, autocast] = loss.double(), {k: p.grad.double() for k, p in model.named_parameters()}
    exact = results[None, False]
    error = {key: {k: ((g - exact[1][k]).norm() / exact[1][k].norm()).item() for k, g in results[key][1].items()}
             for key in ((None, True), (3, True))}
    torch.testing.assert_close(results[3, True][0], results[None, True][0], rtol=1e-6, atol=1e-6)
    for k in exact[1]:
        assert error[3, True][k] <= 1.1 * error[None, True][k] + 1e-3, k


@pytest.mark.unit
def test_a_model_call_leaves_no_hook_behind_even_after_an_error():
    """ModelCall's hooks and lm_head's replaced forward exist for one call only, an interrupted one too."""
    model = tiny_model()
    call = ModelCall(loss_chunk_tokens=2, packing=True)
    ids, attention, labels = sft_batch().values()

    def boom(module, args):
        raise RuntimeError("boom")

    handle = model.model.norm.register_forward_pre_hook(boom)  # fails inside the forward, with every hook on
    with pytest.raises(RuntimeError, match="boom"):
        call.logps(model, ids, attention, labels, intuitive_ids=ids.flip(-1), lam=0.5)
    handle.remove()
    call.logps(model, ids, attention, labels, intuitive_ids=ids.flip(-1), lam=0.5)
    for module in (model.lm_head, model.get_input_embeddings()):
        assert not module._forward_pre_hooks and not module._forward_hooks
    assert "forward" not in model.lm_head.__dict__  # lm_head's own forward is back


@pytest.mark.unit
def test_a_model_that_changes_its_logits_after_lm_head_is_refused_by_the_chunked_head():
    model = tiny_model()
    model.register_forward_hook(lambda module, args, out: type(out)(logits=out.logits * 2))
    with pytest.raises(ValueError, match="loss_chunk_tokens=null"):
        ModelCall().logps(model, *sft_batch().values())
    ModelCall(loss_chunk_tokens=None).logps(model, *sft_batch().values())  # the plain head reads whatever comes


# ------------------------------------------------------------------ every loss, chunked and packed

@pytest.mark.unit
@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_head_gives_every_loss_the_same_rows_metrics_and_gradients(name):
    # chunk 2: dozens of chunks in forward, and vocabulary blocks of a few columns in backward
    assert_same(loss_rows_and_grads(name, {**UNCHUNKED, "loss_chunk_tokens": 2}),
                loss_rows_and_grads(name, UNCHUNKED), rtol=1e-10, atol=1e-12)


@pytest.mark.unit
def test_chunked_head_with_tied_embeddings_gives_ift_the_same_gradients():
    assert_same(loss_rows_and_grads("ift", {**UNCHUNKED, "loss_chunk_tokens": 3}, tie=True),
                loss_rows_and_grads("ift", UNCHUNKED, tie=True), rtol=1e-10, atol=1e-12)


@pytest.mark.unit
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunk", [None, 5])
def test_packed_rows_give_every_loss_the_same_rows_metrics_and_gradients_as_padded(name, chunk):
    assert_same(loss_rows_and_grads(name, {"loss_chunk_tokens": chunk, "packing": True}),
                loss_rows_and_grads(name, UNCHUNKED), rtol=1e-9, atol=1e-11)


@pytest.mark.unit
def test_packing_runs_one_sequence_of_the_real_tokens_with_restarting_positions():
    model = tiny_model()
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    batch = sft_batch()
    ModelCall(packing=True).intuition(model, *batch.values())
    ModelCall(packing=True).pair_logps(model, pair_batch())
    lengths = [p + a for p, a in SFT_ROWS]
    pair_lengths = [p + a for side in (0, 1) for row in PAIR_ROWS for p, a in [row[side]]]
    for kwargs, rows in zip(seen, (lengths, pair_lengths)):  # chosen and rejected stay separate rows
        assert kwargs["input_ids"].shape == (1, sum(rows)) and kwargs["attention_mask"] is None
        assert kwargs["position_ids"][0].tolist() == [t for n in rows for t in range(n)]
    keep = batch["attention_mask"].bool()
    assert torch.equal(seen[0]["input_ids"][0], batch["input_ids"][keep])


@pytest.mark.unit
def test_pack_rows_masks_each_rows_first_token_so_no_row_predicts_its_neighbour():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    attention = (ids != 0).long()
    labels = torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])  # even a labelled first token
    keep, position_ids, packed = forward.pack_rows(ids, attention, labels)
    assert position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert packed.tolist() == [[-100, 6, 7, -100, 9]]
    assert torch.equal(keep, attention.bool())


# ------------------------------------------------------------------ FSDP2, 2 gloo ranks

def _fsdp_shard(reshard_root):
    def shard(model, trainable):
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model, reshard_after_forward=reshard_root or not trainable)
    return shard


FSDP_SETTINGS = {"loss_chunk_tokens": 3, "packing": True}


def _fsdp_worker(rank, port, out_path):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        for i, name in enumerate(CONFIGS):
            # Both ranks run the whole batch; FSDP2 averages their gradients, i.e. keeps them.
            results[name] = loss_rows_and_grads(name, FSDP_SETTINGS, shard=_fsdp_shard(reshard_root=i % 2 == 1))
        results["compiled"] = compiled_ift_loss_and_grads(checkpointing=True, shard=_fsdp_shard(reshard_root=False))
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_chunked_head_packing_and_compile_under_fsdp2_give_the_single_process_results(tmp_path):
    """Every loss, chunked and packed on 2 ranks, against one process unchunked and padded: with the
    root kept unsharded after forward (as the trainer does for the policy) or resharded (so backward
    must unshard lm_head again). And compiled blocks with activation checkpointing under FSDP2, in
    the trainer's order (checkpointing, compile, shard), against eager blocks in one process."""
    import torch.multiprocessing as mp
    out = tmp_path / "fsdp.pt"
    mp.spawn(_fsdp_worker, args=(launch.free_port(), str(out)), nprocs=2, join=True)
    results = torch.load(out, weights_only=False)
    for name in CONFIGS:
        assert_same(results[name], loss_rows_and_grads(name, UNCHUNKED), rtol=1e-9, atol=1e-11)
    assert_close_compiled(results["compiled"], compiled_ift_loss_and_grads(checkpointing=False, compiled=False))


# ------------------------------------------------------------------ kernels: attention, compile

@pytest.mark.unit
def test_attn_implementation_reaches_from_pretrained_and_gives_the_same_loss():
    batch = sft_batch()
    values = {}
    for attn in ("eager", "sdpa"):
        cfg = make_cfg(f"model.attn_implementation={attn}")
        model = modeling.load_model(cfg, "float32")
        assert model.config._attn_implementation == attn
        values[attn] = sft_loss(model, *batch.values())[0]
    torch.testing.assert_close(values["eager"], values["sdpa"], rtol=1e-5, atol=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("overrides, message", [
    (["loss_chunk_tokens=0"], "loss_chunk_tokens"),
    (["packing=yes"], "packing"),
    (["compile=fast"], "compile"),
    (["compile_backend=tvm"], "compile_backend"),
    (["model.attn_implementation=flash"], "attn_implementation"),
    (["model.attn_implementation=flash_attention_2", "device=cpu", "model.policy_dtype=bfloat16"],
     "needs a CUDA device"),
    (["model.attn_implementation=flash_attention_2"], "^model.attn_implementation=flash_attention_2 needs "
                                                       "model.policy_dtype=bfloat16 or float16"),
    (["model.attn_implementation=flash_attention_2", "model.policy_dtype=bfloat16", "loss=dpo"],
     "^model.attn_implementation=flash_attention_2 needs model.reference_dtype=bfloat16 or float16 for loss=dpo"),
])
def test_bad_efficiency_options_fail_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        pipeline.validate_config(make_cfg(*overrides))
    assert "\n" not in str(e.value)


@pytest.mark.unit
def test_defaults_are_a_chunked_head_without_packing_or_compile_on_sdpa():
    cfg = make_cfg()
    assert (cfg.loss_chunk_tokens, cfg.packing, cfg.compile, cfg.model.attn_implementation) == \
        (forward.DEFAULT_LOSS_CHUNK_TOKENS, False, False, "sdpa")


def compiled_ift_loss_and_grads(checkpointing, compiled=True, shard=None):
    """IFT loss and gradients of a float32 tiny model whose blocks are compiled with aot_eager:
    dynamo and AOTAutograd trace each block (the inductor path minus its C++ code generation, which
    takes minutes on a small CPU). Returns (loss, grads, graphs compiled)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model(dtype=torch.float32)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    if compiled:
        assert trainers.compile_blocks(model, "MistralDecoderLayer", backend="aot_eager") == 2
    if shard is not None:
        shard(model, trainable=True)
    loss, _ = ift_loss(model, *sft_batch().values(), lam=LAM, call=ModelCall(loss_chunk_tokens=3, packing=False))
    loss.backward()
    grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for k, p in model.named_parameters()}
    return loss.detach(), grads, torch._dynamo.utils.counters["stats"]["unique_graphs"]


def assert_close_compiled(compiled, eager):
    """Tolerance 1e-5 relative in float32: a traced graph may order floating-point operations differently."""
    assert compiled[2] >= 1 and eager[2] == 0  # dynamo did compile the blocks (and only when asked)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for k in eager[1]:
        torch.testing.assert_close(compiled[1][k], eager[1][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.integration
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_give_the_same_loss_and_gradients(checkpointing):
    assert_close_compiled(compiled_ift_loss_and_grads(checkpointing),
                          compiled_ift_loss_and_grads(checkpointing=False, compiled=False))


@pytest.mark.integration
def test_a_run_with_packing_chunked_head_and_compile_equals_a_plain_run(tmp_path):
    """The trainer's wiring of the three options (and packing's token counts) in a short run."""
    plain = run_inprocess(tmp_path / "plain", *FAST, "loss_chunk_tokens=null")
    fast = run_inprocess(tmp_path / "fast", *FAST, "packing=true", "loss_chunk_tokens=3", "compile=true",
                         "compile_backend=aot_eager")
    assert len(plain) == len(fast) > 2
    for ra, rb in zip(plain, fast):
        for key in ra:
            if key not in ("step_time_s", "tokens_per_s", "tflops", "mfu", "split"):  # timings
                assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), key
