"""How the losses call a model: one forward of a Hugging Face causal LM (FSDP2-sharded or not) that
yields the log-probabilities of the target tokens, and nothing the loss does not need.

The losses receive a `ModelCall` (its settings: `loss_chunk_tokens`, `packing`) and ask it for
log-probs; nothing here is global. One call of `ModelCall.target_logps` runs the model's own root
`forward` with hooks on two of its submodules, each registered for that call only and removed after it:

- always, a forward pre-hook on the output embedding (lm_head), `target_positions_only`: the head
  sees the hidden states of the target positions only, so no (B, T, V) logits tensor is ever made;
- with `loss_chunk_tokens` set (and a plain linear head), `chunked_head`: lm_head's forward is
  replaced, for the call, by `ChunkedTargetLogps`, which returns the target log-probs, chunk by chunk,
  instead of logits; the model's output field `.logits` then holds log-probs, which `target_logps`
  reads under that name and checks;
- with intuitive ids and lambda > 0 (IFT, spec §1.3), `blended_input_embeddings`: a pre-hook and a
  forward hook on the input embedding blend E[x] with E[x'].

Why hooks and not our own call of the submodules: under FSDP2 (`fully_shard`) the root forward is what
unshards the root's parameters (embeddings, head) and registers the backward hooks that reduce their
gradients; code outside that forward would meet sharded weights. Hooks run inside it.

With `packing`, the rows of a batch are concatenated into one sequence without padding (`pack_rows`);
the target positions, and so the results, are the same, in the same order.

Conventions: B rows, T tokens; `labels` is `input_ids` with -100 where there is no loss; position t
predicts token t+1, so per-token results are (B, T-1) with `mask[b, t] = labels[b, t+1] != -100`.
Log-probabilities are float32 (float64 when the model runs in float64).
"""

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# Target positions per chunk of the output head (config key loss_chunk_tokens; null = one chunk).
# Peak memory of the head is then about 10 bytes x chunk x V (bf16 logits, their float32 copy, one
# float32 temporary), e.g. 640 MiB at V = 128k, whatever the micro-batch; and 512 rows still make a
# matrix product large enough to run at full speed.
DEFAULT_LOSS_CHUNK_TOKENS = 512


@dataclass
class TargetLogps:
    """What one forward yields. N target positions, in the row-major order of `mask`.

    token_logps: (N,) float32, log p(target), with gradient when the model has one.
    argmax: (N,) long, the model's greedy prediction at each target position, or None when not asked.
    mask: (B, T-1) bool, the target positions.
    """
    token_logps: torch.Tensor
    argmax: Optional[torch.Tensor]
    mask: torch.Tensor

    def padded(self):
        """token_logps laid out as (B, T-1), zero off the mask."""
        logps = torch.zeros(self.mask.shape, dtype=self.token_logps.dtype, device=self.token_logps.device)
        return logps.masked_scatter(self.mask, self.token_logps)  # fills the mask in row-major order


@dataclass
class PairLogps:
    """Both answers of B preference pairs, scored in one forward (ModelCall.pair_logps).

    chosen, rejected: (B,) summed log-probs of each answer's target tokens (with gradient when the
    model has one). chosen_n, rejected_n: (B,) long, each answer's target count.
    """
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_n: torch.Tensor
    rejected_n: torch.Tensor

    @property
    def valid(self):
        """(B,) bool: both answers have a target."""
        return (self.chosen_n > 0) & (self.rejected_n > 0)

    def means(self):
        """(chosen, rejected) per-token mean log-probs, (B,) each (ORPO, SimPO and the shared metrics)."""
        return self.chosen / self.chosen_n.clamp(min=1), self.rejected / self.rejected_n.clamp(min=1)


@dataclass
class HeadInputs:
    """What a model's output head reads at N target positions (ModelCall.head_inputs).
    hidden: (N, H). weight: (V, H). bias: (V,) or None. No gradient."""
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]


def _scatter(mask, values):
    """values (N,) laid out as mask's shape (B, T-1) in row-major order, zero off the mask."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


@dataclass(frozen=True)
class ModelCall:
    """How the losses call a model; the math does not depend on it (the tests check both ways agree).

    loss_chunk_tokens: int or None. Compute the output head in chunks of this many target positions
        (None: all target positions at once, the logits of all of them in memory).
    packing: bool. Concatenate the rows of a batch into one sequence without padding (position ids
        restart at every row, attention stays within a row) instead of padding them to one length.
    """
    loss_chunk_tokens: Optional[int] = DEFAULT_LOSS_CHUNK_TOKENS
    packing: bool = False

    def target_logps(self, model, input_ids, attention_mask, labels, intuitive_ids=None, lam=0.0, argmax=False):
        """One forward of `model`: the log-probs of the target tokens (and the argmax there).

        input_ids, attention_mask, labels: (B, T). intuitive_ids: (B, T) long, read blended when lam > 0.
        Returns TargetLogps.
        """
        mask = _target_mask(labels)
        targets = labels[:, 1:][mask]
        inputs, model_mask, intuitive_ids = self._model_inputs(input_ids, attention_mask, labels, intuitive_ids)
        chunk = self.loss_chunk_tokens
        chunked = chunk is not None and _chunkable(model, model.get_output_embeddings())
        with contextlib.ExitStack() as hooks:
            hooks.enter_context(target_positions_only(model, model_mask))
            if intuitive_ids is not None and lam > 0:
                hooks.enter_context(blended_input_embeddings(model, intuitive_ids, lam))
            if chunked:
                head_out = hooks.enter_context(chunked_head(model, targets, chunk, argmax))
            output = model(**inputs, use_cache=False).logits  # (1, N, V) logits, or (1, N) log-probs if chunked
        if chunked:
            logps = output
            if logps is not head_out["logps"]:
                raise ValueError(f"{type(model).__name__} changes the logits after lm_head, so the chunked loss head "
                                 "cannot be used with it; set loss_chunk_tokens=null")
            return TargetLogps(logps[0], head_out["argmax"] if argmax else None, mask)
        logits = output[0]  # (N, V)
        return TargetLogps(gather_logps(logits, targets), logits.argmax(-1) if argmax else None, mask)

    def _model_inputs(self, input_ids, attention_mask, labels, intuitive_ids=None):
        """The model's keyword arguments (packed or padded rows), the (.., T-1) mask that
        target_positions_only selects with, and intuitive_ids laid out like the inputs (or None)."""
        if not self.packing:
            return dict(input_ids=input_ids, attention_mask=attention_mask), _target_mask(labels), intuitive_ids
        keep, position_ids, packed_labels = pack_rows(input_ids, attention_mask, labels)
        # No attention mask: transformers then keeps attention within each run of position ids
        # (a block-diagonal mask for sdpa/eager, the varlen kernel for flash_attention_2).
        inputs = dict(input_ids=input_ids[keep][None], position_ids=position_ids, attention_mask=None)
        return inputs, _target_mask(packed_labels), intuitive_ids[keep][None] if intuitive_ids is not None else None

    @torch.no_grad()
    def head_inputs(self, model, input_ids, attention_mask, labels):
        """One no-grad forward of `model` (a frozen reference) that stops at its output head: what the head
        would read at the target positions, for a loss that needs the reference's whole distribution there
        (ASFT's KL) without a (N, V) tensor. The head is skipped, so no logits are made here.

        input_ids, attention_mask, labels: (B, T). Returns HeadInputs: hidden (N, H) in the model's compute
        dtype, the head's weight (V, H) and bias (V,) or None. Under FSDP2 the head's unsharded weight is
        freed after the forward, so a copy of it is kept (V x H, the memory the unsharded head takes anyway).
        """
        head = model.get_output_embeddings()
        inputs, model_mask, _ = self._model_inputs(input_ids, attention_mask, labels)
        sharded = hasattr(head.weight, "full_tensor")  # a DTensor outside the forward: FSDP2
        got = {}

        def keep_inputs(hidden):
            weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
            got["inputs"] = HeadInputs(hidden[0], weight.clone() if sharded else weight,
                                       bias.clone() if sharded and bias is not None else bias)
            return hidden.new_empty((*hidden.shape[:-1], 0))  # no logits: a new (1, N, 0) tensor, not a view

        with target_positions_only(model, model_mask), replaced_head(model, keep_inputs):
            model(**inputs, use_cache=False)
        return got["inputs"]

    def logps_and_kl(self, model, reference, input_ids, attention_mask, labels):
        """One forward of `model` (the policy): the target log-probs and, at each target position,
        KL(reference || model) over the whole vocabulary, computed chunk by chunk (TargetLogpsAndKL).

        reference: HeadInputs of the same rows (head_inputs). input_ids, attention_mask, labels: (B, T).
        Returns (logps (B, T-1), kl (B, T-1), both zero off the mask and with gradient; mask (B, T-1) bool).
        """
        mask = _target_mask(labels)
        targets = labels[:, 1:][mask]
        inputs, model_mask, _ = self._model_inputs(input_ids, attention_mask, labels)
        head = model.get_output_embeddings()
        if not _chunkable(model, head):
            raise ValueError(f"{type(model).__name__}'s output head is not a plain linear layer whose logits the "
                             "model returns unchanged; the chunked KL of loss=asft needs one")
        chunk = self.loss_chunk_tokens or max(1, int(targets.numel()))
        out = {}

        def forward(hidden):
            out["both"] = TargetLogpsAndKL.apply(hidden, head.weight, head.bias, targets.to(hidden.device)[None],
                                                 reference.hidden, reference.weight, reference.bias, int(chunk))
            return out["both"]

        with target_positions_only(model, model_mask), replaced_head(model, forward):
            both = model(**inputs, use_cache=False).logits  # (1, N, 2)
        if both is not out["both"]:
            raise ValueError(f"{type(model).__name__} changes the logits after lm_head; loss=asft cannot use it")
        logps, kl = (_scatter(mask, both[0, :, i]) for i in (0, 1))
        return logps, kl, mask

    def logps(self, model, input_ids, attention_mask, labels, intuitive_ids=None, lam=0.0):
        """One forward of `model`; log-probabilities of the target tokens.

        input_ids, attention_mask, labels: (B, T). intuitive_ids: (B, T) long or None.
        With intuitive_ids given and lam > 0 the model reads blended embeddings (spec §1.3).
        Returns (logps (B, T-1) float32, zero off the mask; mask (B, T-1) bool).
        """
        out = self.target_logps(model, input_ids, attention_mask, labels, intuitive_ids, lam)
        return out.padded(), out.mask

    @torch.no_grad()
    def intuition(self, model, input_ids, attention_mask, labels):
        """IFT's intuition pass (spec §1.1, §1.2): the model's own one-step predictions, without gradient.

        input_ids, attention_mask, labels: (B, T).
        Returns (intuitive_ids x' (B, T) long; logps (B, T-1) of the ground truth given x, zero off the
        mask, used only for the `loss_sft` metric).
        x'[b, t+1] = argmax logits[b, t] where labels[b, t+1] != -100, else x[b, t+1]; x'[b, 0] = x[b, 0]:
        the prompt and the padding are never replaced.
        """
        out = self.target_logps(model, input_ids, attention_mask, labels, argmax=True)
        intuitive_ids = input_ids.clone()
        shifted = intuitive_ids[:, 1:]  # a view: writing into it writes x'[:, 1:]
        shifted[out.mask] = out.argmax.to(intuitive_ids.dtype)
        return intuitive_ids, out.padded()

    def pair_logps(self, model, batch):
        """Chosen and rejected answers in ONE forward on the (2B, T) concatenation.

        batch: chosen_/rejected_ input_ids, attention_mask, labels, each (B, T). (Should the two T differ,
        the shorter is padded on the right with masked, label -100 tokens, which changes no log-prob.)
        Returns PairLogps.
        """
        T = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        parts = {}
        for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
            chosen, rejected = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
            parts[key] = torch.cat([_pad_right(chosen, T, pad), _pad_right(rejected, T, pad)])
        logps, mask = self.logps(model, parts["input_ids"], parts["attention_mask"], parts["labels"])
        sums, counts = logps.sum(-1), mask.sum(-1)
        B = batch["chosen_input_ids"].shape[0]
        return PairLogps(sums[:B], sums[B:], counts[:B], counts[B:])


# ------------------------------------------------------------------------------------------------
# The pieces: log-probs of targets, the hooks, the chunked head, packing
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


def _target_mask(labels):
    """labels (B, T) -> mask (B, T-1) bool: position t predicts a target token t+1."""
    return labels[:, 1:] != IGNORE_INDEX


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
        g = grad_logps.reshape(-1).to(lse.dtype)

        def logit_grad(start, cols, h, w):  # -g * softmax of these columns (the + g at the target is added for us)
            if probs is not None:  # one block of all V columns, kept by the forward
                return probs * -g[:, None]
            logits = F.linear(h, w, None if bias is None else bias[cols].to(ctx.compute_dtype)).to(lse.dtype)
            return logits.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # in place: the softmax recomputed

        grads = _linear_head_backward(hidden, weight, bias, targets, g, ctx.needs_input_grad[:3], ctx.compute_dtype,
                                      ctx.chunk, logit_grad)
        return *grads, None, None, None


class TargetLogpsAndKL(torch.autograd.Function):
    """log p(target) and KL(p_ref || p) over the whole vocabulary at each of N positions, for a linear
    head p = softmax(hidden · Wᵀ + b) against a frozen reference head p_ref = softmax(ref_hidden · W_refᵀ + b_ref),
    computed chunk by chunk so that no (N, V) tensor is made (loss=asft).

    forward(hidden (..., N, H), weight (V, H), bias (V,) or None, targets (..., N) long, ref_hidden (N, H),
    ref_weight (V, H), ref_bias (V,) or None, chunk int) -> (..., N, 2) float32 (float64 for float64 inputs):
    [..., 0] the target log-probs, [..., 1] KL(p_ref || p) = Σ_v p_ref,v (log p_ref,v − log p_v).
    Gradients reach hidden, weight and bias only (the reference is frozen).
    Forward: both heads' logits for `chunk` positions at a time, reduced to the two outputs and each
    position's two log-sum-exps (kept: 2N floats). Backward recomputes both heads' logits in blocks of
    vocabulary columns over all N positions, as ChunkedTargetLogps does; with g0, g1 the upstream
    gradients of the two outputs, d/dlogits_nv = g0·(1[v = t_n] − p_nv) + g1·(p_nv − p_ref,nv).
    The reference's products run in its own weight's dtype, outside any autocast (as in its own forward).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, chunk):
        lead = hidden.shape[:-1]
        h, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        # a new tensor, not a view (FSDP2 hooks the model's output: see ChunkedTargetLogps), filled through a flat view
        result = torch.empty((*lead, 2), dtype=acc, device=hidden.device)
        out = result.view(-1, 2)
        lse = torch.empty(h.shape[0], dtype=acc, device=hidden.device)
        ref_lse = torch.empty_like(lse)
        ctx.compute_dtype = hidden.dtype
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = F.linear(h[rows], weight, bias)
            ctx.compute_dtype = logits.dtype
            logp = logits.to(acc)
            lse[rows] = torch.logsumexp(logp, -1)
            out[rows, 0] = logp.gather(-1, targets[rows, None]).squeeze(-1) - lse[rows]
            ref_logp = _reference_logits(ref_hidden[rows], ref_weight, ref_bias, acc)
            ref_lse[rows] = torch.logsumexp(ref_logp, -1)
            logp.sub_(lse[rows, None])  # in place from here on: log p, log p_ref, then their difference
            ref_logp.sub_(ref_lse[rows, None])
            difference = logp.neg_().add_(ref_logp)  # log p_ref − log p
            p_ref = ref_logp.exp_()
            # where p_ref underflows to 0 the term is 0 (p_ref log p_ref -> 0), never 0 · inf
            out[rows, 1] = torch.where(p_ref > 0, p_ref * difference, 0.0).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ref_hidden, ref_weight, ref_bias, ref_lse)
        ctx.chunk = chunk
        return result

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse, ref_hidden, ref_weight, ref_bias, ref_lse = ctx.saved_tensors
        g = grad_out.reshape(-1, 2).to(lse.dtype)
        g_target, g_kl = g[:, 0], g[:, 1]

        def logit_grad(start, cols, h, w):  # (g_kl - g0)·p - g_kl·p_ref: two (N, columns) blocks of logits at a time
            p = F.linear(h, w, None if bias is None else bias[cols].to(ctx.compute_dtype)).to(lse.dtype)
            p = p.sub_(lse[:, None]).exp_()
            p_ref = _reference_logits(ref_hidden, ref_weight[cols], None if ref_bias is None else ref_bias[cols],
                                      lse.dtype)
            p_ref = p_ref.sub_(ref_lse[:, None]).exp_()
            return p.mul_((g_kl - g_target)[:, None]).sub_(p_ref.mul_(g_kl[:, None]))

        grads = _linear_head_backward(hidden, weight, bias, targets, g_target, ctx.needs_input_grad[:3],
                                      ctx.compute_dtype, ctx.chunk, logit_grad)
        return *grads, None, None, None, None, None


def _linear_head_backward(hidden, weight, bias, targets, g_target, needs, dtype, chunk, logit_grad):
    """The gradients of a linear head's inputs from the gradient of its logits, one block of vocabulary
    columns at a time (about chunk x V elements), so that no (N, V) tensor is made.

    hidden (..., N, H), weight (V, H), bias (V,) or None, targets (..., N) long, g_target (N,): what each
    row's target logit gets on top of logit_grad. needs: which of (hidden, weight, bias) need a gradient.
    dtype: the compute dtype of the products. logit_grad(start, cols, h, w) -> (N, columns) in g_target's
    dtype: the gradient of the logits of columns `cols` (h: hidden (N, H) and w: weight[cols] in `dtype`).
    Returns (grad_hidden, grad_weight, grad_bias), None where not needed."""
    shape, hidden, targets = hidden.shape, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    N, V = hidden.shape[0], weight.shape[0]
    need_h, need_w, need_b = needs
    # Explicit casts below decide every dtype; an autocast region around backward must not.
    with torch.autocast(hidden.device.type, enabled=False):
        h = hidden.to(dtype)
        grad_h = torch.zeros(hidden.shape, dtype=g_target.dtype, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        columns = V if N <= chunk else max(1, chunk * V // N)
        for start in range(0, V, columns):
            cols = slice(start, start + columns)
            w = weight[cols].to(dtype)
            grad = logit_grad(start, cols, h, w)
            inside = ((targets >= start) & (targets < start + grad.shape[1])).nonzero().squeeze(-1)
            grad[inside, targets[inside] - start] += g_target[inside]  # + g0 at each row's target
            if need_b:
                grad_b[cols] = grad.sum(0).to(bias.dtype)
            grad = grad.to(dtype)
            if need_w:
                grad_w[cols] = (grad.T @ h).to(weight.dtype)
            if need_h:
                grad_h += grad @ w
    return (grad_h.to(hidden.dtype).reshape(shape) if need_h else None), grad_w, grad_b


def _reference_logits(hidden, weight, bias, acc):
    """The frozen reference head's logits (n, V') in `acc`, computed in the reference weight's dtype."""
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.to(weight.dtype), weight, bias).to(acc)


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

    with replaced_head(model, forward):
        yield out


@contextlib.contextmanager
def replaced_head(model, forward):
    """Inside this block, lm_head's forward is `forward(hidden)`: it runs inside lm_head's own call,
    within the model's forward, where FSDP2 has unsharded the head's weight."""
    head = model.get_output_embeddings()
    saved = head.__dict__.get("forward")
    head.forward = forward
    try:
        yield
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


def _pad_right(t, length, value):
    """t (B, T) -> (B, length), padded on the right with `value`."""
    return F.pad(t, (0, length - t.shape[1]), value=value)
