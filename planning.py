"""The plan of a run, from its config and its tokenised data: optimizer steps, warm-up, tokens and
FLOPs; and `dry_run=true`, which prints it without loading a model.

The schedule (`schedule`) is the one the trainer follows: an epoch is len(train rows) // batch_size
global batches (the last incomplete batch is dropped), training stops after n_epochs epochs or
n_examples examples, whichever comes first, and warm-up is warmup_ratio of all steps (rounded) or
warmup_steps.
"""

import json

import numpy as np

from preference_datasets import COUNTS, epoch_batches


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


def processed_tokens(data):
    """(N,) tokens each training row puts through the policy: prompt + answer, twice (chosen and
    rejected) for pairs."""
    prompt = data.column_lengths("prompt_ids")
    tokens = prompt + data.column_lengths("chosen_ids")
    if data.pairs:
        tokens = tokens + prompt + data.column_lengths("rejected_ids")
    return tokens


def forward_passes(loss):
    """Passes over each trained token as multiples of a forward (2N FLOPs per token): the trained
    forward and backward (6N), IFT's no-grad forward for its predictions when lambda can be > 0, and
    DPO/IPO's reference forward. loss: the run's losses.Loss. Returns (FLOPs per token / N, what they are)."""
    per, parts = 6, ["6N (forward + backward)"]
    if loss.name == "ift" and max(loss.min_lambda, loss.max_lambda) > 0:
        per, parts = per + 2, parts + ["2N (IFT's no-grad forward for the predictions)"]
    if loss.needs_reference:
        per, parts = per + 2, parts + ["2N (the reference model's forward)"]
    return per, " + ".join(parts)


def parameter_count(cfg):
    """The policy's parameters from its config.json (built on the meta device: no weights, no memory),
    or None when the config cannot be read (a hub id while offline, say)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from utils import resolve_path
        name = cfg.model.name_or_path
        config = AutoConfig.from_pretrained(str(resolve_path(name) or name), trust_remote_code=cfg.model.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in model.parameters())
    except (OSError, ValueError, KeyError) as e:
        print(f"plan: the model's parameters are unknown ({type(e).__name__}: {str(e)[:120]}); FLOPs not computed")
        return None


def plan(cfg, data, loss):
    """The run's plan on tokenised training data: schedule() plus the tokens it processes (exactly:
    the rows of each epoch's batches, epoch_batches) and its FLOPs."""
    steps = schedule(len(data), cfg)
    lengths, tokens = data.lengths(), processed_tokens(data)
    total = 0
    for epoch in range(-(-steps["optimizer_steps"] // steps["steps_per_epoch"])):
        batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch)
        batches = batches[: steps["optimizer_steps"] - epoch * steps["steps_per_epoch"]]
        total += int(tokens[np.concatenate(batches)].sum())
    n = parameter_count(cfg)
    per, what = forward_passes(loss)
    return {**steps, "tokens": total, "parameters": n, "flops": None if n is None else per * n * total,
            "flops_per_token": what}


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
    """Compose and check have run (loss: the run's losses.Loss, as they built it); load the tokenizer
    and every dataset, tokenise, print the data and the plan, then return. No model is loaded, no run directory is made, wandb is not started.
    The last line printed is one JSON object (the plan and the data's counts)."""
    tokenizer = load_tokenizer(cfg)
    from preference_datasets import end_of_turn_token
    eot_token = end_of_turn_token(tokenizer, cfg.model.eot_token)
    train, evals = load_data(cfg, tokenizer, pairs=loss.needs_pairs, eot_token=eot_token)
    for line in describe(train, "train") + describe(evals, "eval"):
        print(line)
    p = plan(cfg, train, loss)
    flops = "unknown" if p["flops"] is None else f"{p['flops']:.3e} ({p['flops_per_token']}, N = {p['parameters']:,})"
    print(f"plan: {len(train):,} training rows, {p['steps_per_epoch']:,} optimizer steps per epoch of "
          f"{cfg.batch_size} examples, {p['optimizer_steps']:,} steps in all ({p['examples']:,} examples), "
          f"{p['warmup_steps']:,} warm-up steps; {p['tokens']:,} tokens processed; FLOPs {flops}")
    counts = {k: {part["name"]: part[k] for part in train.parts} for k in COUNTS}
    print(json.dumps({"rows": len(train), "eval_rows": len(evals), **p, **counts,
                      "rows_per_dataset": {part["name"]: part["rows"] for part in train.parts}}))
