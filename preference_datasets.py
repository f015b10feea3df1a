"""The datasets a run can name, and how each one's rows become one normalised row. This is the file to
edit to add a dataset: a normaliser (raw row -> normalised row) and a `SOURCES` entry (hub id, splits,
bundled sample, normaliser). Reading files and the hub is training/sources.py's job, tokenisation
training/tokenization.py's, batching training/batching.py's.

Every source is reduced to one normalised row:
    {"prompt": [{"role": ..., "content": ...}, ...],   # every message before the final assistant turn
     "chosen": str,                                     # the final assistant turn (the SFT/IFT target)
     "rejected": str | None}                            # the dispreferred answer, for DPO-style losses

A file of your own is read in the format its first row shows (detect_schema; docs/data.md, "Formats"):
a chat ('messages'), preference pairs ('prompt'/'chosen'/'rejected' as strings or, TRL's conversational
format, messages), TRL's 'prompt'/'completion', ShareGPT ('conversations'), Alpaca ('instruction'/'input'/
'output'), or the hh/shp/orca fields. The formats with a rejected answer give pairs (DPO-style losses);
the others SFT rows (rejected None).

Bad input (a missing file, invalid JSON, a row missing a field, null or with the wrong type, an empty
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
    if key not in row:
        raise DataError(f"{where}: missing field '{key}' (fields present: {sorted(row)})")
    if row[key] is None:
        raise DataError(f"{where}: field '{key}' is null")
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


def _split_final_answer(messages, where, what):
    """(prompt messages, final assistant content) of checked messages (_check_messages); the final turn
    must be a non-empty answer with a user turn before it. what: how messages name the field(s)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: {what} must end with an assistant turn")
    if not messages[-1]["content"].strip():
        raise DataError(f"{where}: {what} has an empty final assistant turn")
    if not any(m["role"] == "user" for m in messages[:-1]):
        raise DataError(f"{where}: {what} has no user turn before the final assistant turn")
    return messages[:-1], messages[-1]["content"]


def _conversation(row, key, where):
    """(prompt messages, final answer) of a conversational row: the messages of row['prompt'] (TRL's
    explicit prompt, a list of messages) followed by those of row[key] (the answer turns). Without a
    list 'prompt' (ultrafeedback_binarized's is a string copy of the first user turn), or when row[key]
    already starts with the prompt's messages, row[key] is the whole chat."""
    messages = _check_messages(_need(row, key, list, where), where, key)
    head = row.get("prompt")
    if isinstance(head, list) and messages[:len(head)] != head:
        return _split_final_answer(_check_messages(head, where, "prompt") + messages, where, f"'prompt' + '{key}'")
    return _split_final_answer(messages, where, f"field '{key}'")


def _with_system(row, prompt, where):
    """prompt messages after the row's optional 'system' column (a system prompt string), when non-empty."""
    system = row.get("system")
    if system is None:
        return prompt
    if not isinstance(system, str):
        raise DataError(f"{where}: field 'system' must be str, got {type(system).__name__}")
    if not system.strip():
        return prompt
    if prompt and prompt[0]["role"] == "system":
        raise DataError(f"{where}: field 'system' and a system turn in the conversation; keep one of them")
    return [{"role": "system", "content": system}] + prompt


def _answer_text(row, key, where):
    text = _need(row, key, str, where)
    if not text.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return text


def from_messages(row, where):
    """ultrachat_200k and any {'messages': [...]} chat: the target is the final assistant turn."""
    messages = _check_messages(_need(row, "messages", list, where), where, "messages")
    prompt, answer = _split_final_answer(messages, where, "field 'messages'")
    return {"prompt": prompt, "chosen": answer, "rejected": None}


def from_chosen_rejected_chats(row, where):
    """'chosen' and 'rejected' are chats sharing every message but the last: whole conversations
    (ultrafeedback_binarized), or TRL's conversational preference rows, whose 'prompt' is a list of
    messages and 'chosen'/'rejected' the assistant turn(s) after it (_conversation)."""
    prompt, chosen = _conversation(row, "chosen", where)
    rejected = None
    if row.get("rejected") is not None:
        rejected_prompt, rejected = _conversation(row, "rejected", where)
        if rejected_prompt != prompt:
            raise DataError(f"{where}: 'chosen' and 'rejected' differ before their final assistant turn")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _user_prompt(row, key, where):
    """[optional system message, the user message row[key]] of a row whose prompt is a string."""
    return _with_system(row, [{"role": "user", "content": _answer_text(row, key, where)}], where)


def from_prompt_strings(row, where):
    """A plain {'prompt': str, 'chosen': str, 'rejected': str} file (the usual local DPO format), with an
    optional 'system' column."""
    rejected = _answer_text(row, "rejected", where) if row.get("rejected") is not None else None
    return {"prompt": _user_prompt(row, "prompt", where), "chosen": _answer_text(row, "chosen", where),
            "rejected": rejected}


def from_prompt_completion(row, where):
    """TRL's prompt/completion rows (SFT: no rejected answer): strings ('prompt' the user message,
    'completion' its answer, an optional 'system' column), or conversational ('prompt' a list of
    messages, 'completion' the assistant turn(s) after it)."""
    if isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):
        prompt, answer = _conversation(row, "completion", where)
        return {"prompt": prompt, "chosen": answer, "rejected": None}
    return {"prompt": _user_prompt(row, "prompt", where), "chosen": _answer_text(row, "completion", where),
            "rejected": None}


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def from_sharegpt(row, where):
    """ShareGPT (SFT): 'conversations' is [{'from': 'system'|'human'|'gpt', 'value': str}, ...] ('user' and
    'assistant' too); the final 'gpt' turn is the target. An optional 'system' column is the system prompt."""
    messages = []
    for i, turn in enumerate(_need(row, "conversations", list, where)):
        if (not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES
                or not isinstance(turn.get("value"), str)):
            raise DataError(f"{where}: field 'conversations[{i}]' must be a {{'from': {'|'.join(SHAREGPT_ROLES)}, "
                            f"'value': str}} turn, got {turn!r:.80}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    prompt, answer = _split_final_answer(messages, where, "field 'conversations'")
    return {"prompt": _with_system(row, prompt, where), "chosen": answer, "rejected": None}


def from_alpaca(row, where):
    """Alpaca (SFT): 'instruction', an optional 'input' (joined to the instruction after a blank line
    when non-empty, as one user message), 'output' the answer; an optional 'system' column."""
    instruction = _answer_text(row, "instruction", where)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{where}: field 'input' must be str, got {type(extra).__name__}")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return {"prompt": _with_system(row, [{"role": "user", "content": prompt}], where),
            "chosen": _answer_text(row, "output", where), "rejected": None}


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
    prompt = _user_prompt(row, "question", where)
    return {"prompt": prompt, "chosen": _answer_text(row, "chosen", where),
            "rejected": _answer_text(row, "rejected", where)}


def detect_schema(row, where):
    """The normaliser for a local file, from the fields of its first row (docs/data.md, "Formats")."""
    if "history" in row and "human_ref_A" in row:
        return from_shp
    if "question" in row and "chosen" in row:
        return from_orca
    if "conversations" in row:
        return from_sharegpt
    if "instruction" in row:
        return from_alpaca
    if "completion" in row:
        if "label" in row:  # training on every completion would train on the undesirable ones too
            raise DataError(f"{where}: 'prompt'/'completion' rows with a 'label' (TRL's unpaired preference format, "
                            "for KTO) are not supported; pair them as 'prompt'/'chosen'/'rejected'")
        return from_prompt_completion
    if "chosen" in row:
        if isinstance(row["chosen"], list) or isinstance(row.get("prompt"), list):
            return from_chosen_rejected_chats
        return from_prompt_strings if "prompt" in row else from_hh
    if "messages" in row:
        return from_messages
    raise DataError(f"{where}: unknown schema with fields {sorted(row)}; expected 'messages' (a chat), "
                    "'prompt'/'chosen'/'rejected' (strings or messages), 'prompt'/'completion', 'conversations' "
                    "(ShareGPT), 'instruction'/'output' (Alpaca), or the hh/shp/orca fields")


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


def check_dataset_names(names, dataset_paths):
    """Fails early (before anything loads) on a name that is neither registered nor a local path, and on
    a dataset named twice (x and x, or two spellings of one file): its rows would be read twice."""
    seen = {}
    for name in map(str, names):
        check_dataset_name(name, dataset_paths)
        key = _reads(name, dataset_paths)
        if key in seen:
            same = f"names '{name}' twice" if seen[key] == name else f"names '{seen[key]}' and '{name}', the same {key}"
            raise DataError(f"datasets={[str(n) for n in names]} {same}: its rows would be read twice; name each "
                            "dataset once")
        seen[key] = name


def _reads(name, dataset_paths):
    """What a checked dataset name reads: the local file or directory (resolved), or the hub id."""
    base = name[: -len(SAMPLE_SUFFIX)] if name.endswith(SAMPLE_SUFFIX) else None
    if name in SOURCES:
        override = (dataset_paths or {}).get(name)
        return f"hub dataset {SOURCES[name].hub_id}" if override is None else f"path {resolve_path(override)}"
    if base in SOURCES:
        return f"path {resolve_path(SOURCES[base].sample_dir)}"
    return f"path {resolve_path(name)}"


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
