"""reference_logps=precompute: DPO / IPO / cDPO's reference log-probs, computed once before training.

The reference model never changes, so its summed log-probs of every (chosen, rejected) pair are the
same at every step. With `reference_logps=precompute`, pipeline.build runs one no-grad pass of the
reference over the training and eval rows (`compute`) before the trainer exists, stores the sums in a
file beside the tokenised data (`cache_dir()`), frees the reference, and hands the sums to the
trainer, which trains with the policy alone: each batch then carries the sums (`batch_columns`),
which the preference losses read instead of calling a reference model. (A LoRA run's reference is
its policy's own frozen base: the trainer computes its sums the same way once it has placed the
policy.) A second run with the same reference, data and settings reads the file.

The file's name is a hash (`cache_key`) of everything the sums depend on: the reference's weights
(sums and sums of squares of every parameter: `fingerprint`), its config, the
tokenised training and eval rows, and every setting that changes the computed numbers (reference
dtype, attention kernel, packing, the head's chunk, batching, ranks, device, torch/transformers
versions). Anything else cannot change them.
"""

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from training import checkpoints
from training.batching import collate, eval_batches, micro_batches
from utils import all_reduce_sum, broadcast_object, is_main, rank, world_size

VERSION = 1  # bump when what is computed changes


def cache_dir():
    """Where the files live: beside the tokenised data, in the datasets cache."""
    import datasets
    return Path(datasets.config.HF_DATASETS_CACHE) / "ift_reference_logps"


def fingerprint(model):
    """(2 * params,) float64 sums and sums of squares of every parameter (of this rank's shards, summed
    over ranks): any change to the weights changes it."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    sums = torch.stack([t.detach().double().sum() for t in local] + [t.detach().double().square().sum() for t in local])
    return all_reduce_sum(sums)


def cache_key(model, reference_fingerprint, train_data, eval_data, cfg, world, device):
    """sha256 (32 hex digits) of the reference, the data and the settings (module docstring).
    model: the reference (lora.AdaptersDisabled: its policy's config is read); reference_fingerprint:
    fingerprint(model); train_data, eval_data: TokenizedData; cfg: the run's config (reference dtype,
    attention, packing, head chunk, eval batch size, lora); world: ranks; device: torch.device."""
    import transformers

    model = getattr(model, "policy", model)  # lora.AdaptersDisabled: its policy
    h = hashlib.sha256()
    h.update(reference_fingerprint.detach().cpu().double().numpy().tobytes())
    h.update(model.config.to_json_string(use_diff=False).encode())
    settings = dict(version=VERSION, train=checkpoints.data_fingerprint(train_data),
                    eval=checkpoints.data_fingerprint(eval_data), reference_dtype=cfg.model.reference_dtype,
                    attn=cfg.model.attn_implementation, packing=cfg.packing, chunk=cfg.loss_chunk_tokens,
                    batch=cfg.eval_batch_size, world=world, device=device.type,
                    card=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    lora=cfg.get("lora") is not None, torch=torch.__version__, transformers=transformers.__version__)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def compute(model, data, batch_size, pad_id, call, device):
    """Summed reference log-probs of every row of `data`: (N, 2) float64 tensor on `device`, columns
    (chosen, rejected), the same on every rank. model: the reference, placed as the trainer places it
    (on `device`, or sharded over the ranks); call: the run's forward.ModelCall. Rows go in global
    batches of `batch_size` rows (eval_batch_size) split over the ranks as the trainer splits them; a
    rank left without rows still runs one (ignored) row, since every rank of an FSDP model must take
    part in every forward."""
    world, me = world_size(), rank()
    lengths = data.lengths()
    out = torch.zeros(len(data), 2, dtype=torch.float64, device=device)
    for batch in eval_batches(lengths, batch_size):
        micro = micro_batches(batch, lengths, world)
        for rows in micro[me::world]:
            ignore = len(rows) == 0
            rows = micro[0][:1] if ignore else rows
            tensors = {k: v.to(device) for k, v in collate(data, rows, pad_id).items()}
            pair = call.pair_logps(model, tensors)
            if not ignore:
                index = torch.as_tensor(rows, device=device)
                out[index, 0] = pair.chosen.double()
                out[index, 1] = pair.rejected.double()
    return all_reduce_sum(out)


def load_or_compute(model, reference_fingerprint, train_data, eval_data, cfg, pad_id, call, device):
    """{"train": (N, 2), "eval": (M, 2)} float64 numpy arrays: read from the cache file, or computed
    (`compute`, in batches of cfg.eval_batch_size) and then written there (by rank 0, atomically: a crash
    leaves no half-written file). Arguments as for cache_key and compute. Collective: every rank calls it."""
    key = cache_key(model, reference_fingerprint, train_data, eval_data, cfg, world_size(), device)
    path = cache_dir() / f"{key}.npz"
    start = time.perf_counter()
    cached = None
    if is_main() and path.exists():
        with np.load(path) as f:
            cached = {"train": f["train"], "eval": f["eval"]}
        if cached["train"].shape != (len(train_data), 2) or cached["eval"].shape != (len(eval_data), 2):
            cached = None  # cannot happen for an intact file of this key; recompute rather than trust it
    cached = broadcast_object(cached)
    if cached is not None:
        if is_main():
            print(f"reference log-probs: read from {path}")
        return cached
    values = {split: compute(model, data, cfg.eval_batch_size, pad_id, call, device).cpu().numpy()
              for split, data in (("train", train_data), ("eval", eval_data))}
    if is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **values)
        os.replace(tmp, path)
        print(f"reference log-probs: computed for {len(train_data)} train + {len(eval_data)} eval "
              f"rows in {time.perf_counter() - start:.1f} s, saved to {path}")
    return values


def batch_columns(values, rows, device):
    """The batch entries the preference losses read instead of a reference model: values (N, 2) numpy,
    rows: the batch's row indices. Returns {"reference_chosen_logps": (B,), "reference_rejected_logps":
    (B,)} float64 tensors on `device`."""
    picked = torch.as_tensor(values[np.asarray(rows)], device=device)
    return {"reference_chosen_logps": picked[:, 0], "reference_rejected_logps": picked[:, 1]}
