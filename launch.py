"""Where a run's processes come from: this one (BasicTrainer, or a rank torchrun started), or one
process per GPU (nproc on the CPU) that FSDPTrainer starts here with torch.multiprocessing.

Processes started here join their process group by address and rank (nothing is written to
os.environ). Per-machine tuning stays outside the code: the Makefile exports OMP_WAIT_POLICY=PASSIVE,
because OpenMP threads that spin while waiting stall every step on a CPU shared with other jobs.
"""

import contextlib
import os
import signal
import socket
import sys

import torch
import torch.distributed as dist

from utils import ConfigError, NonFiniteError, launched_by_torchrun, rank

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: "temporary failure, the user is invited to retry"
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")  # allowed in preempt_signals


def use_cuda(cfg):
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def planned_world_size(cfg):
    """How many ranks the run will have: torchrun's WORLD_SIZE, or the processes FSDPTrainer starts."""
    if launched_by_torchrun():
        return int(os.environ["WORLD_SIZE"])
    if cfg.trainer != "FSDPTrainer":
        return 1
    if cfg.nproc is not None:
        return cfg.nproc
    return torch.cuda.device_count() if use_cuda(cfg) else 2


def launch(run, cfg, checked=None, signals=()):
    """Call run(cfg, local_rank, world, port, checked) in this process, or in each process FSDPTrainer
    needs, and return its exit status. cfg: a plain (resolved) dict, so that it pickles. checked:
    what was decided before the launch (pipeline.Checked: the loss, the resume plan), passed on to
    every rank, or None. signals: names of the signals this process forwards to the processes it
    starts (preempt_signals)."""
    from omegaconf import OmegaConf

    conf = OmegaConf.create(cfg)
    world = planned_world_size(conf)
    if conf.trainer != "FSDPTrainer" or launched_by_torchrun():
        return run(cfg, checked=checked)
    if world == 1:  # FSDP2 needs a process group even for one rank
        return run(cfg, 0, 1, free_port(), checked)
    import torch.multiprocessing as mp
    try:
        return spawn(_spawned, (run, cfg, world, free_port(), checked), world, signals or ())
    except mp.ProcessRaisedException as e:
        _reraise_one_line_error(e)
        raise


def _reraise_one_line_error(e):
    """A spawned rank's error arrives as its traceback text; raise the errors whose message says it all
    (bad data or config: the message names the file, row or key; a non-finite step: every rank stops at
    the same step) as themselves, for main's one-line exit."""
    from preference_datasets import DataError
    last = str(e).strip().splitlines()[-1]
    for cls in (DataError, ConfigError, NonFiniteError):
        prefix = f"{cls.__module__}.{cls.__qualname__}: "
        if last.startswith(prefix):
            raise cls(last[len(prefix):]) from None


def _spawned(local_rank, run, cfg, world, port, checked):
    status = run(cfg, local_rank, world, port, checked)
    if status:
        sys.exit(status)


@contextlib.contextmanager
def process_group(cfg, local_rank=0, world=1, port=None):
    """Join this process's group (if it has one) and yield its device; leave the group at the end.
    port: given for the processes launch() started; None for one plain process or a torchrun rank."""
    cuda = use_cuda(cfg)
    backend = "nccl" if cuda else "gloo"
    if port is not None:
        if cuda:
            torch.cuda.set_device(local_rank)
        elif "OMP_NUM_THREADS" not in os.environ:
            # CPU ranks share the cores: more threads than cores make OpenMP barriers stall
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=local_rank, world_size=world)
    elif launched_by_torchrun():  # torchrun set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
        local_rank = int(os.environ["LOCAL_RANK"])
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    try:
        yield torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- preemption signals

_received = None  # the first preemption signal this process received, or None


def stop_signal():
    """The preemption signal this process received inside preemption_signals(), or None."""
    return _received


@contextlib.contextmanager
def preemption_signals(names):
    """While inside, the named signals ask the trainer to stop after the current optimizer step; a
    repeated signal (for instance during the save that follows) is ignored. Main thread only."""
    global _received
    _received = None

    def handler(signum, frame):
        global _received
        if _received is None:
            _received = signum
            print(f"\n[rank {rank()}] {signal.Signals(signum).name}: finishing this optimizer step, then saving a "
                  "checkpoint", file=sys.stderr, flush=True)
        else:
            print(f"[rank {rank()}] {signal.Signals(signum).name} ignored: already stopping (kill -9 to abort "
                  "now; the previous checkpoints stay intact)", file=sys.stderr, flush=True)

    previous = {getattr(signal, n): signal.signal(getattr(signal, n), handler) for n in names or ()}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        _received = None


def spawn(fn, args, nprocs, signal_names):
    """torch.multiprocessing.spawn that forwards the preemption signals this process receives to its
    children (a scheduler signals the process it started). Returns EXIT_PREEMPTED when the ranks stopped
    after a signal, else 0."""
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")

    def forward(signum, frame):
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    previous = {getattr(signal, n): signal.signal(getattr(signal, n), forward) for n in signal_names}
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        if e.exit_code == EXIT_PREEMPTED:
            return EXIT_PREEMPTED
        raise
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    return 0
