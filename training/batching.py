"""Batches: length-grouped global batches of an epoch (a function of seed and epoch only), their
split into micro-batches of similar token counts, and collation padded to the longest row."""

import numpy as np
import torch

from training.tokenization import IDS

# ---------------------------------------------------------------- batching

GROUP_BATCHES = 16  # global batches whose rows are sorted by length together: bigger = less padding, less randomness


def epoch_batches(lengths, batch_size, seed, epoch):
    """Global batches of one training epoch, a function of (seed, epoch) only. Rows are shuffled,
    then sorted by length within groups of GROUP_BATCHES batches so each batch holds rows of
    similar length, then batch order is shuffled. The last incomplete batch is dropped.
    Returns a list of (batch_size,) int arrays of row indices."""
    rng = np.random.default_rng([seed, epoch])
    n_batches = len(lengths) // batch_size
    order = rng.permutation(len(lengths))[: n_batches * batch_size]
    batches = []
    group = GROUP_BATCHES * batch_size
    for start in range(0, len(order), group):
        chunk = order[start:start + group]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(lengths, batch_size):
    """Every eval row once, sorted by length (longest first), in global batches of batch_size
    (the last one may be smaller)."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def micro_batches(batch, lengths, n_micro):
    """Split a global batch into n_micro micro-batches of consecutive rows by length, so each pads
    only to its own longest row. Micro-batch j is processed by rank j % world_size, so the split
    (and every micro-batch's padding) is the same for any (ranks × accumulation steps) product."""
    batch = batch[np.argsort(-lengths[batch], kind="stable")]
    return np.array_split(batch, n_micro)


def _pad(seqs, value, width):
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _sequences(prompts, answers, pad_id, width):
    """input_ids, attention_mask, labels (B, width) for prompt+answer rows, right-padded."""
    ids = [p + a for p, a in zip(prompts, answers)]
    labels = [[-100] * len(p) + a for p, a in zip(prompts, answers)]
    input_ids = _pad(ids, pad_id, width)
    return input_ids, (_pad(ids, -1, width) != -1).long(), _pad(labels, -100, width)


def collate(data, indices, pad_id):
    """A batch of tensors for rows `indices`, right-padded to the longest row (never to max_length).
    SFT/IFT: input_ids, attention_mask, labels (B, T). Pairs: chosen_* and rejected_* (B, T), with
    one T for both so a loss can run them through the model in one concatenated forward."""
    rows = data.rows(indices, IDS if data.pairs else IDS[:2])  # one read of the Arrow table
    prompts, chosen = rows["prompt_ids"], rows["chosen_ids"]
    if not data.pairs:
        width = max(len(p) + len(a) for p, a in zip(prompts, chosen))
        input_ids, attention_mask, labels = _sequences(prompts, chosen, pad_id, width)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    rejected = rows["rejected_ids"]
    width = max(len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected))
    batch = {}
    for side, answers in (("chosen", chosen), ("rejected", rejected)):
        input_ids, attention_mask, labels = _sequences(prompts, answers, pad_id, width)
        batch.update({f"{side}_input_ids": input_ids, f"{side}_attention_mask": attention_mask,
                      f"{side}_labels": labels})
    return batch


# ---------------------------------------------------------------- what a batch holds

def is_pairs(batch):
    """Whether `batch` (collate's dict) holds (chosen, rejected) pairs rather than single answers."""
    return "chosen_input_ids" in batch


def chosen_view(batch):
    """The chosen half of a pair batch under the single-answer keys (input_ids, attention_mask, labels)."""
    return {k[len("chosen_"):]: v for k, v in batch.items() if k.startswith("chosen_")}


def loss_view(batch, pairs):
    """The batch a loss reads. pairs: whether the loss trains on (chosen, rejected) pairs (Loss.needs_pairs).
    A loss on single answers given pairs (SFT or IFT evaluated on preference data) reads the chosen half;
    otherwise the batch itself. A pair loss given single answers is an error."""
    if pairs and not is_pairs(batch):
        raise ValueError(f"a loss on (chosen, rejected) pairs got a batch of single answers (keys {sorted(batch)})")
    return chosen_view(batch) if is_pairs(batch) and not pairs else batch


def token_counts(batch, packing):
    """(tokens, slots) of a collated batch: its non-padding tokens, and the tensor positions the model
    processes (every position, padding included; packed, only the tokens). Both answers of a pair count."""
    masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
    tokens = sum(int(m.sum()) for m in masks)
    return tokens, (tokens if packing else sum(m.numel() for m in masks))
