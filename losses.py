"""Losses: SFT, IFT (Intuitive Fine-Tuning), DPO / cDPO / IPO, ORPO, and the DFT, ASFT and SimPO baselines.

Read top-down: the registry (what the trainer calls), then each loss, its math beside its class. The
IFT math follows docs/ift_spec.md section by section ("spec §N" in the comments is its section N).
Every loss gets its log-probs from a `forward.ModelCall`, passed in as `call` (forward.py: the hooks).
Conventions
- B rows, T tokens. `labels` is `input_ids` with -100 wherever there is no loss (prompt, padding).
- Position t predicts token t+1, so every per-token tensor here is (B, T-1):
  `mask[b, t] = labels[b, t+1] != -100`, `n[b] = mask[b].sum()` is row b's target count, and
  `logps[b, t]` is log p(labels[b, t+1]), zero off the mask.
- Log-probabilities are float32 (float64 when the model runs in float64, so tests can check in double).
"""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from forward import ModelCall
from training.batching import is_pairs, loss_view
from training.options import check, default_of, option
from training.scan import discounted_cumsum
from utils import ConfigError

PREFERENCE_LOSS_TYPES = ("dpo", "ipo")
LAMBDA_SCHEDULES = (None, "linear", "warmup")
LAMBDA_DISTURBS = (None, "normal")
PROPAGATION_TYPES = ("loss", "mask", "logps")
PROPAGATION_SIDES = ("left", "right")
PROPAGATION_NORMS = ("L1", "L2", "softmax", "log")

# ---------------------------------------------------------------- The registry: what the trainer calls

# Each loss is a dataclass registered under its name: its fields are its config keys (config/loss/<name>.yaml
# is written from them) and `rows` computes it. Nothing but the registry knows which losses exist.

LOSSES = {}


def register(cls):
    """Class decorator: make a Loss subclass a dataclass and the loss named cls.name."""
    cls = dataclass(cls)
    LOSSES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class StepInfo:
    """What a loss may know about the optimizer step it is computed for: the same for every micro-batch,
    rank and row of the step. step: 0-based optimizer step (an evaluation after k steps: step k, at most
    total_steps - 1). total_steps, warmup_steps: the run's schedule. seed: the run's seed. training:
    True for a training step, False for an evaluation."""

    step: int
    total_steps: int
    warmup_steps: int
    seed: int
    training: bool


# A loss called outside a run (a benchmark, a test): the only step of a one-step run, training.
ONE_STEP = StepInfo(step=0, total_steps=1, warmup_steps=0, seed=0, training=True)


@dataclass(frozen=True)
class LossOutput:
    """One micro-batch's loss, per row. row_losses: (B,) with gradient. valid: (B,) bool, the rows the
    loss is defined on (n > 0; both answers have targets for pair losses). metrics: name -> (B,) detached
    float tensor, always including "loss"; the trainer sums each over the valid rows."""

    row_losses: torch.Tensor
    valid: torch.Tensor
    metrics: dict

    def with_metrics(self, more):
        """The same output with the (B,) tensors of `more` added to its metrics."""
        return dataclasses.replace(self, metrics={**self.metrics, **more})


class Loss:
    """A loss and its options. Subclasses set `name`, `needs_pairs` and implement `rows`; a loss whose
    computation depends on the step (IFT's λ) reads it from the StepInfo it is given."""

    name: ClassVar[str]
    needs_pairs: ClassVar[bool] = False  # trains on (chosen, rejected) pairs
    # a reference's per-row summed log-probs are all it needs of the reference (reference_logps=precompute)
    reference_precomputable: ClassVar[bool] = True
    # None: the output head as ModelCall computes it (training/flops.py); an int: the loss computes the head
    # itself and its backward recomputes that many heads' logits at the target positions
    head_recomputes: ClassVar[Optional[int]] = None

    @property
    def needs_reference(self):
        """Whether `rows` needs a frozen reference model."""
        return False

    def no_grad_passes(self, info):
        """Forwards of the policy without gradient that `rows` makes per micro-batch of step `info` (a
        StepInfo) besides the trained one (the FLOPs count, training/flops.py); a reference model's forward
        is counted by the trainer."""
        return 0

    def scalars(self, info):
        """Values of step `info` the loss logs once per step, not per row (IFT: its λ): name -> float."""
        return {}

    def rows(self, call, policy, reference, batch, info):
        """Per-row losses of one micro-batch. call: the forward.ModelCall that scores the models.
        batch: dict of (B, T) tensors (chosen_/rejected_ ones when needs_pairs). info: the StepInfo.
        Returns a LossOutput."""
        raise NotImplementedError


def build(loss_cfg):
    """The registered Loss named loss_cfg["name"], with loss_cfg's other keys as its options (missing
    ones take their declared defaults). loss_cfg: a dict or DictConfig. Raises ConfigError (a
    ValueError) for an unknown loss, an unknown key or an impossible value."""
    if isinstance(loss_cfg, Loss):
        return loss_cfg
    name = loss_cfg.get("name")
    if name not in LOSSES:
        raise ConfigError(f"loss.name={name!r} is not allowed; choose one of {', '.join(LOSSES)}")
    cls = LOSSES[name]
    values = {f.name: default_of(f) for f in dataclasses.fields(cls)}
    values.update((k, v) for k, v in loss_cfg.items() if k != "name")
    check(values, cls, "loss.", where=f"of loss={name}")
    return cls(**values)


def batch_loss(loss, policy, reference, batch, info, call=ModelCall()):
    """Per-row loss of one micro-batch, for any registered loss.

    loss: a Loss (losses.build makes one from a config). policy: the model being trained.
    reference: frozen model or None (used only when needs_reference). batch: dict of (B, T) tensors as
    training/batching.collate makes them; a pair batch given to a loss that trains on single answers is
    read as its chosen half (batching.loss_view). info: the StepInfo of this step. call: how the models
    are called (forward.ModelCall: chunked head, packing; an immutable value, the defaults unless given).
    Returns a LossOutput whose invalid rows hold exactly 0 (row losses and metrics). reduce_rows sums
    them. Valid: n > 0 for sft / ift; both responses have targets for dpo / ipo / orpo.
    """
    if not isinstance(loss, Loss):
        raise TypeError(f"batch_loss takes a losses.Loss (losses.build(config) makes one), got {type(loss).__name__}")
    out = loss.rows(call, policy, reference, loss_view(batch, loss.needs_pairs), info)
    # Invalid rows: exactly 0, so that (row_losses * valid) can never meet a NaN or inf.
    valid = out.valid
    return LossOutput(torch.where(valid, out.row_losses, torch.zeros_like(out.row_losses)), valid,
                      {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in out.metrics.items()})


def reduce_rows(row_losses, valid, row_metrics):
    """The one reduction of per-row losses, used by the trainer.

    row_losses: (B,). valid: (B,) bool. row_metrics: dict of (B,) tensors.
    Returns (loss_sum 0-dim with gradient, metric_sums dict of 0-dim detached, count 0-dim long):
    sums over the valid rows (whatever an invalid row holds, even a NaN, never enters) and the number
    of valid rows. The mean is sum / count; the trainer divides by the global batch's row count instead.
    """
    zero = torch.zeros((), dtype=row_losses.dtype, device=row_losses.device)
    loss_sum = torch.where(valid, row_losses, zero).sum()
    metric_sums = {k: torch.where(valid, v, torch.zeros((), dtype=v.dtype, device=v.device)).sum().detach()
                   for k, v in row_metrics.items()}
    return loss_sum, metric_sums, valid.sum()


def row_mean(values, mask):
    """Mean of `values` over each row's mask.

    values: (B, T-1). mask: (B, T-1) bool. Returns (B,): sum over the mask / n[b], 0 where n[b] == 0.
    """
    # torch.where (not a product) so that whatever sits off the mask cannot leak in, not even a NaN.
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(-1)
    return total / mask.sum(-1).clamp(min=1)


def _unpack(batch, prefix=""):
    return batch[prefix + "input_ids"], batch[prefix + "attention_mask"], batch[prefix + "labels"]


# ---------------------------------------------------------------- SFT

@register
class SFT(Loss):
    """Supervised fine-tuning: per-sequence mean negative log-likelihood of the answer, averaged over sequences."""

    name: ClassVar[str] = "sft"

    def rows(self, call, policy, reference, batch, info):
        return LossOutput(*sft_rows(call, policy, *_unpack(batch)))


def sft_rows(call, model, input_ids, attention_mask, labels):
    """Per-row SFT loss: mean negative log-likelihood of each row's target tokens.

    input_ids, attention_mask, labels: (B, T).
    Returns (row_losses (B,) with gradient, 0 where n == 0; valid (B,) bool, n > 0;
    metrics {"loss": (B,)} detached).
    """
    logps, mask = call.logps(model, input_ids, attention_mask, labels)
    row_losses = row_mean(-logps, mask)
    return row_losses, mask.any(-1), {"loss": row_losses.detach()}


# ---------------------------------------------------------------- IFT (spec §1-§4)

@register
class IFT(Loss):
    """Intuitive Fine-Tuning (Hua et al., arXiv 2405.11870). See README, "What IFT does", and docs/ift_spec.md."""

    name: ClassVar[str] = "ift"
    min_lambda: float = option(0.2, "lambda at the first step (linear) / before warm-up ends (warmup); in [0, 1]",
                               low=0, high=1, before=(
                                   "Temporal Residual Connection: the model reads (1 - lambda) * E[x] + lambda * "
                                   "E[x'], where x' are its\nown one-step predictions on the answer tokens. "
                                   "lambda = 0 is SFT."))
    max_lambda: float = option(0.2, "lambda at the last step (linear) / after warm-up (warmup) / always (null); "
                                    "in [0, 1]", low=0, high=1)
    lambda_schedule: Optional[str] = option(
        None, "null (constant max_lambda) | linear (min -> max over training) | warmup (min -> max over the lr "
              "warm-up)", choices=LAMBDA_SCHEDULES)
    lambda_disturb: Optional[str] = option(
        None, "null | normal: lambda *= 1 + disturb_std * N(0, 1), clipped to [0, 1], noise seeded by (seed, step)",
        choices=LAMBDA_DISTURBS)
    disturb_std: float = option(0.5, "standard deviation of the relative lambda noise; >= 0", low=0)
    gamma: float = option(0.95, "discount in [0, 1]; 0 switches propagation off (all weights 1)", low=0, high=1,
                          before="Relation Propagation: each answer token's loss is weighted by a discounted sum "
                                 "of the losses around it.")
    propagation_type: str = option("loss", "loss (-logp / n) | mask (1 per target) | logps (-logp): what is "
                                           "propagated", choices=PROPAGATION_TYPES)
    propagation_side: str = option("left", "left (each token carries the loss of the tokens after it) | right "
                                           "(of those before it)", choices=PROPAGATION_SIDES)
    propagation_norm: str = option("L1", "L1 | L2 | softmax | log: how the propagated sums become weights",
                                   choices=PROPAGATION_NORMS)

    def lambda_of(self, info):
        """λ of step `info` (a StepInfo, spec §1): scheduled, then disturbed in training, never in evaluation.
        Returns a float in [0, 1]."""
        lam = scheduled_lambda(info.step, info.total_steps, info.warmup_steps, self.min_lambda, self.max_lambda,
                               self.lambda_schedule)
        if not info.training:
            return lam
        return disturbed_lambda(lam, info.seed, info.step, self.lambda_disturb, self.disturb_std)

    def no_grad_passes(self, info):
        return 1 if self.lambda_of(info) > 0 else 0  # the intuition pass; lambda = 0 skips it (ift_rows)

    def scalars(self, info):
        return {"lambda": self.lambda_of(info)}

    def rows(self, call, policy, reference, batch, info):
        return LossOutput(*ift_rows(call, policy, *_unpack(batch), self.lambda_of(info), self.gamma,
                                    self.propagation_type, self.propagation_side, self.propagation_norm))


def ift_rows(call, model, input_ids, attention_mask, labels, lam, gamma=0.95, propagation_type="loss",
             propagation_side="left", propagation_norm="L1"):
    """Per-row IFT loss (spec §1-§3): sum_t(-l * w) / n over each row's targets.

    input_ids, attention_mask, labels: (B, T). lam: float, already scheduled/disturbed.
    Returns (row_losses (B,) with gradient, 0 where n == 0; valid (B,) bool, n > 0; metrics, each
    (B,) detached and 0 on invalid rows: loss, loss_sft (NLL of the intuition pass, i.e. given the
    ground truth), loss_further (unweighted NLL of the blended pass), weight_max (largest w of the
    row), weight_first (w at the row's first target)). With lam = 0 and gamma = 0 it is sft_rows bit
    for bit.
    """
    lam = float(lam)
    if lam > 0:
        # §1.1-1.3: the intuition pass (no gradient), then the blended pass with gradient.
        intuitive_ids, sft_logps = call.intuition(model, input_ids, attention_mask, labels)
        logps, mask = call.logps(model, input_ids, attention_mask, labels, intuitive_ids, lam)
    else:
        # §1.4: lambda = 0 is one ordinary forward, the same call SFT makes.
        logps, mask = call.logps(model, input_ids, attention_mask, labels)
        sft_logps = logps.detach()
    # §2: weights from the blended pass's log-probs, not detached.
    w = relation_propagation_weights(logps, mask, gamma, propagation_type, propagation_side, propagation_norm)
    # §3. With gamma = 0, w is exactly 1.0 on the mask, so this is bit for bit sft_rows' row_mean(-logps).
    row_losses = row_mean(-logps * w, mask)
    valid = mask.any(-1)

    w = w.detach()
    first = mask.int().argmax(-1, keepdim=True)  # index of the first True (0 for a row with none)
    metrics = {
        "loss": row_losses.detach(),
        "loss_sft": row_mean(-sft_logps, mask),
        "loss_further": row_mean(-logps.detach(), mask),
        "weight_max": w.amax(-1),  # w >= 0 on the mask and 0 off it: the max over the row's targets
        "weight_first": w.gather(-1, first).squeeze(-1),  # 0 for a row with no target (w is 0 there)
    }
    return row_losses, valid, metrics


def scheduled_lambda(step, total_steps, warmup_steps, min_lambda, max_lambda, lambda_schedule):
    """IFT's lambda at optimizer step `step` (0-based) of `total_steps` (spec §1). Returns a float.

    None: max_lambda.  "linear": min_lambda at step 0 to max_lambda at step total_steps - 1.
    "warmup": min_lambda to max_lambda over the first `warmup_steps` steps, then max_lambda.
    The ramp's fraction is clipped to [0, 1], so a step past the end (e.g. a final evaluation at
    step == total_steps) stays at max_lambda instead of extrapolating; inside the run this is the
    spec's formula exactly.
    """
    if lambda_schedule is None:
        return float(max_lambda)
    if lambda_schedule == "linear":
        fraction = step / max(1, total_steps - 1)
    elif lambda_schedule == "warmup":
        fraction = step / max(1, warmup_steps)
    else:
        raise ValueError(f"lambda_schedule must be one of {LAMBDA_SCHEDULES}, got {lambda_schedule!r}")
    return float(min_lambda + (max_lambda - min_lambda) * min(1.0, max(0.0, fraction)))


def disturbed_lambda(lam, seed, step, lambda_disturb, disturb_std):
    """lam with the spec's multiplicative noise for optimizer step `step`. Returns a float.

    None: lam unchanged. "normal": clip(lam * (1 + disturb_std * eps), 0, 1), eps ~ N(0, 1) drawn
    from a CPU torch.Generator seeded with (seed * 1_000_003 + step) mod 2^63: a function of
    (seed, step) only, so a resumed run draws the same eps, whatever ran before.
    """
    if lambda_disturb is None:
        return float(lam)
    if lambda_disturb != "normal":
        raise ValueError(f"lambda_disturb must be one of {LAMBDA_DISTURBS}, got {lambda_disturb!r}")
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % 2 ** 63)
    eps = torch.randn((), generator=generator, dtype=torch.float64).item()
    return float(min(1.0, max(0.0, lam * (1.0 + disturb_std * eps))))


def relation_propagation_weights(logps, mask, gamma, propagation_type="loss", propagation_side="left",
                                 propagation_norm="L1"):
    """Relation Propagation token weights (spec §2), computed strictly per row.

    logps: (B, T-1) per-token log-probabilities l, zero off the mask. mask: (B, T-1) bool.
    Returns w: (B, T-1), zero off the mask, each row summing to its target count n[b] (a row with no
    target is all zeros). Not detached: the gradient flows through w into logps.
    """
    if propagation_type not in PROPAGATION_TYPES:
        raise ValueError(f"propagation_type must be one of {PROPAGATION_TYPES}, got {propagation_type!r}")
    if propagation_side not in PROPAGATION_SIDES:
        raise ValueError(f"propagation_side must be one of {PROPAGATION_SIDES}, got {propagation_side!r}")
    if propagation_norm not in PROPAGATION_NORMS:
        raise ValueError(f"propagation_norm must be one of {PROPAGATION_NORMS}, got {propagation_norm!r}")
    mask = mask.bool()
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    one = torch.ones((), dtype=logps.dtype, device=logps.device)
    n = mask.sum(-1, keepdim=True)  # (B, 1)

    # §2.1: gamma = 0 switches propagation off.
    if gamma == 0:
        return mask.to(logps.dtype)

    # §2.2: the propagated quantity a, zero off the mask.
    if propagation_type == "loss":
        a = -logps / n.clamp(min=1)
    elif propagation_type == "mask":
        a = mask.to(logps.dtype)
    else:  # logps
        a = -logps
    a = torch.where(mask, a, zero)

    # §2.3: left sums the tokens after t (a reverse scan), right the tokens before t.
    c = discounted_cumsum(a, gamma, reverse=propagation_side == "left")

    # §2.4, right: shift each row by its own smallest positive c at its target positions.
    if propagation_side == "right":
        positive = mask & (c > 0)
        smallest = torch.where(positive, c, torch.full((), torch.inf, dtype=c.dtype, device=c.device))
        smallest = smallest.amin(-1, keepdim=True)
        # No positive c in the row: no shift; the 1/c that follows is then infinite and §2.5 falls back.
        c = c + torch.where(positive.any(-1, keepdim=True), smallest, zero)

    # §2.5 fallback: find the rows whose weights sum to 0 or to a non-finite value first, without
    # gradient, then normalise with those rows left out, so their inf/NaN never enters the graph.
    with torch.no_grad():
        total = _normalised(c, mask, propagation_side, propagation_norm).sum(-1, keepdim=True)
        degenerate = (total == 0) | ~torch.isfinite(total)  # (B, 1); includes rows with no target
    w = _normalised(c, mask & ~degenerate, propagation_side, propagation_norm)

    # §2.5: rescale each row to sum n[b]; degenerate rows get w = 1 on their mask.
    total = w.sum(-1, keepdim=True)
    w = w * (n / torch.where(degenerate, one, total))
    return torch.where(degenerate & mask, one, w)


def _normalised(c, usable, side, norm):
    """Spec §2.4 on the usable positions; zero elsewhere.

    c: (B, T-1) discounted sums (right side: already shifted). usable: (B, T-1) bool.
    Returns (B, T-1) unscaled weights.
    """
    # Off the usable positions, put a harmless c = 1 before any 1/c or log, so that those positions
    # create no inf/NaN whose (zero) upstream gradient would turn into a NaN gradient.
    c = torch.where(usable, c, torch.ones((), dtype=c.dtype, device=c.device))
    if side == "left":
        value = {"L1": c, "L2": c ** 2, "softmax": c, "log": torch.log1p(c)}[norm]
    else:
        value = {"L1": 1.0 / c, "L2": 1.0 / c ** 2, "softmax": 1.0 / c, "log": 1.0 / torch.log1p(c)}[norm]
    if norm == "softmax":
        value = _masked_softmax(value, usable)
    return torch.where(usable, value, torch.zeros((), dtype=c.dtype, device=c.device))


def _masked_softmax(z, usable):
    """Softmax of z (B, T-1) over each row's usable positions; 0 elsewhere and in rows with none."""
    z = torch.where(usable, z, torch.full((), -torch.inf, dtype=z.dtype, device=z.device))
    # Softmax is shift invariant, so the (detached) row maximum only prevents overflow.
    peak = z.amax(-1, keepdim=True).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros((), dtype=z.dtype, device=z.device))
    e = torch.exp(z - peak)  # exp(-inf) = 0 off the usable positions
    return e / e.sum(-1, keepdim=True).clamp(min=torch.finfo(z.dtype).tiny)


# ---------------------------------------------------------------- DPO, cDPO, IPO

REFERENCE_FREE = "true: a uniform reference (no reference model is loaded)"


@register
class DPO(Loss):
    """Direct Preference Optimization (Rafailov et al., 2023); label_smoothing > 0 is conservative DPO (cDPO;
    docs/losses.md: not TRL's robust)."""

    name: ClassVar[str] = "dpo"
    needs_pairs: ClassVar[bool] = True
    beta: float = option(0.1, "inverse temperature of the implicit reward; > 0", low=0, low_open=True)
    label_smoothing: float = option(0.0, "cDPO (not TRL's robust/rDPO): assumed probability that a preference label "
                                         "is flipped; in [0, 0.5)", low=0, high=0.5, high_open=True)
    reference_free: bool = option(False, REFERENCE_FREE)

    @property
    def needs_reference(self):
        return not self.reference_free

    def rows(self, call, policy, reference, batch, info):
        return _preference_rows(call, policy, reference, batch, "dpo", self.beta, self.label_smoothing,
                                self.reference_free)


@register
class IPO(Loss):
    """Identity Preference Optimisation (Azar et al., 2023): (h - 1 / (2 beta))^2 on the reference-relative margin h of
    summed log-probs (docs/losses.md: not TRL's per-token ipo)."""

    name: ClassVar[str] = "ipo"
    needs_pairs: ClassVar[bool] = True
    beta: float = option(0.1, "tau of the paper, on summed log-probs as its Eq. 17 (TRL's ipo: per-token means); > 0",
                         low=0, low_open=True)
    reference_free: bool = option(False, REFERENCE_FREE)

    @property
    def needs_reference(self):
        return not self.reference_free

    def rows(self, call, policy, reference, batch, info):
        # IPO has no label smoothing
        return _preference_rows(call, policy, reference, batch, "ipo", self.beta, 0.0, self.reference_free)


def _preference_rows(call, policy, reference, batch, loss_type, beta, label_smoothing, reference_free):
    """DPO / IPO rows: both responses of each pair through the policy (and the reference) in one forward."""
    pol = call.pair_logps(policy, batch)
    if reference_free:
        ref_chosen, ref_rejected = torch.zeros_like(pol.chosen), torch.zeros_like(pol.rejected)
    elif "reference_chosen_logps" in batch:  # reference_logps=precompute: the reference's sums, computed before
        ref_chosen, ref_rejected = (batch[f"reference_{k}_logps"].to(pol.chosen.dtype) for k in ("chosen", "rejected"))
    else:
        if reference is None:
            raise ValueError(f"loss={loss_type} with reference_free=false needs a reference model")
        with torch.no_grad():
            ref = call.pair_logps(reference, batch)
        ref_chosen, ref_rejected = ref.chosen, ref.rejected
    row_losses, chosen_rewards, rejected_rewards = preference_loss(
        pol.chosen, pol.rejected, ref_chosen, ref_rejected,
        beta, label_smoothing=label_smoothing, loss_type=loss_type, reference_free=reference_free)
    return LossOutput(row_losses, pol.valid, {
        "loss": row_losses.detach(),
        "rewards_chosen": chosen_rewards,
        "rewards_rejected": rejected_rewards,
        "rewards_accuracy": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "rewards_margin": chosen_rewards - rejected_rewards,
        "logps_chosen": pol.chosen.detach(),
        "logps_rejected": pol.rejected.detach(),
    })


def preference_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                    beta, label_smoothing=0.0, loss_type="dpo", reference_free=False):
    """DPO / cDPO / IPO loss of each example.

    All four log-prob inputs: (B,), summed over each response's target tokens.
    h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected), the reference
    term dropped when reference_free.
    dpo: -log sigmoid(beta h) (1 - eps) - log sigmoid(-beta h) eps, eps = label_smoothing (cDPO if > 0).
    ipo: (h - 1 / (2 beta))^2.
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); rewards are
    beta * (policy - reference) log-probs, detached.
    """
    policy_margin = policy_chosen_logps - policy_rejected_logps
    reference_margin = 0.0 if reference_free else reference_chosen_logps - reference_rejected_logps
    h = policy_margin - reference_margin
    if loss_type == "dpo":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {PREFERENCE_LOSS_TYPES}, got {loss_type!r}")
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


# ---------------------------------------------------------------- ORPO

@register
class ORPO(Loss):
    """Odds Ratio Preference Optimization (Hong et al., 2024): SFT on the chosen answer minus
    beta * log sigmoid(log odds ratio of chosen over rejected). No reference model."""

    name: ClassVar[str] = "orpo"
    needs_pairs: ClassVar[bool] = True
    beta: float = option(0.1, "weight of the odds-ratio term (lambda in the paper); >= 0", low=0)

    def rows(self, call, policy, reference, batch, info):
        pol = call.pair_logps(policy, batch)
        # ORPO works on per-token mean log-probs (odds of a whole response would vanish with length).
        chosen, rejected = pol.means()
        row_losses = orpo_loss(chosen, rejected, self.beta)
        return LossOutput(row_losses, pol.valid, {
            "loss": row_losses.detach(),
            "nll": -chosen.detach(),
            "log_odds_ratio": orpo_log_odds(chosen, rejected).detach(),
            "logps_chosen": chosen.detach(),
            "logps_rejected": rejected.detach(),
        })


def _log1mexp(x):
    """log(1 - e^x) for x < 0, as log(-expm1(x)). x: any shape, float32 or wider.

    x is clamped to <= -sqrt(tiny) (about -1.1e-19 in float32): a log-prob of exactly 0 would give
    log(0) = -inf, and the derivative, about -1/|x|, stays finite (about 1e19) at the clamp.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny ** 0.5)
    return torch.log(-torch.expm1(x))


def orpo_log_odds(chosen_logps, rejected_logps):
    """ORPO's log odds ratio. Inputs: (B,) per-token mean log-probs. Returns (B,).

    log odds(p) = log p - log(1 - p); the ratio is log odds(chosen) - log odds(rejected).
    """
    if chosen_logps.dtype not in (torch.float32, torch.float64):
        chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    return (chosen_logps - _log1mexp(chosen_logps)) - (rejected_logps - _log1mexp(rejected_logps))


def orpo_loss(chosen_logps, rejected_logps, beta):
    """ORPO loss of each example: -chosen_logps - beta * log sigmoid(log odds ratio).

    chosen_logps, rejected_logps: (B,) per-token MEAN log-probs of each response. Returns (B,).
    """
    return -chosen_logps - beta * F.logsigmoid(orpo_log_odds(chosen_logps, rejected_logps))


# ---------------------------------------------------------------- DFT

@register
class DFT(Loss):
    """Dynamic Fine-Tuning (Wu et al., 2025, arXiv 2508.05629): SFT with each token's NLL weighted by its own
    probability, detached: -sum_t sg(p_t) * log p_t / n per sequence, averaged over sequences. No keys."""

    name: ClassVar[str] = "dft"

    def rows(self, call, policy, reference, batch, info):
        return LossOutput(*dft_rows(call, policy, *_unpack(batch)))


def dft_rows(call, model, input_ids, attention_mask, labels):
    """Per-row DFT loss: sum_t -sg(p_t) · log p_t / n, averaged over rows like SFT. Tokens the model
    already finds likely count fully; unlikely ones are damped.

    input_ids, attention_mask, labels: (B, T).
    Returns (row_losses (B,) with gradient; valid (B,) bool, n > 0; metrics (B,) detached: loss,
    nll (the unweighted mean NLL), weight_mean (the mean of sg(p_t) over the row's targets)).
    """
    logps, mask = call.logps(model, input_ids, attention_mask, labels)
    weights = logps.detach().exp()  # sg(p_t); row_mean ignores what sits off the mask
    row_losses = row_mean(-weights * logps, mask)
    return row_losses, mask.any(-1), {"loss": row_losses.detach(), "nll": row_mean(-logps.detach(), mask),
                                      "weight_mean": row_mean(weights, mask)}


# ---------------------------------------------------------------- ASFT

@register
class ASFT(Loss):
    """Anchored Supervised Fine-Tuning (Zhu et al., 2025, arXiv 2509.23753): DFT's loss plus kl_weight times
    the token-level KL(π_ref ‖ π_θ) over the whole vocabulary at each answer position, π_ref the frozen base
    (with LoRA: the base with its adapters off). Per sequence, averaged over sequences like DFT; docs/losses.md."""

    name: ClassVar[str] = "asft"
    # its reference term is a whole distribution at every answer position, not a per-row sum to precompute
    reference_precomputable: ClassVar[bool] = False
    # the chunked KL's backward recomputes both heads' logits at the answer positions (training/flops.py)
    head_recomputes: ClassVar[Optional[int]] = 2
    kl_weight: float = option(0.1, "weight of the KL(reference ‖ policy) term per answer token; >= 0 (0 is DFT; "
                                   "the authors' code uses 0.1)", low=0)

    @property
    def needs_reference(self):
        return True

    def rows(self, call, policy, reference, batch, info):
        if reference is None:
            raise ValueError("loss=asft needs a reference model (it is loaded unless reference_logps=precompute)")
        return LossOutput(*asft_rows(call, policy, reference, *_unpack(batch), self.kl_weight))


def asft_rows(call, model, reference, input_ids, attention_mask, labels, kl_weight):
    """Per-row ASFT loss: Σ_t [−sg(p_t)·log p_t + kl_weight·KL_t] / n, KL_t = KL(π_ref(·|x,y<t) ‖ π_θ(·|x,y<t))
    over the vocabulary, averaged over rows like SFT and DFT. With kl_weight = 0 the value is DFT's.

    model: the policy. reference: the frozen reference (or lora.AdaptersDisabled). input_ids, attention_mask,
    labels: (B, T). Returns (row_losses (B,) with gradient; valid (B,) bool, n > 0; metrics (B,) detached:
    loss, nll (unweighted mean NLL), weight_mean (mean sg(p_t)), kl (mean KL_t over the row's targets)).
    """
    anchor = call.head_inputs(reference, input_ids, attention_mask, labels)
    logps, kl, mask = call.logps_and_kl(model, anchor, input_ids, attention_mask, labels)
    weights = logps.detach().exp()  # sg(p_t), as DFT
    row_losses = row_mean(-weights * logps + kl_weight * kl, mask)
    return row_losses, mask.any(-1), {"loss": row_losses.detach(), "nll": row_mean(-logps.detach(), mask),
                                      "weight_mean": row_mean(weights, mask), "kl": row_mean(kl.detach(), mask)}


# ---------------------------------------------------------------- SimPO

@register
class SimPO(Loss):
    """SimPO (Meng et al., 2024, arXiv 2405.14734): reference-free, length-normalised preference loss
    -log sigmoid(beta * (mean log p(chosen) - mean log p(rejected)) - gamma_margin), per-token mean log-probs."""

    name: ClassVar[str] = "simpo"
    needs_pairs: ClassVar[bool] = True
    beta: float = option(2.0, "scale of the length-normalised reward; > 0 (the paper uses 2.0-2.5)", low=0,
                         low_open=True)
    gamma_margin: float = option(1.0, "target reward margin; >= 0 (the paper's gamma / beta is about 0.5)", low=0)

    def rows(self, call, policy, reference, batch, info):
        chosen, rejected = (pol := call.pair_logps(policy, batch)).means()
        row_losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, self.beta, self.gamma_margin)
        return LossOutput(row_losses, pol.valid, {
            "loss": row_losses.detach(),
            "rewards_margin": chosen_rewards - rejected_rewards,
            "rewards_accuracy": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
            "logps_chosen": chosen.detach(),
            "logps_rejected": rejected.detach(),
        })


def simpo_loss(chosen_logps, rejected_logps, beta, gamma_margin):
    """SimPO (Meng et al. 2024, arXiv 2405.14734): reference-free and length-normalised,
    -log σ(β · (chosen_logps − rejected_logps) − gamma_margin).

    chosen_logps, rejected_logps: (B,) per-token MEAN log-probs of each response.
    Returns (losses (B,), chosen_rewards (B,) = β · chosen_logps, rejected_rewards (B,)), rewards detached.
    """
    losses = -F.logsigmoid(beta * (chosen_logps - rejected_logps) - gamma_margin)
    return losses, (beta * chosen_logps).detach(), (beta * rejected_logps).detach()


# ---------------------------------------------------------------- Method-independent evaluation metrics

def shared_eval_metrics(call, model, batch):
    """Held-out metrics computed the same way whatever the training loss (λ = 0, no weights), so that
    runs of different methods can be compared: each method's own loss cannot.

    batch: SFT keys (input_ids, attention_mask, labels) or pair keys (chosen_* / rejected_*), each (B, T).
    Returns a dict of (B,) float tensors: `nll`, the per-token mean NLL of the chosen answer; with pairs
    also `margin`, mean log p(chosen) − mean log p(rejected) (per-token means, as ORPO and SimPO use), and
    `pref_accuracy`, 1.0 where the chosen answer is the more likely one by that measure, else 0.0.
    """
    if not is_pairs(batch):
        logps, mask = call.logps(model, *_unpack(batch))
        return {"nll": row_mean(-logps, mask)}
    chosen, rejected = call.pair_logps(model, batch).means()
    return {"nll": -chosen, "margin": chosen - rejected, "pref_accuracy": (chosen > rejected).to(chosen.dtype)}

