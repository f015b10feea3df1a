"""A warm Python for tests that run a shell script whose Python calls depend on each other (so they
cannot be recorded and replayed, conftest.python_calls): each `$PYTHON SCRIPT ARGS` or
`$PYTHON -m MODULE ARGS` of the script becomes a process forked from one server that imported torch,
transformers, datasets, hydra and matplotlib once, instead of a new interpreter importing them
(~5-7 s of CPU per call). The forked process is otherwise what the interpreter would be: the call's
arguments, working directory, environment and standard streams, the script run as __main__ with the
same sys.path, Python's own exit (atexit, its exit status or signal, reported back to the caller), and
nothing left over from another call. The server imports only installed packages, never this
repository's modules, so a call still imports the repository's code as a new interpreter would.

    with warm_python(tmp_path) as python: ...PYTHON=python...    (conftest.warm_python)

The server takes the environment of its first call before importing anything (libraries read some
variables once, when imported); a later call whose such variables differ, or any other form of command
line, runs in a new interpreter instead: slower, never different.
"""

import json
import os
import selectors
import signal
import socket
import struct
import sys

PRELOAD = ["torch", "numpy", "transformers", "transformers.models.auto.modeling_auto",
           "transformers.models.auto.tokenization_auto", "transformers.models.mistral.modeling_mistral",
           "datasets", "hydra", "omegaconf", "safetensors.torch", "matplotlib.pyplot", "gymnasium"]
# Variables that libraries may read once, at import: a call must agree with the server on all of them.
IMPORT_TIME_PREFIXES = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TOKENIZERS", "DATASETS", "TORCH", "PYTORCH",
                        "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS", "CUDA", "TQDM_", "MPL", "MATPLOTLIB", "PYTHON",
                        "WANDB_", "XDG_", "LD_", "HOME", "LANG", "LC_", "TZ")


def import_time_env(env):
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES)}


def send(conn, obj, fds=()):
    data = json.dumps(obj).encode()
    socket.send_fds(conn, [struct.pack("!I", len(data)) + data], list(fds)) if fds else \
        conn.sendall(struct.pack("!I", len(data)) + data)


def receive(conn, maxfds=0):
    """One message (and up to maxfds file descriptors, which come with its first bytes); None at the
    end of the stream."""
    header, fds, _, _ = socket.recv_fds(conn, 4, maxfds) if maxfds else (conn.recv(4), [], 0, None)
    header += read_exactly(conn, 4 - len(header)) if header else b""
    if len(header) < 4:
        return None, fds
    data = read_exactly(conn, struct.unpack("!I", header)[0])
    return json.loads(data), fds


def read_exactly(conn, n):
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            break
        data += more
    return data


# ---------------------------------------------------------------- the caller: what the script runs as $PYTHON

def client(sock_path, args):
    def new_interpreter():
        os.execv(sys.executable, [sys.executable, *args])

    if not args or (args[0].startswith("-") and args[0] != "-m") or args[:1] == ["-m"] and len(args) < 2:
        new_interpreter()
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(sock_path)
    except OSError:
        new_interpreter()
    send(conn, {"args": args, "cwd": os.getcwd(), "env": dict(os.environ)}, fds=[0, 1, 2])
    reply, _ = receive(conn)
    if reply is None or "refused" in reply:
        new_interpreter()
    pid = reply["pid"]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the caller's signals reach the process
        signal.signal(sig, lambda s, _: os.kill(pid, s))
    reply, _ = receive(conn)
    code = 1 if reply is None else reply["exitcode"]
    if code < 0:  # killed by a signal: so is the caller
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


# ---------------------------------------------------------------- the server

def serve(sock_path):
    """Serve calls until stdin closes. Returns the request in a forked child (which then runs it); the
    server itself returns None."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(16)
    print("ready", flush=True)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(sys.stdin, selectors.EVENT_READ, "stop")
    # what the interpreter itself read when this server started (PYTHONPATH, PYTHONHASHSEED, ...)
    startup = {k: v for k, v in os.environ.items() if k.startswith("PYTHON")}
    env = None
    running = {}  # pidfd -> (pid, connection)
    while True:
        for key, _ in selector.select():
            if key.data == "stop":
                for pidfd, (pid, conn) in running.items():
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                return None
            if key.data == "accept":
                conn, _ = listener.accept()
                request, fds = receive(conn, maxfds=3)
                if env is None and all(request["env"].get(k) == v for k, v in startup.items()):
                    # the first call: its environment, then the imports
                    env = import_time_env(request["env"])
                    os.environ.clear()
                    os.environ.update(request["env"])
                    for name in PRELOAD:
                        __import__(name)
                if import_time_env(request["env"]) != env:
                    send(conn, {"refused": "environment"})
                    conn.close()
                    for fd in fds:
                        os.close(fd)
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    listener.close()
                    for _, c in running.values():
                        c.close()
                    conn.close()
                    for target, fd in zip((0, 1, 2), fds):
                        os.dup2(fd, target)
                        os.close(fd)
                    return request
                for fd in fds:
                    os.close(fd)
                send(conn, {"pid": pid})
                pidfd = os.pidfd_open(pid)
                running[pidfd] = (pid, conn)
                selector.register(pidfd, selectors.EVENT_READ, "exit")
            else:  # a call's process ended: reap it (its CPU time counts as ours) and tell its caller
                pid, conn = running.pop(key.fileobj)
                selector.unregister(key.fileobj)
                os.close(key.fileobj)
                _, status = os.waitpid(pid, 0)
                try:
                    send(conn, {"exitcode": os.waitstatus_to_exitcode(status)})
                except OSError:
                    pass
                conn.close()


def run(request):
    """In the forked child: become `python ARGS` and run it; Python's own exit follows."""
    import runpy

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.stdout.reconfigure(line_buffering=os.isatty(1))  # as the interpreter sets it up for these streams
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = request["args"]
    if args[0] == "-m":
        sys.argv = ["-m", *args[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args)
        sys.path[0] = os.path.dirname(os.path.realpath(args[0]))
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        request = serve(sys.argv[2])
        if request is not None:
            run(request)
    else:
        client(sys.argv[1], sys.argv[2:])
