"""DFT and SimPO against closed forms computed here in float64: the pure SimPO function, its gradient,
and both losses through batch_loss on a tiny random Mistral (log-probs from an independent full
log-softmax loop)."""

import math

import pytest
import torch
from test_losses_preference import log_sigmoid, pair_batch, sft_batch, summed_logps

import losses

from conftest import tiny_model

C = [-1.0, -0.25, -3.0, -2.0]   # per-token mean log-probs of the chosen answers
R = [-1.5, -0.20, -1.0, -2.0]   # and of the rejected ones


pytestmark = pytest.mark.unit


def t(values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("beta, gamma_margin", [(2.0, 1.0), (0.5, 0.0), (10.0, 3.0)])
def test_simpo_loss_and_rewards_match_the_closed_form(beta, gamma_margin):
    chosen, rejected = t(C).requires_grad_(), t(R)
    got, chosen_rewards, rejected_rewards = losses.simpo_loss(chosen, rejected, beta, gamma_margin)
    expected = [-log_sigmoid(beta * (c - r) - gamma_margin) for c, r in zip(C, R)]
    torch.testing.assert_close(got, t(expected), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, t([beta * c for c in C]), rtol=1e-12, atol=0)
    torch.testing.assert_close(rejected_rewards, t([beta * r for r in R]), rtol=1e-12, atol=0)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    # d/dc of -log σ(z), z = β(c - r) - γ: -β · σ(-z)
    got.sum().backward()
    sigma = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    torch.testing.assert_close(chosen.grad, t([-beta * sigma(-(beta * (c - r) - gamma_margin)) for c, r in zip(C, R)]),
                               rtol=1e-12, atol=1e-12)


def test_simpo_through_batch_loss_uses_per_token_mean_log_probs():
    policy = tiny_model()
    batch = pair_batch()
    cfg = {"name": "simpo", "beta": 2.0, "gamma_margin": 0.5}
    out = losses.batch_loss(losses.build(cfg), policy, None, batch, losses.ONE_STEP)
    row_losses, valid, metrics = out.row_losses, out.valid, out.metrics
    assert valid.tolist() == [True, True, False] and row_losses[2] == 0
    parts = lambda side: [batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels")]  # noqa: E731
    with torch.no_grad():
        (pc, nc), (pr, nr) = summed_logps(policy, *parts("chosen")), summed_logps(policy, *parts("rejected"))
    for b in range(2):
        c, r = (pc[b] / nc[b]).item(), (pr[b] / nr[b]).item()
        assert row_losses[b].item() == pytest.approx(-log_sigmoid(2.0 * (c - r) - 0.5), rel=1e-9)
        assert metrics["rewards_margin"][b].item() == pytest.approx(2.0 * (c - r), rel=1e-9)
    assert losses.build(cfg).needs_pairs and not losses.build(cfg).needs_reference


def test_dft_loss_and_gradient_match_a_float64_loop():
    """Row loss sum_t -sg(p_t) log p_t / n, and the gradient of exactly that (p_t held constant)."""
    policy, twin = tiny_model(), tiny_model()
    batch = sft_batch()
    out = losses.batch_loss(losses.build({"name": "dft"}), policy, None, batch, losses.ONE_STEP)
    row_losses, valid, metrics = out.row_losses, out.valid, out.metrics
    assert valid.all() and set(metrics) == {"loss", "nll", "weight_mean"}
    row_losses.sum().backward()

    logprobs = torch.log_softmax(twin(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    expected = []
    for b in range(3):
        terms = [logprobs[b, i, batch["labels"][b, i + 1]] for i in range(8) if batch["labels"][b, i + 1] != -100]
        expected.append(sum(-math.exp(lp.item()) * lp for lp in terms) / len(terms))
        assert metrics["nll"][b].item() == pytest.approx(-sum(lp.item() for lp in terms) / len(terms), rel=1e-10)
        assert metrics["weight_mean"][b].item() == pytest.approx(
            sum(math.exp(lp.item()) for lp in terms) / len(terms), rel=1e-10)
    torch.testing.assert_close(row_losses.detach(), torch.stack(expected).detach(), rtol=1e-10, atol=1e-12)
    torch.stack(expected).sum().backward()
    for p, q in zip(policy.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12)
