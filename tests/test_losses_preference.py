"""DPO / cDPO / IPO and ORPO: the pure functions of log-probs against closed forms computed here;
ModelCall.pair_logps and batch_loss (every loss name) on a tiny random Mistral."""

import math

import pytest
import torch
from omegaconf import OmegaConf

import losses
from forward import ModelCall

from conftest import tiny_model

PC = [-10.0, -3.5, -40.0, -7.25]  # policy chosen (summed log-probs)
PR = [-12.0, -3.0, -20.0, -7.25]  # policy rejected
RC = [-11.0, -4.0, -35.0, -6.0]   # reference chosen
RR = [-11.5, -2.0, -22.0, -9.0]   # reference rejected


pytestmark = pytest.mark.unit


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(z):
    """log(1 / (1 + e^-z)), computed stably in plain Python."""
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def margins(reference_free=False):
    return [(pc - pr) - (0.0 if reference_free else (rc - rr)) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_rewards_match_the_closed_form(beta):
    got, chosen_rewards, rejected_rewards = losses.preference_loss(t(PC), t(PR), t(RC), t(RR), beta)
    expected = [-log_sigmoid(beta * h) for h in margins()]
    torch.testing.assert_close(got, t(expected), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, t([beta * (pc - rc) for pc, rc in zip(PC, RC)]), rtol=1e-12, atol=0)
    torch.testing.assert_close(rejected_rewards, t([beta * (pr - rr) for pr, rr in zip(PR, RR)]), rtol=1e-12, atol=0)


def test_cdpo_mixes_both_label_directions():
    beta, eps = 0.1, 0.1
    got, _, _ = losses.preference_loss(t(PC), t(PR), t(RC), t(RR), beta, label_smoothing=eps)
    expected = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in margins()]
    torch.testing.assert_close(got, t(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_loss_matches_the_closed_form(beta):
    got, _, _ = losses.preference_loss(t(PC), t(PR), t(RC), t(RR), beta, loss_type="ipo")
    expected = [(h - 1 / (2 * beta)) ** 2 for h in margins()]
    torch.testing.assert_close(got, t(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo"])
def test_reference_free_drops_the_reference_margin(loss_type):
    beta = 0.2
    got, _, _ = losses.preference_loss(t(PC), t(PR), t(RC), t(RR), beta, loss_type=loss_type, reference_free=True)
    if loss_type == "dpo":
        expected = [-log_sigmoid(beta * h) for h in margins(reference_free=True)]
    else:
        expected = [(h - 1 / (2 * beta)) ** 2 for h in margins(reference_free=True)]
    torch.testing.assert_close(got, t(expected), rtol=1e-12, atol=1e-12)


def test_rewards_are_detached_and_the_loss_is_not():
    pc = t(PC).requires_grad_()
    got, chosen_rewards, rejected_rewards = losses.preference_loss(pc, t(PR), t(RC), t(RR), 0.1)
    assert got.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    got.sum().backward()
    # d/dpc of -log sigmoid(beta h) = -beta * sigmoid(-beta h)
    expected = [-0.1 / (1 + math.exp(0.1 * h)) for h in margins()]
    torch.testing.assert_close(pc.grad, t(expected), rtol=1e-12, atol=1e-12)


def test_unknown_preference_loss_type_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="dpo.*ipo"):
        losses.preference_loss(t(PC), t(PR), t(RC), t(RR), 0.1, loss_type="kto")


# ------------------------------------------------------------------ ORPO

def orpo_closed_form(c, r, beta):
    """(loss, log odds ratio); 1 - e^x is written -expm1(x) so that it stays exact near x = 0."""
    log_odds = (c - math.log(-math.expm1(c))) - (r - math.log(-math.expm1(r)))
    return -c - beta * log_sigmoid(log_odds), log_odds


def test_orpo_loss_and_log_odds_match_the_closed_form():
    chosen, rejected, beta = [-0.5, -1.2, -3.0, -0.01], [-0.9, -0.4, -3.0, -2.0], 0.1
    got = losses.orpo_loss(t(chosen), t(rejected), beta)
    expected = [orpo_closed_form(c, r, beta) for c, r in zip(chosen, rejected)]
    torch.testing.assert_close(got, t([e[0] for e in expected]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses.orpo_log_odds(t(chosen), t(rejected)), t([e[1] for e in expected]),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_is_finite_near_zero_and_at_very_negative_log_probs(dtype):
    chosen = torch.tensor([-1e-12, -1e-12, -1e4, -60.0, 0.0], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-1.0, -1e-12, -1e-12, -1e4, -0.5], dtype=dtype, requires_grad=True)
    got = losses.orpo_loss(chosen, rejected, 0.1)
    assert torch.isfinite(got).all()
    got.sum().backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    # At -1e-12, log(1 - e^x) = log(-expm1(x)) is log(1e-12), not log(0) = -inf.
    expected = orpo_closed_form(-1e-12, -1.0, 0.1)[0]
    assert got[0].item() == pytest.approx(expected, rel=1e-5)
    assert losses.orpo_log_odds(chosen, rejected)[0].item() == pytest.approx(
        orpo_closed_form(-1e-12, -1.0, 0.1)[1], rel=1e-5)


# ------------------------------------------------------------------ models: pair_logps, batch_loss

def pair_batch():
    """B=3 preference pairs, both sides right-padded to T=9; pair 2's rejected answer has no target."""
    g = torch.Generator().manual_seed(5)
    batch = {}
    answers = {"chosen": [(3, 8), (2, 9), (4, 6)], "rejected": [(3, 6), (2, 9), None]}  # [start, end) per row
    for side, spans in answers.items():
        ids = torch.randint(1, 64, (3, 9), generator=g)
        attention = torch.ones(3, 9, dtype=torch.long)
        labels = torch.full((3, 9), -100)
        for b, span in enumerate(spans):
            end = span[1] if span else 5
            ids[b, end:], attention[b, end:] = 0, 0
            if span:
                labels[b, span[0]:span[1]] = ids[b, span[0]:span[1]]
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_labels": labels})
    return batch


def summed_logps(model, ids, attention, labels):
    """(sum of target log-probs (B,), target count (B,)) from a full float64 log-softmax, by a loop."""
    logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.double(), -1)
    sums, counts = [], []
    for b in range(ids.shape[0]):
        terms = [logprobs[b, t, labels[b, t + 1]] for t in range(ids.shape[1] - 1) if labels[b, t + 1] != -100]
        sums.append(sum(terms) if terms else torch.tensor(0.0, dtype=torch.float64))
        counts.append(len(terms))
    return torch.stack(sums), torch.tensor(counts)


def test_pair_logps_is_one_forward_of_2B_rows_equal_to_two_separate_ones():
    model = tiny_model()
    batch = pair_batch()
    rows_seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: rows_seen.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    got = ModelCall().pair_logps(model, batch)
    assert rows_seen == [6]
    for side in ("chosen", "rejected"):
        sums, counts = summed_logps(model, *(batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels")))
        torch.testing.assert_close(getattr(got, side), sums, rtol=1e-10, atol=1e-12)
        assert torch.equal(getattr(got, f"{side}_n"), counts)


METRICS = {
    "sft": {"loss"},
    "ift": {"loss", "loss_sft", "loss_further", "weight_max", "weight_first"},
    "dpo": {"loss", "rewards_chosen", "rewards_rejected", "rewards_accuracy", "rewards_margin", "logps_chosen",
            "logps_rejected"},
    "orpo": {"loss", "nll", "log_odds_ratio", "logps_chosen", "logps_rejected"},
}
METRICS["ipo"] = METRICS["dpo"]

CONFIGS = {
    "sft": {"name": "sft"},
    "ift": {"name": "ift", "gamma": 0.95, "propagation_type": "loss", "propagation_side": "left",
            "propagation_norm": "L1", "min_lambda": 0.2, "max_lambda": 0.2},
    "dpo": {"name": "dpo", "beta": 0.1, "label_smoothing": 0.1, "reference_free": False},
    "ipo": {"name": "ipo", "beta": 0.1, "reference_free": False},
    "orpo": {"name": "orpo", "beta": 0.1},
}


def sft_batch():
    batch = pair_batch()
    return {k.removeprefix("chosen_"): v for k, v in batch.items() if k.startswith("chosen_")}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("as_omegaconf", [False, True])
def test_batch_loss_returns_rows_with_gradient_and_the_listed_metrics(name, as_omegaconf):
    cfg = OmegaConf.create(CONFIGS[name]) if as_omegaconf else CONFIGS[name]
    policy, reference = tiny_model(seed=0), tiny_model(seed=1)
    batch = pair_batch() if losses.build(cfg).needs_pairs else sft_batch()
    needs_reference = losses.build(cfg).needs_reference
    out = losses.batch_loss(losses.build(cfg), policy, reference if needs_reference else None, batch, losses.ONE_STEP)
    assert isinstance(out, losses.LossOutput)
    row_losses, valid, metrics = out.row_losses, out.valid, out.metrics
    assert row_losses.shape == (3,) and row_losses.requires_grad
    assert valid.dtype == torch.bool and valid.tolist() == ([True, True, False] if losses.build(cfg).needs_pairs else
                                                            [True, True, True])
    assert row_losses[~valid].eq(0).all() and torch.isfinite(row_losses).all()
    assert set(metrics) == METRICS[name]
    for value in metrics.values():
        assert value.shape == (3,) and value.is_floating_point() and not value.requires_grad
        assert torch.isfinite(value).all()
    (row_losses * valid).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    assert all(p.grad is None for p in reference.parameters())


def test_batch_loss_dpo_rows_equal_the_closed_form_on_independent_log_probs():
    cfg = CONFIGS["dpo"]
    policy, reference = tiny_model(seed=0), tiny_model(seed=1)
    batch = pair_batch()
    out = losses.batch_loss(losses.build(cfg), policy, reference, batch, losses.ONE_STEP)
    row_losses, metrics = out.row_losses, out.metrics
    parts = lambda side: [batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels")]  # noqa: E731
    with torch.no_grad():
        pc, _ = summed_logps(policy, *parts("chosen"))
        pr, _ = summed_logps(policy, *parts("rejected"))
        rc, _ = summed_logps(reference, *parts("chosen"))
        rr, _ = summed_logps(reference, *parts("rejected"))
    beta, eps = 0.1, 0.1
    for b in range(2):
        h = (pc[b] - pr[b]).item() - (rc[b] - rr[b]).item()
        expected = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
        assert row_losses[b].item() == pytest.approx(expected, rel=1e-9)
        chosen_reward, rejected_reward = beta * (pc[b] - rc[b]).item(), beta * (pr[b] - rr[b]).item()
        assert metrics["rewards_chosen"][b].item() == pytest.approx(chosen_reward, rel=1e-9)
        margin = chosen_reward - rejected_reward
        assert metrics["rewards_margin"][b].item() == pytest.approx(margin, rel=1e-9, abs=1e-12)
        assert metrics["rewards_accuracy"][b].item() == float(chosen_reward > rejected_reward)
        assert metrics["logps_chosen"][b].item() == pytest.approx(pc[b].item(), rel=1e-9)


def test_batch_loss_orpo_rows_use_per_token_mean_log_probs():
    policy = tiny_model(seed=0)
    batch = pair_batch()
    out = losses.batch_loss(losses.build(CONFIGS["orpo"]), policy, None, batch, losses.ONE_STEP)
    row_losses, metrics = out.row_losses, out.metrics
    parts = lambda side: [batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels")]  # noqa: E731
    with torch.no_grad():
        pc, nc = summed_logps(policy, *parts("chosen"))
        pr, nr = summed_logps(policy, *parts("rejected"))
    for b in range(2):
        c, r = pc[b].item() / nc[b].item(), pr[b].item() / nr[b].item()
        loss, log_odds = orpo_closed_form(c, r, 0.1)
        assert row_losses[b].item() == pytest.approx(loss, rel=1e-9)
        assert metrics["nll"][b].item() == pytest.approx(-c, rel=1e-9)
        assert metrics["log_odds_ratio"][b].item() == pytest.approx(log_odds, rel=1e-9)


def test_which_losses_need_a_reference_model_and_pairs():
    assert [losses.build(CONFIGS[n]).needs_reference for n in CONFIGS] == [False, False, True, True, False]
    assert [losses.build(CONFIGS[n]).needs_pairs for n in CONFIGS] == [False, False, True, True, True]
    assert not losses.build({"name": "dpo", "beta": 0.1, "reference_free": True}).needs_reference
    assert not losses.build(OmegaConf.create({"name": "ipo", "beta": 0.1, "reference_free": True})).needs_reference


def test_reduce_rows_sums_the_valid_rows_and_counts_them():
    """The trainer's one reduction: a NaN on an invalid row never enters."""
    rows = torch.tensor([1.5, float("nan"), 2.0, 4.0], requires_grad=True)
    valid = torch.tensor([True, False, True, False])
    loss_sum, sums, count = losses.reduce_rows(rows, valid, {"loss": rows.detach(), "x": torch.tensor([1., 2, 3, 4])})
    assert loss_sum.item() == 3.5 and count.item() == 2 and sums["loss"].item() == 3.5 and sums["x"].item() == 4.0
    loss_sum.backward()
    assert rows.grad.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert not sums["loss"].requires_grad


def test_build_rejects_an_unknown_loss_and_batch_loss_a_missing_reference():
    with pytest.raises(ValueError, match="sft.*ift.*dpo.*ipo.*orpo"):
        losses.build({"name": "kto"})
    with pytest.raises(ValueError, match="loss.gamma must be a number, got None"):  # null is never the default
        losses.build({"name": "ift", "gamma": None})
    with pytest.raises(ValueError, match="unknown config key 'loss.gamma'.*keys of loss=sft: none"):
        losses.build({"name": "sft", "gamma": 0.9})
    with pytest.raises(ValueError, match="reference"):
        losses.batch_loss(losses.build(CONFIGS["dpo"]), tiny_model(), None, pair_batch(), losses.ONE_STEP)


@pytest.mark.parametrize("config", [CONFIGS["sft"], OmegaConf.create(CONFIGS["dpo"])])
def test_batch_loss_takes_a_loss_not_its_config(config):
    """One form: a config is built into a Loss first (losses.build), where its keys are checked."""
    with pytest.raises(TypeError, match="batch_loss takes a losses.Loss"):
        losses.batch_loss(config, tiny_model(), None, sft_batch(), losses.ONE_STEP)


def test_a_pair_loss_given_single_answers_says_so():
    with pytest.raises(ValueError, match="pairs got a batch of single answers"):
        losses.batch_loss(losses.build(CONFIGS["orpo"]), tiny_model(), None, sft_batch(), losses.ONE_STEP)
