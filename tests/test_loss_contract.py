"""The contract between the trainer and a loss: the loss receives the step's facts (losses.StepInfo) and
returns a losses.LossOutput; IFT's λ (spec §1) is computed inside IFT from the StepInfo, and the trainer
holds nothing IFT-specific. The data layer (training/batching.py) owns the batch's key names."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from test_losses_preference import pair_batch, sft_batch

import losses
from forward import ModelCall
from training import batching

from conftest import tiny_model

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- λ from the StepInfo (spec §1)

def spec_lambda(s, S, W, seed, lo, hi, schedule, disturb, std, training):
    """Spec §1 written out for step s (0-based) of S, W warm-up steps. The noise: ε ~ N(0, 1) from a CPU
    generator seeded by (seed * 1_000_003 + s) mod 2^63, losses.disturbed_lambda's documented seeding."""
    if schedule is None:
        lam = hi
    elif schedule == "linear":
        lam = lo + (hi - lo) * s / max(1, S - 1)
    else:
        lam = lo + (hi - lo) * min(1, s / max(1, W))
    if training and disturb == "normal":
        g = torch.Generator().manual_seed((seed * 1_000_003 + s) % 2 ** 63)
        eps = torch.randn((), generator=g, dtype=torch.float64).item()
        lam = min(1.0, max(0.0, lam * (1 + std * eps)))
    return lam


GRID = [(schedule, disturb) for schedule in (None, "linear", "warmup") for disturb in (None, "normal")]


@pytest.mark.parametrize("schedule, disturb", GRID)
@pytest.mark.parametrize("training", [True, False])
def test_ift_computes_the_spec_lambda_from_the_step_info(schedule, disturb, training):
    S, W, seed, lo, hi, std = 23, 7, 11, 0.1, 0.6, 0.5
    ift = losses.build({"name": "ift", "min_lambda": lo, "max_lambda": hi, "lambda_schedule": schedule,
                        "lambda_disturb": disturb, "disturb_std": std})
    for s in range(S):
        info = losses.StepInfo(step=s, total_steps=S, warmup_steps=W, seed=seed, training=training)
        lam = ift.lambda_of(info)
        # The closed form groups (hi - lo) * s / (S - 1) differently from the code, and the noise multiplies
        # it once more: a few roundings of <= 2^-53 relative on values <= 1, far below 1e-15.
        expected = spec_lambda(s, S, W, seed, lo, hi, schedule, disturb, std, training)
        assert lam == pytest.approx(expected, abs=1e-15, rel=0), (s, schedule, disturb, training)
        # ... and exactly what the trainer logged before λ moved inside IFT: the schedule, then the noise in training
        old = losses.scheduled_lambda(s, S, W, lo, hi, schedule)
        old = losses.disturbed_lambda(old, seed, s, disturb, std) if training else old
        assert lam == old
        assert ift.scalars(info) == {"lambda": lam}  # what metrics.jsonl's `lambda` holds


def test_the_noise_is_drawn_only_in_training_and_per_seed_and_step():
    ift = losses.build({"name": "ift", "lambda_disturb": "normal", "disturb_std": 0.5})
    train = [ift.lambda_of(losses.StepInfo(s, 10, 0, 3, training=True)) for s in range(10)]
    assert len(set(train)) == 10 and all(0 <= v <= 1 for v in train)
    assert {ift.lambda_of(losses.StepInfo(s, 10, 0, 3, training=False)) for s in range(10)} == {0.2}
    assert train != [ift.lambda_of(losses.StepInfo(s, 10, 0, 4, training=True)) for s in range(10)]


def test_no_grad_passes_come_from_the_step_info():
    """IFT runs its intuition pass only where its λ of that step is > 0: λ = 0 at a linear schedule's first
    step, and where the noise clips λ to 0 in training (never in evaluation). The others never run one."""
    ramp = losses.build({"name": "ift", "min_lambda": 0.0, "max_lambda": 0.4, "lambda_schedule": "linear"})
    assert [ramp.no_grad_passes(losses.StepInfo(s, 5, 0, 0, training=True)) for s in range(5)] == [0, 1, 1, 1, 1]
    noisy = losses.build({"name": "ift", "lambda_disturb": "normal", "disturb_std": 5.0})
    steps = [losses.StepInfo(s, 50, 0, 1, training=True) for s in range(50)]
    clipped = [i for i in steps if noisy.lambda_of(i) == 0]
    assert 5 < len(clipped) < 45  # std 5: P(1 + 5 ε <= 0) = P(ε <= -0.2), about 0.42
    for info in steps:
        assert noisy.no_grad_passes(info) == (0 if info in clipped else 1)
        assert noisy.no_grad_passes(dataclasses.replace(info, training=False)) == 1
    for name, cls in losses.LOSSES.items():
        if name != "ift":
            assert cls().no_grad_passes(steps[0]) == 0 and cls().scalars(steps[0]) == {}, name


@pytest.mark.parametrize("max_lambda", [0.0, 0.3])
def test_no_grad_passes_count_the_policy_forwards_the_loss_makes(max_lambda):
    """1 + no_grad_passes(info) is the number of the policy's forwards in one batch_loss call."""
    policy = tiny_model()
    calls = []
    policy.register_forward_hook(lambda *a: calls.append(1))
    ift = losses.build({"name": "ift", "min_lambda": max_lambda, "max_lambda": max_lambda})
    losses.batch_loss(ift, policy, None, sft_batch(), losses.ONE_STEP)
    assert len(calls) == 1 + ift.no_grad_passes(losses.ONE_STEP) == (2 if max_lambda > 0 else 1)


def test_the_step_info_is_a_frozen_value():
    with pytest.raises(dataclasses.FrozenInstanceError):
        losses.ONE_STEP.step = 3
    assert losses.ONE_STEP == losses.StepInfo(step=0, total_steps=1, warmup_steps=0, seed=0, training=True)


# ---------------------------------------------------------------- LossOutput, for every registered loss

@pytest.mark.parametrize("name", list(losses.LOSSES))
def test_every_registered_loss_returns_a_loss_output_of_per_row_tensors(name):
    loss = losses.LOSSES[name]()  # the declared defaults
    policy = tiny_model(seed=0)
    reference = tiny_model(seed=1) if loss.needs_reference else None
    batch = pair_batch() if loss.needs_pairs else sft_batch()
    B = 3
    for out in (loss.rows(ModelCall(), policy, reference, batch, losses.ONE_STEP),
                losses.batch_loss(loss, policy, reference, batch, losses.ONE_STEP)):
        assert type(out) is losses.LossOutput
        assert [f.name for f in dataclasses.fields(out)] == ["row_losses", "valid", "metrics"]
        assert out.row_losses.shape == (B,) and out.row_losses.requires_grad
        assert out.valid.shape == (B,) and out.valid.dtype == torch.bool
        assert "loss" in out.metrics
        for key, value in out.metrics.items():
            assert value.shape == (B,) and value.is_floating_point() and not value.requires_grad, key
    assert all(isinstance(v, float) for v in loss.scalars(losses.ONE_STEP).values())


# ---------------------------------------------------------------- what the trainer and the data layer hold

def test_the_trainer_holds_no_lambda_and_no_batch_key_names():
    source = (REPO / "trainers.py").read_text()
    assert not re.findall(r"\blam\b", source)
    # the batch's key names (input_ids also names a tokenizer's output, which tokenizer_as_trained reads)
    assert not re.findall(r"chosen_|rejected_|attention_mask|\blabels\b", source)


def test_the_data_layer_gives_a_single_answer_loss_the_chosen_half_of_pairs():
    pairs, single = pair_batch(), sft_batch()
    assert batching.is_pairs(pairs) and not batching.is_pairs(single)
    view = batching.loss_view(pairs, pairs=False)
    assert sorted(view) == ["attention_mask", "input_ids", "labels"]
    assert all(view[k] is pairs[f"chosen_{k}"] for k in view)
    assert batching.loss_view(pairs, pairs=True) is pairs and batching.loss_view(single, pairs=False) is single


def test_token_counts_count_every_answer_and_padding_only_without_packing():
    pairs = pair_batch()  # attention masks: chosen rows of 8, 9, 6 tokens, rejected 6, 9, 5, each of width 9
    assert batching.token_counts(pairs, packing=False) == (8 + 9 + 6 + 6 + 9 + 5, 6 * 9)
    assert batching.token_counts(pairs, packing=True) == (43, 43)
