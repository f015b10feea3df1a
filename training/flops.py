"""FLOPs of a training step, and MFU: one formula, used by the trainer's `tflops` / `mfu` metrics
and by anything that plans a run's cost (docs/performance.md, "Hardware use: tflops and MFU").

What is counted: 2 FLOPs per multiply-accumulate of the matrix products, nothing else (norms,
activations, softmax, the embedding lookup and IFT's embedding blend are elementwise and left out,
the usual convention). For one forward call over sequences of n_s tokens, m_s of them targets:

    F = 2·N·Σ n_s  +  2·N_head·Σ m_s  +  4·L·d_attn·Σ pairs(n_s)

N: the parameters of every weight matrix (≥ 2-D) except the embedding table and the output head;
N_head: the head's (V × H), applied only at target positions (the losses never compute the logits
of a prompt token); L layers; d_attn = heads × head_dim, the width of both q·kᵀ and the weighted
sum of v; pairs(n) = the (query, key) pairs causal attention needs, n(n+1)/2 (fewer with a sliding
window). Padding is never counted: a padded slot is waste, so packing shows up as higher MFU.

A step then costs, per sequence the loss reads (chosen and rejected for DPO/IPO/ORPO/SimPO):
  - the trained pass: forward F, backward 2F (gradients of activations and of weights): 6·N per
    token. LoRA: the frozen weights get no weight gradient, so the backward of the matrices is F
    (4·N per token; the adapters' own small products are not counted separately);
  - + F for each no-grad pass over the same sequences: IFT's intuition pass (when lambda > 0), a
    DPO/IPO/cDPO reference forward (reference_logps=live; none with precompute);
  - + 2·N_head·Σ m of the chunked head's backward, which recomputes the logits when the call's
    targets exceed loss_chunk_tokens (one chunk keeps them instead);
  - ASFT instead: its reference forward (F, its head included: the reference's logits at the answer
    positions, computed inside the policy's head for the full-vocabulary KL), and 2·2·N_head·Σ m for
    its backward, which always recomputes both heads' logits (Loss.head_recomputes = 2);
  - + the blocks' forward again under activation checkpointing (2·N·Σ n + attention).
These are the FLOPs the step executes (recomputation included), so with recomputation the "MFU" is
strictly a hardware-FLOPs utilisation; without it the two agree.
"""

import collections
import dataclasses
import math
from typing import Optional, Tuple

import numpy as np

# Peak dense (no sparsity) bfloat16 / float16 tensor-core TFLOP/s with float32 accumulation, from the
# vendors' data sheets, matched against torch.cuda.get_device_name(); the first matching entry wins, so
# more specific names come first ("H100 PCIe" before "H100", "A100" before "A10").
PEAK_TFLOPS = (
    ("B200", 2250.0),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5),
    ("H100", 989.4),  # SXM
    ("H800", 989.4),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("A6000", 154.8),
    ("RTX 6000 Ada", 364.2),
    ("4090", 165.2),
    ("3090", 71.0),
    ("V100", 125.0),  # float16 only (no bfloat16)
    ("T4", 65.0),  # float16 only
    ("MI300X", 1307.4),
    ("MI250X", 383.0),
)


def card_peak_tflops(name):
    """Peak dense bf16/fp16 TFLOP/s of the card called `name` (torch.cuda.get_device_name), or None."""
    for key, peak in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def device_peak_tflops(device, override=None):
    """The peak TFLOP/s MFU is measured against: `override` (config key peak_tflops) if given, else the
    table's entry for a CUDA device, else None (no MFU: on the CPU, or a card not in the table)."""
    if override is not None:
        return float(override)
    if getattr(device, "type", device) == "cuda":
        import torch
        return card_peak_tflops(torch.cuda.get_device_name(device))
    return None


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the FLOPs of a causal LM depend on.

    body: parameters of every ≥ 2-D weight except the input embedding table and the output head.
    head: parameters of the output head's weight (V × H), applied at target positions only.
    attn_width: per layer, num_attention_heads × head_dim.
    windows: per layer, the sliding-window span in tokens, or None for full causal attention.
    """
    body: int
    head: int
    attn_width: int
    windows: Tuple[Optional[int], ...]

    @property
    def layers(self):
        return len(self.windows)


def shape_of(model):
    """Shape of a Hugging Face causal LM (plain, on the meta device, FSDP2-sharded, or a peft model)."""
    config = model.config
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    skip = {id(embedding), id(head)}
    shapes = [logical_shape(p) for p in model.parameters() if id(p) not in skip]
    body = sum(math.prod(s) for s in shapes if len(s) >= 2)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    kinds = getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * layers
    windows = tuple(window if kind == "sliding_attention" else None for kind in kinds)
    return Shape(body=int(body), head=int(head.numel()), attn_width=int(heads * head_dim), windows=windows)


def logical_shape(p):
    """The shape of the weight `p` stands for. A bitsandbytes 4-bit weight (QLoRA's Params4bit) is stored
    packed, two values a byte, as (numel/2, 1); its quant_state keeps the real (out, in). DTensor's shape
    is the full (unsharded) one, so a sharded model counts as the whole model."""
    quant = getattr(p, "quant_state", None)
    shape = getattr(quant, "shape", None)
    return tuple(shape) if shape is not None else tuple(p.shape)


def attention_pairs(n, window=None):
    """(query, key) pairs of causal attention over n tokens: query i sees keys max(0, i-w+1) .. i.
    n: int or integer array. Returns the same kind."""
    n = np.asarray(n, dtype=np.int64)
    if window is None:
        return n * (n + 1) // 2
    w = np.minimum(n, window)
    return w * (w + 1) // 2 + (n - w) * window


def forward_flops(shape, tokens, targets):
    """Matrix-product FLOPs of one forward call. tokens, targets: (S,) ints, per sequence of the call
    (its real tokens, its target positions). Returns (weights, attention, head): the blocks' weight
    matrices 2·N·Σn, attention's two products 4·L·d_attn·Σ pairs(n), the output head 2·N_head·Σm."""
    tokens = np.asarray(tokens, dtype=np.int64)
    pairs = sum(layers * int(attention_pairs(tokens, w).sum()) for w, layers in collections.Counter(shape.windows).items())
    return (float(2 * shape.body * int(tokens.sum())), float(4 * shape.attn_width * pairs),
            float(2 * shape.head * int(np.asarray(targets, dtype=np.int64).sum())))


def call_flops(shape, tokens, targets, no_grad_passes=0, lora=False, head_chunk=None, recompute_blocks=False,
               head_recomputes=None):
    """FLOPs of one trained forward call with its backward, plus `no_grad_passes` forwards over the same
    sequences (module docstring). tokens, targets: (S,) per sequence of the call. lora: the weight
    matrices are frozen. head_chunk: loss_chunk_tokens when the chunked head runs, else None.
    recompute_blocks: activation checkpointing. head_recomputes: None, or the number of heads whose
    logits at the target positions the loss's own head recomputes in backward (ASFT: 2, its policy's and
    its reference's), which then replaces the chunked head's count. Returns a float."""
    weights, attention, head = forward_flops(shape, tokens, targets)
    forward = weights + attention + head
    # backward: the activations' gradients (one product per forward one) and, unless frozen, the
    # weights' (one more); attention has no weights but needs two products per forward one
    backward = (1 if lora else 2) * (weights + head) + 2 * attention
    total = forward + backward + no_grad_passes * forward
    if head_recomputes is not None:
        total += head_recomputes * head
    elif head_chunk is not None and int(np.sum(targets)) > head_chunk:
        total += head  # the chunked head's backward recomputes the logits
    if recompute_blocks:
        total += weights + attention
    return total


def step_flops(shape, sizes, micro, no_grad_passes=0, lora=False, head_chunk=None, recompute_blocks=False,
               head_recomputes=None):
    """FLOPs of one optimizer step over all ranks: call_flops of each micro-batch's trained call (the
    trainer's metric `tflops` and planning's plan both count this). sizes: sequence_sizes of the
    training data. micro: the global batch's micro-batches (arrays of row indices). Returns a float."""
    tokens, targets = sizes
    return sum(call_flops(shape, tokens[rows].ravel(), targets[rows].ravel(), no_grad_passes, lora=lora,
                          head_chunk=head_chunk, recompute_blocks=recompute_blocks, head_recomputes=head_recomputes)
               for rows in micro if len(rows))


def sequence_sizes(data):
    """(tokens, targets), each (N, k) int64: the real tokens and target tokens of each of row i's k
    sequences (k = 2 with rejected answers: chosen, rejected), what one forward of the row computes.
    data: preference_datasets.TokenizedData."""
    answers = ["chosen_ids"] + (["rejected_ids"] if data.pairs else [])
    prompt = data.column_lengths("prompt_ids")  # read from the Arrow offsets, no row materialised
    targets = np.stack([data.column_lengths(column) for column in answers], axis=1)
    return prompt[:, None] + targets, targets
