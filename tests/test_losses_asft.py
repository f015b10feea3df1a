"""ASFT (loss=asft) against brute-force float64 computations: the chunked target-log-prob + full-vocabulary
KL head and its gradients against a full log-softmax, and the loss through batch_loss on tiny random
Mistrals against a loop over a full float64 log-softmax of both models, gradients included.

Tolerances: everything runs in float64 (about 1e-16 relative per operation); a chunked log-sum-exp and a
sum of V = 64 (head tests: V = 50) terms against the same sums done at once differ by a few ulps, so
rtol 1e-10 leaves a margin of about 10^5 while any error in the formulas (a missing term, a wrong sign,
the other KL direction) is of the order of the values themselves."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from test_losses_preference import sft_batch

import forward
import losses
from forward import ModelCall
from training import config_schema, flops
from utils import ConfigError

from conftest import tiny_model

pytestmark = pytest.mark.unit


def brute_force_head(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias):
    """(N, 2): log p(target) and KL(p_ref || p) from full (N, V) log-softmaxes, autograd for the gradients."""
    logp = torch.log_softmax(hidden @ weight.T + (0 if bias is None else bias), -1)
    ref_logp = torch.log_softmax(ref_hidden @ ref_weight.T + (0 if ref_bias is None else ref_bias), -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return torch.stack([logp.gather(-1, targets[:, None]).squeeze(-1), kl], -1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])  # one position per chunk, uneven chunks, exact fit, one chunk
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_kl_head_matches_a_full_log_softmax_in_values_and_gradients(chunk, bias):
    g = torch.Generator().manual_seed(chunk)
    N, H, V = 7, 6, 50
    new = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    hidden, weight = new(N, H).requires_grad_(), new(V, H).requires_grad_()
    b = new(V).requires_grad_() if bias else None
    ref_hidden, ref_weight, ref_bias = new(N, H), new(V, H), new(V) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    upstream = new(N, 2)  # both outputs' gradients at once: the two terms of the backward formula

    got = forward.TargetLogpsAndKL.apply(hidden[None], weight, b, targets[None], ref_hidden, ref_weight, ref_bias,
                                         chunk)[0]
    assert got.shape == (N, 2) and got.dtype == torch.float64
    grads = torch.autograd.grad((got * upstream).sum(), [hidden, weight] + ([b] if bias else []))

    leaves = [t.detach().clone().requires_grad_() for t in [hidden, weight] + ([b] if bias else [])]
    expected = brute_force_head(leaves[0], leaves[1], leaves[2] if bias else None, targets, ref_hidden, ref_weight,
                                ref_bias)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert (got[:, 1] > 0).all()  # different heads: a KL is positive
    for mine, theirs in zip(grads, torch.autograd.grad((expected * upstream).sum(), leaves)):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


def test_the_kl_is_zero_with_its_gradient_when_the_policy_head_is_the_reference_head():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g,
                                                                                       dtype=torch.float64)
    leaf = hidden.clone().requires_grad_()
    got = forward.TargetLogpsAndKL.apply(leaf[None], weight, None, torch.zeros(1, 5, dtype=torch.long), hidden,
                                         weight, None, 2)[0]
    (grad,) = torch.autograd.grad(got[:, 1].sum(), leaf)
    torch.testing.assert_close(got[:, 1], torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-14)


def expected_rows(policy, reference, batch, kl_weight):
    """(row losses (B,), kl (B,)): Σ_t [−sg(p_t) log p_t + kl_weight KL(π_ref ‖ π_θ)_t] / n by a loop over a full
    float64 log-softmax of each model's logits (the reference's without gradient)."""
    ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    logp = torch.log_softmax(policy(input_ids=ids, attention_mask=attention).logits, -1)
    with torch.no_grad():
        ref_logp = torch.log_softmax(reference(input_ids=ids, attention_mask=attention).logits, -1)
    rows, kls = [], []
    for b in range(ids.shape[0]):
        terms, kl_terms = [], []
        for t in range(ids.shape[1] - 1):
            if labels[b, t + 1] == -100:
                continue
            lp = logp[b, t, labels[b, t + 1]]
            kl = sum(ref_logp[b, t, v].exp() * (ref_logp[b, t, v] - logp[b, t, v]) for v in range(logp.shape[-1]))
            terms.append(-math.exp(lp.item()) * lp + kl_weight * kl)
            kl_terms.append(kl.item())
        rows.append(sum(terms) / len(terms))
        kls.append(sum(kl_terms) / len(kl_terms))
    return torch.stack(rows), torch.tensor(kls, dtype=torch.float64)


@pytest.mark.parametrize("call", [ModelCall(), ModelCall(loss_chunk_tokens=2), ModelCall(loss_chunk_tokens=None),
                                  ModelCall(loss_chunk_tokens=3, packing=True)], ids=["default", "chunk2", "one-chunk",
                                                                                     "packed"])
def test_asft_rows_and_gradients_match_a_float64_loop_over_both_models(call):
    policy, twin, reference = tiny_model(seed=0), tiny_model(seed=0), tiny_model(seed=1)
    batch = sft_batch()
    loss = losses.build({"name": "asft", "kl_weight": 0.3})
    assert loss.needs_reference and not loss.needs_pairs
    out = losses.batch_loss(loss, policy, reference, batch, losses.ONE_STEP, call)
    assert out.valid.all() and set(out.metrics) == {"loss", "nll", "weight_mean", "kl"}
    out.row_losses.sum().backward()

    expected, kl = expected_rows(twin, reference, batch, 0.3)
    torch.testing.assert_close(out.row_losses.detach(), expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.metrics["kl"], kl, rtol=1e-10, atol=1e-12)
    expected.sum().backward()
    for p, q in zip(policy.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12)
    assert all(p.grad is None for p in reference.parameters())


def test_kl_weight_zero_is_dft_and_a_reference_equal_to_the_policy_adds_nothing():
    batch = sft_batch()
    dft = losses.batch_loss(losses.build({"name": "dft"}), tiny_model(), None, batch, losses.ONE_STEP)
    for kl_weight, reference in ((0.0, tiny_model(seed=1)), (0.5, tiny_model(seed=0))):
        out = losses.batch_loss(losses.build({"name": "asft", "kl_weight": kl_weight}), tiny_model(), reference,
                                batch, losses.ONE_STEP)
        torch.testing.assert_close(out.row_losses, dft.row_losses, rtol=1e-12, atol=1e-14)
    assert out.metrics["kl"].abs().max() < 1e-14  # the same weights: KL 0


def test_asft_without_a_reference_or_with_precomputed_reference_sums_is_refused():
    with pytest.raises(ValueError, match="needs a reference"):
        losses.batch_loss(losses.build({"name": "asft"}), tiny_model(), None, sft_batch(), losses.ONE_STEP)
    cfg = OmegaConf.create({"device": "cpu", "reference_logps": "precompute", "loss": {"name": "asft"},
                            "model": {"policy_dtype": "float32"}})
    with pytest.raises(ConfigError, match="reference_logps=live"):
        config_schema.check_run(cfg, 1)


def test_flops_count_both_recomputed_heads_at_the_answer_tokens():
    shape = flops.Shape(body=1000, head=640, attn_width=8, windows=(None,))
    tokens, targets = [10, 6], [4, 3]
    base = flops.call_flops(shape, tokens, targets, no_grad_passes=1, head_chunk=512)
    asft = flops.call_flops(shape, tokens, targets, no_grad_passes=1, head_chunk=512,
                            head_recomputes=losses.build({"name": "asft"}).head_recomputes)
    assert asft - base == 2 * 2 * 640 * 7  # two heads' logits at the 7 answer tokens, 2 FLOPs per MAC
