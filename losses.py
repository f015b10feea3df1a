"""Losses: SFT, IFT (Intuitive Fine-Tuning), DPO / cDPO / IPO, ORPO, and the DFT and SimPO baselines.

Everything here is a function of tensors and of one call of a model's own `forward`. The IFT math
follows IFT_SPEC.md section by section (the section numbers in the comments refer to it). At the end,
the registry: one small dataclass per loss (its config keys, what it needs, its per-row loss), which
is all the trainer sees, and `reduce_rows`, the one reduction of per-row losses.

Conventions
- B rows, T tokens. `labels` is `input_ids` with -100 wherever there is no loss (prompt, padding).
- Position t of the logits predicts token t+1, so every per-token tensor here is (B, T-1):
  `mask[b, t] = labels[b, t+1] != -100`, `n[b] = mask[b].sum()` is row b's target count, and
  `logps[b, t]` is log p(labels[b, t+1]), zero off the mask.
- Log-probabilities are float32 (float64 when the model runs in float64, so tests can check in double).
- Models are Hugging Face causal LMs, possibly wrapped by FSDP2 `fully_shard`. We only ever call the
  root `forward`; the two tricks we need (logits at target positions only, blended input embeddings)
  are hooks on submodules, which run inside that root forward, where FSDP2 has unsharded the weights.
"""

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from options import check, default_of, option
from utils import ConfigError

IGNORE_INDEX = -100
PREFERENCE_LOSS_TYPES = ("dpo", "ipo")
LAMBDA_SCHEDULES = (None, "linear", "warmup")
LAMBDA_DISTURBS = (None, "normal")
PROPAGATION_TYPES = ("loss", "mask", "logps")
PROPAGATION_SIDES = ("left", "right")
PROPAGATION_NORMS = ("L1", "L2", "softmax", "log")

# Block size C of the blocked discounted scan: O(T*C) work, O(T + C^2) extra memory.
SCAN_BLOCK = 128


# ------------------------------------------------------------------------------------------------
# Log-probabilities of target tokens
# ------------------------------------------------------------------------------------------------

def gather_logps(logits, targets):
    """log p(target) for each row of `logits`.

    logits: (N, V), any float dtype. targets: (N,) long.
    Returns (N,) float32 (float64 if the logits are float64).
    Cross-entropy gives -log_softmax(logits)[target] without us keeping an (N, V) log-softmax tensor.
    """
    # Upcast half precision for an accurate log-sum-exp; never downcast float64.
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return -F.cross_entropy(logits, targets, reduction="none")


@contextlib.contextmanager
def target_positions_only(model, mask):
    """Inside this block, `model(...)` returns logits only where a target is predicted.

    mask: (B, T-1) bool, True at positions t whose token t+1 is a target.
    A forward pre-hook on the output embedding (lm_head) replaces its input hidden states
    (B, T, H) by hidden[:, :-1][mask] of shape (1, N, H), so the logits are (1, N, V) in the
    row-major order of `mask` and no (B, T, V) tensor is ever made. Call the model with the default
    logits_to_keep=0 (all positions reach the head) and use_cache=False.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head) to hook")

    def keep_target_positions(module, args):
        hidden = args[0]
        # The last position predicts nothing; keep the positions that predict a target.
        return (hidden[:, :-1][mask].unsqueeze(0),) + tuple(args[1:])

    handle = head.register_forward_pre_hook(keep_target_positions)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def blended_input_embeddings(model, intuitive_ids, lam):
    """Inside this block, the model reads e = (1 - lam) * E[x] + lam * E[x'] (spec §1.3).

    intuitive_ids: (B, T) long, x'. lam: float in [0, 1].
    Two hooks on the input embedding module: a pre-hook stacks its input ids x (B, T) with x' into
    (2B, T), and a forward hook blends the two halves of the (2B, T, H) lookup back into (B, T, H).
    Both come from the same table, so the gradient reaches E through both terms.
    """
    embedding = model.get_input_embeddings()

    # One lookup of [x; x'] (2B, T) rather than two: the backward then scatters into one (V, H)
    # gradient instead of building two and adding them (for a 32k x 4096 table, 512 MiB each in
    # float32). The module's own forward does the lookup, so any scaling a subclass applies (e.g.
    # Gemma's) reaches E[x'] too.
    def stack_inputs(module, args):
        return (torch.cat([args[0], intuitive_ids.to(args[0].device)]),) + tuple(args[1:])

    def blend(module, args, output):
        truth, intuition = output.chunk(2)
        return (1.0 - lam) * truth + lam * intuition

    handles = [embedding.register_forward_pre_hook(stack_inputs), embedding.register_forward_hook(blend)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _target_mask(labels):
    """labels (B, T) -> mask (B, T-1) bool: position t predicts a target token t+1."""
    return labels[:, 1:] != IGNORE_INDEX


# ------------------------------------------------------------------------------------------------
# How the model is called: a chunked output head and padding-free packing
# ------------------------------------------------------------------------------------------------

# Target positions per chunk of the output head (config key loss_chunk_tokens; null = one chunk).
# Peak memory of the head is then about 10 bytes x chunk x V (bf16 logits, their float32 copy, one
# float32 temporary), e.g. 640 MiB at V = 128k, whatever the micro-batch; and 512 rows still make a
# matrix product large enough to run at full speed.
DEFAULT_LOSS_CHUNK_TOKENS = 512


@dataclasses.dataclass(frozen=True)
class ForwardSettings:
    """How policy_logps and intuition_pass call a model; the math does not depend on them.

    loss_chunk_tokens: int or None. Compute the output head in chunks of this many target positions
        (None: all target positions at once, the logits of all of them in memory).
    packing: bool. Concatenate the rows of a batch into one sequence without padding (position ids
        restart at every row, attention stays within a row) instead of padding them to one length.
    """
    loss_chunk_tokens: Optional[int] = DEFAULT_LOSS_CHUNK_TOKENS
    packing: bool = False


_SETTINGS = ForwardSettings()


@contextlib.contextmanager
def forward_settings(**changes):
    """Inside this block, model calls use ForwardSettings with `changes` (loss_chunk_tokens, packing)."""
    global _SETTINGS
    saved = _SETTINGS
    _SETTINGS = dataclasses.replace(saved, **changes)
    try:
        yield _SETTINGS
    finally:
        _SETTINGS = saved


class ChunkedTargetLogps(torch.autograd.Function):
    """log p(target) (and the argmax) of a linear output head, computed chunk by chunk.

    forward(hidden (..., N, H), weight (V, H), bias (V,) or None, targets (..., N) long, chunk int, argmax
    bool) -> (logps (..., N) float32, or float64 for float64 inputs; argmax (..., N) long, empty unless
    asked). The leading dims are flattened; the outputs are new tensors, not views (a model whose
    output is a view would trip FSDP2's backward hook on any in-place op).
    Forward: logits of `chunk` rows at a time, upcast to float32, reduced to the log-prob of the
    target and the log-sum-exp (kept: N floats). Backward recomputes the logits instead of storing
    them, in blocks of vocabulary columns sized to hold as many logits as one forward chunk:
    d logp_n / d logits_nv = 1[v = t_n] - softmax_nv, so each block's gradient is exact on its own,
    and grad_weight[block] is one matrix product over all N rows, as in the unchunked backward (a
    running sum over token chunks would round at every chunk in bf16, or need a float32 (V, H) copy).
    The products run in the dtype the forward's F.linear produced (bf16 under autocast of float32
    weights), and the gradients come back in each input's own dtype.
    When all N rows fit in one chunk, the forward keeps their softmax for backward instead (no
    recomputation): that is one chunk's logits, the memory the unchunked head would hold anyway.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, argmax):
        lead = hidden.shape[:-1]
        flat_hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        N = flat_hidden.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logps_out = torch.empty(lead, dtype=acc, device=hidden.device)
        best_out = torch.empty(lead if argmax else (0,), dtype=torch.long, device=hidden.device)
        logps, best = logps_out.view(-1), best_out.view(-1)  # filled through these flat views
        lse = torch.empty(N, dtype=acc, device=hidden.device)
        ctx.compute_dtype = hidden.dtype
        probs = None
        for start in range(0, N, chunk):
            rows = slice(start, start + chunk)
            logits = F.linear(flat_hidden[rows], weight, bias)
            ctx.compute_dtype = logits.dtype
            logits = logits.to(acc)
            lse[rows] = torch.logsumexp(logits, -1)
            logps[rows] = logits.gather(-1, targets[rows, None]).squeeze(-1) - lse[rows]
            if argmax:
                best[rows] = logits.argmax(-1)
            if N <= chunk and any(ctx.needs_input_grad[:3]):
                probs = logits.sub_(lse[:, None]).exp_()  # (N, V), in place: the logits are not needed again
        ctx.save_for_backward(hidden, weight, bias, targets, lse, probs)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(best_out)
        return logps_out, best_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, _grad_argmax):
        hidden, weight, bias, targets, lse, probs = ctx.saved_tensors
        shape, hidden, targets = hidden.shape, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        N, V = hidden.shape[0], weight.shape[0]
        dtype = ctx.compute_dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        # Explicit casts below decide every dtype; an autocast region around backward must not.
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(dtype)
            g = grad_logps.reshape(-1).to(lse.dtype)
            grad_h = torch.zeros(hidden.shape, dtype=lse.dtype, device=hidden.device) if need_h else None
            grad_w = torch.empty_like(weight) if need_w else None
            grad_b = torch.empty_like(bias) if need_b else None
            columns = V if N <= ctx.chunk else max(1, ctx.chunk * V // N)
            for start in range(0, V, columns):
                cols = slice(start, start + columns)
                w = weight[cols].to(dtype)
                if probs is None:  # recompute this block's softmax from the logits
                    logits = F.linear(h, w, None if bias is None else bias[cols].to(dtype)).to(lse.dtype)
                    grad = logits.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # in place: -g * softmax
                else:  # one block of all V columns, kept by the forward
                    grad = probs * -g[:, None]
                # + g at each row's target
                inside = ((targets >= start) & (targets < start + grad.shape[1])).nonzero().squeeze(-1)
                grad[inside, targets[inside] - start] += g[inside]
                if need_b:
                    grad_b[cols] = grad.sum(0).to(bias.dtype)
                grad = grad.to(dtype)
                if need_w:
                    grad_w[cols] = (grad.T @ h).to(weight.dtype)
                if need_h:
                    grad_h += grad @ w
        grad_h = grad_h.to(hidden.dtype).reshape(shape) if need_h else None
        return grad_h, grad_w, grad_b, None, None, None


def _chunkable(model, head):
    """Whether the head can be computed by ChunkedTargetLogps: a plain linear layer whose output the
    model returns unchanged (some models scale or soft-cap the logits after lm_head)."""
    config = getattr(model, "config", None)
    changes_logits = any(getattr(config, key, None) not in (None, 1, 1.0)
                         for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return isinstance(head, torch.nn.Linear) and not changes_logits


@contextlib.contextmanager
def chunked_head(model, targets, chunk, argmax=False):
    """Inside this block, lm_head returns ChunkedTargetLogps of its input instead of logits.

    Use inside target_positions_only, so that the head's input is the (1, N, H) hidden states of the
    target positions. targets: (N,) long. Yields a dict; after the call, the model's output `logits`
    is logps (1, N) (with gradient) and dict["argmax"] is (N,) long when argmax.
    The projection runs inside lm_head's own call, within the model's forward: where FSDP2 has
    unsharded the weight, and on the model's output tensor, whose backward hook FSDP2 relies on.
    """
    head = model.get_output_embeddings()
    out = {}

    def forward(hidden):
        logps, best = ChunkedTargetLogps.apply(hidden, head.weight, head.bias, targets.to(hidden.device)[None],
                                               int(chunk), argmax)
        out["argmax"], out["logps"] = best.reshape(-1), logps
        return logps

    saved = head.__dict__.get("forward")
    head.forward = forward
    try:
        yield out
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


def pack_rows(input_ids, attention_mask, labels):
    """Rows of a padded batch as one sequence without padding.

    input_ids, attention_mask, labels: (B, T); each row's tokens are where attention_mask is 1,
    contiguous (right or left padding). Returns (keep (B, T) bool, the tokens kept in row-major
    order; position_ids (1, L): 0, 1, ... restarting at every row; labels (1, L), with -100 at each
    row's first token, which in the packed sequence would otherwise be predicted by the row before).
    With these labels the target positions of the packed sequence are exactly those of the padded
    rows, in the same (row-major) order.
    """
    keep = attention_mask.bool()
    lengths = keep.sum(-1)
    starts = torch.cumsum(lengths, 0) - lengths  # (B,) first packed index of each row
    L = int(lengths.sum())
    index = torch.arange(L, device=input_ids.device)
    row = torch.repeat_interleave(torch.arange(len(lengths), device=input_ids.device), lengths)
    position_ids = (index - starts[row])[None]
    packed_labels = labels[keep].clone()
    packed_labels[starts[lengths > 0]] = IGNORE_INDEX
    return keep, position_ids, packed_labels[None]


def _target_logps(model, input_ids, attention_mask, labels, intuitive_ids=None, lam=0.0, argmax=False):
    """One forward of `model`, returning the log-probs of the target tokens (and the argmax there).

    input_ids, attention_mask, labels: (B, T). intuitive_ids: (B, T) long, read blended when lam > 0.
    Honours the ForwardSettings of forward_settings(): chunked head, packing.
    Returns (token_logps (N,), argmax (N,) long or None, mask (B, T-1) bool), the N target positions
    in the row-major order of `mask`.
    """
    settings = _SETTINGS
    mask = _target_mask(labels)
    targets = labels[:, 1:][mask]
    if settings.packing:
        keep, position_ids, packed_labels = pack_rows(input_ids, attention_mask, labels)
        # No attention mask: transformers then keeps attention within each run of position ids
        # (a block-diagonal mask for sdpa/eager, the varlen kernel for flash_attention_2).
        inputs = dict(input_ids=input_ids[keep][None], position_ids=position_ids, attention_mask=None)
        model_mask = _target_mask(packed_labels)
        intuitive_ids = intuitive_ids[keep][None] if intuitive_ids is not None else None
    else:
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
        model_mask = mask
    blend = intuitive_ids is not None and lam > 0
    chunk = settings.loss_chunk_tokens
    head = model.get_output_embeddings()
    chunked = chunk is not None and _chunkable(model, head)
    with contextlib.ExitStack() as stack:
        stack.enter_context(target_positions_only(model, model_mask))
        if blend:
            stack.enter_context(blended_input_embeddings(model, intuitive_ids, lam))
        if chunked:
            out = stack.enter_context(chunked_head(model, targets, chunk, argmax))
        output = model(**inputs, use_cache=False).logits
    if chunked:
        if output is not out["logps"]:
            raise ValueError(f"{type(model).__name__} changes the logits after lm_head, so the chunked loss head "
                             "cannot be used with it; set loss_chunk_tokens=null")
        return output[0], (out["argmax"] if argmax else None), mask
    logits = output[0]  # (N, V)
    return gather_logps(logits, targets), (logits.argmax(-1) if argmax else None), mask


def policy_logps(model, input_ids, attention_mask, labels, intuitive_ids=None, lam=0.0):
    """One forward of `model`; log-probabilities of the target tokens.

    input_ids, attention_mask, labels: (B, T). intuitive_ids: (B, T) long or None.
    With intuitive_ids given and lam > 0 the model reads blended embeddings (spec §1.3).
    Returns (logps (B, T-1) float32, zero off the mask; mask (B, T-1) bool).
    """
    token_logps, _, mask = _target_logps(model, input_ids, attention_mask, labels, intuitive_ids, lam)
    # masked_scatter fills the mask in row-major order, the order of the target positions.
    logps = torch.zeros(mask.shape, dtype=token_logps.dtype, device=token_logps.device)
    return logps.masked_scatter(mask, token_logps), mask


@torch.no_grad()
def intuition_pass(model, input_ids, attention_mask, labels):
    """The model's own one-step predictions of the answer (spec §1.1, §1.2), without gradient.

    input_ids, attention_mask, labels: (B, T).
    Returns (intuitive_ids x' (B, T) long; logps (B, T-1) of the ground truth given x, zero off the
    mask, used only for the `loss_sft` metric).
    x'[b, t+1] = argmax logits[b, t] where labels[b, t+1] != -100, else x[b, t+1]; x'[b, 0] = x[b, 0]:
    the prompt and the padding are never replaced.
    """
    token_logps, best, mask = _target_logps(model, input_ids, attention_mask, labels, argmax=True)
    intuitive_ids = input_ids.clone()
    shifted = intuitive_ids[:, 1:]  # a view: writing into it writes x'[:, 1:]
    shifted[mask] = best.to(intuitive_ids.dtype)
    logps = torch.zeros(mask.shape, dtype=token_logps.dtype, device=token_logps.device)
    return intuitive_ids, logps.masked_scatter(mask, token_logps)


def row_mean(values, mask):
    """Mean of `values` over each row's mask.

    values: (B, T-1). mask: (B, T-1) bool. Returns (B,): sum over the mask / n[b], 0 where n[b] == 0.
    """
    # torch.where (not a product) so that whatever sits off the mask cannot leak in, not even a NaN.
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(-1)
    return total / mask.sum(-1).clamp(min=1)


# ------------------------------------------------------------------------------------------------
# Relation Propagation (spec §2)
# ------------------------------------------------------------------------------------------------

def discounted_cumsum(x, gamma, reverse=False):
    """Discounted cumulative sum along the last dimension.

    x: (B, T) (any leading dims). gamma: float >= 0.
    reverse=False: y_t = sum_{k <= t} gamma^(t-k) x_k.   reverse=True: y_t = sum_{k >= t} gamma^(k-t) x_k.
    Returns y with the shape and dtype of x; differentiable.

    A blocked scan in float64 (float32 on MPS, which has no float64): within blocks of C = SCAN_BLOCK
    tokens, one (C, C) lower-triangular matrix of gamma powers; between blocks, the value at the end
    of each block is carried forward with gamma^C by the same scan applied to the (T/C) block ends.
    Only non-negative powers of gamma appear, so nothing overflows; gamma^k underflowing to 0 is
    the correct limit. Why float64: at T = 32k the float32 results are then within 6e-8 relative of a
    float64 loop (their own rounding), while the same scan accumulated in float32 measured 2.5e-6
    relative on positive inputs and 4e-2 on signed ones (cancellation). The scan is O(T*C) flops,
    negligible next to the model's forward (README, "Cost", has the measured figures).
    """
    if reverse:
        return discounted_cumsum(x.flip(-1), gamma, reverse=False).flip(-1)
    T = x.shape[-1]
    if T == 0:
        return x.clone()
    acc = torch.float32 if x.device.type == "mps" else torch.float64
    y = _discounted_scan(x.reshape(-1, T).to(acc), float(gamma))
    return y.reshape(x.shape).to(x.dtype)


def _discounted_scan(x, gamma):
    """Forward discounted scan y_t = x_t + gamma * y_{t-1}. x: (R, T) -> (R, T), same dtype."""
    R, T = x.shape
    C = min(T, max(2, SCAN_BLOCK))  # C >= 2, so each level of the recursion is shorter
    n_blocks = -(-T // C)
    # Zeros after the end change nothing before it.
    blocks = F.pad(x, (0, n_blocks * C - T)).view(R, n_blocks, C)
    k = torch.arange(C, device=x.device, dtype=x.dtype)
    lag = k[:, None] - k[None, :]  # lag[j, i] = j - i
    # decay[j, i] = gamma^(j - i) for i <= j, else 0; torch.pow gives 0^0 = 1, so gamma = 0 is y = x.
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    decay = torch.where(lag >= 0, torch.pow(gamma, lag.clamp(min=0)), zero)
    y = blocks @ decay.T  # (R, n_blocks, C): the scan restarted at each block's start
    if n_blocks > 1:
        # y at the end of block b is a scan over the block ends with discount gamma^C.
        ends = _discounted_scan(y[:, :, -1], gamma ** C)  # (R, n_blocks)
        # Block b starts from y at the end of block b-1 (nothing before block 0), decayed by gamma^(j+1).
        carry = F.pad(ends[:, :-1], (1, 0))  # (R, n_blocks)
        y = y + carry[:, :, None] * torch.pow(gamma, k + 1)
    return y.reshape(R, n_blocks * C)[:, :T]


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


# ------------------------------------------------------------------------------------------------
# Lambda (spec §1)
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# SFT and IFT (spec §3)
# ------------------------------------------------------------------------------------------------

def sft_rows(model, input_ids, attention_mask, labels):
    """Per-row SFT loss: mean negative log-likelihood of each row's target tokens.

    input_ids, attention_mask, labels: (B, T).
    Returns (row_losses (B,) with gradient, 0 where n == 0; valid (B,) bool, n > 0;
    metrics {"loss": (B,)} detached).
    """
    logps, mask = policy_logps(model, input_ids, attention_mask, labels)
    row_losses = row_mean(-logps, mask)
    return row_losses, mask.any(-1), {"loss": row_losses.detach()}


def ift_rows(model, input_ids, attention_mask, labels, lam, gamma=0.95, propagation_type="loss",
             propagation_side="left", propagation_norm="L1"):
    """Per-row IFT loss (spec §1-§3): sum_t(-l * w) / n over each row's targets.

    input_ids, attention_mask, labels: (B, T). lam: float, already scheduled/disturbed.
    Returns (row_losses (B,) with gradient, 0 where n == 0; valid (B,) bool, n > 0; metrics, each
    (B,) detached and 0 on invalid rows: loss, loss_sft (NLL of the intuition pass, i.e. given the
    ground truth), loss_further (unweighted NLL of the blended pass), weight_max (largest w of the
    row), weight_first (w at the row's first target)).
    """
    lam = float(lam)
    if lam > 0:
        # §1.1-1.3: the intuition pass (no gradient), then the blended pass with gradient.
        intuitive_ids, sft_logps = intuition_pass(model, input_ids, attention_mask, labels)
        logps, mask = policy_logps(model, input_ids, attention_mask, labels, intuitive_ids, lam)
    else:
        # §1.4: lambda = 0 is one ordinary forward, the same call SFT makes.
        logps, mask = policy_logps(model, input_ids, attention_mask, labels)
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


def dft_rows(model, input_ids, attention_mask, labels):
    """Per-row DFT loss (Dynamic Fine-Tuning, Wu et al. 2025, arXiv 2508.05629): SFT with each token's
    NLL weighted by its own probability, detached: sum_t -sg(p_t) · log p_t / n, averaged over rows
    like SFT. Tokens the model already finds likely count fully; unlikely ones are damped.

    input_ids, attention_mask, labels: (B, T).
    Returns (row_losses (B,) with gradient; valid (B,) bool, n > 0; metrics (B,) detached: loss,
    nll (the unweighted mean NLL), weight_mean (the mean of sg(p_t) over the row's targets)).
    """
    logps, mask = policy_logps(model, input_ids, attention_mask, labels)
    weights = logps.detach().exp()  # sg(p_t); row_mean ignores what sits off the mask
    row_losses = row_mean(-weights * logps, mask)
    return row_losses, mask.any(-1), {"loss": row_losses.detach(), "nll": row_mean(-logps.detach(), mask),
                                      "weight_mean": row_mean(weights, mask)}


def reduce_rows(row_losses, valid, row_metrics):
    """The one reduction of per-row losses, used by the trainer and by sft_loss / ift_loss.

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


def _mean_over_valid(row_losses, valid, row_metrics):
    """(loss, metrics): means over the valid rows, 0 when there is none; metrics are 0-dim detached."""
    loss_sum, metric_sums, count = reduce_rows(row_losses, valid, row_metrics)
    count = count.clamp(min=1)
    return loss_sum / count, {k: v / count for k, v in metric_sums.items()}


def sft_loss(model, input_ids, attention_mask, labels):
    """SFT loss: per-sequence mean NLL of the target tokens, averaged over sequences with n > 0.

    input_ids, attention_mask, labels: (B, T).
    Returns (loss 0-dim with gradient, {"loss": 0-dim detached}).
    """
    return _mean_over_valid(*sft_rows(model, input_ids, attention_mask, labels))


def ift_loss(model, input_ids, attention_mask, labels, lam, gamma=0.95, propagation_type="loss",
             propagation_side="left", propagation_norm="L1"):
    """IFT loss (spec §3): mean over rows with n > 0 of sum_t(-l * w) / n.

    input_ids, attention_mask, labels: (B, T). lam: float.
    Returns (loss 0-dim with gradient, metrics: 0-dim detached means over valid rows of loss,
    loss_sft, loss_further, weight_max, weight_first). lam = 0, gamma = 0 is sft_loss bit for bit.
    """
    return _mean_over_valid(*ift_rows(model, input_ids, attention_mask, labels, lam, gamma, propagation_type,
                                      propagation_side, propagation_norm))


# ------------------------------------------------------------------------------------------------
# Preference losses
# ------------------------------------------------------------------------------------------------

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


def simpo_loss(chosen_logps, rejected_logps, beta, gamma_margin):
    """SimPO (Meng et al. 2024, arXiv 2405.14734): reference-free and length-normalised,
    -log σ(β · (chosen_logps − rejected_logps) − gamma_margin).

    chosen_logps, rejected_logps: (B,) per-token MEAN log-probs of each response.
    Returns (losses (B,), chosen_rewards (B,) = β · chosen_logps, rejected_rewards (B,)), rewards detached.
    """
    losses = -F.logsigmoid(beta * (chosen_logps - rejected_logps) - gamma_margin)
    return losses, (beta * chosen_logps).detach(), (beta * rejected_logps).detach()


def _pad_right(t, length, value):
    """t (B, T) -> (B, length), padded on the right with `value`."""
    return F.pad(t, (0, length - t.shape[1]), value=value)


def concatenated_logps(model, batch):
    """Chosen and rejected responses in ONE forward on the (2B, T) concatenation.

    batch: chosen_/rejected_ input_ids, attention_mask, labels, each (B, T). (Should the two T differ,
    the shorter is padded on the right with masked, label -100 tokens, which changes no log-prob.)
    Returns a dict of (B,) tensors: chosen_logps, rejected_logps (summed target log-probs, with
    gradient if the model has one), chosen_n, rejected_n (target counts, long).
    """
    T = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    parts = {}
    for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        chosen, rejected = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
        parts[key] = torch.cat([_pad_right(chosen, T, pad), _pad_right(rejected, T, pad)])
    logps, mask = policy_logps(model, parts["input_ids"], parts["attention_mask"], parts["labels"])
    sums, counts = logps.sum(-1), mask.sum(-1)
    B = batch["chosen_input_ids"].shape[0]
    return {"chosen_logps": sums[:B], "rejected_logps": sums[B:],
            "chosen_n": counts[:B], "rejected_n": counts[B:]}


# ------------------------------------------------------------------------------------------------
# The registry: what the trainer calls
# ------------------------------------------------------------------------------------------------

# Each loss is a dataclass registered under its name: its fields are its config keys (default, allowed
# values, the comment config/loss/<name>.yaml shows: that file is written from them), and `rows`
# computes it. The trainer builds one from the run's `loss` section and asks it; nothing else knows
# which losses exist.

LOSSES = {}


def register(cls):
    """Class decorator: make a Loss subclass a dataclass and the loss named cls.name."""
    cls = dataclass(cls)
    LOSSES[cls.name] = cls
    return cls


class Loss:
    """A loss and its options. Subclasses set `name`, `needs_pairs` and implement `rows`."""

    name: ClassVar[str]
    needs_pairs: ClassVar[bool] = False  # trains on (chosen, rejected) pairs

    @property
    def needs_reference(self):
        """Whether `rows` needs a frozen reference model."""
        return False

    def lam(self, step, total_steps, warmup_steps, seed, disturb):
        """IFT's lambda for optimizer step `step`; None for losses without one."""
        return None

    def no_grad_passes(self, lam):
        """Forwards of the policy without gradient that `rows` makes per micro-batch besides the trained
        one (the FLOPs count, flops.py); a reference model's forward is counted by the trainer."""
        return 0

    def rows(self, policy, reference, batch, lam):
        """Per-row losses of one micro-batch. batch: dict of (B, T) tensors (chosen_/rejected_ ones when
        needs_pairs). Returns (row_losses (B,) with gradient; valid (B,) bool; metrics: dict of (B,)
        detached float tensors, always including "loss")."""
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


def needs_reference(loss_cfg):
    """True when the loss needs a frozen reference model (dpo / ipo, unless reference_free)."""
    return build(loss_cfg).needs_reference


def needs_pairs(loss_cfg):
    """True when the loss trains on (chosen, rejected) pairs (dpo / ipo / orpo)."""
    return build(loss_cfg).needs_pairs


def batch_loss(loss_cfg, policy, reference, batch, lam):
    """Per-row loss of one micro-batch, for any registered loss.

    loss_cfg: a Loss, or a mapping with `name` and that loss's keys. policy: the model being trained.
    reference: frozen model or None (used only when needs_reference). batch: dict of (B, T) tensors.
    lam: IFT's lambda for this step (ignored by the other losses).
    Returns (row_losses (B,) with gradient, 0 on invalid rows; valid (B,) bool; row_metrics: dict of
    (B,) detached float tensors, 0 on invalid rows). reduce_rows sums them. Valid: n > 0 for sft / ift;
    both responses have targets for dpo / ipo / orpo.
    """
    row_losses, valid, metrics = build(loss_cfg).rows(policy, reference, batch, lam)
    # Invalid rows: exactly 0, so that (row_losses * valid) can never meet a NaN or inf.
    row_losses = torch.where(valid, row_losses, torch.zeros_like(row_losses))
    metrics = {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in metrics.items()}
    return row_losses, valid, metrics


def _unpack(batch, prefix=""):
    return batch[prefix + "input_ids"], batch[prefix + "attention_mask"], batch[prefix + "labels"]


@register
class SFT(Loss):
    """Supervised fine-tuning: per-sequence mean negative log-likelihood of the answer, averaged over sequences."""

    name: ClassVar[str] = "sft"

    def rows(self, policy, reference, batch, lam):
        return sft_rows(policy, *_unpack(batch))


@register
class IFT(Loss):
    """Intuitive Fine-Tuning (Hua et al., arXiv 2405.11870). See README, "IFT", and shared IFT_SPEC."""

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

    def lam(self, step, total_steps, warmup_steps, seed, disturb):
        """Scheduled lambda (spec §1), disturbed in training (disturb=True), never in evaluation."""
        lam = scheduled_lambda(step, total_steps, warmup_steps, self.min_lambda, self.max_lambda,
                               self.lambda_schedule)
        return disturbed_lambda(lam, seed, step, self.lambda_disturb, self.disturb_std) if disturb else lam

    def no_grad_passes(self, lam):
        return 1 if float(lam) > 0 else 0  # the intuition pass; lambda = 0 skips it (ift_rows)

    def rows(self, policy, reference, batch, lam):
        return ift_rows(policy, *_unpack(batch), lam, self.gamma, self.propagation_type, self.propagation_side,
                        self.propagation_norm)


def _preference_rows(policy, reference, batch, loss_type, beta, label_smoothing, reference_free):
    """DPO / IPO rows: both responses of each pair through the policy (and the reference) in one forward."""
    pol = concatenated_logps(policy, batch)
    if reference_free:
        ref = {"chosen_logps": torch.zeros_like(pol["chosen_logps"]),
               "rejected_logps": torch.zeros_like(pol["rejected_logps"])}
    elif "reference_chosen_logps" in batch:  # reference_logps=precompute: the reference's sums, computed before
        ref = {k: batch[f"reference_{k}"].to(pol[k].dtype) for k in ("chosen_logps", "rejected_logps")}
    else:
        if reference is None:
            raise ValueError(f"loss={loss_type} with reference_free=false needs a reference model")
        with torch.no_grad():
            ref = concatenated_logps(reference, batch)
    row_losses, chosen_rewards, rejected_rewards = preference_loss(
        pol["chosen_logps"], pol["rejected_logps"], ref["chosen_logps"], ref["rejected_logps"],
        beta, label_smoothing=label_smoothing, loss_type=loss_type, reference_free=reference_free)
    valid = (pol["chosen_n"] > 0) & (pol["rejected_n"] > 0)
    return row_losses, valid, {
        "loss": row_losses.detach(),
        "rewards_chosen": chosen_rewards,
        "rewards_rejected": rejected_rewards,
        "rewards_accuracy": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "rewards_margin": chosen_rewards - rejected_rewards,
        "logps_chosen": pol["chosen_logps"].detach(),
        "logps_rejected": pol["rejected_logps"].detach(),
    }


REFERENCE_FREE = "true: a uniform reference (no reference model is loaded)"


@register
class DPO(Loss):
    """Direct Preference Optimization (Rafailov et al., 2023); label_smoothing > 0 is conservative DPO (cDPO)."""

    name: ClassVar[str] = "dpo"
    needs_pairs: ClassVar[bool] = True
    beta: float = option(0.1, "inverse temperature of the implicit reward; > 0", low=0, low_open=True)
    label_smoothing: float = option(0.0, "cDPO: assumed probability that a preference label is flipped; in [0, 0.5)",
                                    low=0, high=0.5, high_open=True)
    reference_free: bool = option(False, REFERENCE_FREE)

    @property
    def needs_reference(self):
        return not self.reference_free

    def rows(self, policy, reference, batch, lam):
        return _preference_rows(policy, reference, batch, "dpo", self.beta, self.label_smoothing, self.reference_free)


@register
class IPO(Loss):
    """Identity Preference Optimisation (Azar et al., 2023): (h - 1 / (2 beta))^2 on the reference-relative margin h."""

    name: ClassVar[str] = "ipo"
    needs_pairs: ClassVar[bool] = True
    beta: float = option(0.1, "regularisation strength (tau in the paper); > 0", low=0, low_open=True)
    reference_free: bool = option(False, REFERENCE_FREE)

    @property
    def needs_reference(self):
        return not self.reference_free

    def rows(self, policy, reference, batch, lam):
        # IPO has no label smoothing
        return _preference_rows(policy, reference, batch, "ipo", self.beta, 0.0, self.reference_free)


@register
class ORPO(Loss):
    """Odds Ratio Preference Optimization (Hong et al., 2024): SFT on the chosen answer minus
    beta * log sigmoid(log odds ratio of chosen over rejected). No reference model."""

    name: ClassVar[str] = "orpo"
    needs_pairs: ClassVar[bool] = True
    beta: float = option(0.1, "weight of the odds-ratio term (lambda in the paper); >= 0", low=0)

    def rows(self, policy, reference, batch, lam):
        pol = concatenated_logps(policy, batch)
        # ORPO works on per-token mean log-probs (odds of a whole response would vanish with length).
        chosen = pol["chosen_logps"] / pol["chosen_n"].clamp(min=1)
        rejected = pol["rejected_logps"] / pol["rejected_n"].clamp(min=1)
        row_losses = orpo_loss(chosen, rejected, self.beta)
        valid = (pol["chosen_n"] > 0) & (pol["rejected_n"] > 0)
        return row_losses, valid, {
            "loss": row_losses.detach(),
            "nll": -chosen.detach(),
            "log_odds_ratio": orpo_log_odds(chosen, rejected).detach(),
            "logps_chosen": chosen.detach(),
            "logps_rejected": rejected.detach(),
        }


@register
class DFT(Loss):
    """Dynamic Fine-Tuning (Wu et al., 2025, arXiv 2508.05629): SFT with each token's NLL weighted by its own
    probability, detached: -sum_t sg(p_t) * log p_t / n per sequence, averaged over sequences. No keys."""

    name: ClassVar[str] = "dft"

    def rows(self, policy, reference, batch, lam):
        return dft_rows(policy, *_unpack(batch))


@register
class SimPO(Loss):
    """SimPO (Meng et al., 2024, arXiv 2405.14734): reference-free, length-normalised preference loss
    -log sigmoid(beta * (mean log p(chosen) - mean log p(rejected)) - gamma_margin), per-token mean log-probs."""

    name: ClassVar[str] = "simpo"
    needs_pairs: ClassVar[bool] = True
    beta: float = option(2.0, "scale of the length-normalised reward; > 0 (the paper uses 2.0-2.5)", low=0,
                         low_open=True)
    gamma_margin: float = option(1.0, "target reward margin; >= 0 (the paper's gamma / beta is about 0.5)", low=0)

    def rows(self, policy, reference, batch, lam):
        pol = concatenated_logps(policy, batch)
        chosen = pol["chosen_logps"] / pol["chosen_n"].clamp(min=1)
        rejected = pol["rejected_logps"] / pol["rejected_n"].clamp(min=1)
        row_losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, self.beta, self.gamma_margin)
        valid = (pol["chosen_n"] > 0) & (pol["rejected_n"] > 0)
        return row_losses, valid, {
            "loss": row_losses.detach(),
            "rewards_margin": chosen_rewards - rejected_rewards,
            "rewards_accuracy": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
            "logps_chosen": chosen.detach(),
            "logps_rejected": rejected.detach(),
        }


LOSS_NAMES = tuple(LOSSES)


# ------------------------------------------------------------------------------------------------
# Method-independent evaluation metrics
# ------------------------------------------------------------------------------------------------

def shared_eval_metrics(model, batch):
    """Held-out metrics computed the same way whatever the training loss (λ = 0, no weights), so that
    runs of different methods can be compared: each method's own loss cannot.

    batch: SFT keys (input_ids, attention_mask, labels) or pair keys (chosen_* / rejected_*), each (B, T).
    Returns a dict of (B,) float tensors: `nll`, the per-token mean NLL of the chosen answer; with pairs
    also `margin`, mean log p(chosen) − mean log p(rejected) (per-token means, as ORPO and SimPO use), and
    `pref_accuracy`, 1.0 where the chosen answer is the more likely one by that measure, else 0.0.
    """
    if "chosen_input_ids" not in batch:
        logps, mask = policy_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return {"nll": row_mean(-logps, mask)}
    out = concatenated_logps(model, batch)
    chosen = out["chosen_logps"] / out["chosen_n"].clamp(min=1)
    rejected = out["rejected_logps"] / out["rejected_n"].clamp(min=1)
    return {"nll": -chosen, "margin": chosen - rejected, "pref_accuracy": (chosen > rejected).to(chosen.dtype)}


def chosen_view(batch):
    """The chosen half of a pair batch under the SFT keys (input_ids, attention_mask, labels), for
    evaluating a loss that trains on single answers on preference data."""
    return {k[len("chosen_"):]: v for k, v in batch.items() if k.startswith("chosen_")}
