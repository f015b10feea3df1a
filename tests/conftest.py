"""Helpers shared by the test files: composing a config as the command line would, running the tiny
model in this process (or in the processes FSDPTrainer starts), and a random float64 Mistral."""

import contextlib
import io
import json
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing
import transformers
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import losses
from benchmarks.forked import TRAIN_MODULES, Forked
from forward import ModelCall
from training import config_schema, pipeline
from utils import REPO_DIR

# A few quick steps: 64 examples in batches of 16, evaluation on 32 rows every 2 steps.
FAST = ["n_examples=64", "batch_size=16", "eval_batch_size=16", "n_eval_examples=32", "eval_every=32",
        "warmup_steps=0"]


# The tiers of pytest.ini's markers: `make test-fast` runs the unit tier alone, so a test in no tier would
# escape it unnoticed, and a test in two would leave its tier ambiguous.
TIERS = ("unit", "integration", "distributed")


def tier_problems(items):
    """'node id: what is wrong' for each collected test without exactly one tier marker (its own,
    its class's or its module's pytestmark)."""
    problems = []
    for item in items:
        tiers = [mark.name for mark in item.iter_markers() if mark.name in TIERS]
        if len(tiers) != 1:
            problems.append(f"{item.nodeid}: {' + '.join(tiers) or 'no tier marker'}")
    return problems


@pytest.hookimpl(tryfirst=True)  # before -m deselects: `pytest -m unit` refuses an untiered test too
def pytest_collection_modifyitems(items):
    problems = tier_problems(items)
    if problems:
        raise pytest.UsageError("every test needs exactly one of the markers " + ", ".join(TIERS)
                                + " (pytest.ini says which):\n  " + "\n  ".join(problems))
    items[:] = heavy_files_first(items)


def heavy_files_first(items):
    """The items, whole files at a time, the files with the most integration and distributed tests first
    (otherwise in their order). pytest-xdist's --dist loadfile hands out files in this order as workers
    free up: the long files start first, and the unit-only files fill the gaps at the end instead of one
    long file running alone at the end while the other worker idles."""
    files, heavy = {}, {}
    for item in items:
        files.setdefault(item.path, []).append(item)
        heavy[item.path] = heavy.get(item.path, 0) + (item.get_closest_marker("unit") is None)
    order = sorted(files, key=lambda path: -heavy[path])  # stable: equal counts keep their order
    return [item for path in order for item in files[path]]


# torch's own thread count (one per core), read before any test module could change it; under pytest-xdist
# (make test) the cores are shared out among the worker processes, so that workers do not oversubscribe them
DEFAULT_THREADS = max(1, torch.get_num_threads() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


@pytest.fixture(autouse=True, scope="session")
def torch_uses_every_core():
    """The tests in this process compute with DEFAULT_THREADS threads, even if a test module sets
    one thread when it is imported (that would hold for the whole session). With OMP_WAIT_POLICY=PASSIVE
    (the Makefile's) a second thread costs no extra CPU time on the tiny model and cuts the wall time of
    its matrix products; FSDPTrainer's ranks still take cores // ranks each."""
    torch.set_num_threads(DEFAULT_THREADS)
    yield


@pytest.fixture(autouse=True, scope="session")
def ranks_fork_from_a_warm_server():
    """The ranks FSDPTrainer starts in the tests fork from one server process that has imported torch,
    transformers and the repo once, instead of each starting Python and importing them anew (seconds of
    CPU per rank, twice per 2-rank run). Like "spawn", the server is a fresh interpreter: a rank sees none
    of a test's monkeypatching, and gets its arguments pickled. Unlike "spawn", it inherits the environment
    of the moment the server started (the first multi-rank launch), not of the launch itself.
    forked_script runs train.py in a real process forked from the same server."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(TRAIN_MODULES)
    spawn_module = sys.modules["torch.multiprocessing.spawn"]  # torch.multiprocessing.spawn() calls its own
    spawn = spawn_module.start_processes

    def start_processes(fn, args=(), nprocs=1, join=True, daemon=False, start_method="spawn"):
        return spawn(fn, args, nprocs, join, daemon, "forkserver" if start_method == "spawn" else start_method)

    for module in (torch.multiprocessing, spawn_module):
        module.start_processes = start_processes
    yield
    for module in (torch.multiprocessing, spawn_module):
        module.start_processes = spawn
    stop = getattr(multiprocessing.forkserver._forkserver, "_stop", None)
    if stop is not None:  # and reap it, so that its CPU time counts as this process's children's
        stop()


def forked_script(script, *args, cwd=REPO_DIR, env=None, log):
    """`python SCRIPT ARGS` as a real process forked from the tests' warm server (imports done;
    benchmarks.forked), for tests that signal or kill it or read its exit status: a Popen-like handle
    whose communicate() returns (stdout and stderr together, None). Not for what only a fresh interpreter
    shows (import-time warnings, environment variables read at import): those tests start `python`."""
    return Forked(multiprocessing.get_context("forkserver"), [script, *args], cwd,
                  os.environ if env is None else env, log)


def make_cfg(*overrides):
    """The composed config for these overrides (short loss keys allowed), as train.py composes it."""
    with initialize_config_dir(config_dir=str(config_schema.CONFIG_DIR), version_base=None):
        return compose("config", overrides=config_schema.expand_short_overrides(list(overrides)))


def run_train_py(*args, cwd=REPO_DIR):
    """`python REPO_DIR/train.py ARGS` run from cwd, in this process: train.py executed as __main__
    with that sys.argv, which is what the interpreter does, less starting Python and importing torch
    (seconds each). Returns (exit status, stdout, stderr); a SystemExit message goes to stderr with
    status 1, as Python does it. For what only a real process shows (a signal, the interpreter's own
    exit) and for ranks started by FSDPTrainer (they could not unpickle this __main__'s functions),
    run train.py in a subprocess."""
    out, err = io.StringIO(), io.StringIO()
    argv, before = sys.argv, os.getcwd()
    sys.argv = [str(REPO_DIR / "train.py"), *map(str, args)]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(REPO_DIR / "train.py"), run_name="__main__")
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    finally:
        sys.argv = argv
        os.chdir(before)
        HydraConfig.instance().cfg = None  # as a new process would find it (sweep_run_dir reads it)
    return status, out.getvalue(), err.getvalue()


def python_calls(script, *args, env, cwd, timeout=60):
    """Run the shell script `script` with PYTHON set to a stand-in that records each call (its working
    directory and arguments) and exits 0, instead of starting Python. Returns the calls [(cwd, argv)],
    for a test to check what the script runs and to replay the calls in this process (run_train_py),
    which costs the runs without a new interpreter's seconds of imports each. Only for a script that
    does not read what its Python calls write."""
    log = cwd / "python_calls.jsonl"
    stand_in = cwd / "python_stand_in"
    record = "import json, os, sys; open(sys.argv[1], 'a').write(json.dumps([os.getcwd(), sys.argv[2:]]) + chr(10))"
    stand_in.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -I -c {shlex.quote(record)} '
                        f'{shlex.quote(str(log))} "$@"\n')
    stand_in.chmod(0o755)
    proc = subprocess.run(["bash", str(script), *map(str, args)], env=dict(env, PYTHON=str(stand_in)), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    calls = [json.loads(line) for line in open(log)] if log.exists() else []
    log.unlink(missing_ok=True)
    return [(Path(c), argv) for c, argv in calls]


@contextlib.contextmanager
def warm_python(directory):
    """An executable for a shell script's PYTHON whose calls run in processes forked from a server that
    imported torch, transformers and the other heavy packages once (tests/warm_python.py), instead of
    new interpreters (seconds of imports each); the server is stopped and reaped on exit, so the CPU
    time of every call counts as this process's children's."""
    warm = Path(__file__).with_name("warm_python.py")
    sock = directory / "python.sock"
    server = subprocess.Popen([sys.executable, str(warm), "serve", str(sock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "ready\n"
        python = directory / "warm_python"
        python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -I {shlex.quote(str(warm))} '
                          f'{shlex.quote(str(sock))} "$@"\n')
        python.chmod(0o755)
        yield python
    finally:
        server.stdin.close()
        server.wait(timeout=60)


def read_rows(run_dir, split=None):
    """The rows of run_dir/metrics.jsonl (those of one split if given)."""
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r for r in rows if split is None or r["split"] == split]


def run_inprocess(run_dir, *overrides):
    """Check and run a one-process run in this process; returns its metrics rows."""
    cfg = make_cfg(f"run_dir={run_dir}", *overrides)
    checked = pipeline.validate_config(cfg)
    pipeline.run(OmegaConf.to_container(cfg, resolve=True), checked=checked)
    return read_rows(run_dir)


def launch_run(run_dir, *overrides):
    """Check and launch a run as train.py does (spawning FSDP ranks if asked); returns (its training
    rows of metrics.jsonl, its final weights)."""
    from safetensors.torch import load_file
    cfg = make_cfg(f"run_dir={run_dir}", *overrides)
    pipeline.launch(cfg, pipeline.validate_config(cfg))
    return read_rows(run_dir, "train"), load_file(run_dir / "final" / "model.safetensors")


def tiny_model(tie=False, seed=0):
    """A random 2-layer Mistral in float64 (hidden 32, 4 heads, 2 kv heads, vocab 64)."""
    torch.manual_seed(seed)
    config = transformers.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, tie_word_embeddings=tie)
    # sdpa (the default): in float64, eager attention turns a left-padded row into NaN (its fully
    # masked padding queries), which no loss could survive.
    config._attn_implementation = "sdpa"
    return transformers.MistralForCausalLM(config).to(torch.float64)


def mean_over_valid(row_losses, valid, row_metrics):
    """(loss, metrics): the trainer's reduction divided by the valid rows, 0 when there is none."""
    loss_sum, metric_sums, count = losses.reduce_rows(row_losses, valid, row_metrics)
    count = count.clamp(min=1)
    return loss_sum / count, {k: v / count for k, v in metric_sums.items()}


def sft_loss(model, input_ids, attention_mask, labels, call=ModelCall()):
    """SFT's mean loss over the rows with a target: (loss 0-dim with gradient, {"loss": 0-dim})."""
    return mean_over_valid(*losses.sft_rows(call, model, input_ids, attention_mask, labels))


def ift_loss(model, input_ids, attention_mask, labels, lam, gamma=0.95, propagation_type="loss",
             propagation_side="left", propagation_norm="L1", call=ModelCall()):
    """IFT's mean loss (spec §3) over the rows with a target, and its metrics' means."""
    return mean_over_valid(*losses.ift_rows(call, model, input_ids, attention_mask, labels, lam, gamma,
                                            propagation_type, propagation_side, propagation_norm))
