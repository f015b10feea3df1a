"""Data: load (hub id or local copy) -> normalise to (prompt messages, chosen[, rejected]) ->
chat template -> tokenise once, with labels -> length-grouped batches padded to their longest row.

Every source is reduced to one normalised row:
    {"prompt": [{"role": ..., "content": ...}, ...],   # every message before the final assistant turn
     "chosen": str,                                     # the final assistant turn (the SFT/IFT target)
     "rejected": str | None}                            # the dispreferred answer, for DPO-style losses

Bad input (a missing file, invalid JSON, a row missing a field or with the wrong type, an empty
assistant turn) raises DataError naming the file, row and field, before any model is loaded.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from utils import resolve_path

ROLES = ("system", "user", "assistant")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")

# The chat template that base models without one get (the Zephyr format, which the reference code
# falls back to): each message is '<|role|>\n' + content + eos, and generation starts at '<|assistant|>\n'.
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class DataError(ValueError):
    """Malformed or missing data; the message names the file (or hub id), row and field."""


# ---------------------------------------------------------------- normalisers: raw row -> normalised row

def _need(row, key, kind, where):
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field '{key}' (fields present: {sorted(row)})")
    if not isinstance(row[key], kind):
        raise DataError(f"{where}: field '{key}' must be {kind.__name__}, got {type(row[key]).__name__}")
    return row[key]


def _check_messages(messages, where, key):
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field '{key}[{i}]' must be a {{'role': str, 'content': str}} message, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: field '{key}[{i}].role' is '{m['role']}'; allowed: {', '.join(ROLES)}")
    return messages


def _split_final_answer(messages, where, key):
    """(prompt messages, final assistant content) of a chat; the final turn must be a non-empty answer."""
    _check_messages(messages, where, key)
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: field '{key}' must end with an assistant turn")
    if not messages[-1]["content"].strip():
        raise DataError(f"{where}: field '{key}' has an empty final assistant turn")
    if not any(m["role"] == "user" for m in messages[:-1]):
        raise DataError(f"{where}: field '{key}' has no user turn before the final assistant turn")
    return messages[:-1], messages[-1]["content"]


def _answer_text(row, key, where):
    text = _need(row, key, str, where)
    if not text.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return text


def from_messages(row, where):
    """ultrachat_200k and any {'messages': [...]} chat: the target is the final assistant turn."""
    prompt, answer = _split_final_answer(_need(row, "messages", list, where), where, "messages")
    return {"prompt": prompt, "chosen": answer, "rejected": None}


def from_chosen_rejected_chats(row, where):
    """ultrafeedback_binarized: 'chosen' and 'rejected' are chats sharing every message but the last."""
    prompt, chosen = _split_final_answer(_need(row, "chosen", list, where), where, "chosen")
    rejected = None
    if row.get("rejected") is not None:
        rejected_prompt, rejected = _split_final_answer(_need(row, "rejected", list, where), where, "rejected")
        if rejected_prompt != prompt:
            raise DataError(f"{where}: 'chosen' and 'rejected' differ before their final assistant turn")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def from_prompt_strings(row, where):
    """A plain {'prompt': str, 'chosen': str, 'rejected': str} file (the usual local DPO format)."""
    prompt = _answer_text(row, "prompt", where)
    rejected = _answer_text(row, "rejected", where) if row.get("rejected") is not None else None
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": _answer_text(row, "chosen", where),
            "rejected": rejected}


HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def _hh_transcript(text, where, key):
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> (prompt messages, final assistant answer)."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(f"{where}: field '{key}' has no '{HH_ASSISTANT.strip()}' turn")
    answer = text[cut + len(HH_ASSISTANT):].strip()
    messages, rest = [], text[:cut]
    for i, chunk in enumerate(rest.split(HH_HUMAN)):
        if i == 0:
            if chunk.strip():  # text before the first "Human:" marker would be silently lost
                raise DataError(f"{where}: field '{key}' must start with '{HH_HUMAN.strip()}'")
            continue
        user, *assistants = chunk.split(HH_ASSISTANT)
        messages.append({"role": "user", "content": user.strip()})
        messages += [{"role": "assistant", "content": a.strip()} for a in assistants]
    if not messages:
        raise DataError(f"{where}: field '{key}' has no '{HH_HUMAN.strip()}' turn")
    return messages, answer


def from_hh(row, where):
    """Anthropic/hh-rlhf: two whole transcripts that differ only in the final assistant answer."""
    prompt, chosen = _hh_transcript(_need(row, "chosen", str, where), where, "chosen")
    _, rejected = _hh_transcript(_need(row, "rejected", str, where), where, "rejected")
    if not chosen or not rejected:
        raise DataError(f"{where}: field '{'chosen' if not chosen else 'rejected'}' has an empty final assistant answer")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def from_shp(row, where):
    """stanfordnlp/SHP: a post ('history') and two comments; 'labels' is 1 when A is preferred."""
    label = _need(row, "labels", int, where)
    if label not in (0, 1):
        raise DataError(f"{where}: field 'labels' must be 0 or 1, got {label}")
    a, b = _answer_text(row, "human_ref_A", where), _answer_text(row, "human_ref_B", where)
    chosen, rejected = (a, b) if label == 1 else (b, a)
    return {"prompt": [{"role": "user", "content": _answer_text(row, "history", where)}],
            "chosen": chosen, "rejected": rejected}


def from_orca(row, where):
    """Intel/orca_dpo_pairs: optional system prompt, a question, chosen and rejected answers."""
    system = row.get("system") or ""
    if not isinstance(system, str):
        raise DataError(f"{where}: field 'system' must be str, got {type(system).__name__}")
    prompt = [{"role": "system", "content": system}] if system.strip() else []
    prompt.append({"role": "user", "content": _answer_text(row, "question", where)})
    return {"prompt": prompt, "chosen": _answer_text(row, "chosen", where),
            "rejected": _answer_text(row, "rejected", where)}


def detect_schema(row, where):
    """The normaliser for a local file, from the fields of its first row."""
    if "history" in row and "human_ref_A" in row:
        return from_shp
    if "question" in row and "chosen" in row:
        return from_orca
    if "chosen" in row:
        if isinstance(row["chosen"], list):
            return from_chosen_rejected_chats
        return from_prompt_strings if "prompt" in row else from_hh
    if "messages" in row:
        return from_messages
    raise DataError(f"{where}: unknown schema with fields {sorted(row)}; expected 'messages' (a chat) or "
                    "'prompt'/'chosen'/'rejected' (ultrafeedback or plain strings), or the hh/shp/orca fields")


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Source:
    hub_id: str
    splits: dict            # our split ('train'/'test') -> the hub's split name, or None if the hub has none
    sample_dir: str         # the bundled sample in the same schema (the name '<key>_sample' loads it)
    normalise: Callable


SOURCES = {
    "ultrachat": Source("HuggingFaceH4/ultrachat_200k", {"train": "train_sft", "test": "test_sft"},
                        "data/ultrachat_200k", from_messages),
    "ultrafeedback": Source("HuggingFaceH4/ultrafeedback_binarized", {"train": "train_prefs", "test": "test_prefs"},
                            "data/ultrafeedback_binarized", from_chosen_rejected_chats),
    "hh": Source("Anthropic/hh-rlhf", {"train": "train", "test": "test"}, "data/hh-rlhf", from_hh),
    "shp": Source("stanfordnlp/SHP", {"train": "train", "test": "test"}, "data/shp", from_shp),
    "orca": Source("Intel/orca_dpo_pairs", {"train": "train", "test": None}, "data/orca_dpo_pairs", from_orca),
}
SAMPLE_SUFFIX = "_sample"
HELD_OUT_FRACTION, HELD_OUT_MAX = 0.05, 256  # eval rows carved from 'train' when a source has no test split


def known_dataset_names():
    return sorted(SOURCES) + sorted(k + SAMPLE_SUFFIX for k in SOURCES)


def check_dataset_name(name, dataset_paths):
    """Fails early (before anything loads) on a name that is neither registered nor a local path."""
    if name in SOURCES or (name.endswith(SAMPLE_SUFFIX) and name[: -len(SAMPLE_SUFFIX)] in SOURCES):
        override = (dataset_paths or {}).get(name)
        if override is not None and resolve_path(override) is None:
            raise DataError(f"dataset_paths.{name} = '{override}' does not exist")
        return
    if resolve_path(name) is None:
        raise DataError(f"unknown dataset '{name}': not a file or directory, and not one of "
                        f"{', '.join(known_dataset_names())}")


def _read_local_rows(path):
    """[(where, row)] of a .jsonl/.json/.parquet file, invalid JSON naming the file and line. where is 'FILE: line N' (1-based) for .jsonl, so an error
    points at the line to open, and 'FILE: row i' (0-based, as datasets counts) otherwise."""
    if path.suffix != ".jsonl":
        return [(f"{path}: row {i}", row) for i, row in enumerate(_read_whole_file(path))]
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {line_no}: a row must be a JSON object, got {type(row).__name__}")
            rows.append((f"{path}: line {line_no}", row))
    return rows


def _read_whole_file(path):
    """Rows of a .json or .parquet file."""
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: a .json file must hold a list of row objects")
        return rows
    if path.suffix == ".parquet":
        import datasets
        return datasets.load_dataset("parquet", data_files=str(path), split="train").to_list()
    raise DataError(f"{path}: unsupported file type; use {', '.join(LOCAL_SUFFIXES)}")


def _split_files(directory, split):
    """Files holding `split` in a local copy: '<split>.jsonl' etc., or the hub layout 'data/<split>-*.parquet'."""
    found = [directory / f"{split}{s}" for s in LOCAL_SUFFIXES if (directory / f"{split}{s}").is_file()]
    return found or sorted(directory.glob(f"{split}-*.parquet")) or sorted(directory.glob(f"data/{split}-*.parquet"))


def _normalise_rows(located_rows, normalise, label):
    """Normalise [(where, row)]; `normalise` None detects the schema from the first row."""
    if normalise is None:
        if not located_rows:
            raise DataError(f"{label}: no rows")
        normalise = detect_schema(located_rows[0][1], located_rows[0][0])
    return [normalise(row, where) for where, row in located_rows]


def _load_local(path, split, normalise, split_names=("train", "test")):
    """Normalised rows of `split` ('train' or 'test') from a local file or directory. In a directory,
    split_names are the file stems of the two splits (the hub's split names for registered sources).
    A single file, or a directory without a test file, serves 'test' from its last rows (HELD_OUT_*)
    and 'train' from the rest, so no run evaluates on its training rows."""
    if path.is_file():
        return _hold_out(_load_files([path], normalise), split)
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    train_name, test_name = split_names
    test_files = _split_files(path, test_name)
    if split == "test" and test_files:
        return _load_files(test_files, normalise)
    train_files = _split_files(path, train_name)
    if not train_files:
        raise DataError(f"{path}: no '{train_name}' file (looked for {train_name}.jsonl, {train_name}.json, "
                        f"{train_name}.parquet, {train_name}-*.parquet, data/{train_name}-*.parquet)")
    rows = _load_files(train_files, normalise)
    return rows if split == "train" and test_files else _hold_out(rows, split)


def _load_files(files, normalise):
    rows = []
    for f in files:
        rows += _normalise_rows(_read_local_rows(f), normalise, str(f))
    return rows


def _hold_out(rows, split):
    n_test = min(HELD_OUT_MAX, max(1, int(len(rows) * HELD_OUT_FRACTION))) if len(rows) > 1 else 0
    return rows[len(rows) - n_test:] if split == "test" else rows[: len(rows) - n_test]


def _load_hub(source, key, split):
    import datasets
    hub_split = source.splits[split] or source.splits["train"]
    try:
        ds = datasets.load_dataset(source.hub_id, split=hub_split)
    except Exception as e:  # offline, unreachable, or not found: say how to point at a local copy
        raise DataError(
            f"could not load '{source.hub_id}' (split '{hub_split}') from the hub: {type(e).__name__}: {e}. "
            f"Set dataset_paths.{key}=/path/to/a/local/copy (a directory with {hub_split}.jsonl or "
            f"{hub_split}-*.parquet files), or use datasets=[{key}{SAMPLE_SUFFIX}] for the bundled sample"
        ) from None
    rows = _normalise_rows([(f"{source.hub_id} ({hub_split}): row {i}", row) for i, row in enumerate(ds)],
                           source.normalise, source.hub_id)
    return rows if source.splits[split] else _hold_out(rows, split)


def _split_names(source):
    return source.splits["train"], source.splits["test"] or "test"


def load_normalised(name, split, dataset_paths=None):
    """Normalised rows of one dataset (a registry name, '<name>_sample', or a local path) for
    split 'train' or 'test'."""
    dataset_paths = dataset_paths or {}
    if name in SOURCES:
        source = SOURCES[name]
        if dataset_paths.get(name) is not None:
            return _load_local(resolve_path(dataset_paths[name]) or Path(dataset_paths[name]), split,
                               source.normalise, _split_names(source))
        return _load_hub(source, name, split)
    if name.endswith(SAMPLE_SUFFIX) and name[: -len(SAMPLE_SUFFIX)] in SOURCES:
        source = SOURCES[name[: -len(SAMPLE_SUFFIX)]]
        return _load_local(resolve_path(source.sample_dir), split, source.normalise, _split_names(source))
    path = resolve_path(name)
    if path is None:
        raise DataError(f"unknown dataset '{name}': not a file or directory, and not one of "
                        f"{', '.join(known_dataset_names())}")
    return _load_local(path, split, None)


# ---------------------------------------------------------------- tokenisation

def ensure_chat_template(tokenizer):
    """Base models (Mistral-7B-v0.1, Llama) ship no chat template: give them the Zephyr one."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
    if tokenizer.pad_token_id is None:  # right-padded positions are masked out, so any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_prompt(tokenizer, prompt_messages):
    """Token ids of the prompt rendered with the chat template up to the start of the answer,
    with the tokenizer's bos prepended once."""
    text = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return text, ids


def encode_answer(tokenizer, prompt_messages, prompt_text, answer):
    """Token ids of the assistant answer as the chat template renders it after the prompt, up to
    and including its end-of-turn (eos) token; what the template puts after eos is not a target."""
    full = tokenizer.apply_chat_template(prompt_messages + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt_text):
        raise DataError("the tokenizer's chat template does not render the prompt as a prefix of the chat; "
                        "set a compatible template")
    text = full[len(prompt_text):]
    eos = tokenizer.eos_token
    if eos and eos in text:
        text = text[: text.rindex(eos) + len(eos)]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def truncate(prompt_ids, answers, max_length, max_prompt_length):
    """Fit prompt + the longest answer into max_length, as the reference code does: first cut the
    prompt to max_prompt_length keeping its END (the question is usually last) and its bos, then, if
    still too long, cut every answer to what is left: at least max_length - max_prompt_length tokens,
    so a row loses all its targets only when max_prompt_length == max_length (it is then dropped)."""
    longest = max(len(a) for a in answers)
    if len(prompt_ids) + longest > max_length and len(prompt_ids) > max_prompt_length:
        keep = max_prompt_length - 1
        prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - keep:] if keep > 0 else prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    return prompt_ids, [a[:room] for a in answers]


@dataclass
class TokenizedData:
    """Tokenised rows, kept as plain lists for fast collation.
    prompt_ids[i]: the prompt (bos + chat template), chosen_ids[i] / rejected_ids[i]: the answers.
    prompts[i] / answers[i]: the normalised text, kept for greedy sampling and exact match."""
    prompt_ids: list
    chosen_ids: list
    rejected_ids: Optional[list]
    prompts: list = field(repr=False)
    answers: list = field(repr=False)
    n_dropped: int = 0

    def __len__(self):
        return len(self.prompt_ids)

    @property
    def pairs(self):
        return self.rejected_ids is not None

    def lengths(self):
        """(N,) tokens in each row's longest sequence: what it costs in a padded batch."""
        answer = [len(c) if not self.pairs else max(len(c), len(r))
                  for c, r in zip(self.chosen_ids, self.rejected_ids or self.chosen_ids)]
        return np.array([len(p) + a for p, a in zip(self.prompt_ids, answer)], dtype=np.int64)


TOKENIZE_VERSION = 1  # bump when encode_prompt / encode_answer / truncate change what they produce


def _cache_key(rows, tokenizer, max_length, max_prompt_length, pairs):
    """sha256 of the rows, the tokenizer (vocabulary, merges, special tokens, chat template) and the settings."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(json.dumps([TOKENIZE_VERSION, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token,
                         max_length, max_prompt_length, pairs, type(tokenizer).__name__]).encode())
    for row in rows:
        h.update(json.dumps(row, sort_keys=True).encode())
    return h.hexdigest()[:32]


def tokenize_rows(rows, tokenizer, max_length, max_prompt_length, pairs):
    """Tokenise normalised rows once. Rows left with no target token (an answer that renders to no
    tokens) are dropped and counted in `n_dropped`; `pairs` keeps the rejected answers."""
    import datasets

    def encode(batch):
        out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
        for prompt, chosen, rejected in zip(batch["prompt"], batch["chosen"], batch["rejected"]):
            text, p = encode_prompt(tokenizer, prompt)
            answers = [encode_answer(tokenizer, prompt, text, chosen)]
            if pairs:
                answers.append(encode_answer(tokenizer, prompt, text, rejected))
            p, answers = truncate(p, answers, max_length, max_prompt_length)
            out["prompt_ids"].append(p)
            out["chosen_ids"].append(answers[0])
            out["rejected_ids"].append(answers[1] if pairs else [])
        return out

    # Cached on disk under a key of everything the result depends on, so a second run (or the other
    # ranks, which wait for rank 0) reads the token ids instead of re-rendering every chat.
    key = _cache_key(rows, tokenizer, max_length, max_prompt_length, pairs)
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "ift_tokenized" / f"{key}.arrow"
    cache.parent.mkdir(parents=True, exist_ok=True)
    quiet = len(rows) < 20_000
    if quiet:
        datasets.disable_progress_bars()
    try:
        ds = datasets.Dataset.from_list(rows).map(encode, batched=True, batch_size=256, desc="tokenising",
                                                  cache_file_name=str(cache), new_fingerprint=key)
    finally:
        if quiet:
            datasets.enable_progress_bars()
    cols = ds.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_dict()  # plain lists, read once
    keep = [i for i, (c, r) in enumerate(zip(cols["chosen_ids"], cols["rejected_ids"])) if c and (r or not pairs)]
    pick = lambda col: [cols[col][i] for i in keep]  # noqa: E731
    return TokenizedData(
        prompt_ids=pick("prompt_ids"), chosen_ids=pick("chosen_ids"),
        rejected_ids=pick("rejected_ids") if pairs else None,
        prompts=[rows[i]["prompt"] for i in keep], answers=[rows[i]["chosen"] for i in keep],
        n_dropped=len(rows) - len(keep))


def load_split(names, split, tokenizer, max_length, max_prompt_length, pairs, dataset_paths=None):
    """Normalise, check and tokenise the rows of `split` from every dataset in `names`."""
    rows = []
    for name in names:
        part = load_normalised(name, split, dataset_paths)
        if pairs:
            missing = next((i for i, r in enumerate(part) if r["rejected"] is None), None)
            if missing is not None:
                raise DataError(f"dataset '{name}' ({split}) row {missing} has no rejected answer, but the loss "
                                "compares chosen with rejected answers; use a preference dataset such as "
                                "ultrafeedback, hh, shp or orca (or their _sample versions)")
        rows += part
    if not rows:
        raise DataError(f"datasets {list(names)} have no '{split}' rows")
    return tokenize_rows(rows, tokenizer, max_length, max_prompt_length, pairs)


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
    prompts = [data.prompt_ids[i] for i in indices]
    chosen = [data.chosen_ids[i] for i in indices]
    if not data.pairs:
        width = max(len(p) + len(a) for p, a in zip(prompts, chosen))
        input_ids, attention_mask, labels = _sequences(prompts, chosen, pad_id, width)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    rejected = [data.rejected_ids[i] for i in indices]
    width = max(len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected))
    batch = {}
    for side, answers in (("chosen", chosen), ("rejected", rejected)):
        input_ids, attention_mask, labels = _sequences(prompts, answers, pad_id, width)
        batch.update({f"{side}_input_ids": input_ids, f"{side}_attention_mask": attention_mask,
                      f"{side}_labels": labels})
    return batch
