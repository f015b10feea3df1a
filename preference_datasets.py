"""Data: load (hub id or local copy) -> normalise to (prompt messages, chosen[, rejected]) ->
chat template -> tokenise once, with labels -> length-grouped batches padded to their longest row.

Every source is reduced to one normalised row:
    {"prompt": [{"role": ..., "content": ...}, ...],   # every message before the final assistant turn
     "chosen": str,                                     # the final assistant turn (the SFT/IFT target)
     "rejected": str | None}                            # the dispreferred answer, for DPO-style losses

Bad input (a missing file, invalid JSON, a row missing a field or with the wrong type, an empty
assistant turn) raises DataError naming the file, row and field, before any model is loaded.
"""

import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field, fields, replace
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
    pairs: bool = True      # every row of every split has a rejected answer (False: chats, nothing to compare)


SOURCES = {
    "ultrachat": Source("HuggingFaceH4/ultrachat_200k", {"train": "train_sft", "test": "test_sft"},
                        "data/ultrachat_200k", from_messages, pairs=False),
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
    """(where, row) of a .parquet, .jsonl or .json file (optionally gzipped, as hh-rlhf's .jsonl.gz), one
    row at a time (parquet in record batches, JSON lines line by line), invalid JSON naming the file and
    line. A .json file holds a list of rows, {'data': [...]}, or one row per line (SHP's files). where is
    'FILE: line N' (1-based) for JSON lines, so an error points at the line to open, and 'FILE: row i'
    (0-based, as datasets counts) otherwise."""
    if path.suffix == ".parquet":
        yield from _read_parquet(path)
        return
    if _stem_suffix(path) not in (".jsonl", ".json"):
        raise DataError(f"{path}: unsupported file type; use {', '.join(LOCAL_SUFFIXES)} (or .jsonl.gz, .json.gz)")
    if _stem_suffix(path) == ".json":
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = _utf8(data, path)
        if not text.strip():  # an empty file (a domain of SHP without rows in a split, say)
            return
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # not a JSON document; maybe one per line
                raise DataError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
            rows = None
        del text
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if isinstance(rows, list):
            if not all(isinstance(r, dict) for r in rows):
                raise DataError(f"{path}: a .json file must hold a list of row objects (or one object per line)")
            yield from ((f"{path}: row {i}", row) for i, row in enumerate(rows))
            return
        yield from _json_lines(data.split(b"\n"), path)  # one row object per line (a file of one line is one object)
        return
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as lines:
            yield from _json_lines(lines, path)
    except (OSError, EOFError) as e:  # a gzip file cut short or not gzip at all
        raise DataError(f"{path}: not a readable file ({type(e).__name__}: {e})") from None


def _json_lines(lines, path):
    """(where, row) of JSON lines (bytes)."""
    for line_no, raw in enumerate(lines, start=1):
        line = _utf8(raw, path, line_no)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {line_no}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {line_no}: a row must be a JSON object, got {type(row).__name__}")
        yield f"{path}: line {line_no}", row


def _stem_suffix(path):
    """'.jsonl' for x.jsonl and x.jsonl.gz."""
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def _utf8(data, path, first_line=1):
    """bytes (of `path`, starting at line first_line) -> str, or DataError naming the file and the
    line of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = first_line + data.count(b"\n", 0, e.start)
        raise DataError(f"{path}: line {line_no}: not valid UTF-8 (byte 0x{data[e.start]:02x}); "
                        "re-encode the file as UTF-8") from None


def _read_parquet(path, batch_rows=256):
    """(where, row) of a parquet file, batch_rows rows at a time in Python."""
    import pyarrow
    import pyarrow.parquet
    try:
        with pyarrow.parquet.ParquetFile(path) as f:
            i = 0
            for batch in f.iter_batches(batch_size=batch_rows):
                for row in batch.to_pylist():
                    yield f"{path}: row {i}", row
                    i += 1
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None


def _split_files(directory, split):
    """Files holding `split` in a local copy, in the layouts of the hub repositories: '<split>.jsonl'
    (.json, .parquet, .jsonl.gz), 'data/<split>-*.parquet' (ultrachat_200k, ultrafeedback_binarized,
    orca_dpo_pairs), '<subset>/<split>.jsonl.gz' (hh-rlhf) or '<domain>/<split>.json' (SHP)."""
    names = [f"{split}{s}" for s in LOCAL_SUFFIXES + (".jsonl.gz", ".json.gz")]
    found = [directory / n for n in names if (directory / n).is_file()]
    return (found or sorted(directory.glob(f"{split}-*.parquet")) or sorted(directory.glob(f"data/{split}-*.parquet"))
            or sorted(f for n in names for f in directory.glob(f"*/{n}") if f.is_file()))


def _normalised_files(files, normalise):
    """(where, normalised row) of every row of `files`, in order, one at a time; `normalise` None
    detects each file's schema from its first row."""
    for f in files:
        detected = normalise
        for where, row in _read_local_rows(f):
            if detected is None:
                detected = detect_schema(row, where)
            yield where, detected(row, where)


def _local_split(path, split, normalise, split_names=("train", "test")):
    """_split_rows of a local file or directory. In a directory, split_names are the file stems of the
    two splits (the hub's split names for registered sources). A single file, or a directory without a
    test file, serves 'test' from its last rows (HELD_OUT_*) and 'train' from the rest, so no run
    evaluates on its training rows."""
    if path.is_file():
        return _normalised_files([path], normalise), split
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    train_name, test_name = split_names
    test_files = _split_files(path, test_name)
    if split == "test" and test_files:
        return _normalised_files(test_files, normalise), None
    train_files = _split_files(path, train_name)
    if not train_files:
        raise DataError(f"{path}: no '{train_name}' file (looked for {train_name}.jsonl, {train_name}.json, "
                        f"{train_name}.parquet, {train_name}-*.parquet, data/{train_name}-*.parquet)")
    return _normalised_files(train_files, normalise), None if split == "train" and test_files else split


def _held_out(n_rows, split):
    """range of the rows of `split` when a dataset's n_rows are cut into train and a held-out test tail."""
    n_test = min(HELD_OUT_MAX, max(1, int(n_rows * HELD_OUT_FRACTION))) if n_rows > 1 else 0
    return range(n_rows - n_test, n_rows) if split == "test" else range(n_rows - n_test)


def _hub_split(source, key, split):
    """_split_rows of a registered dataset loaded from the hub (the datasets library's own cache)."""
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

    def rows():
        i = 0
        for batch in ds.iter(batch_size=256):
            for values in zip(*batch.values()):
                where = f"{source.hub_id} ({hub_split}): row {i}"
                yield where, source.normalise(dict(zip(batch, values)), where)
                i += 1
    return rows(), None if source.splits[split] else split


def _split_names(source):
    return source.splits["train"], source.splits["test"] or "test"


def _locate(name, dataset_paths):
    """(local path or None for the hub, registered Source or None) of a dataset name."""
    dataset_paths = dataset_paths or {}
    if name in SOURCES:
        override = dataset_paths.get(name)
        return (resolve_path(override) or Path(override)) if override is not None else None, SOURCES[name]
    if name.endswith(SAMPLE_SUFFIX) and name[: -len(SAMPLE_SUFFIX)] in SOURCES:
        source = SOURCES[name[: -len(SAMPLE_SUFFIX)]]
        return resolve_path(source.sample_dir), source
    path = resolve_path(name)
    if path is None:
        raise DataError(f"unknown dataset '{name}': not a file or directory, and not one of "
                        f"{', '.join(known_dataset_names())}")
    return path, None


def _split_rows(name, split, dataset_paths=None):
    """(rows, held_out) of one dataset (a registry name, '<name>_sample', or a local path) for split
    'train' or 'test': rows iterates, one row at a time, over (where, normalised row) of the files (or
    hub split) holding the split, where naming the file and line or row for messages; held_out is None,
    or the split to take from those rows with _held_out when the dataset has no file of its own for it.
    A missing file or directory raises at once; a malformed row raises when it is reached."""
    path, source = _locate(name, dataset_paths)
    if path is None:
        return _hub_split(source, name, split)
    if source is None:
        return _local_split(path, split, None)
    return _local_split(path, split, source.normalise, _split_names(source))


def load_normalised(name, split, dataset_paths=None):
    """Normalised rows (a list of dicts) of one dataset for split 'train' or 'test' (_split_rows). Runs
    never hold a dataset's rows in Python like this (load_split streams them to Arrow); for small data
    and tests."""
    rows, held_out = _split_rows(name, split, dataset_paths)
    rows = [row for _, row in rows]
    return [rows[i] for i in _held_out(len(rows), held_out)] if held_out else rows


NORMALISED_FEATURES = {"prompt": [{"role": "string", "content": "string"}], "chosen": "string", "rejected": "string"}


def _normalised_features():
    """The datasets.Features of normalised rows (prompt messages keep only role and content)."""
    import datasets
    as_feature = lambda f: ([as_feature(f[0])] if isinstance(f, list) else  # noqa: E731
                            {k: as_feature(v) for k, v in f.items()} if isinstance(f, dict) else datasets.Value(f))
    return datasets.Features(as_feature(NORMALISED_FEATURES))


def _plain(row):
    """A normalised row with only the fields and message keys of NORMALISED_FEATURES."""
    return {"prompt": [{"role": m["role"], "content": m["content"]} for m in row["prompt"]],
            "chosen": row["chosen"], "rejected": row["rejected"]}


def _normalised_arrow(name, split, dataset_paths, folder):
    """The normalised rows of one dataset's split (_split_rows) as a datasets.Dataset memory-mapped from
    folder/normalised.arrow: rows are read, normalised and written a few hundred at a time, so no
    dataset's text is ever held in Python."""
    import datasets
    from datasets.arrow_writer import ArrowWriter
    rows, held_out = _split_rows(name, split, dataset_paths)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "normalised.arrow"
    with ArrowWriter(features=_normalised_features(), path=str(path), writer_batch_size=256) as writer:
        for _, row in rows:
            writer.write(_plain(row))
        writer.finalize()
    table = datasets.Dataset.from_file(str(path))
    return table.select(_held_out(len(table), held_out)) if held_out else table


def has_rejected_answers(name, split, dataset_paths=None):
    """Whether every `split` row of dataset `name` has a rejected answer. A registered dataset (also
    its _sample, and a dataset_paths copy in its schema) is answered by the registry (Source.pairs)
    without reading a row; a file or folder of your own by its rows, streamed (one bool kept per row;
    a missing split or a bad row raises _split_rows' DataError, which names it), once per version of
    its files."""
    _, source = _locate(name, dataset_paths)
    if source is not None:
        return source.pairs
    # Remembered beside the tokenised data under a key of the same source identity (paths, sizes,
    # modification times): every run start and every rank asks, and only the first reads the rows.
    key = hashlib.sha256(json.dumps(["has_rejected", source_identity(name, dataset_paths), split]).encode())
    memo = _cache_folder(key.hexdigest()[:32]).with_suffix(".json")
    if memo.is_file():
        return json.loads(memo.read_text())
    rows, held_out = _split_rows(name, split, dataset_paths)
    has = [row["rejected"] is not None for _, row in rows]
    answer = all(has[i] for i in (_held_out(len(has), held_out) if held_out else range(len(has))))
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")  # whole or absent for a rank reading it meanwhile
    tmp.write_text(json.dumps(answer))
    tmp.replace(memo)
    return answer


def source_identity(name, dataset_paths=None):
    """What a dataset's rows are read from, for the tokenised cache's key: every file of a local copy
    with its size and modification time (a file changed in place gets a new key), or the hub id at its
    revision (_hub_revision: a new commit of the dataset gets a new key)."""
    path, source = _locate(name, dataset_paths)
    if path is None:
        return f"hub:{source.hub_id}@{_hub_revision(source.hub_id) or 'unresolved'}"
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return json.dumps([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files])


HUB_TIMEOUT_S = 10  # seconds _hub_revision waits for the hub before falling back to the local cache's record


def _hub_revision(hub_id):
    """The commit of a hub dataset's main branch that load_dataset reads: asked of the hub when online;
    offline (or unreachable), the commit the local hub cache's refs/main records (what the last online
    load resolved, which is what an offline load reads); None when neither knows."""
    import datasets
    from huggingface_hub import HfApi, constants
    if not (constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE):
        try:  # bounded: every rank asks, and a hung connection must not stall a node's start for minutes
            return HfApi().dataset_info(hub_id, timeout=HUB_TIMEOUT_S).sha
        except Exception:  # unreachable, or not found: load_dataset names the problem
            pass
    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{hub_id.replace('/', '--')}" / "refs" / "main"
    return ref.read_text().strip() if ref.is_file() else None


# ---------------------------------------------------------------- tokenisation

def ensure_chat_template(tokenizer):
    """Base models (Mistral-7B-v0.1, Llama) ship no chat template: give them the Zephyr one."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
    if tokenizer.pad_token_id is None:  # right-padded positions are masked out, so any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


EOT_PROBE = "IFT-END-OF-TURN-PROBE"  # an answer no template emits itself: what follows it ends the turn


def end_of_turn_token(tokenizer, configured=None):
    """The token that ends an assistant turn (always a target; greedy generation stops at it).

    `configured` (model.eot_token) wins; otherwise it is the first special token the chat template
    emits after an assistant message's content: '</s>' for the Zephyr template, '<|im_end|>' for
    ChatML, '<|eot_id|>' for Llama-3. It must be one token of the vocabulary."""
    token = configured
    if token is not None and not isinstance(token, str):
        raise DataError(f"model.eot_token must be a token string like '<|im_end|>' or null, got {token!r}")
    if token is None:
        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": EOT_PROBE}]
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        tail = text[text.rindex(EOT_PROBE) + len(EOT_PROBE):]
        special = {str(t) for t in tokenizer.added_tokens_decoder.values() if t.special}
        special |= set(tokenizer.all_special_tokens)
        emitted = tokenizer.convert_ids_to_tokens(tokenizer(tail, add_special_tokens=False)["input_ids"])
        token = next((t for t in emitted if t in special), None)
        if token is None:
            raise DataError(f"the chat template emits no special token after an assistant message (it emits "
                            f"{tail!r}); set model.eot_token to the token that ends an assistant turn")
    if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1:
        raise DataError(f"model.eot_token={token!r} is not a single token of the tokenizer")
    return token


def encode_chat(tokenizer, prompt_messages, answer, eot_token=None):
    """(prompt_ids, answer_ids) of one chat, split from ONE tokenisation of the whole rendered chat.

    The chat (prompt messages + the assistant answer) is rendered with the chat template and
    tokenised once (bos prepended when the tokenizer has one and the template does not emit it), so
    prompt_ids + answer_ids is exactly a prefix of the whole chat's ids: the model trains on the
    tokens it sees at inference, not on an answer tokenised on its own (which gains a leading-space
    token with metaspace tokenizers). The split is by characters, with the fast tokenizer's offsets:
    - the answer starts at the first character after the prompt rendered with the generation prompt;
      a token is a target if it holds at least one answer character, so a token straddling the
      boundary (prompt characters merged with the first answer characters) is a target;
    - the answer ends with the end-of-turn token that follows its text (end_of_turn_token; eot_token
      None = detected from the template), which is the last target: whatever the template puts
      after it (a newline, say) is cut off.
    Raises DataError for a slow tokenizer (no offsets), when the template does not render the prompt
    as a prefix of the chat, or when it emits no end-of-turn token after the answer."""
    prompt, (answer_ids,) = encode_row(tokenizer, prompt_messages, [answer], eot_token or end_of_turn_token(tokenizer))
    return prompt, answer_ids


def _render(tokenizer, prompt_messages, answers, eot_token):
    """[(chat text, first answer character, end of the end-of-turn token)] per answer; the prompt is
    rendered once, with the generation prompt, and must be a prefix of every chat."""
    prompt_text = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    out = []
    for answer in answers:
        chat_text = tokenizer.apply_chat_template(prompt_messages + [{"role": "assistant", "content": answer}],
                                                  tokenize=False)
        if not chat_text.startswith(prompt_text):
            raise DataError("the tokenizer's chat template does not render the prompt as a prefix of the chat; "
                            "set a compatible template")
        start = len(prompt_text)
        eot_at = chat_text.find(eot_token, start + len(answer.strip()))  # templates may strip the content
        if eot_at < 0:
            raise DataError(f"the chat template emits no end-of-turn token {eot_token!r} after an assistant answer; "
                            "set model.eot_token to the token that ends an assistant turn")
        out.append((chat_text, start, eot_at + len(eot_token)))
    return out


def _split_encoding(encoding, start, end, eot_id, bos):
    """(prompt_ids, answer_ids) of one tokenised chat (a tokenizers.Encoding): the tokens wholly
    before character `start`, then those up to the end-of-turn token ending at character `end`
    (encode_chat's rules). Positions come from the encoding's own char -> token map, so no list of
    offsets is built in Python."""
    ids = encoding.ids
    n_prompt = None
    for char in range(start, end):  # the first answer character a token holds (trimmed offsets may skip spaces)
        n_prompt = encoding.char_to_token(char)
        if n_prompt is not None:
            break
    last = encoding.char_to_token(end - 1)
    if last is None or ids[last] != eot_id or encoding.token_to_chars(last)[1] != end:
        raise DataError(f"the end-of-turn token (id {eot_id}) is not tokenised as one token after the answer")
    n_chat = last + 1
    if bos is not None and ids[0] != bos:
        ids, n_prompt, n_chat = [bos] + ids, n_prompt + 1, n_chat + 1
    return ids[:n_prompt], ids[n_prompt:n_chat]


def encode_row(tokenizer, prompt_messages, answers, eot_token):
    """(prompt_ids, [answer_ids, ...]) for answers sharing one prompt (chosen[, rejected]), each split
    from its own whole-chat tokenisation (encode_chat). The prompt is their longest common prefix:
    only a boundary-straddling token can make them differ, and the rest of a side's prompt then
    becomes the first targets of that side, so prompt + answer stays that side's chat prefix."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{type(tokenizer).__name__} is not a fast tokenizer: the split of prompt and answer needs "
                        "its offset mapping; load the tokenizer with use_fast=True (a tokenizer.json)")
    chats = _render(tokenizer, prompt_messages, answers, eot_token)
    # the Rust tokenizer itself, in one call: what tokenizer(text, add_special_tokens=False) runs, without
    # the Python wrapper's per-call conversions
    encodings = tokenizer.backend_tokenizer.encode_batch([c for c, _, _ in chats], add_special_tokens=False)
    eot_id, bos = tokenizer.convert_tokens_to_ids(eot_token), tokenizer.bos_token_id
    encoded = [_split_encoding(e, start, end, eot_id, bos) for e, (_, start, end) in zip(encodings, chats)]
    prompt = encoded[0][0]
    for p, _ in encoded[1:]:
        n = next((i for i, (x, y) in enumerate(zip(prompt, p)) if x != y), min(len(prompt), len(p)))
        prompt = prompt[:n]
    return prompt, [p[len(prompt):] + a for p, a in encoded]


PROMPT_CUT, ANSWER_CUT = 1, 2  # what truncate did to a row (bit flags)


def cut_counts(flags):
    """The truncation counts of rows whose truncate flags are `flags` ((N,) int numpy array)."""
    return {"prompts_truncated": int(((flags & PROMPT_CUT) != 0).sum()),
            "answers_truncated": int(((flags & ANSWER_CUT) != 0).sum())}


def truncate(prompt_ids, answers, max_length, max_prompt_length, min_answer_tokens):
    """Fit prompt + the longest answer into max_length; returns (prompt_ids, answers, flags).

    The policy (README "Truncation"): a row that fits is unchanged. Otherwise
    1. the prompt is cut from its START (the question is usually last; its bos stays) to
       max_prompt_length tokens, or further, to max_length - reserve, where
       reserve = min(longest answer, min_answer_tokens, max_length // 2): so every answer keeps at
       least `reserve` tokens even when max_prompt_length == max_length (the paper's 1024 / 1024);
    2. then every answer longer than the room left is cut to it, keeping its last token (the
       end-of-turn token, which stays the last target).
    reserve >= 1, so no row ever loses all its targets and none is dropped. flags: PROMPT_CUT |
    ANSWER_CUT for what was cut. An untouched row's prompt + answer is a prefix of its chat's
    tokenisation (encode_chat); a cut one is bos + the end of the prompt + the start of the answer +
    the end-of-turn token."""
    longest = max(len(a) for a in answers)
    flags = 0
    if len(prompt_ids) + longest > max_length:
        limit = min(max_prompt_length, max_length - min(longest, min_answer_tokens, max_length // 2))
        if len(prompt_ids) > limit:
            keep = limit - 1
            prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - keep:] if keep > 0 else prompt_ids[-limit:]
            flags |= PROMPT_CUT
    room = max_length - len(prompt_ids)
    if longest > room:
        flags |= ANSWER_CUT
    return prompt_ids, [a if len(a) <= room else a[:room - 1] + a[-1:] for a in answers], flags


IDS = ("prompt_ids", "chosen_ids", "rejected_ids")


class Column:
    """One token-id column of TokenizedData, read from the Arrow table: column[i] is row i's ids (a
    list of ints), len(column) the rows; iterating reads the rows in blocks."""

    def __init__(self, data, name):
        self.data, self.name = data, name

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self.data.table[int(self.data.index[i])][self.name]

    def __iter__(self):
        for start in range(0, len(self), 4096):
            yield from self.data.rows(range(start, min(start + 4096, len(self))), (self.name,))[self.name]


class TokenizedData:
    """Tokenised rows of one split: token ids in a datasets Arrow table, memory-mapped from the
    datasets cache (the ranks of a node share one copy in the page cache), read batch by batch.

    table: a datasets.Dataset with int32 list columns prompt_ids (bos + chat template), chosen_ids and
        rejected_ids (each answer ends with the end-of-turn token and has at least one token;
        rejected_ids empty unless pairs), and the text of each row's last prompt message ('question')
        and chosen answer ('answer'), for greedy samples.
    index: (N,) int64 rows of `table` in this split, in order.
    parts: one dict per dataset in order: name, rows (of the table), available (rows the dataset has) and
        the truncation counts (COUNTS) of its rows in this split (first(n) counts only the n kept).
    split: 'train' or 'test' (None: rows given to tokenize_rows)."""

    def __init__(self, table, pairs, parts, split, index=None):
        self.table, self.pairs, self.parts, self.split = table, pairs, parts, split
        self.index = np.arange(len(table), dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
        self._lengths = self._fingerprint = None

    def __len__(self):
        return len(self.index)

    prompt_ids = property(lambda self: Column(self, "prompt_ids"))
    chosen_ids = property(lambda self: Column(self, "chosen_ids"))
    rejected_ids = property(lambda self: Column(self, "rejected_ids") if self.pairs else None)
    questions = property(lambda self: Column(self, "question"))
    answers = property(lambda self: Column(self, "answer"))

    @property
    def origins(self):
        """origins[i]: where row i came from, e.g. "dataset 'hh_sample' (test) row 3" (for messages)."""
        return _Origins(self)

    def rows(self, indices, columns=IDS):
        """{column: [value of each row]} for rows `indices` of this split."""
        rows = self.index[np.asarray(indices, dtype=np.int64)]
        return self.table.select_columns(list(columns))[rows.tolist()] if len(rows) else {c: [] for c in columns}

    def column_lengths(self, name):
        """(N,) int64 tokens of each row in id column `name`."""
        import pyarrow.compute as pc
        lengths = pc.list_value_length(self.table.data.table.column(name)).to_numpy(zero_copy_only=False)
        return lengths.astype(np.int64)[self.index]

    def lengths(self):
        """(N,) tokens in each row's longest sequence: what it costs in a padded batch."""
        if self._lengths is None:
            answer = self.column_lengths("chosen_ids")
            if self.pairs:
                answer = np.maximum(answer, self.column_lengths("rejected_ids"))
            self._lengths = self.column_lengths("prompt_ids") + answer
        return self._lengths

    def first(self, n):
        """The first n rows; each part's truncation counts become those of the rows kept."""
        index = self.index[:n]
        flags = self.table.data.table.column("flags").to_numpy()[index]
        part_of = np.searchsorted(np.cumsum([p["rows"] for p in self.parts]), index, side="right")
        parts = [{**p, **cut_counts(flags[part_of == k])} for k, p in enumerate(self.parts)]
        return TokenizedData(self.table, self.pairs, parts, self.split, index)

    @property
    def fingerprint(self):
        """sha256 (32 hex digits) of the token ids, in order: changes with the files, the sample, the
        tokenizer, the chat template or the truncation settings. Read in blocks, never all at once; computed once."""
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        for name in IDS if self.pairs else IDS[:2]:
            h.update(self.column_lengths(name).tobytes())
        for name in IDS if self.pairs else IDS[:2]:
            for start in range(0, len(self), 8192):
                block = self.table.data.table.column(name).take(self.index[start:start + 8192])
                h.update(block.combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint


class _Origins:
    def __init__(self, data):
        self.data = data
        self.ends = np.cumsum([p["rows"] for p in data.parts])

    def __getitem__(self, i):
        k = int(np.searchsorted(self.ends, self.data.index[i], side="right"))
        row = int(self.data.table[int(self.data.index[i])]["row"])
        if self.data.split is None:  # tokenize_rows: rows given directly
            return f"row {row}"
        return f"dataset '{self.data.parts[k]['name']}' ({self.data.split}) row {row}"


TOKENIZE_VERSION = 3  # bump when encode_chat / encode_row / truncate change what they produce
COUNTS = ("prompts_truncated", "answers_truncated", "rows_dropped")


def _tokenizer_key(tokenizer, eot_token):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return hashlib.sha256((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode()
                          + json.dumps([TOKENIZE_VERSION, tokenizer.chat_template, tokenizer.bos_token,
                                        tokenizer.eos_token, type(tokenizer).__name__, eot_token]).encode()).hexdigest()


def _auto_num_proc(n_rows, num_proc):
    """num_proc null: one worker per CPU (at most 8), one for fewer than 2,000 rows (starting workers costs more)."""
    if num_proc is not None:
        return num_proc
    return 1 if n_rows < 2000 else max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                 else os.cpu_count() or 1))


def _cache_folder(key):
    import datasets
    return Path(datasets.config.HF_DATASETS_CACHE) / "ift_tokenized" / key


def _cached(key):
    """(dataset, manifest) of tokenised rows already in the cache under `key`, or None."""
    folder = _cache_folder(key)
    if not (folder / "manifest.json").is_file():
        return None
    info = json.loads((folder / "manifest.json").read_text())
    return _open(folder, info["files"]), info


def _tokenise(source, folder, key, label, tokenizer, eot_token, pairs, max_length, max_prompt_length,
              min_answer_tokens, num_proc, row_ids, available):
    """Normalised rows (a datasets.Dataset: prompt, chosen, rejected) -> Arrow files of token ids in
    `folder` (a cache entry being built: _build), and last its manifest.json with the files and the
    truncation counts. Rows are tokenised in num_proc worker processes, a batch of rows at a time.
    row_ids: each row's index in its dataset (for messages); available: the rows the dataset has."""
    import datasets

    eot_id = tokenizer.convert_tokens_to_ids(eot_token)

    def encode(batch, indices):
        out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "flags": [], "row": [], "question": [],
               "answer": []}
        for i, prompt, chosen, rejected in zip(indices, batch["prompt"], batch["chosen"], batch["rejected"]):
            where = f"{label} row {row_ids[i]}"
            if pairs and rejected is None:
                raise DataError(f"{where} has no rejected answer, but the loss compares chosen with rejected answers; "
                                "use a preference dataset such as ultrafeedback, hh, shp or orca (or their _sample "
                                "versions)")
            try:
                p, answers = encode_row(tokenizer, prompt, [chosen, rejected] if pairs else [chosen], eot_token)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
            p, answers, flags = truncate(p, answers, max_length, max_prompt_length, min_answer_tokens)
            assert all(a and a[-1] == eot_id for a in answers)  # truncate's contract: the end of turn stays
            out["prompt_ids"].append(p)
            out["chosen_ids"].append(answers[0])
            out["rejected_ids"].append(answers[1] if pairs else [])
            out["flags"].append(flags)
            out["row"].append(int(row_ids[i]))
            out["question"].append(prompt[-1]["content"])
            out["answer"].append(chosen)
        return out

    ids = datasets.Sequence(datasets.Value("int32"))
    features = datasets.Features({"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids,
                                  "flags": datasets.Value("int8"), "row": datasets.Value("int64"),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string")})
    quiet = len(source) < 20_000
    if quiet:
        datasets.disable_progress_bars()
    try:
        num_proc = _auto_num_proc(len(source), num_proc)
        ds = source.map(encode, batched=True, with_indices=True, batch_size=64, writer_batch_size=64,
                        remove_columns=source.column_names,
                        features=features, num_proc=num_proc if num_proc > 1 else None,
                        cache_file_name=str(folder / "tokens.arrow"), new_fingerprint=key, desc=f"tokenising {label}")
    finally:
        if quiet:
            datasets.enable_progress_bars()
    counts = {**cut_counts(ds.data.table.column("flags").to_numpy()),
              "rows_dropped": 0}  # truncate never drops a row (it always keeps the end-of-turn target)
    info = {"files": [Path(f["filename"]).name for f in ds.cache_files], "counts": counts, "available": available}
    (folder / "manifest.json").write_text(json.dumps(info))


def _build(key, write):
    """Build the cache entry of `key` with write(folder) in a folder of this process's own, then
    publish it under its key with one atomic rename, and return it as _cached does. Two processes that
    build the same entry at once (two jobs of a sweep on one node, each one's rank 0) never touch each
    other's files: the first to finish publishes, the others drop their copy and map the published
    one (the same rows). A reader sees a complete entry or none. On any error (a bad row, a full disk,
    an interrupt) the private folder is removed; one left by a killed process is removed by the next
    build of the key on that host."""
    import shutil
    import socket
    target = _cache_folder(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for stale in target.parent.glob(f"{target.name}.building-{host}-*"):
        if not _alive(int(stale.name.rsplit("-", 2)[1])):
            shutil.rmtree(stale, ignore_errors=True)
    folder = target.with_name(f"{target.name}.building-{host}-{os.getpid()}-{os.urandom(4).hex()}")
    folder.mkdir()
    try:
        write(folder)
        for _ in range(2):
            try:
                folder.rename(target)  # atomic; refused while target is a folder with files in it
                break
            except OSError:
                if (target / "manifest.json").is_file():
                    break  # another process published the same entry first: map theirs
                shutil.rmtree(target, ignore_errors=True)  # a folder no build published (older code)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # gone already when it was published
    cached = _cached(key)
    if cached is None:
        raise RuntimeError(f"the tokenised data could not be published in the cache at {target}")
    return cached


def _alive(pid):
    """Whether process `pid` of this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _open(folder, files):
    import datasets
    parts = [datasets.Dataset.from_file(str(folder / f)) for f in files]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def sample_rows(n_rows, rows_per_dataset, seed, name):
    """Indices (sorted) of the training rows a dataset contributes: all of them (rows_per_dataset
    null, or not fewer rows than it), else a random sample of rows_per_dataset drawn from (seed, name):
    the same on every rank, on every resume and whatever the other datasets are."""
    if rows_per_dataset is None or n_rows <= rows_per_dataset:
        return np.arange(n_rows)
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")])
    return np.sort(rng.choice(n_rows, rows_per_dataset, replace=False))


def tokenize_rows(rows, tokenizer, max_length, max_prompt_length, pairs, eot_token=None, origins=None,
                  min_answer_tokens=128, num_proc=None, label="rows"):
    """Tokenise normalised rows (encode_row, then truncate) into TokenizedData; `pairs` keeps the
    rejected answers. eot_token: the end-of-turn token (None = detected from the chat template).
    Cached under a key of the rows' content and every setting."""
    eot_token = end_of_turn_token(tokenizer, eot_token)
    h = hashlib.sha256(json.dumps([_tokenizer_key(tokenizer, eot_token), max_length, max_prompt_length,
                                   min_answer_tokens, pairs]).encode())
    for row in rows:
        h.update(json.dumps(row, sort_keys=True).encode())
    key = h.hexdigest()[:32]
    cached = _cached(key)
    if cached is None:
        import datasets
        source = datasets.Dataset.from_list([_plain(row) for row in rows], features=_normalised_features())
        cached = _build(key, lambda folder: _tokenise(source, folder, key, label, tokenizer, eot_token, pairs,
                                                      max_length, max_prompt_length, min_answer_tokens, num_proc,
                                                      np.arange(len(rows)), len(rows)))
    table, info = cached
    return TokenizedData(table, pairs, [{"name": label, "rows": len(table), "available": len(rows), **info["counts"]}],
                         None)


def _read_and_tokenise(name, split, dataset_paths, folder, key, sample, seed, settings):
    """One dataset's split, tokenised into `folder` (a cache entry being built: _build): its rows are
    streamed into an Arrow file (_normalised_arrow, in the folder's source/, removed at the end),
    sampled (sample_rows) and tokenised from that memory map (_tokenise)."""
    import shutil
    try:
        source = _normalised_arrow(name, split, dataset_paths, folder / "source")
        if len(source) == 0:
            raise DataError(f"dataset '{name}' has no '{split}' rows")
        if settings["pairs"]:  # refused before anything is tokenised
            import pyarrow.compute as pc
            missing = pc.index(pc.is_null(source.with_format("arrow", columns=["rejected"])[:]["rejected"]),
                               True).as_py()
            if missing >= 0:
                raise DataError(f"dataset '{name}' ({split}) row {missing} has no rejected answer, but the loss "
                                "compares chosen with rejected answers; use a preference dataset such as "
                                "ultrafeedback, hh, shp or orca (or their _sample versions)")
        chosen = sample_rows(len(source), sample, seed, name)
        available = len(source)
        if len(chosen) < available:
            source = source.select(chosen, keep_in_memory=True)  # an index over the memory map, not a copy
        _tokenise(source, folder, key, f"dataset '{name}' ({split})", row_ids=chosen, available=available, **settings)
    finally:
        shutil.rmtree(folder / "source", ignore_errors=True)


def load_split(names, split, tokenizer, max_length, max_prompt_length, pairs, dataset_paths=None, eot_token=None,
               rows_per_dataset=None, seed=0, min_answer_tokens=128, num_proc=None, log=None):
    """Rows of `split` from every dataset in `names`, tokenised (cached: see _tokenise) into one
    TokenizedData. Training rows are first sampled (sample_rows: rows_per_dataset, seed) before any
    is tokenised. A dataset whose tokenised rows are already in the cache is not read again.
    log: called with one line per dataset (rows, sample, truncation counts). eot_token: the
    end-of-turn token (None = detected from the chat template)."""
    import datasets

    eot_token = end_of_turn_token(tokenizer, eot_token)
    tables, parts = [], []
    for name in names:
        sample = rows_per_dataset if split == "train" else None
        key = hashlib.sha256(json.dumps([_tokenizer_key(tokenizer, eot_token), source_identity(name, dataset_paths),
                                         name, split, sample, seed if sample else None, max_length, max_prompt_length,
                                         min_answer_tokens, pairs]).encode()).hexdigest()[:32]
        cached = _cached(key)
        if cached is None:
            settings = dict(tokenizer=tokenizer, eot_token=eot_token, pairs=pairs, max_length=max_length,
                            max_prompt_length=max_prompt_length, min_answer_tokens=min_answer_tokens,
                            num_proc=num_proc)
            cached = _build(key, lambda folder: _read_and_tokenise(name, split, dataset_paths, folder, key, sample,
                                                                   seed, settings))
        table, info = cached
        counts, available = info["counts"], info["available"]
        tables.append(table)
        parts.append({"name": name, "rows": len(table), "available": available, **counts})
        if log is not None:
            sampled = (f"a random sample of {len(table):,} of its {available:,} rows (rows_per_dataset={sample}, "
                       f"seed={seed})" if len(table) < available else f"all {len(table):,} rows"
                       + (f" (it has no more than rows_per_dataset={sample})" if sample else ""))
            log(f"data: '{name}' ({split}): {sampled}; truncated to max_length={max_length}: "
                f"{counts['prompts_truncated']:,} prompts cut, {counts['answers_truncated']:,} answers cut, "
                f"{counts['rows_dropped']} rows dropped")
    table = tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)
    if len(table) == 0:
        raise DataError(f"datasets {list(names)} have no '{split}' rows")
    return TokenizedData(table, pairs, parts, split)


def mask_audit(data, tokenizer, eot_token, row=0, head=40, tail=8):
    """The mask audit a run prints before it starts: row `row` of `data` rendered with its targets
    marked (the prompt as text, then each target token in [brackets], so token boundaries show; an
    answer longer than head + tail tokens shows its first `head` and last `tail`), and the target
    counts. Raises DataError naming the dataset and row when a row has no target token, or when
    the end-of-turn token is a target nowhere (every answer should end with it). Reads the token ids
    column by column in Arrow, never as Python lists."""
    eot_id = tokenizer.convert_tokens_to_ids(eot_token)
    sides = ["chosen_ids"] + (["rejected_ids"] if data.pairs else [])
    n_targets = ending = 0
    anywhere = False
    for side in sides:
        lengths = data.column_lengths(side)
        if (lengths == 0).any():
            raise DataError(f"{data.origins[int(np.argmax(lengths == 0))]}: the row has no target token")
        n_targets += int(lengths.sum())
        if len(data) < len(data.table):  # a subset (first(n), a few eval rows): row by row
            answers = list(getattr(data, side))
            ending += sum(a[-1] == eot_id for a in answers)
            anywhere |= any(eot_id in a for a in answers)
            continue
        for chunk in data.table.data.table.column(side).chunks:
            # offsets index the chunk's values buffer: row r is values[offsets[r]:offsets[r + 1]]
            offsets, values = chunk.offsets.to_numpy(), chunk.values.to_numpy(zero_copy_only=False)
            ending += int((values[offsets[1:] - 1] == eot_id).sum()) if len(offsets) > 1 else 0
            anywhere |= bool((values[offsets[0]:offsets[-1]] == eot_id).any())
    if not anywhere:
        raise DataError(f"{data.origins[0]} (and every other row): the end-of-turn token {eot_token!r} is never a "
                        "target; set model.eot_token to the token that ends an assistant turn")
    prompt, answer = data.prompt_ids[row], data.chosen_ids[row]
    shown = list(range(len(answer))) if len(answer) <= head + tail else \
        list(range(head)) + [None] + list(range(len(answer) - tail, len(answer)))
    text = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    # each token's text is what it adds to the decoded prefix, so leading spaces and merges show
    pieces = ["…" if k is None else "[" + text(prompt + answer[:k + 1])[len(text(prompt + answer[:k])):] + "]"
              for k in shown]
    escape = lambda s: s.replace("\n", "\\n")  # noqa: E731
    prompt_text = text(prompt)
    return (f"mask audit, {data.origins[row]}: {len(prompt)} prompt tokens (not trained), {len(answer)} target "
            f"tokens in [brackets]; all {len(data)} rows: {n_targets} target tokens, {ending} of "
            f"{len(data) * len(sides)} answers end with the end-of-turn token {eot_token!r}\n"
            f"  prompt: {'…' if len(prompt_text) > 300 else ''}{escape(prompt_text[-300:])}\n"
            f"  target: {escape(''.join(pieces))}")


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
