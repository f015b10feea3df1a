"""Normalised rows -> token ids: the chat template (the Zephyr fallback for base models), the
end-of-turn token, encoding with labels (only answer tokens are targets), truncation, and
`TokenizedData`, the memory-mapped Arrow table of token ids that a run trains on. `load_split`
reads, samples and tokenises a split once and keeps the result in the datasets cache, keyed by
everything that changes the tokens; `mask_audit` shows which tokens of a row are trained."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from preference_datasets import DataError
from training.sources import cache_folder, normalised_arrow, normalised_features, plain_row, source_identity
from utils import is_main

# ---------------------------------------------------------------- tokenisation

# The chat template that base models without one get (the Zephyr format, which the reference code
# falls back to): each message is '<|role|>\n' + content + eos, and generation starts at '<|assistant|>\n'.
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)



def ensure_chat_template(tokenizer):
    """Base models (Mistral-7B-v0.1, Llama) ship no chat template: give them the Zephyr one, and say so
    (rank 0, one line): a model fine-tuned in a format its tokenizer does not know should not be a surprise."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
        if is_main():
            print(f"chat template: the tokenizer of {tokenizer.name_or_path or '(unnamed)'} has none; using the Zephyr "
                  "template (<|system|>, <|user|>, <|assistant|> turns, each ending with eos); for another, give the "
                  "tokenizer a chat_template or set model.tokenizer_name_or_path")
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


def _cached(key):
    """(dataset, manifest) of tokenised rows already in the cache under `key`, or None."""
    folder = cache_folder(key)
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
    target = cache_folder(key)
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
        source = datasets.Dataset.from_list([plain_row(row) for row in rows], features=normalised_features())
        cached = _build(key, lambda folder: _tokenise(source, folder, key, label, tokenizer, eot_token, pairs,
                                                      max_length, max_prompt_length, min_answer_tokens, num_proc,
                                                      np.arange(len(rows)), len(rows)))
    table, info = cached
    return TokenizedData(table, pairs, [{"name": label, "rows": len(table), "available": len(rows), **info["counts"]}],
                         None)


def _read_and_tokenise(name, split, dataset_paths, folder, key, sample, seed, settings, identity=None):
    """One dataset's split, tokenised into `folder` (a cache entry being built: _build): its rows are
    streamed into an Arrow file (normalised_arrow, in the folder's source/, removed at the end),
    sampled (sample_rows) and tokenised from that memory map (_tokenise)."""
    import shutil
    try:
        source = normalised_arrow(name, split, dataset_paths, folder / "source", identity)
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
               rows_per_dataset=None, seed=0, min_answer_tokens=128, num_proc=None, log=None, identities=None):
    """Rows of `split` from every dataset in `names`, tokenised (cached: see _tokenise) into one
    TokenizedData. Training rows are first sampled (sample_rows: rows_per_dataset, seed) before any
    is tokenised. A dataset whose tokenised rows are already in the cache is not read again.
    log: called with one line per dataset (rows, sample, truncation counts). eot_token: the
    end-of-turn token (None = detected from the chat template). identities: {name: source_identity},
    decided once for all ranks (run_data.load_data: on rank 0, so every node keys, and reads, the
    same hub commit); None: looked up here."""
    import datasets

    eot_token = end_of_turn_token(tokenizer, eot_token)
    tables, parts = [], []
    for name in names:
        sample = rows_per_dataset if split == "train" else None
        identity = identities[name] if identities is not None else source_identity(name, dataset_paths)
        key = hashlib.sha256(json.dumps([_tokenizer_key(tokenizer, eot_token), identity,
                                         name, split, sample, seed if sample else None, max_length, max_prompt_length,
                                         min_answer_tokens, pairs]).encode()).hexdigest()[:32]
        cached = _cached(key)
        if cached is None:
            settings = dict(tokenizer=tokenizer, eot_token=eot_token, pairs=pairs, max_length=max_length,
                            max_prompt_length=max_prompt_length, min_answer_tokens=min_answer_tokens,
                            num_proc=num_proc)
            cached = _build(key, lambda folder: _read_and_tokenise(name, split, dataset_paths, folder, key, sample,
                                                                   seed, settings, identity))
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


