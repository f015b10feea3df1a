"""Sharded, crash-safe checkpoints, exact resume and preemption.

A checkpoint is a folder `RUN/checkpoints/step-N/`:

    .metadata, __<rank>_0.distcp   model and optimizer state in torch.distributed.checkpoint (DCP) format
                                   (with LoRA, the trainable parameters only: Checkpointer.options):
                                   every rank writes (and on resume reads) only its own shards, and a
                                   checkpoint written by R ranks loads on any R' (DCP reshards)
    rng-rank<r>.pt                 the RNG states (python, numpy, torch CPU and CUDA) of rank r
    trainer_state.pt               the trainer's TrainerState (step, scheduler position, token and
                                   skipped-step counters, wandb run id), the float16 loss scale, the
                                   world size, and the fingerprint of everything that changes the math
                                   (rank 0)
    hf/                            a Hugging Face copy of the weights, as final/, only with save_hf_checkpoints
    manifest.json                  {"files": {relative path: size in bytes}} of every file above, written last

It is written into `step-N.tmp/`, every file and the folder are fsynced, and only then is it renamed to
`step-N/`: a visible checkpoint is always complete, whatever moment a `kill -9` picks. What a cluster does
later (a truncated shard, a deleted file, a copy that stopped half-way) shows against the manifest
(`damage`): resume_from=latest moves such a folder aside to `step-N.damaged-<time>` (never deletes it) and
takes the newest whole one; resume_from=<a damaged folder> stops with one line naming the damage. A save
whose `step-N/` already exists moves the old one aside to `step-N.replaced-<time>`. Leftover `*.tmp`
folders are removed when a run resumes in place. `keep_last=K` deletes older checkpoints only after a
newer one is complete (renamed to `*.tmp` first, so a half-deleted folder is never visible either).

Resume is exact because a run is a function of its config: data order comes from (seed, epoch), lambda
noise from (seed, step), and everything else that carries over lives in the checkpoint. So a resume
with a config that changes the math (lr, seed, loss, data, ...) is refused unless resume_force=true.

Preemption: run() installs handlers for `preempt_signals` (launch.preemption_signals); the trainer
asks `stop_requested()` after every optimizer step (an all-reduced flag, so all ranks stop after the
same step), writes a checkpoint and exits with EXIT_PREEMPTED.
"""

import copy
import json
import os
import random
import re
import shutil
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from training.launch import EXIT_PREEMPTED, SIGNALS, stop_signal
from utils import (ConfigError, all_reduce_sum, barrier, fsync_dir, fsync_tree, holds_run, is_main, rank, resolve_path,
                   run_dir_taken, world_size)

TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
STEP_DIR = re.compile(r"step-(\d+)")
# DCP warns on every save and load in one process (BasicTrainer); that is the intended use here, not a slip.
warnings.filterwarnings("ignore", message="torch.distributed is .*uninitialized")
# Test-only: "POINT@STEP" makes the save of step STEP SIGKILL its own process at POINT (see _crash_point).
CRASH_ENV = "IFT_TEST_KILL_AT"


# ---------------------------------------------------------------- finding checkpoints

def step_folders(run_dir):
    """{step: folder} of every `step-N` folder under run_dir/checkpoints, whole or not, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = {}
    for path in root.glob("step-*") if root.is_dir() else ():
        match = STEP_DIR.fullmatch(path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def complete_checkpoints(run_dir):
    """{step: folder} of the whole checkpoints under run_dir/checkpoints (damage() finds nothing)."""
    return {step: path for step, path in step_folders(run_dir).items() if damage(path) is None}


def damage(path):
    """None when the checkpoint folder is whole: its manifest lists every file the save wrote with its
    size, each is there at that size, and trainer_state.pt reads. Otherwise what is wrong, in a few words.
    Sizes, not checksums: they catch truncation, loss and a half-finished copy for the cost of a stat."""
    path = Path(path)
    try:
        listed = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"{MANIFEST} is missing (a save writes it last, so this folder is not a whole save)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST} is unreadable ({error})"
    for name, size in listed.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, its manifest says {size}"
    try:
        read_trainer_state(path)
    except Exception as error:  # noqa: BLE001 - whatever torch.load raises, the folder cannot be resumed
        return f"{TRAINER_STATE} does not load ({type(error).__name__}: {error})"
    return None


def write_manifest(folder):
    """folder/manifest.json: {"files": {path relative to folder: size}} of every file in it, fsynced."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def set_aside(path, why):
    """Rename `path` to `<name>.<why>-<UTC time>` beside it (never deleted: a person may want to look at
    it) and return the new path. The name no longer matches `step-N`, so no resume or prune sees it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = path.with_name(f"{path.name}.{why}-{stamp}"), 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.{why}-{stamp}-{n}"), n + 1
    path.rename(aside)
    fsync_dir(path.parent)
    return aside


def resume_checkpoint(cfg):
    """(folder, damaged): the folder cfg.resume_from names and the damaged folders passed over to find it.
    `latest` = the newest whole checkpoint of run_dir (None when there is none yet, so the same command
    starts a run and resumes it after a requeue); damaged: [(step folder newer than it, what is wrong)]."""
    if cfg.resume_from is None:
        return None, []
    if cfg.resume_from == "latest":
        damaged = []
        for path in reversed(step_folders(cfg.run_dir).values()):
            problem = damage(path)
            if problem is None:
                return path, damaged
            damaged.append((path, problem))
        return None, damaged
    path = resolve_path(cfg.resume_from)
    if path is None or not path.is_dir() or not ((path / ".metadata").exists() or (path / MANIFEST).exists()):
        raise ConfigError(f"resume_from={cfg.resume_from} is not a checkpoint folder (one holding .metadata and "
                          f"{TRAINER_STATE}, e.g. <run_dir>/checkpoints/step-100), nor 'latest'")
    problem = damage(path)
    if problem is not None:
        raise ConfigError(f"resume_from={cfg.resume_from} is a damaged checkpoint: {problem}. Resume from another "
                          "step folder, or from latest (which sets damaged ones aside)")
    return path, []


def _resumes_in_place(cfg):
    """Whether this run continues in its own run_dir (resume_from=latest, or a checkpoint of run_dir)."""
    if cfg.resume_from is None or cfg.run_dir is None:
        return False
    if cfg.resume_from == "latest":
        return True
    path = resolve_path(cfg.resume_from)
    return path is not None and path.parent.parent == Path(cfg.run_dir).resolve()


def read_checkpoint(directory):
    """A checkpoint's model and optimizer state as full tensors, in one process, without a model:
    {"model": {name: tensor}, "optimizer": {"state": {name: {...}}, "param_groups": [...]}}.
    For inspecting a checkpoint (a 7B one needs its whole size in memory)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    return _load_state_dict_from_keys(checkpoint_id=str(directory))  # every key, unsharded


def read_trainer_state(directory):
    return torch.load(Path(directory) / TRAINER_STATE, weights_only=True, map_location="cpu")


# ---------------------------------------------------------------- the resume plan

@dataclass(frozen=True)
class ResumePlan:
    """How a run starts, decided once from the config and the disk (plan_resume), before anything loads;
    pipeline.build, the trainer and the Checkpointer read it, and every rank gets rank 0's.

    checkpoint: Path of the checkpoint folder to continue, or None (the run starts at step 0).
    in_place: the run continues in its own run_dir (resume_from=latest, or a checkpoint of run_dir):
        leftovers are removed there and metrics.jsonl is cut back to the checkpoint's step.
    finished: in place, and run_dir already holds final/: there is nothing to do.
    step: the checkpoint's optimizer step (0 without a checkpoint).
    reads_weights: whether the policy's weights are read from model.name_or_path; False when the
        checkpoint fills them (a resume without LoRA; LoRA's frozen base is read as at the start).
    fingerprint: the checkpoint's fingerprint (config and tokenised data), or None.
    damaged: ((folder, what is wrong), ...) newer than the checkpoint, which prepare_run_dir moves aside.
    differences: {key: (value in the checkpoint, value now)} that resume_force=true let through.
    """
    checkpoint: Optional[Path] = None
    in_place: bool = False
    finished: bool = False
    step: int = 0
    reads_weights: bool = True
    fingerprint: Optional[dict] = None
    damaged: tuple = ()
    differences: dict = field(default_factory=dict)


def plan_resume(cfg):
    """The run's ResumePlan, after checking what config_schema's declarations cannot (signal names, the
    run_dir, the checkpoint to resume and its config fingerprint). Raises ConfigError."""
    for name in cfg.preempt_signals or ():
        if name not in SIGNALS:
            raise ConfigError(f"preempt_signals has '{name}'; allowed: {', '.join(SIGNALS)}")
    if cfg.resume_from == "latest" and cfg.run_dir is None:
        raise ConfigError("resume_from=latest continues the run in run_dir: set run_dir to that run's directory")
    in_place = _resumes_in_place(cfg)
    if in_place and (Path(cfg.run_dir) / "final").exists():
        if cfg.resume_from != "latest":
            raise ConfigError(f"run_dir={cfg.run_dir} holds a finished run (final/ exists): nothing to resume")
        return ResumePlan(in_place=True, finished=True)  # e.g. a job requeued after its run completed
    if cfg.run_dir is not None and holds_run(Path(cfg.run_dir)) and not in_place:
        raise ConfigError(run_dir_taken(cfg.run_dir))
    checkpoint, damaged = resume_checkpoint(cfg)
    if checkpoint is None:
        return ResumePlan(in_place=in_place, damaged=tuple(damaged))
    saved = read_trainer_state(checkpoint)
    if in_place:
        newer = [s for s in complete_checkpoints(cfg.run_dir) if s > saved["step"]]
        if newer:
            raise ConfigError(f"resume_from={cfg.resume_from} is older than this run's checkpoint step-{max(newer)}; "
                              "resume from latest, or into a new run_dir")
    differences = check_fingerprint(cfg, checkpoint, saved=saved["fingerprint"])  # the config's part
    return ResumePlan(checkpoint=checkpoint, in_place=in_place, step=saved["step"],
                      reads_weights=cfg.get("lora") is not None, fingerprint=saved["fingerprint"],
                      damaged=tuple(damaged), differences=differences)


def config_fingerprint(cfg):
    """{dotted key: value} of the resolved config, less the keys that do not change the math
    (config_schema.NOT_MATH). Resharding (trainer, nproc) is among those on purpose."""
    from omegaconf import OmegaConf

    from training.config_schema import changes_the_math

    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if not changes_the_math(name):
                continue
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                flat[name] = value

    container = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    walk(container, "")
    return flat


def data_fingerprint(data):
    """sha256 (32 hex digits) of the tokenised training rows, in order: changes with the files, the
    tokenizer, the chat template or the truncation settings (TokenizedData.fingerprint)."""
    return data.fingerprint


def fingerprint_differences(saved, current):
    """{key: (value in the checkpoint, value now)} for every key whose value differs."""
    return {k: (saved.get(k, "<absent>"), current.get(k, "<absent>"))
            for k in sorted(set(saved) | set(current)) if saved.get(k, "<absent>") != current.get(k, "<absent>")}


def check_fingerprint(cfg, checkpoint, data=None, saved=None):
    """Refuse (ConfigError) a resume whose config (data None) or tokenised training data (data given)
    differs from what wrote the checkpoint, naming every differing key with both values; with
    resume_force=true, return the differences ({key: (in the checkpoint, now)}). saved: the
    checkpoint's fingerprint when already read (ResumePlan.fingerprint)."""
    saved = saved if saved is not None else read_trainer_state(checkpoint)["fingerprint"]
    if data is None:
        differences = fingerprint_differences(saved["config"], config_fingerprint(cfg))
    else:
        current = data_fingerprint(data)
        differences = {} if saved["data"] == current else {"tokenised training data (sha256)": (saved["data"], current)}
    if differences and not cfg.resume_force:
        listed = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in
                           ((k, *v) for k, v in differences.items()))
        raise ConfigError(f"resume_from={cfg.resume_from} ({checkpoint}) was written by a run whose math differs: "
                          f"{listed}. Resume with the checkpoint's values, or set resume_force=true to continue anyway")
    return differences


# ---------------------------------------------------------------- the run directory on resume

def remove_leftovers(run_dir):
    """Remove what an interrupted save left behind: `*.tmp` (and atomic_directory's `*.old`) folders and
    files in run_dir and run_dir/checkpoints. Nothing visible is touched."""
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        for path in folder.glob("*") if folder.is_dir() else ():
            if path.suffix in (".tmp", ".old"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def prune(run_dir, keep_last):
    """Delete all but the newest `keep_last` complete checkpoints (None: keep all). Each is renamed to
    `*.tmp` before it is deleted, so a crash never leaves half a checkpoint in view."""
    if keep_last is None:
        return
    found = complete_checkpoints(run_dir)
    for step in sorted(found)[:-keep_last]:
        doomed = found[step].with_name(found[step].name + ".old.tmp")
        found[step].rename(doomed)
        fsync_dir(doomed.parent)
        shutil.rmtree(doomed)


def truncate_metrics(path, step):
    """Keep the rows of metrics.jsonl up to `step` (those the checkpoint has seen) and drop the
    interrupted tail, so the resumed run appends to one consistent history. Replaced atomically."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the line a crash tore in half
            continue
        if row.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def prepare_run_dir(plan, run_dir, keep_last):
    """Rank 0, when resuming in place: remove leftovers and cut metrics.jsonl back to the checkpoint's
    step (to nothing when there is no checkpoint yet: the run starts again)."""
    if not plan.in_place:
        return
    for folder, problem in plan.damaged:  # before anything is written: a save must not meet them
        aside = set_aside(folder, "damaged")
        print(f"resume_from=latest: {folder.name} is damaged ({problem}); moved it to {aside.name} and "
              f"resuming from {plan.checkpoint.name if plan.checkpoint is not None else 'the beginning'}", flush=True)
    remove_leftovers(run_dir)
    prune(run_dir, keep_last)  # a crash may have come between a save and its clean-up
    truncate_metrics(run_dir / "metrics.jsonl", plan.step if plan.checkpoint is not None else -1)
    if plan.checkpoint is None:
        print(f"resume_from=latest: {run_dir} has no complete checkpoint yet; starting the run from the beginning")


# ---------------------------------------------------------------- RNG states

def rng_state():
    """This process's RNG states. On CUDA only the generator of this rank's own device (the current one):
    a rank draws from no other, and a resume with another rank count gives this state to the device of
    the rank that loads it (see set_rng_state)."""
    state = {"python": _python_state(random.getstate()), "numpy": _numpy_state(np.random.get_state()),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_device"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda_device" in state:  # the saving rank's device -> this rank's device
        torch.cuda.set_rng_state(state["cuda_device"], torch.cuda.current_device())
    elif torch.cuda.is_available() and "cuda" in state:  # older checkpoints: every device's generator
        saved = state["cuda"]
        torch.cuda.set_rng_state(saved[torch.cuda.current_device() % len(saved)], torch.cuda.current_device())


def _python_state(state):  # lists and tensors only, so torch.load(weights_only=True) reads it
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _numpy_state(state):
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


# ---------------------------------------------------------------- saving and loading

@dataclass
class TrainerState:
    """The trainer's counters: everything a resume needs besides the model, the optimizer, the float16
    loss scaler and the RNG states (which the Checkpointer takes as objects of their own). The trainer
    owns one and updates it as it trains; the Checkpointer saves `state_dict()` and gives a checkpoint's
    values back through `load_state_dict()`, never touching the trainer itself.

    step: optimizer steps done, the data position (batches are a function of (seed, epoch, step)).
    scheduler: the learning-rate scheduler's state_dict, refreshed by the trainer before each save; a
        resume reads only its step count (`last_epoch`: updates applied) and rebuilds the schedule from
        the config (trainers.BasicTrainer.build_scheduler).
    tokens_seen, slots_seen: non-padding tokens and padded tensor slots processed, over all ranks.
    skipped_steps, consecutive_skips: updates not applied (non-finite loss or gradient), in all and in a row.
    wandb_run_id: the wandb run this one logs to; a run resumed in place continues it.
    """
    step: int = 0
    scheduler: dict = field(default_factory=dict)
    tokens_seen: int = 0
    slots_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    wandb_run_id: Optional[str] = None

    def state_dict(self):
        """{field: value}, a copy (an asynchronous save writes it while training moves on)."""
        return copy.deepcopy(asdict(self))

    def load_state_dict(self, saved):
        """Take every field's value from `saved` (a state_dict()); a missing or unknown key is an error."""
        names = {f.name for f in fields(self)}
        if set(saved) != names:
            raise KeyError(f"a TrainerState needs exactly the keys {sorted(names)}; got {sorted(saved)}")
        for name in names:
            setattr(self, name, copy.deepcopy(saved[name]))


# what trainer_state.pt holds besides the TrainerState's own keys (total_steps: written by checkpoints before
# the TrainerState object, read by nothing)
OWN_KEYS = ("format", "world_size", "scaler", "fingerprint", "total_steps")


class Checkpointer:
    """Writes and reads the checkpoints of one run: model, optimizer, the trainer's TrainerState, the float16
    loss scaler and this process's RNG states, each handed over as an object (no trainer is ever read).
    Collective: every rank calls save() and load().

    data_fingerprint: the tokenised training rows' fingerprint (data_fingerprint(train_data)), which every
    checkpoint records so that a resume on other data is refused."""

    def __init__(self, cfg, run_dir, data_fingerprint):
        self.cfg, self.run_dir, self.data_fingerprint = cfg, Path(run_dir), data_fingerprint
        self.pending = None  # an asynchronous save still being written: (future, tmp, folder, step, meta, start)
        self.group = None
        if cfg.save_async and torch.distributed.is_initialized():
            # the background writer runs collectives; they must not share a group with training's
            self.group = torch.distributed.new_group(backend="gloo")

    def options(self):
        """What of the model a checkpoint holds: everything, or with LoRA only the trainable parameters
        (adapters and trainable_modules). A LoRA run's frozen base is loaded from model.name_or_path on
        resume, as at the start (possibly in 4 bits, which DCP could not reshard anyway). Loading is then
        not strict about the frozen keys; dcp.load still fails on any trainable key the checkpoint lacks."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        adapters_only = self.cfg.get("lora") is not None
        return StateDictOptions(ignore_frozen_params=adapters_only, strict=not adapters_only)

    def save(self, step, *, model, optimizer, state, scaler=None, export=None):
        """checkpoints/step-<step>/ from every rank's own shards of `model` and `optimizer`, plus
        `state.state_dict()` (a TrainerState, or anything with state_dict()), `scaler`'s (float16's
        GradScaler, or None) and this rank's RNG states. export: a function that writes a Hugging Face
        model directory into the folder it is given (save_hf_checkpoints), collective like save()."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.wait()
        start = time.perf_counter()
        folder = self.run_dir / "checkpoints" / f"step-{step}"
        tmp = folder.with_name(folder.name + ".tmp")
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        torch.save(rng_state(), tmp / f"rng-rank{rank()}.pt")
        if self.cfg.save_hf_checkpoints and export is not None:  # gathered on rank 0: for evaluation, not resuming
            export(tmp / "hf")
        model_state, optimizer_state = get_state_dict(model, optimizer, options=self.options())
        shards = {"model": model_state, "optimizer": optimizer_state}
        meta = self._meta(state, scaler) if is_main() else None  # taken now: training moves on during an async save
        writer = dcp.FileSystemWriter(tmp, sync_files=True)
        if self.cfg.save_async:
            future = dcp.async_save(shards, storage_writer=writer, process_group=self.group, no_dist=_no_dist())
            self.pending = (future, tmp, folder, step, meta, start)
            _report(f"checkpoint step-{step}: training resumes after {time.perf_counter() - start:.2f} s; "
                    "the shards are written in the background")
        else:
            dcp.save(shards, storage_writer=writer, no_dist=_no_dist())
            barrier()  # every rank's shards are written before rank 0 publishes the folder
            self._publish(tmp, folder, step, meta, start)
            barrier()

    def wait(self):
        """Finish an asynchronous save (rank 0 publishes it once every rank's shards are written)."""
        if self.pending is None:
            return
        future, tmp, folder, step, meta, start = self.pending
        self.pending = None
        future.result()
        # DCP's coordinator (rank 0) finishes only after gathering every rank's write results, so the
        # folder is complete when rank 0 publishes it; the other ranks have nothing left to do
        self._publish(tmp, folder, step, meta, start)

    def poll(self):
        """Publish a finished asynchronous save without waiting for one still being written."""
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def _meta(self, state, scaler):
        """trainer_state.pt's contents: the state's own keys beside OWN_KEYS (the file's format of old)."""
        saved = state.state_dict()
        clash = set(saved) & set(OWN_KEYS)
        if clash:
            raise KeyError(f"the trainer state's keys {sorted(clash)} are the checkpoint's own")
        return {"format": FORMAT_VERSION, **saved, "world_size": world_size(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "fingerprint": {"config": config_fingerprint(self.cfg), "data": self.data_fingerprint}}

    def _publish(self, tmp, folder, step, meta, start):
        """Rank 0: trainer_state.pt, fsync everything, rename into place, then apply keep_last."""
        if not is_main():
            return
        _crash_point("state", step)
        torch.save(meta, tmp / TRAINER_STATE)
        _crash_point("manifest", step)
        write_manifest(tmp)  # last: a folder without one was never a whole save
        fsync_tree(tmp)
        _crash_point("rename", step)
        if folder.exists():  # e.g. a damaged step-N that a resume from an older path came back to
            _report(f"checkpoint {folder.name} already exists: moved it to {set_aside(folder, 'replaced').name}")
        tmp.rename(folder)
        fsync_dir(folder.parent)
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        _report(f"saved {folder} ({size:.1f} MiB) in {time.perf_counter() - start:.2f} s")
        _crash_point("retention", step)
        prune(self.run_dir, self.cfg.keep_last)

    def load(self, checkpoint, *, model, optimizer, state, scaler=None):
        """Read the checkpoint folder into `model` and `optimizer` (each rank its own shards; the optimizer
        keeps its hyperparameters as they are, the config's, equal to the checkpoint's unless
        resume_force=true), `state` (load_state_dict of what save() took from it) and `scaler` (float16's
        loss scale goes on from where it was), and restore this rank's RNG states. Returns the number of
        ranks that wrote the checkpoint."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        directory = Path(checkpoint)
        start = time.perf_counter()
        saved = read_trainer_state(directory)
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        model_state, optimizer_state = get_state_dict(model, optimizer, options=self.options())
        shards = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(shards, checkpoint_id=directory, no_dist=_no_dist())  # each rank reads what its shards hold
        set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"],
                       options=self.options())
        for group, hyper in zip(optimizer.param_groups, fresh):
            group.update(hyper)
        state.load_state_dict({k: v for k, v in saved.items() if k not in OWN_KEYS})
        if scaler is not None and saved["scaler"] is not None:
            scaler.load_state_dict(saved["scaler"])
        # with a different number of ranks, rank r continues the random streams of saved rank r mod R
        set_rng_state(torch.load(directory / f"rng-rank{rank() % saved['world_size']}.pt", weights_only=True))
        _report(f"resumed from {directory} (step {saved['step']}, written by {saved['world_size']} rank(s), read by "
                f"{world_size()}) in {time.perf_counter() - start:.2f} s")
        return saved["world_size"]

    # ------------------------------------------------------------ preemption

    def stop_requested(self, device):
        """Whether any rank received a preemption signal (all ranks get the same answer, so they stop
        after the same step). One all-reduce of one number per optimizer step."""
        self.poll()
        flag = torch.tensor([float(stop_signal() is not None)], device=device)
        return all_reduce_sum(flag).item() > 0

    def report_preempted(self, step, saved=True):
        """Print where the run stopped and how to continue it (saved=False: stopped before training)."""
        if is_main():
            name = signal.Signals(stop_signal()).name if stop_signal() is not None else "a signal on another rank"
            where = (f"after step {step}: checkpoint {self.run_dir / 'checkpoints' / f'step-{step}'}" if saved else
                     f"before training (at step {step}), as the models loaded; nothing new to save")
            print(f"\nstopped by {name} {where}\n"
                  f"to continue, run the same command with run_dir={self.run_dir} resume_from=latest "
                  f"(exit status {EXIT_PREEMPTED})", flush=True)


def _report(line):
    """A line from rank 0 that does not break the progress bar."""
    from tqdm import tqdm
    if is_main():
        tqdm.write(line)


def _no_dist():
    return not torch.distributed.is_initialized()


def _crash_point(point, step):
    """Test-only: with IFT_TEST_KILL_AT=POINT@STEP, the save of step STEP dies by SIGKILL at POINT
    (state: before trainer_state.pt; manifest: between trainer_state.pt and manifest.json; rename: before
    the rename; retention: before old ones are deleted)."""
    if os.environ.get(CRASH_ENV) == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
