"""Where rows come from: a registered dataset's hub id or bundled sample, or a file or directory of
your own (.jsonl, .json, .parquet, optionally gzipped), read a record batch or a line at a time and
normalised (preference_datasets.py's normalisers) into an Arrow file in the datasets cache. Nothing
here holds a whole dataset's text in Python; bad rows raise DataError naming the file and line or row."""

import codecs
import gzip
import hashlib
import json
import os
from pathlib import Path

from preference_datasets import (HELD_OUT_FRACTION, HELD_OUT_MAX, LOCAL_SUFFIXES, SAMPLE_SUFFIX, SOURCES, DataError,
                                 detect_schema, known_dataset_names)
from utils import resolve_path


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
    line of the first byte that is not UTF-8. The file's first line may start with a UTF-8 byte-order
    mark (Windows editors and Excel write one), which is dropped."""
    if first_line == 1:
        data = data.removeprefix(codecs.BOM_UTF8)
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


def _hub_split(source, key, split, revision=None):
    """_split_rows of a registered dataset loaded from the hub (the datasets library's own cache), at
    commit `revision` (None: the main branch)."""
    import datasets
    hub_split = source.splits[split] or source.splits["train"]
    try:
        ds = datasets.load_dataset(source.hub_id, split=hub_split, revision=revision)
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


def _split_rows(name, split, dataset_paths=None, revision=None):
    """(rows, held_out) of one dataset (a registry name, '<name>_sample', or a local path) for split
    'train' or 'test': rows iterates, one row at a time, over (where, normalised row) of the files (or
    hub split) holding the split, where naming the file and line or row for messages; held_out is None,
    or the split to take from those rows with _held_out when the dataset has no file of its own for it.
    A missing file or directory raises at once; a malformed row raises when it is reached."""
    path, source = _locate(name, dataset_paths)
    if path is None:
        return _hub_split(source, name, split, revision)
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


def normalised_features():
    """The datasets.Features of normalised rows (prompt messages keep only role and content)."""
    import datasets
    as_feature = lambda f: ([as_feature(f[0])] if isinstance(f, list) else  # noqa: E731
                            {k: as_feature(v) for k, v in f.items()} if isinstance(f, dict) else datasets.Value(f))
    return datasets.Features(as_feature(NORMALISED_FEATURES))


def plain_row(row):
    """A normalised row with only the fields and message keys of NORMALISED_FEATURES."""
    return {"prompt": [{"role": m["role"], "content": m["content"]} for m in row["prompt"]],
            "chosen": row["chosen"], "rejected": row["rejected"]}


def normalised_arrow(name, split, dataset_paths, folder, identity=None):
    """The normalised rows of one dataset's split (_split_rows) as a datasets.Dataset memory-mapped from
    folder/normalised.arrow: rows are read, normalised and written a few hundred at a time, so no
    dataset's text is ever held in Python. identity: the source_identity the cache entry is keyed by
    (decided on rank 0): a hub dataset is read at the commit it names."""
    import datasets
    from datasets.arrow_writer import ArrowWriter
    rows, held_out = _split_rows(name, split, dataset_paths, identity_revision(identity))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "normalised.arrow"
    with ArrowWriter(features=normalised_features(), path=str(path), writer_batch_size=256) as writer:
        for _, row in rows:
            writer.write(plain_row(row))
        writer.finalize()
    table = datasets.Dataset.from_file(str(path))
    return table.select(_held_out(len(table), held_out)) if held_out else table


def cache_folder(key):
    import datasets
    return Path(datasets.config.HF_DATASETS_CACHE) / "ift_tokenized" / key


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
    memo = cache_folder(key.hexdigest()[:32]).with_suffix(".json")
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


def identity_revision(identity):
    """The hub commit a source_identity names ('hub:ID@COMMIT'), or None (a local copy, unresolved)."""
    if identity is None or not identity.startswith("hub:") or identity.endswith("@unresolved"):
        return None
    return identity.rsplit("@", 1)[1]


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


