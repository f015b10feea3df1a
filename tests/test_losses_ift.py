"""IFT (docs/ift_spec.md) and SFT: Relation Propagation weights, the discounted cumulative sum, the lambda
schedule, and the losses on a tiny random Mistral.

Every expected value comes from a brute-force float64 computation written here straight from the
spec (Python loops, full-vocabulary log-softmax, inputs_embeds), never from losses.py's own output.
"""

import itertools
import math

import numpy as np
import pytest
import torch

import forward
import losses
from forward import ModelCall
from training import scan

from conftest import ift_loss, sft_loss, tiny_model

GAMMAS = (0.0, 0.5, 0.95, 1.0)
COMBOS = list(itertools.product(losses.PROPAGATION_SIDES, losses.PROPAGATION_NORMS, losses.PROPAGATION_TYPES, GAMMAS))


# ------------------------------------------------------------------ brute-force references

pytestmark = pytest.mark.unit


def reference_row_weights(l_row, m_row, gamma, ptype, side, norm):
    """Spec §2 for one row, with Python loops over 0-dim float64 tensors (so autograd can follow).

    l_row: list of 0-dim tensors (log-probs). m_row: list of bool. Returns a list of 0-dim tensors.
    """
    size = len(m_row)
    zero, one = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    targets = [t for t in range(size) if m_row[t]]
    n = len(targets)
    if n == 0:
        return [zero] * size
    if gamma == 0:  # §2.1
        return [one if m else zero for m in m_row]
    # §2.2
    a = []
    for t in range(size):
        if not m_row[t]:
            a.append(zero)
        elif ptype == "loss":
            a.append(-l_row[t] / n)
        elif ptype == "mask":
            a.append(one)
        else:
            a.append(-l_row[t])
    # §2.3, the double sum as written (Python's 0 ** 0 == 1)
    c = []
    for t in range(size):
        if side == "left":
            c.append(sum((gamma ** (k - t) * a[k] for k in range(t, size)), zero))
        else:
            c.append(sum((gamma ** (t - k) * a[k] for k in range(0, t + 1)), zero))
    # §2.4
    if side == "right":
        positives = [c[t] for t in targets if c[t] > 0]
        shift = min(positives) if positives else zero
        c = [ct + shift for ct in c]
    value = {}
    for t in targets:
        ct = c[t]
        if side == "left":
            value[t] = {"L1": ct, "L2": ct ** 2, "softmax": ct, "log": torch.log(1 + ct)}[norm]
        else:
            value[t] = {"L1": 1 / ct, "L2": 1 / ct ** 2, "softmax": 1 / ct, "log": 1 / torch.log(1 + ct)}[norm]
    if norm == "softmax":
        peak = max(value.values())
        exps = {t: torch.exp(v - peak) for t, v in value.items()}
        total = sum(exps.values())
        value = {t: e / total for t, e in exps.items()}
    # §2.5
    total = sum(value.values())
    if total == 0 or not torch.isfinite(total):
        return [one if m else zero for m in m_row]
    return [value[t] * n / total if m_row[t] else zero for t in range(size)]


def reference_weights(logps, mask, gamma, ptype, side, norm):
    """reference_row_weights for each row of logps (B, L) float64 tensor; returns (B, L)."""
    rows = []
    for b in range(logps.shape[0]):
        l_row = [logps[b, t] for t in range(logps.shape[1])]
        m_row = [bool(m) for m in mask[b]]
        rows.append(torch.stack(reference_row_weights(l_row, m_row, gamma, ptype, side, norm)))
    return torch.stack(rows)


def make_batch(dtype=torch.float64, seed=0):
    """Per-token log-probs (B=6, L=12) and a mask covering right padding, left padding, a row with no
    target, a row with two separate answer spans, a row whose log-probs are all 0 and a one-target row."""
    L = 12
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(6, L, dtype=torch.bool)
    mask[0, 2:7] = True             # prompt 0-1, answer 2-6, right padding 7-11
    mask[1, 6:] = True              # left padding 0-3, prompt 4-5, answer 6-11
    # row 2: no target at all
    mask[3, 1:4] = True             # two answer spans (multi-turn)
    mask[3, 7:10] = True
    mask[4, 3:9] = True             # all log-probs 0: the propagated loss is 0, weights fall back to 1
    mask[5, 5] = True               # one target
    logps = -(0.05 + 3.0 * torch.rand(6, L, generator=g, dtype=torch.float64))
    logps[4] = 0.0
    logps = torch.where(mask, logps, torch.zeros(()))
    return logps.to(dtype), mask


def gradient(w, x, upstream):
    """d sum(w * upstream) / dx; zeros when w does not depend on x at all (gamma = 0)."""
    if not w.requires_grad:
        return torch.zeros_like(x)
    return torch.autograd.grad((w * upstream).sum(), x, allow_unused=True, materialize_grads=True)[0]


# ------------------------------------------------------------------ relation_propagation_weights

@pytest.mark.parametrize("side,norm,ptype,gamma", COMBOS)
def test_weights_match_the_spec_loop_values_and_gradients(side, norm, ptype, gamma):
    logps, mask = make_batch(torch.float64)
    upstream = torch.randn(logps.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    ours_in = logps.clone().requires_grad_()
    w = losses.relation_propagation_weights(ours_in, mask, gamma, ptype, side, norm)
    ref_in = logps.clone().requires_grad_()
    w_ref = reference_weights(ref_in, mask, gamma, ptype, side, norm)

    assert w.shape == mask.shape and w.dtype == torch.float64
    torch.testing.assert_close(w, w_ref.detach(), rtol=1e-10, atol=1e-12)
    # The gradient flows through the weights (not detached), as the reference loop's autograd says.
    grad = gradient(w, ours_in, upstream)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, gradient(w_ref, ref_in, upstream), rtol=1e-8, atol=1e-10)
    # Each row sums to its target count; zero off the mask; the empty row is all zeros.
    torch.testing.assert_close(w.detach().sum(-1), mask.sum(-1).double(), rtol=1e-12, atol=1e-12)
    assert (w[~mask] == 0).all()
    assert (w[2] == 0).all()
    # The all-zero-loss row falls back to 1 on its mask where the loss/logps are propagated.
    if gamma > 0 and ptype != "mask":
        assert (w[4][mask[4]] == 1).all()


@pytest.mark.parametrize("side,norm,ptype,gamma", COMBOS)
def test_weights_in_float32_are_finite_and_close_to_the_loop(side, norm, ptype, gamma):
    logps, mask = make_batch(torch.float32, seed=2)
    x = logps.clone().requires_grad_()
    w = losses.relation_propagation_weights(x, mask, gamma, ptype, side, norm)
    assert w.dtype == torch.float32
    assert torch.isfinite(w).all() and torch.isfinite(gradient(w, x, torch.ones_like(w))).all()
    w_ref = reference_weights(logps.double(), mask, gamma, ptype, side, norm)
    torch.testing.assert_close(w.double(), w_ref, rtol=2e-5, atol=1e-6)


def test_weights_with_no_target_anywhere_are_zero_without_nan():
    logps = torch.zeros(3, 9, requires_grad=True)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for side, norm, ptype in itertools.product(losses.PROPAGATION_SIDES, losses.PROPAGATION_NORMS,
                                               losses.PROPAGATION_TYPES):
        w = losses.relation_propagation_weights(logps, mask, 0.95, ptype, side, norm)
        assert (w == 0).all()
        assert torch.isfinite(gradient(w, logps, torch.ones_like(w))).all()


def _row(n_targets, seed):
    g = torch.Generator().manual_seed(seed)
    return -(0.05 + 3.0 * torch.rand(n_targets, generator=g))


def _place(row_logps, length, start):
    """A (1, length) log-prob row and mask holding row_logps at positions start.."""
    logps = torch.zeros(1, length)
    mask = torch.zeros(1, length, dtype=torch.bool)
    logps[0, start:start + len(row_logps)] = row_logps
    mask[0, start:start + len(row_logps)] = True
    return logps, mask


@pytest.mark.parametrize("side,norm,ptype", list(itertools.product(
    losses.PROPAGATION_SIDES, losses.PROPAGATION_NORMS, losses.PROPAGATION_TYPES)))
def test_a_rows_weights_ignore_other_rows_padding_and_micro_batching(side, norm, ptype):
    gamma = 0.95
    answer = _row(7, seed=3)
    alone_l, alone_m = _place(answer, 7, 0)
    alone = losses.relation_propagation_weights(alone_l, alone_m, gamma, ptype, side, norm)[0]

    # The same answer after a prompt, with right padding and with (much) left padding, in a batch
    # with other rows whose losses are larger / smaller (the reference's batch-wide shift would move).
    right_l, right_m = _place(answer, 40, 2)
    left_l, left_m = _place(answer, 40, 31)
    other_l, other_m = _place(_row(20, seed=4) * 10, 40, 5)
    tiny_l, tiny_m = _place(_row(3, seed=5) * 1e-3, 40, 30)
    batch_l = torch.cat([right_l, other_l, left_l, tiny_l])
    batch_m = torch.cat([right_m, other_m, left_m, tiny_m])
    together = losses.relation_propagation_weights(batch_l, batch_m, gamma, ptype, side, norm)
    torch.testing.assert_close(together[0][right_m[0]], alone, rtol=1e-6, atol=0)
    torch.testing.assert_close(together[2][left_m[0]], alone, rtol=1e-6, atol=0)

    # Micro-batch split: two halves give the rows of the whole batch.
    halves = torch.cat([losses.relation_propagation_weights(batch_l[i:i + 2], batch_m[i:i + 2], gamma, ptype, side,
                                                            norm) for i in (0, 2)])
    torch.testing.assert_close(halves, together, rtol=1e-6, atol=0)


def test_weights_reject_unknown_options():
    logps, mask = make_batch()
    with pytest.raises(ValueError, match="propagation_norm"):
        losses.relation_propagation_weights(logps, mask, 0.9, propagation_norm="L3")
    with pytest.raises(ValueError, match="propagation_side"):
        losses.relation_propagation_weights(logps, mask, 0.9, propagation_side="both")
    with pytest.raises(ValueError, match="propagation_type"):
        losses.relation_propagation_weights(logps, mask, 0.9, propagation_type="probs")


# ------------------------------------------------------------------ discounted_cumsum

def loop_scan(x, gamma, reverse):
    """y_t = x_t + gamma * y_{t -/+ 1} in float64: a Python loop over T on NumPy columns."""
    x = np.asarray(x, dtype=np.float64)
    y = np.empty_like(x)
    acc = np.zeros(x.shape[0])
    order = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    for t in order:
        acc = x[:, t] + gamma * acc
        y[:, t] = acc
    return y


def scan_inputs(T, dtype):
    """Three rows: signed normal values (sums that cancel), positive values (the real use: losses)
    and values spread over six orders of magnitude."""
    g = torch.Generator().manual_seed(T)
    signed = torch.randn(T, generator=g, dtype=torch.float64)
    positive = torch.rand(T, generator=g, dtype=torch.float64) + 0.01
    spread = torch.rand(T, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-3, 4, (T,), generator=g)
    return torch.stack([signed, positive, spread]).to(dtype)


@pytest.mark.parametrize("T", [1, 7, 1000, 32768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_discounted_cumsum_is_exact_to_1e6_relative(T, dtype):
    x = scan_inputs(T, dtype)
    for gamma, reverse in itertools.product((0.0, 0.5, 0.95, 0.999, 1.0), (False, True)):
        y = scan.discounted_cumsum(x, gamma, reverse=reverse)
        assert y.shape == x.shape and y.dtype == dtype
        # Relative to the float64 loop on the very same (float32 or float64) inputs.
        expected = loop_scan(x.double().numpy(), gamma, reverse)
        relative = np.abs(y.double().numpy() - expected) / np.abs(expected)
        assert relative.max() <= 1e-6, (gamma, reverse, relative.max())


@pytest.mark.parametrize("block", [1, 2, 3, 128])
def test_discounted_cumsum_carries_across_any_block_size(block, monkeypatch):
    monkeypatch.setattr(scan, "SCAN_BLOCK", block)
    x = scan_inputs(257, torch.float64)
    for gamma, reverse in itertools.product((0.0, 0.5, 0.999, 1.0), (False, True)):
        expected = loop_scan(x.numpy(), gamma, reverse)
        np.testing.assert_allclose(scan.discounted_cumsum(x, gamma, reverse).numpy(), expected, rtol=1e-9, atol=1e-12)


def test_discounted_cumsum_formulas_on_a_small_case():
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    g = 0.5
    # reverse: y_t = sum_{k >= t} g^(k-t) x_k; forward: y_t = sum_{k <= t} g^(t-k) x_k.
    assert scan.discounted_cumsum(x, g, reverse=True).tolist() == [[1 + g * 2 + g * g * 3, 2 + g * 3, 3.0]]
    assert scan.discounted_cumsum(x, g, reverse=False).tolist() == [[1.0, 2 + g * 1, 3 + g * 2 + g * g * 1]]


@pytest.mark.parametrize("reverse", [False, True])
def test_discounted_cumsum_gradient_matches_the_loop(reverse):
    T, gamma = 300, 0.97  # crosses the 128-token block boundaries twice
    x = torch.randn(2, T, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    upstream = torch.randn(2, T, dtype=torch.float64, generator=torch.Generator().manual_seed(8))

    ours = x.clone().requires_grad_()
    (scan.discounted_cumsum(ours, gamma, reverse) * upstream).sum().backward()

    ref = x.clone().requires_grad_()
    acc, outs = torch.zeros(2, dtype=torch.float64), [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        acc = ref[:, t] + gamma * acc
        outs[t] = acc
    (torch.stack(outs, -1) * upstream).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ lambda

@pytest.mark.parametrize("step", [0, 50, 99])
def test_static_lambda_is_max_lambda(step):
    assert losses.scheduled_lambda(step, 100, 10, 0.0, 0.2, None) == 0.2


def test_linear_lambda_goes_from_min_at_the_first_step_to_max_at_the_last():
    S, lo, hi = 101, 0.1, 0.5
    assert losses.scheduled_lambda(0, S, 10, lo, hi, "linear") == pytest.approx(lo, abs=1e-15)
    assert losses.scheduled_lambda(50, S, 10, lo, hi, "linear") == pytest.approx(lo + (hi - lo) * 50 / 100, abs=1e-15)
    assert losses.scheduled_lambda(100, S, 10, lo, hi, "linear") == pytest.approx(hi, abs=1e-15)
    assert losses.scheduled_lambda(37, 80, 10, 0.0, 1.0, "linear") == pytest.approx(37 / 79, abs=1e-15)
    # One-step run: max(1, S - 1) keeps it finite.
    assert losses.scheduled_lambda(0, 1, 0, lo, hi, "linear") == pytest.approx(lo, abs=1e-15)


def test_warmup_lambda_ramps_over_the_warmup_steps_then_stays():
    S, W, lo, hi = 100, 20, 0.0, 0.4
    assert losses.scheduled_lambda(0, S, W, lo, hi, "warmup") == pytest.approx(lo, abs=1e-15)
    assert losses.scheduled_lambda(5, S, W, lo, hi, "warmup") == pytest.approx(hi * 5 / 20, abs=1e-15)
    assert losses.scheduled_lambda(20, S, W, lo, hi, "warmup") == pytest.approx(hi, abs=1e-15)
    assert losses.scheduled_lambda(50, S, W, lo, hi, "warmup") == pytest.approx(hi, abs=1e-15)
    assert losses.scheduled_lambda(99, S, W, lo, hi, "warmup") == pytest.approx(hi, abs=1e-15)
    # No warmup (W = 0): min(1, s / max(1, W)) is 0 at step 0 and 1 from step 1 on.
    assert losses.scheduled_lambda(0, S, 0, lo, hi, "warmup") == pytest.approx(lo, abs=1e-15)
    assert losses.scheduled_lambda(1, S, 0, lo, hi, "warmup") == pytest.approx(hi, abs=1e-15)


def test_unknown_lambda_schedule_is_an_error():
    with pytest.raises(ValueError, match="lambda_schedule"):
        losses.scheduled_lambda(0, 10, 1, 0.1, 0.2, "cosine")


def test_disturbed_lambda_is_a_function_of_seed_and_step():
    a = [losses.disturbed_lambda(0.3, 7, s, "normal", 0.5) for s in range(20)]
    b = [losses.disturbed_lambda(0.3, 7, s, "normal", 0.5) for s in reversed(range(20))][::-1]
    assert a == b  # reproducible, whatever was drawn before
    assert len(set(a)) == 20  # different across steps
    assert a != [losses.disturbed_lambda(0.3, 8, s, "normal", 0.5) for s in range(20)]  # and across seeds
    assert all(isinstance(v, float) for v in a)
    # Each value is lam * (1 + std * eps) for some eps: the eps behave like N(0, 1) draws.
    eps = np.array([(losses.disturbed_lambda(0.3, 1, s, "normal", 0.5) / 0.3 - 1) / 0.5 for s in range(400)])
    assert abs(eps.mean()) < 0.2 and 0.8 < eps.std() < 1.2


def test_disturbed_lambda_is_clipped_to_the_unit_interval():
    values = [losses.disturbed_lambda(0.9, 3, s, "normal", 5.0) for s in range(200)]
    assert min(values) == 0.0 and max(values) == 1.0
    assert all(0.0 <= v <= 1.0 for v in values)


def test_no_disturbance_is_the_identity():
    assert losses.disturbed_lambda(0.37, 1, 5, None, 0.5) == 0.37
    with pytest.raises(ValueError, match="lambda_disturb"):
        losses.disturbed_lambda(0.37, 1, 5, "uniform", 0.5)


def test_lambda_helpers_return_python_floats():
    assert isinstance(losses.scheduled_lambda(3, 10, 2, 0, 1, "linear"), float)
    assert math.isfinite(losses.disturbed_lambda(0.2, 0, 0, "normal", 0.5))


# ------------------------------------------------------------------ SFT and IFT on a tiny model

def tiny_batch():
    """B=4, T=10, pad id 0: right padding, left padding, a row without target, a row without padding."""
    g = torch.Generator().manual_seed(11)
    x = torch.randint(1, 64, (4, 10), generator=g)
    attention = torch.ones(4, 10, dtype=torch.long)
    labels = torch.full((4, 10), -100)
    x[0, 8:], attention[0, 8:] = 0, 0   # prompt 0-2, answer 3-7, right padding 8-9
    labels[0, 3:8] = x[0, 3:8]
    x[1, :3], attention[1, :3] = 0, 0   # left padding 0-2, prompt 3-4, answer 5-9
    labels[1, 5:] = x[1, 5:]
    x[2, 6:], attention[2, 6:] = 0, 0   # prompt only: no target
    labels[3, 1:] = x[3, 1:]            # prompt 0, answer 1-9
    return x, attention, labels


def count_forwards(model):
    """A list that grows by one per call of the model's root forward."""
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def reference_sft(model, x, attention, labels):
    """SFT from the spec: full float64 log-softmax; per-row mean NLL; mean over rows with targets."""
    logprobs = torch.log_softmax(model(input_ids=x, attention_mask=attention).logits.double(), -1)
    rows = []
    for b in range(x.shape[0]):
        nll = [-logprobs[b, t, labels[b, t + 1]] for t in range(x.shape[1] - 1) if labels[b, t + 1] != -100]
        if nll:
            rows.append(sum(nll) / len(nll))
    return sum(rows) / len(rows)


def reference_ift(model, x, attention, labels, lam, gamma, ptype, side, norm):
    """IFT from the spec, independently: the intuition pass on full logits, x' by a loop, the blend via
    inputs_embeds, a full float64 log-softmax, the weight loop above. Returns (loss, metrics)."""
    B, T = x.shape
    targets = [[labels[b, t + 1] != -100 for t in range(T - 1)] for b in range(B)]
    with torch.no_grad():
        truth = torch.log_softmax(model(input_ids=x, attention_mask=attention).logits.double(), -1)
    x_prime = x.clone()
    for b in range(B):
        for t in range(T - 1):
            if targets[b][t]:
                x_prime[b, t + 1] = truth[b, t].argmax()
    table = model.get_input_embeddings().weight
    blended = (1 - lam) * table[x] + lam * table[x_prime]
    logprobs = torch.log_softmax(model(inputs_embeds=blended, attention_mask=attention).logits.double(), -1)
    zero = torch.zeros((), dtype=torch.float64)
    rows, metrics = [], {"loss_sft": [], "loss_further": [], "weight_max": [], "weight_first": []}
    for b in range(B):
        l_row = [logprobs[b, t, labels[b, t + 1]] if targets[b][t] else zero for t in range(T - 1)]
        n = sum(targets[b])
        if n == 0:
            continue
        w = reference_row_weights(l_row, targets[b], gamma, ptype, side, norm)
        rows.append(sum(-l_row[t] * w[t] for t in range(T - 1) if targets[b][t]) / n)
        metrics["loss_sft"].append(sum(-truth[b, t, labels[b, t + 1]] for t in range(T - 1) if targets[b][t]) / n)
        metrics["loss_further"].append(sum(-l_row[t] for t in range(T - 1) if targets[b][t]).detach() / n)
        metrics["weight_max"].append(max(w[t].detach() for t in range(T - 1) if targets[b][t]))
        metrics["weight_first"].append(w[targets[b].index(True)].detach())
    loss = sum(rows) / len(rows)
    return loss, {"loss": loss.detach(), **{k: sum(v) / len(v) for k, v in metrics.items()}}, x_prime


IFT_CASES = [  # (lam, gamma, type, side, norm, tied embeddings)
    (0.2, 0.95, "loss", "left", "L1", False),
    (0.2, 0.95, "loss", "left", "L1", True),
    (0.5, 0.5, "logps", "right", "softmax", False),
    (1.0, 1.0, "mask", "right", "log", True),
    (0.3, 0.9, "loss", "right", "L2", False),
    (0.0, 0.95, "loss", "left", "log", False),
    (0.7, 0.0, "loss", "left", "L1", False),
]


@pytest.mark.parametrize("lam,gamma,ptype,side,norm,tie", IFT_CASES)
def test_ift_loss_value_and_every_gradient_match_an_independent_two_pass_computation(lam, gamma, ptype, side, norm,
                                                                                      tie):
    model = tiny_model(tie=tie)
    x, attention, labels = tiny_batch()
    calls = count_forwards(model)
    loss, metrics = ift_loss(model, x, attention, labels, lam, gamma, ptype, side, norm)
    assert len(calls) == (2 if lam > 0 else 1)  # lambda = 0 skips the intuition pass
    loss.backward()
    ours = grads(model)

    model.zero_grad()
    expected, expected_metrics, _ = reference_ift(model, x, attention, labels, lam, gamma, ptype, side, norm)
    expected.backward()
    theirs = grads(model)

    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    assert set(metrics) == {"loss", "loss_sft", "loss_further", "weight_max", "weight_first"}
    for key, value in expected_metrics.items():
        torch.testing.assert_close(metrics[key], value, rtol=1e-10, atol=1e-12, msg=key)
    # The embedding table trains (through both terms of the blend) and everything matches.
    assert ours["model.embed_tokens.weight"].abs().sum() > 0
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-8, atol=1e-11, msg=name)


def test_ift_at_lambda_0_gamma_0_is_sft_bit_for_bit():
    model = tiny_model()
    x, attention, labels = tiny_batch()
    calls = count_forwards(model)
    sft, sft_metrics = sft_loss(model, x, attention, labels)
    sft.backward()
    sft_grads = grads(model)
    model.zero_grad()
    ift, ift_metrics = ift_loss(model, x, attention, labels, lam=0.0, gamma=0.0)
    ift.backward()
    assert len(calls) == 2  # one forward each
    assert torch.equal(ift, sft)
    assert torch.equal(ift_metrics["loss_sft"], sft_metrics["loss"])
    assert torch.equal(ift_metrics["loss_further"], sft_metrics["loss"])
    for name, g in grads(model).items():
        assert torch.equal(g, sft_grads[name]), name


def test_sft_loss_matches_an_independent_float64_computation():
    model = tiny_model()
    x, attention, labels = tiny_batch()
    loss, metrics = sft_loss(model, x, attention, labels)
    expected = reference_sft(model, x, attention, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert metrics["loss"] == loss.detach() and not metrics["loss"].requires_grad


def test_intuitive_inputs_replace_only_answer_tokens_by_the_models_predictions():
    model = tiny_model()
    x, attention, labels = tiny_batch()
    x_prime, logps = ModelCall().intuition(model, x, attention, labels)
    _, _, expected = reference_ift(model, x, attention, labels, 0.5, 0.95, "loss", "left", "L1")
    assert torch.equal(x_prime, expected)
    answer = labels != -100  # x'[b, t+1] may differ from x only where y[b, t+1] is a target
    assert torch.equal(x_prime[~answer], x[~answer])
    assert torch.equal(x_prime[:, 0], x[:, 0])
    assert (x_prime[answer] != x[answer]).any()  # the model does predict something else somewhere
    assert not logps.requires_grad


def test_rows_without_targets_contribute_nothing_and_make_no_nan():
    model = tiny_model()
    x, attention, labels = tiny_batch()
    keep = [0, 1, 3]
    for lam in (0.0, 0.4):
        loss, _ = ift_loss(model, x, attention, labels, lam, 0.95, "loss", "right", "L1")
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad()
        without, _ = ift_loss(model, x[keep], attention[keep], labels[keep], lam, 0.95, "loss", "right", "L1")
        torch.testing.assert_close(loss, without, rtol=1e-10, atol=1e-12)
    # A batch with no target at all: loss 0, no NaN.
    empty = torch.full_like(labels, -100)
    loss, metrics = ift_loss(model, x, attention, empty, 0.4)
    loss.backward()
    assert loss.item() == 0.0 and all(torch.isfinite(v) for v in metrics.values())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_target_positions_only_returns_logits_at_the_target_positions_only():
    model = tiny_model()
    x, attention, labels = tiny_batch()
    mask = labels[:, 1:] != -100
    full = model(input_ids=x, attention_mask=attention).logits
    with forward.target_positions_only(model, mask):
        kept = model(input_ids=x, attention_mask=attention, use_cache=False).logits
    assert kept.shape == (1, int(mask.sum()), 64)
    torch.testing.assert_close(kept[0], full[:, :-1][mask], rtol=1e-12, atol=1e-12)
    # The hook is gone afterwards, also after an exception.
    assert model(input_ids=x, attention_mask=attention).logits.shape == (4, 10, 64)
    with pytest.raises(RuntimeError, match="boom"):
        with forward.target_positions_only(model, mask):
            raise RuntimeError("boom")
    assert model(input_ids=x, attention_mask=attention).logits.shape == (4, 10, 64)


def test_policy_logps_are_the_target_log_probs_with_zeros_off_the_mask():
    model = tiny_model()
    x, attention, labels = tiny_batch()
    logps, mask = ModelCall().logps(model, x, attention, labels)
    logprobs = torch.log_softmax(model(input_ids=x, attention_mask=attention).logits, -1)
    for b in range(4):
        for t in range(9):
            assert mask[b, t] == (labels[b, t + 1] != -100)
            expected = logprobs[b, t, labels[b, t + 1]] if mask[b, t] else torch.tensor(0.0, dtype=torch.float64)
            torch.testing.assert_close(logps[b, t], expected, rtol=1e-12, atol=1e-12)


def test_gather_logps_is_float32_for_half_precision_logits():
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    targets = torch.arange(5)
    got = forward.gather_logps(logits, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.log_softmax(logits.double(), -1)[torch.arange(5), targets].float())


def test_row_mean_is_zero_for_rows_without_targets_even_with_nan_off_the_mask():
    values = torch.tensor([[1.0, 2.0, float("nan")], [float("nan"), 5.0, 7.0], [3.0, 3.0, 3.0]])
    mask = torch.tensor([[True, True, False], [False, False, False], [False, True, True]])
    assert losses.row_mean(values, mask).tolist() == [1.5, 0.0, 3.0]
