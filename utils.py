"""Small helpers shared by train.py, trainers.py and preference_datasets.py: paths, seeding,
distributed bookkeeping and crash-safe writing. Nothing model- or loss-specific lives here."""

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

REPO_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A config key has an impossible or unknown value. Raised before any model loads."""


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm was NaN or infinite and on_nonfinite says stop. No update of that step
    was applied; the message names the step and the metric."""


def resolve_path(path):
    """A local path as given (relative to the working directory) or, failing that, relative to the
    repository, so `models/tiny-mistral` works from any directory. Returns None when neither exists
    (the caller then treats the string as a hub id)."""
    if path is None:
        return None
    for candidate in (Path(path).expanduser(), REPO_DIR / path):
        if candidate.exists():
            return candidate.resolve()
    return None


def holds_run(path):
    """Whether a directory already holds a run's metrics or final model (which must not be overwritten)."""
    return (path / "metrics.jsonl").exists() or (path / "final").exists()


def _unwritten_claim(path):
    """Whether `path` holds only a run's claim: an empty metrics.jsonl (reserve_run_dir), no final/."""
    metrics = Path(path) / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size == 0 and not (Path(path) / "final").exists()


def run_dir_taken(path, resumable=True):
    """The refusal of a run_dir that holds a run (holds_run), telling the user what to do. A claim
    with no row written is most often left by a run killed before its first step (kill -9, a node
    lost), but may belong to a run still loading: only the user can tell, so it is not removed here.
    resumable: whether resume_from can continue it in this context (check before the launch)."""
    path = Path(path).resolve()
    if _unwritten_claim(path):
        return (f"run_dir={path} already holds a run that has written nothing yet (an empty metrics.jsonl: a run "
                f"still starting, or one killed before its first step); if no run is using it, delete "
                f"{path / 'metrics.jsonl'} and start again")
    return f"run_dir={path} already holds a run; choose another run_dir" + (
        ", or continue it with resume_from=latest" if resumable else "")


def make_run_dir(run_dir, exp_name, in_place=False):
    """The run directory (run_dir, or runs/<exp_name>_<date_time>), reserved by rank 0 and shared with
    the others. Refuses a directory that already holds a run, so nothing written earlier is overwritten,
    unless the run continues in it (in_place: resume_from=latest); a default name taken by another
    launcher in the same second gets a suffix (_1, _2, ...)."""
    import datetime
    import itertools
    path = None
    if is_main():
        if run_dir is not None and in_place:  # the run's own directory: its metrics.jsonl continues
            path = Path(run_dir).resolve()
            path.mkdir(parents=True, exist_ok=True)
        elif run_dir is not None:
            path = Path(run_dir).resolve()
            if not reserve_run_dir(path):
                raise ConfigError(run_dir_taken(path, resumable=False))
        else:
            stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            base = Path(f"runs/{exp_name}_{stamp}").resolve()
            path = next(p for p in itertools.chain([base], (Path(f"{base}_{i}") for i in itertools.count(1)))
                        if reserve_run_dir(p))
    return Path(broadcast_object(str(path)))


def reserve_run_dir(path):
    """Claim `path` for this run, atomically: the exclusive creation (O_EXCL) of its metrics.jsonl
    succeeds in exactly one process, so parallel launchers can never share a run directory (checking
    first and creating after could not promise that). False when the directory already holds a run."""
    if (path / "final").exists():
        return False
    path.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path / "metrics.jsonl", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    return True


def release_run_dir(run_dir):
    """Give back a run directory whose run wrote nothing (before its first metrics row), so that the
    same run_dir can be used again: remove the still-empty metrics.jsonl that claims it, the
    config.yaml written beside it, and the directory when nothing else is left in it. Returns
    whether it was released (False: a row was written, or there is no claim)."""
    if not _unwritten_claim(run_dir):
        return False
    (Path(run_dir) / "metrics.jsonl").unlink()
    (Path(run_dir) / "config.yaml").unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: something else was written there
        Path(run_dir).rmdir()
    return True


@contextlib.contextmanager
def released_on_failure(run_dir, fresh):
    """Inside, a failure (an exception, Ctrl-C) before the run's first metrics row gives back the run
    directory that make_run_dir reserved for it (fresh: not a run continued in place): release_run_dir
    on rank 0. (A rank that is killed, or a failure on another rank only, cannot get here: for spawned
    ranks the launcher releases it, launch.spawn.)"""
    try:
        yield
    except BaseException:
        if fresh and is_main():
            release_run_dir(run_dir)
        raise


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- distributed bookkeeping
# Every helper below also works in a plain single process, so the trainer has one code path.

def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor):
    """In-place sum over ranks (a no-op in one process). Returns the tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local_rank():
    """This rank's index on its node: torchrun's LOCAL_RANK; the global rank for the processes
    training/launch.py starts (all on one node) and for one plain process."""
    return int(os.environ.get("LOCAL_RANK", rank())) if launched_by_torchrun() else rank()


@contextlib.contextmanager
def node_first():
    """Global rank 0 runs the body first (reads and tokenises into its datasets cache); then the first
    rank of every other node (local_rank 0) runs it, and builds what its node's cache lacks (a
    node-local HF_DATASETS_CACHE); then all the other ranks, which find their node's cache warm.
    So each node tokenises at most once, whether or not the nodes share the cache. The waits are
    barriers of the whole group: a node's ranks could start no sooner, since training begins with a
    collective of all ranks."""
    first, node_head = is_main(), local_rank() == 0
    if first:
        yield
    barrier()  # global rank 0 has built
    if node_head and not first:
        yield
    barrier()  # every node's first rank has built what its node lacked
    if not node_head:
        yield


def launched_by_torchrun():
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


# ---------------------------------------------------------------- crash-safe writing

class JsonlWriter:
    """Appends one JSON object per line and flushes each, so a crash loses at most the line being
    written and never corrupts the earlier ones."""

    def __init__(self, path):
        self.path = Path(path)
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, row):
        self.file.write(json.dumps(row, allow_nan=True) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def write_atomic(path, text):
    """Through a temporary sibling and a rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(target):
    """Yields a temporary sibling directory; on success it is renamed to `target` in one step, so a
    crash mid-save leaves either the previous complete directory or none, never half a model.
    An existing `target` is replaced only after the new one is fully written."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def fsync_tree(root):
    """Flush every file under `root`, then the folders themselves, to the disk: after a power cut or
    kill -9 a renamed folder then holds its whole content, not empty or truncated files."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def fsync_dir(path):
    """Make the entries of folder `path` (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

