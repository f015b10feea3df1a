"""Helpers shared by the test files: composing a config as the command line would, running the tiny
model in this process (or in the processes FSDPTrainer starts), and a random float64 Mistral."""

import json

import torch
import transformers
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import config_schema
import losses
import train
from forward import ModelCall

# A few quick steps: 64 examples in batches of 16, evaluation on 32 rows every 2 steps.
FAST = ["n_examples=64", "batch_size=16", "eval_batch_size=16", "n_eval_examples=32", "eval_every=32",
        "warmup_steps=0"]


def make_cfg(*overrides):
    """The composed config for these overrides (short loss keys allowed), as train.py composes it."""
    with initialize_config_dir(config_dir=str(config_schema.CONFIG_DIR), version_base=None):
        return compose("config", overrides=config_schema.expand_short_overrides(list(overrides)))


def read_rows(run_dir, split=None):
    """The rows of run_dir/metrics.jsonl (those of one split if given)."""
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r for r in rows if split is None or r["split"] == split]


def run_inprocess(run_dir, *overrides):
    """Check and run a one-process run in this process; returns its metrics rows."""
    cfg = make_cfg(f"run_dir={run_dir}", *overrides)
    train.validate_config(cfg)
    train.run(OmegaConf.to_container(cfg, resolve=True))
    return read_rows(run_dir)


def launch_run(run_dir, *overrides):
    """Check and launch a run as train.py does (spawning FSDP ranks if asked); returns (its training
    rows of metrics.jsonl, its final weights)."""
    from safetensors.torch import load_file
    cfg = make_cfg(f"run_dir={run_dir}", *overrides)
    train.validate_config(cfg)
    train.launch(cfg)
    return read_rows(run_dir, "train"), load_file(run_dir / "final" / "model.safetensors")


def tiny_model(tie=False, seed=0):
    """A random 2-layer Mistral in float64 (hidden 32, 4 heads, 2 kv heads, vocab 64)."""
    torch.manual_seed(seed)
    config = transformers.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, tie_word_embeddings=tie)
    # sdpa (the default): in float64, eager attention turns a left-padded row into NaN (its fully
    # masked padding queries), which no loss could survive.
    config._attn_implementation = "sdpa"
    return transformers.MistralForCausalLM(config).to(torch.float64)


def mean_over_valid(row_losses, valid, row_metrics):
    """(loss, metrics): the trainer's reduction divided by the valid rows, 0 when there is none."""
    loss_sum, metric_sums, count = losses.reduce_rows(row_losses, valid, row_metrics)
    count = count.clamp(min=1)
    return loss_sum / count, {k: v / count for k, v in metric_sums.items()}


def sft_loss(model, input_ids, attention_mask, labels, call=ModelCall()):
    """SFT's mean loss over the rows with a target: (loss 0-dim with gradient, {"loss": 0-dim})."""
    return mean_over_valid(*losses.sft_rows(call, model, input_ids, attention_mask, labels))


def ift_loss(model, input_ids, attention_mask, labels, lam, gamma=0.95, propagation_type="loss",
             propagation_side="left", propagation_norm="L1", call=ModelCall()):
    """IFT's mean loss (spec §3) over the rows with a target, and its metrics' means."""
    return mean_over_valid(*losses.ift_rows(call, model, input_ids, attention_mask, labels, lam, gamma,
                                            propagation_type, propagation_side, propagation_norm))
