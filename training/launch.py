"""Where a run's processes come from: this one (BasicTrainer, or a rank torchrun started), or one
process per GPU (nproc on the CPU) that FSDPTrainer starts here with torch.multiprocessing.

Processes started here join their process group by address and rank (nothing is written to
os.environ). Per-machine tuning stays outside the code: the Makefile exports OMP_WAIT_POLICY=PASSIVE,
because OpenMP threads that spin while waiting stall every step on a CPU shared with other jobs.
"""

import contextlib
import datetime
import os
import signal
import socket
import sys

import torch
import torch.distributed as dist

from utils import ConfigError, NonFiniteError, is_main, launched_by_torchrun, rank, release_run_dir

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
        return spawn(run, cfg, world, checked, signals or ())
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


@contextlib.contextmanager
def process_group(cfg, local_rank=0, world=1, port=None):
    """Join this process's group (if it has one) and yield its device; leave the group at the end.
    port: given for the processes launch() started; None for one plain process or a torchrun rank."""
    cuda = use_cuda(cfg)
    backend = "nccl" if cuda else "gloo"
    torchrun = port is None and launched_by_torchrun()  # torchrun set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    if torchrun:
        local_rank = int(os.environ["LOCAL_RANK"])
    if port is not None or torchrun:
        if cuda:
            torch.cuda.set_device(local_rank)
        elif port is not None and "OMP_NUM_THREADS" not in os.environ:
            # CPU ranks share the cores: more threads than cores make OpenMP barriers stall
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        where = {} if torchrun else {"init_method": f"tcp://127.0.0.1:{port}", "rank": local_rank, "world_size": world}
        # the timeout covers rank 0 downloading, tokenising and loading alone while the others wait in a
        # collective (NCCL's default: 10 minutes); device_id binds the group to this rank's GPU, which
        # barrier() would otherwise guess
        dist.init_process_group(backend, **where, timeout=datetime.timedelta(minutes=cfg.dist_timeout_minutes),
                                device_id=torch.device(f"cuda:{local_rank}") if cuda else None)
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


# ---------------------------------------------------------------- the ranks FSDPTrainer starts here

_claims = None  # in a rank that spawn() started: the pipe on which rank 0 tells the launcher its run_dir


def claimed(run_dir):
    """Rank 0 has reserved `run_dir` for a fresh run (pipeline.build). A rank that spawn() started
    tells its launcher, which gives the directory back if the run fails before writing to it; in one
    process, or under torchrun, the rank itself does that (utils.released_on_failure)."""
    if _claims is not None and is_main():
        _claims.send(str(run_dir))


def _rank(local_rank, run, cfg, world, port, checked, claims):
    global _claims
    _claims = claims
    status = run(cfg, local_rank, world, port, checked)
    if status:
        sys.exit(status)


def spawn(run, cfg, world, checked, signal_names):
    """Start `world` ranks with torch.multiprocessing, each calling run(cfg, local_rank, world, port,
    checked), and wait for them. This process, the launcher, forwards the preemption signals it
    receives (signal_names) to the ranks: a scheduler signals the process it started.

    Returns EXIT_PREEMPTED when a preemption signal stopped the ranks: one they handled (they saved a
    checkpoint and exited 75), or one that killed a rank before it had installed its handlers (while
    still importing): see _preempted. Else 0, or raises the ranks' failure (ProcessRaisedException,
    ProcessExitedException) after giving back the run directory rank 0 reserved if nothing was
    written to it: a rank that is killed (kill -9), or a failure on another rank only, leaves rank 0
    no chance to do that itself, and the empty claim would refuse the same run_dir."""
    import multiprocessing

    import torch.multiprocessing as mp

    received, processes = [], []

    def forward(signum, frame=None):
        received.append(signum)
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    # installed before the ranks start, so that a signal meanwhile is not lost (it is sent on below)
    previous = {getattr(signal, n): signal.signal(getattr(signal, n), forward) for n in signal_names}
    claims, claim = multiprocessing.Pipe(duplex=False)
    try:
        context = mp.start_processes(_rank, args=(run, cfg, world, free_port(), checked, claim), nprocs=world,
                                     join=False, start_method="spawn")
        processes.extend(context.processes)
        if received:
            forward(received[0])
        while not context.join():
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        if _preempted(e, received):
            if getattr(e, "exit_code", None) != EXIT_PREEMPTED:  # the ranks could not say it themselves
                print(f"[launch] the ranks were stopped by a signal ({e}); exit status {EXIT_PREEMPTED}: the same "
                      "command with resume_from=latest continues the run", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        while claims.poll():  # the writer stays open here: poll never blocks, recv never meets the end
            run_dir = claims.recv()
            if release_run_dir(run_dir):
                print(f"[launch] the run failed before writing to run_dir={run_dir}: given back (its empty "
                      "metrics.jsonl removed), so the same run_dir can be used again", file=sys.stderr, flush=True)
        raise
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        claims.close()
        claim.close()
    return 0


def _preempted(error, received):
    """Whether the ranks' failure is a preemption, to be reported as EXIT_PREEMPTED (the run can be
    continued): a rank exited with it (it saved and stopped), or died of a signal after this launcher
    had received one (the forwarded signal, or the clean-up of the other ranks that follows), or died
    of SIGTERM / SIGINT (a scheduler signalling every process), or raised KeyboardInterrupt after a
    signal here (SIGINT's default action in a rank that had not installed its handlers yet)."""
    import torch.multiprocessing as mp

    if isinstance(error, mp.ProcessExitedException):
        code = error.exit_code
        return code == EXIT_PREEMPTED or (code < 0 and (bool(received) or -code in (signal.SIGTERM, signal.SIGINT)))
    return bool(received) and str(error).strip().splitlines()[-1].startswith("KeyboardInterrupt")
