"""The datasets a run can name, and how each one's rows become one normalised row. This is the file to
edit to add a dataset: a normaliser (raw row -> normalised row) and a `SOURCES` entry (hub id, splits,
bundled sample, normaliser). Reading files and the hub is training/sources.py's job, tokenisation
training/tokenization.py's, batching training/batching.py's.

Every source is reduced to one normalised row:
    {"prompt": [{"role": ..., "content": ...}, ...],   # every message before the final assistant turn
     "chosen": str,                                     # the final assistant turn (the SFT/IFT target)
     "rejected": str | None}                            # the dispreferred answer, for DPO-style losses

Bad input (a missing file, invalid JSON, a row missing a field or with the wrong type, an empty
assistant turn) raises DataError naming the file, row and field, before any model is loaded.
"""

from dataclasses import dataclass
from typing import Callable

from utils import resolve_path

ROLES = ("system", "user", "assistant")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


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
