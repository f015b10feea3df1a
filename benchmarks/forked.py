"""A script run as __main__ in a process forked from a multiprocessing fork server that imported torch,
transformers and the repository once: a real process (a signal stops it, a timeout kills it, its exit
status is the script's), without a new interpreter's seconds of imports. benchmarks/gpu_check.py's smoke
mode and the tests (tests/conftest.py) start train.py this way; what only a fresh interpreter shows
(import-time warnings, environment variables read when a library is imported) still needs one."""

import atexit
import os
import runpy
import subprocess
import sys

# What train.py and the ranks it starts import, some of it only once running (datasets in load_split, the
# model's module, peft with lora=, DCP at a checkpoint): a fork server's preload list, imported once there.
# multiprocessing skips a name that does not import, silently (tests/test_gpu_check.py checks them all).
TRAIN_MODULES = ["train", "trainers", "preference_datasets", "training.pipeline", "training.launch",
                 "training.checkpoints", "training.lora", "training.reference_logps", "hydra", "datasets",
                 "transformers", "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
                 "transformers.models.mistral.modeling_mistral", "safetensors.torch", "peft", "torch.distributed.fsdp",
                 "torch.distributed.checkpoint", "torch.distributed.checkpoint.state_dict"]


def run_script(argv, cwd, env, log):
    """In the forked child: what `python ARGV` does from cwd with env, its stdout and stderr appended to
    the file `log`; the script's SystemExit status becomes the process's exit status."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:  # torch read it when the server imported it
        import torch
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = list(argv)
    try:
        runpy.run_path(argv[0], run_name="__main__")
    finally:  # as the interpreter does at exit (multiprocessing's child ends with os._exit)
        atexit._run_exitfuncs()


class Forked:
    """`python ARGV` (see run_script) started from `context` (multiprocessing.get_context("forkserver")),
    with the part of subprocess.Popen's interface its callers use: poll() and returncode (None while it
    runs, -N after signal N), wait(), communicate() -> (the log's text, None), send_signal(), kill()."""

    def __init__(self, context, argv, cwd, env, log):
        self.log = log
        self.process = context.Process(target=run_script, args=([str(a) for a in argv], str(cwd), dict(env), str(log)))
        self.process.start()

    def poll(self):
        return self.process.exitcode

    returncode = property(poll)

    def wait(self, timeout=None):
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.process.name, timeout)
        return self.process.exitcode

    def communicate(self, timeout=None):
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.process.join()
            raise
        return open(self.log, errors="replace").read(), None

    def send_signal(self, signum):
        os.kill(self.process.pid, signum)

    def kill(self):
        self.process.kill()
