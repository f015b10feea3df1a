"""The plan of a run, from its config and its tokenised data: optimizer steps, warm-up, tokens and
FLOPs (training/flops.py's count, the one behind the trainer's `tflops`); and `dry_run=true`, which prints it
without loading a model.

The schedule (`schedule`) is the one the trainer follows: an epoch is len(train rows) // batch_size
global batches (the last incomplete batch is dropped), training stops after n_epochs epochs or
n_examples examples, whichever comes first, and warm-up is warmup_ratio of all steps (rounded) or
warmup_steps. `lr_factor` is the learning rate of each step as a fraction of `lr`.
"""

import json
import math

import numpy as np

from losses import StepInfo
from training import flops, lora
from training.batching import epoch_batches, micro_batches
from training.launch import planned_world_size
from training.tokenization import COUNTS


def schedule(n_rows, cfg):
    """{'steps_per_epoch', 'optimizer_steps', 'warmup_steps', 'examples'} of a run on n_rows training rows."""
    steps_per_epoch = n_rows // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {n_rows} training rows")
    total = cfg.n_epochs * steps_per_epoch
    if cfg.n_examples is not None:
        total = min(total, cfg.n_examples // cfg.batch_size)
    if total == 0:
        raise ValueError(f"n_examples={cfg.n_examples} is smaller than batch_size={cfg.batch_size}: no step to take")
    warmup = round(cfg.warmup_ratio * total) if cfg.warmup_ratio is not None else min(cfg.warmup_steps, total)
    return {"steps_per_epoch": steps_per_epoch, "optimizer_steps": total, "warmup_steps": warmup,
            "examples": total * cfg.batch_size}


def lr_factor(step, warmup_steps, total_steps, lr_schedule):
    """The learning rate of optimizer update `step` (0-based: the number of updates applied before it)
    as a fraction of the peak `lr`. Warm-up: update k of W runs at (k + 1) / W, so the first update
    already moves the weights (lr / W) and the last warm-up update runs at the peak; transformers'
    schedulers run update k at k / W, which makes the first update a no-op (lr 0). After warm-up:
    `constant` stays at 1; `cosine` is transformers' half cosine from 1 at update W towards 0 at
    update total_steps (never reached: the last update runs just above 0)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if lr_schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def model_shape(cfg):
    """(flops.Shape, head_chunk, parameters) of the policy, from its config.json on the meta device (no
    weights, no memory): what the trainer's FLOPs count reads from the loaded model (with LoRA, the
    adapters included). head_chunk: loss_chunk_tokens when the chunked head applies, else None.
    parameters: all of the model's. None when the config cannot be read (a hub id while offline, say)."""
    import torch

    from forward import _chunkable
    from training.modeling import meta_model
    try:
        model = meta_model(cfg)
        if model is None:
            raise OSError(f"config.json of {cfg.model.name_or_path} cannot be read")
        if lora.enabled(cfg):
            with torch.device("meta"):
                model = lora.apply(cfg, model)
    except (OSError, ValueError, KeyError) as e:
        print(f"plan: the model's shape is unknown ({type(e).__name__}: {str(e)[:120]}); FLOPs not computed")
        return None
    head_chunk = cfg.loss_chunk_tokens if _chunkable(model, model.get_output_embeddings()) else None
    return flops.shape_of(model), head_chunk, sum(p.numel() for p in model.parameters())


def plan(cfg, data, loss, world=None):
    """The run's plan on tokenised training data: schedule() plus the tokens it processes (exactly:
    the rows of each step's global batch, epoch_batches; prompt + answer, both answers of a pair) and
    its FLOPs, counted step by step as the trainer counts them (flops.step_flops: its micro-batches, the
    loss's no-grad passes at that step (IFT: λ > 0), a live reference's forward, none with reference_logps=precompute).
    loss: the run's losses.Loss. world: the ranks (None: launch.planned_world_size)."""
    steps = schedule(len(data), cfg)
    lengths, sizes = data.lengths(), flops.sequence_sizes(data)
    row_tokens = sizes[0].sum(axis=1)
    model = model_shape(cfg)
    n_micro = cfg.gradient_accumulation_steps * (world or planned_world_size(cfg))
    reference = loss.needs_reference and cfg.get("reference_logps", "live") != "precompute"
    recompute = cfg.trainer == "FSDPTrainer" and cfg.activation_checkpointing
    tokens, total, batches, no_grad_steps = 0, 0.0, {}, 0
    for step in range(steps["optimizer_steps"]):
        epoch, i = divmod(step, steps["steps_per_epoch"])
        if epoch not in batches:
            batches = {epoch: epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch)}
        batch = batches[epoch][i]
        tokens += int(row_tokens[batch].sum())
        if model is not None:
            passes = loss.no_grad_passes(StepInfo(step, steps["optimizer_steps"], steps["warmup_steps"], cfg.seed,
                                                  training=True))
            no_grad_steps += passes > 0
            total += flops.step_flops(model[0], sizes, micro_batches(batch, lengths, n_micro),
                                      passes + reference, lora=lora.enabled(cfg),
                                      head_chunk=model[1], recompute_blocks=recompute,
                                      head_recomputes=loss.head_recomputes)
    counted = ["3F per trained sequence (F: one forward's matrix products; 2F its backward" +
               (", less the frozen weights' gradients under LoRA)" if lora.enabled(cfg) else ")")]
    if no_grad_steps:
        counted.append(f"F for the loss's no-grad forward (IFT, lambda > 0) at {no_grad_steps:,} of the steps")
    if reference:
        counted.append("F for the reference model's forward")
    if loss.head_recomputes:
        counted.append(f"{loss.head_recomputes} x the output head at the answer tokens, recomputed in backward "
                       f"(loss={loss.name})")
    return {**steps, "tokens": tokens, "parameters": None if model is None else model[2],
            "flops": None if model is None else total, "flops_counted": " + ".join(counted)}


def _spread(x):
    return (f"median {int(np.median(x)):,}, p95 {int(np.percentile(x, 95)):,}, max {int(x.max()):,}"
            if len(x) else "none")


def describe(data, label):
    """Lines: per dataset and in total, rows, sequence and answer lengths and truncation counts."""
    lines, start = [], 0
    sequence, answer = data.lengths(), data.column_lengths("chosen_ids")
    parts = data.parts + ([{"name": "total", "rows": len(data.table), "available": sum(p["available"] for p in data.parts),
                            **{k: sum(p[k] for p in data.parts) for k in COUNTS}}] if len(data.parts) > 1 else [])
    for p in parts:
        first = 0 if p["name"] == "total" else start  # the part's rows of the table: [first, first + rows)
        start += p["rows"] if p["name"] != "total" else 0
        rows = (data.index >= first) & (data.index < first + p["rows"])  # those in this split (eval: the first n)
        lines.append(f"{label} '{p['name']}': {int(rows.sum()):,} rows (of {p['available']:,}); sequence tokens "
                     f"{_spread(sequence[rows])}; answer tokens {_spread(answer[rows])}; "
                     f"{p['prompts_truncated']:,} prompts cut, {p['answers_truncated']:,} answers cut, "
                     f"{p['rows_dropped']} rows dropped")
    return lines


def dry_run(cfg, loss, load_tokenizer, load_data):
    """Compose and check have run (loss: the run's losses.Loss, as they built it; the model checked on
    the meta device); load the tokenizer and every dataset, tokenise, check the rows as the real run does
    (run_data.check_data), print the data, its mask audit and the plan, then return. No weights are
    loaded, no run directory is made, wandb is not started. The last line printed is one JSON object (the
    plan and the data's counts)."""
    from training.run_data import check_data
    from training.tokenization import end_of_turn_token

    tokenizer = load_tokenizer(cfg)
    eot_token = end_of_turn_token(tokenizer, cfg.model.eot_token)
    train, evals = load_data(cfg, tokenizer, pairs=loss.needs_pairs, eot_token=eot_token)
    audit = check_data(cfg, tokenizer, eot_token, train, evals)  # the real run's checks: a batch's rows, label masks
    for line in describe(train, "train") + describe(evals, "eval") + [audit]:
        print(line)
    p = plan(cfg, train, loss)
    count = "unknown" if p["flops"] is None else f"{p['flops']:.3e} (training/flops.py: {p['flops_counted']})"
    print(f"plan: {len(train):,} training rows, {p['steps_per_epoch']:,} optimizer steps per epoch of "
          f"{cfg.batch_size} examples, {p['optimizer_steps']:,} steps in all ({p['examples']:,} examples), "
          f"{p['warmup_steps']:,} warm-up steps; {p['tokens']:,} tokens processed; FLOPs {count}")
    counts = {k: {part["name"]: part[k] for part in train.parts} for k in COUNTS}
    print(json.dumps({"rows": len(train), "eval_rows": len(evals), **p, **counts,
                      "rows_per_dataset": {part["name"]: part["rows"] for part in train.parts}}))
