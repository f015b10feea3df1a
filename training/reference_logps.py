"""reference_logps=precompute: DPO / IPO / cDPO's reference log-probs, computed once before training.

The reference model never changes, so its summed log-probs of every (chosen, rejected) pair are the
same at every step. With `reference_logps=precompute` the trainer runs one no-grad pass of the
reference over the training and eval rows (`compute`), stores the sums in a file beside the
tokenised data (`cache_dir()`), frees the reference, and trains with the policy alone: each batch
then carries the sums (`batch_columns`), which the preference losses read instead of calling a
reference model. A second run with the same reference, data and settings reads the file.

The file's name is a hash (`cache_key`) of everything the sums depend on: the reference's weights
(sums and sums of squares of every parameter, as the trainer fingerprints them), its config, the
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
from utils import all_reduce_sum, broadcast_object, is_main

VERSION = 1  # bump when what is computed changes


def cache_dir():
    """Where the files live: beside the tokenised data, in the datasets cache."""
    import datasets
    return Path(datasets.config.HF_DATASETS_CACHE) / "ift_reference_logps"


def cache_key(trainer, reference_fingerprint):
    """sha256 (32 hex digits) of the reference, the data and the settings (module docstring)."""
    import transformers

    cfg = trainer.cfg
    model = getattr(trainer.reference, "policy", trainer.reference)  # lora.AdaptersDisabled: its policy
    h = hashlib.sha256()
    h.update(reference_fingerprint.detach().cpu().double().numpy().tobytes())
    h.update(model.config.to_json_string(use_diff=False).encode())
    settings = dict(version=VERSION, train=checkpoints.data_fingerprint(trainer.train_data),
                    eval=checkpoints.data_fingerprint(trainer.eval_data), reference_dtype=cfg.model.reference_dtype,
                    attn=cfg.model.attn_implementation, packing=cfg.packing, chunk=cfg.loss_chunk_tokens,
                    batch=cfg.eval_batch_size, world=trainer.world, device=trainer.device.type,
                    card=torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else None,
                    lora=cfg.get("lora") is not None, torch=torch.__version__, transformers=transformers.__version__)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def compute(trainer, data):
    """Summed reference log-probs of every row of `data`: (N, 2) float64 tensor on trainer.device,
    columns (chosen, rejected), the same on every rank. Rows go in eval-sized global batches split
    over the ranks as the trainer splits them; a rank left without rows still runs one (ignored)
    row, since every rank of an FSDP model must take part in every forward."""
    lengths = data.lengths()
    out = torch.zeros(len(data), 2, dtype=torch.float64, device=trainer.device)
    for batch in eval_batches(lengths, trainer.cfg.eval_batch_size):
        micro = micro_batches(batch, lengths, trainer.world)
        for rows in micro[trainer.rank::trainer.world]:
            ignore = len(rows) == 0
            rows = micro[0][:1] if ignore else rows
            tensors = {k: v.to(trainer.device) for k, v in collate(data, rows, trainer.tokenizer.pad_token_id).items()}
            pair = trainer.call.pair_logps(trainer.reference, tensors)
            if not ignore:
                index = torch.as_tensor(rows, device=trainer.device)
                out[index, 0] = pair.chosen.double()
                out[index, 1] = pair.rejected.double()
    return all_reduce_sum(out)


def load_or_compute(trainer, reference_fingerprint):
    """{"train": (N, 2), "eval": (M, 2)} float64 numpy arrays: read from the cache file, or computed and
    then written there (by rank 0, atomically: a crash leaves no half-written file)."""
    path = cache_dir() / f"{cache_key(trainer, reference_fingerprint)}.npz"
    start = time.perf_counter()
    cached = None
    if is_main() and path.exists():
        with np.load(path) as f:
            cached = {"train": f["train"], "eval": f["eval"]}
        if cached["train"].shape != (len(trainer.train_data), 2) or cached["eval"].shape != (len(trainer.eval_data), 2):
            cached = None  # cannot happen for an intact file of this key; recompute rather than trust it
    cached = broadcast_object(cached)
    if cached is not None:
        if is_main():
            print(f"reference log-probs: read from {path}")
        return cached
    values = {split: compute(trainer, data).cpu().numpy()
              for split, data in (("train", trainer.train_data), ("eval", trainer.eval_data))}
    if is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **values)
        os.replace(tmp, path)
        print(f"reference log-probs: computed for {len(trainer.train_data)} train + {len(trainer.eval_data)} eval "
              f"rows in {time.perf_counter() - start:.1f} s, saved to {path}")
    return values


def batch_columns(values, rows, device):
    """The batch entries the preference losses read instead of a reference model: values (N, 2) numpy,
    rows: the batch's row indices. Returns {"reference_chosen_logps": (B,), "reference_rejected_logps":
    (B,)} float64 tensors on `device`."""
    picked = torch.as_tensor(values[np.asarray(rows)], device=device)
    return {"reference_chosen_logps": picked[:, 0], "reference_rejected_logps": picked[:, 1]}
