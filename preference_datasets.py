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
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = _utf8(raw, path, line_no)
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


def _utf8(data, path, first_line=1):
    """bytes (of `path`, starting at line first_line) -> str, or DataError naming the file and the
    line of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = first_line + data.count(b"\n", 0, e.start)
        raise DataError(f"{path}: line {line_no}: not valid UTF-8 (byte 0x{data[e.start]:02x}); "
                        "re-encode the file as UTF-8") from None


def _read_whole_file(path):
    """Rows of a .json or .parquet file."""
    if path.suffix == ".json":
        try:
            rows = json.loads(_utf8(path.read_bytes(), path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: a .json file must hold a list of row objects")
        return rows
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet
        try:
            return pyarrow.parquet.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
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
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{type(tokenizer).__name__} is not a fast tokenizer: the split of prompt and answer needs "
                        "its offset mapping; load the tokenizer with use_fast=True (a tokenizer.json)")
    eot_token = eot_token or end_of_turn_token(tokenizer)
    prompt_text = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
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
    end = eot_at + len(eot_token)
    enc = tokenizer(chat_text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    n_prompt = next(i for i, (_, e) in enumerate(offsets) if e > start)      # tokens wholly before the answer
    n_chat = next((i for i, (s, _) in enumerate(offsets) if s >= end), len(ids))  # ... up to the end of turn
    if offsets[n_chat - 1][1] != end or ids[n_chat - 1] != tokenizer.convert_tokens_to_ids(eot_token):
        raise DataError(f"the end-of-turn token {eot_token!r} is not tokenised as one token after the answer")
    bos = tokenizer.bos_token_id
    if bos is not None and ids[0] != bos:
        ids, n_prompt, n_chat = [bos] + ids, n_prompt + 1, n_chat + 1
    return ids[:n_prompt], ids[n_prompt:n_chat]


def encode_row(tokenizer, prompt_messages, answers, eot_token):
    """(prompt_ids, [answer_ids, ...]) for answers sharing one prompt (chosen[, rejected]), each split
    from its own whole-chat tokenisation (encode_chat). The prompt is their longest common prefix:
    only a boundary-straddling token can make them differ, and the rest of a side's prompt then
    becomes the first targets of that side, so prompt + answer stays that side's chat prefix."""
    encoded = [encode_chat(tokenizer, prompt_messages, a, eot_token) for a in answers]
    prompt = encoded[0][0]
    for p, _ in encoded[1:]:
        n = next((i for i, (x, y) in enumerate(zip(prompt, p)) if x != y), min(len(prompt), len(p)))
        prompt = prompt[:n]
    return prompt, [p[len(prompt):] + a for p, a in encoded]


def truncate(prompt_ids, answers, max_length, max_prompt_length):
    """Fit prompt + the longest answer into max_length, as the reference code does: first cut the
    prompt to max_prompt_length keeping its END (the question is usually last) and its bos, then, if
    still too long, cut every answer to what is left, keeping its last token (the end-of-turn token,
    which stays the last target). At least max_length - max_prompt_length tokens are left for the
    answers, so a row loses all its targets only when max_prompt_length == max_length."""
    longest = max(len(a) for a in answers)
    if len(prompt_ids) + longest > max_length and len(prompt_ids) > max_prompt_length:
        keep = max_prompt_length - 1
        prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - keep:] if keep > 0 else prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    return prompt_ids, [a if len(a) <= room else a[:room - 1] + a[-1:] if room > 0 else [] for a in answers]


@dataclass
class TokenizedData:
    """Tokenised rows, kept as plain lists for fast collation.
    prompt_ids[i]: the prompt (bos + chat template), chosen_ids[i] / rejected_ids[i]: the answers,
    each ending with the end-of-turn token (encode_chat); every answer has at least one token.
    prompts[i] / answers[i]: the normalised text, kept for greedy sampling and exact match.
    origins[i]: where the row came from ("dataset 'hh_sample' (train) row 3"), for error messages."""
    prompt_ids: list
    chosen_ids: list
    rejected_ids: Optional[list]
    prompts: list = field(repr=False)
    answers: list = field(repr=False)
    origins: list = field(repr=False)

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

    def first(self, n):
        """The first n rows."""
        return replace(self, **{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[:n]
                                for f in fields(self)})


TOKENIZE_VERSION = 2  # bump when encode_chat / encode_row / truncate change what they produce


def _cache_key(rows, tokenizer, max_length, max_prompt_length, pairs, eot_token):
    """sha256 of the rows, the tokenizer (vocabulary, merges, special tokens, chat template) and the settings."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(json.dumps([TOKENIZE_VERSION, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token,
                         max_length, max_prompt_length, pairs, type(tokenizer).__name__, eot_token]).encode())
    for row in rows:
        h.update(json.dumps(row, sort_keys=True).encode())
    return h.hexdigest()[:32]


def tokenize_rows(rows, tokenizer, max_length, max_prompt_length, pairs, eot_token=None, origins=None):
    """Tokenise normalised rows once (encode_row, then truncate); `pairs` keeps the rejected answers.
    eot_token: the end-of-turn token (None = detected from the chat template, end_of_turn_token).
    origins: a name per row for error messages (default 'row i'). A row left with no target token
    (its prompt fills max_length, possible only when max_prompt_length == max_length) raises DataError."""
    import datasets

    eot_token = end_of_turn_token(tokenizer, eot_token)
    origins = origins or [f"row {i}" for i in range(len(rows))]

    def encode(batch, indices):
        out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
        for i, prompt, chosen, rejected in zip(indices, batch["prompt"], batch["chosen"], batch["rejected"]):
            try:
                p, answers = encode_row(tokenizer, prompt, [chosen, rejected] if pairs else [chosen], eot_token)
            except DataError as e:
                raise DataError(f"{origins[i]}: {e}") from None
            p, answers = truncate(p, answers, max_length, max_prompt_length)
            out["prompt_ids"].append(p)
            out["chosen_ids"].append(answers[0])
            out["rejected_ids"].append(answers[1] if pairs else [])
        return out

    # Cached on disk under a key of everything the result depends on, so a second run (or the other
    # ranks, which wait for rank 0) reads the token ids instead of re-rendering every chat.
    key = _cache_key(rows, tokenizer, max_length, max_prompt_length, pairs, eot_token)
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "ift_tokenized" / f"{key}.arrow"
    cache.parent.mkdir(parents=True, exist_ok=True)
    quiet = len(rows) < 20_000
    if quiet:
        datasets.disable_progress_bars()
    try:
        ds = datasets.Dataset.from_list(rows).map(encode, batched=True, with_indices=True, batch_size=256,
                                                  desc="tokenising", cache_file_name=str(cache), new_fingerprint=key)
    finally:
        if quiet:
            datasets.enable_progress_bars()
    cols = ds.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_dict()  # plain lists, read once
    empty = next((i for i, (c, r) in enumerate(zip(cols["chosen_ids"], cols["rejected_ids"]))
                  if not c or (pairs and not r)), None)
    if empty is not None:
        raise DataError(f"{origins[empty]}: no answer token is left after truncation (its prompt fills "
                        f"max_length={max_length}); set max_prompt_length below max_length")
    return TokenizedData(
        prompt_ids=cols["prompt_ids"], chosen_ids=cols["chosen_ids"],
        rejected_ids=cols["rejected_ids"] if pairs else None,
        prompts=[r["prompt"] for r in rows], answers=[r["chosen"] for r in rows], origins=origins)


def load_split(names, split, tokenizer, max_length, max_prompt_length, pairs, dataset_paths=None, eot_token=None):
    """Normalise, check and tokenise the rows of `split` from every dataset in `names`
    (eot_token: the end-of-turn token, None = detected from the chat template)."""
    rows, origins = [], []
    for name in names:
        part = load_normalised(name, split, dataset_paths)
        if pairs:
            missing = next((i for i, r in enumerate(part) if r["rejected"] is None), None)
            if missing is not None:
                raise DataError(f"dataset '{name}' ({split}) row {missing} has no rejected answer, but the loss "
                                "compares chosen with rejected answers; use a preference dataset such as "
                                "ultrafeedback, hh, shp or orca (or their _sample versions)")
        rows += part
        origins += [f"dataset '{name}' ({split}) row {i}" for i in range(len(part))]
    if not rows:
        raise DataError(f"datasets {list(names)} have no '{split}' rows")
    return tokenize_rows(rows, tokenizer, max_length, max_prompt_length, pairs, eot_token, origins)


def mask_audit(data, tokenizer, eot_token, row=0, head=40, tail=8):
    """The mask audit a run prints before it starts: row `row` of `data` rendered with its targets
    marked (the prompt as text, then each target token in [brackets], so token boundaries show; an
    answer longer than head + tail tokens shows its first `head` and last `tail`), and the target
    counts. Raises DataError naming the dataset and row when a row has no target token, or when
    the end-of-turn token is a target nowhere (every answer should end with it)."""
    eot_id = tokenizer.convert_tokens_to_ids(eot_token)
    sides = [data.chosen_ids] + ([data.rejected_ids] if data.pairs else [])
    for answers in sides:
        empty = next((i for i, a in enumerate(answers) if not a), None)
        if empty is not None:
            raise DataError(f"{data.origins[empty]}: the row has no target token")
    ending = sum(a[-1] == eot_id for answers in sides for a in answers)
    if not any(eot_id in a for answers in sides for a in answers):
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
    n_targets = sum(len(a) for answers in sides for a in answers)
    prompt_text = text(prompt)
    return (f"mask audit, {data.origins[row]}: {len(prompt)} prompt tokens (not trained), {len(answer)} target "
            f"tokens in [brackets]; all {len(data)} rows: {n_targets} target tokens, {ending} of "
            f"{sum(map(len, sides))} answers end with the end-of-turn token {eot_token!r}\n"
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
