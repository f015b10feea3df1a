"""How the data path scales: tokenisation speed, memory per rank, time to the first optimizer step.

    nice -n 10 .venv/bin/python -m benchmarks.data_scale --rows 200000            # everything
    .venv/bin/python -m benchmarks.data_scale --rows 10000 --parts tokenise --repo /path/to/another/checkout

Writes --rows stand-in UltraChat rows (scripts/make_standins.py, the hub's parquet layout, real length
shapes) once under --work, then measures, each in a fresh process with its own empty datasets cache:
  tokenise   tokenization.load_split on the training split (read, normalise, sample, tokenise):
             tokens/s with 1 and with 2 worker processes (num_proc; a checkout without it: 1 only),
             wall and CPU time, the process's peak RSS (VmHWM) and the tokens produced.
  dry_run    `python train.py dry_run=true` on those rows (max_length 4096): wall time and peak RSS.
  first_step `python train.py` training the tiny model one optimizer step on those rows, with 1 rank
             (BasicTrainer) and 2 ranks (FSDPTrainer nproc=2): wall time from the start of the command
             to the end of the 1-step run (an upper bound on the time to the first step), and each
             rank's peak private memory (RssAnon) and peak file-backed resident memory (RssFile:
             memory-mapped data in the page cache, which the ranks of a node share).
--repo points the child processes at another checkout (e.g. an older main, to measure before/after);
parts that checkout cannot run are reported as such. Figures are wall and CPU time on whatever machine
this runs on: on a shared machine compare CPU time and give the load average (printed).
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

print = functools.partial(print, flush=True)  # noqa: A001 (figures appear as they come, under nohup too)
REPO = Path(__file__).resolve().parent.parent
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE", "WANDB_MODE": "disabled"}

TOKENISE = r"""
import inspect, json, os, resource, sys, time
from transformers import AutoTokenizer
import preference_datasets as pd
from training import tokenization
tok = tokenization.ensure_chat_template(AutoTokenizer.from_pretrained({tokenizer!r}))
kw = dict(tokenizer=tok, max_length={max_length}, max_prompt_length={max_prompt_length}, pairs=False,
          dataset_paths={{"ultrachat": {data!r}}})
if "num_proc" in inspect.signature(tokenization.load_split).parameters:
    kw["num_proc"] = {workers}
elif {workers} != 1:
    print(json.dumps({{"unsupported": "num_proc"}})); sys.exit(0)
t0, c0 = time.perf_counter(), os.times()
data = tokenization.load_split(["ultrachat"], "train", **kw)
wall, c1 = time.perf_counter() - t0, os.times()
cpu = (c1.user - c0.user) + (c1.system - c0.system) + (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
tokens = int(data.lengths().sum())
peak = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM"))) * 1024
print(json.dumps({{"rows": len(data), "tokens": tokens, "wall_s": wall, "cpu_s": cpu, "tokens_per_s": tokens / wall,
                  "peak_rss_bytes": peak, "bytes_per_token": peak / tokens}}))
"""


def run_child(cmd, env, cwd, poll=0.5):
    """Run cmd; every `poll` seconds (None: never) read every process in its tree for peak VmHWM, RssAnon
    and RssFile (the reading costs CPU on a loaded machine: keep it coarse). Returns (wall, cpu, rc,
    stdout, {pid: {'VmHWM': bytes, 'RssAnon': peak bytes, 'RssFile': peak bytes, 'cmd': str}})."""
    t0, c0 = time.perf_counter(), os.times()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {}
    out = []
    import threading
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        if poll is None:
            proc.wait()
            break
        for pid in _tree(proc.pid):
            try:
                status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
                cmdline = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:80]
            except (OSError, ValueError):
                continue
            p = peaks.setdefault(pid, {"cmd": "", "root": pid == proc.pid, "pid": pid, "ppid": int(status["PPid"])})
            if cmdline:  # the latest (seen between fork and exec, a process still shows its parent's), but
                p["cmd"] = cmdline  # not a zombie's, which is empty
            for key in ("VmHWM", "RssAnon", "RssFile"):
                if key in status:
                    p[key] = max(p.get(key, 0), int(status[key].split()[0]) * 1024)
        time.sleep(poll)
    reader.join()
    c1 = os.times()
    cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    return time.perf_counter() - t0, cpu, proc.returncode, "".join(out), peaks


def _role(p, peaks):
    """'main' (the command), 'rank' (a process the launcher spawned) or 'worker of <role>' (a forked
    tokenising worker), from the process tree run_child recorded."""
    parent = next((v for v in peaks.values() if v["pid"] == p["ppid"]), None)
    if p["root"]:
        return "main"
    if "resource_tracker" in p["cmd"]:
        return "resource tracker"
    if "multiprocessing" in p["cmd"] and "spawn" in p["cmd"] and parent is not None and parent["root"]:
        return "rank"
    return f"worker of {_role(parent, peaks)}" if parent else "worker"


def _tree(root):
    """root and its descendants (from /proc)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def gib(n):
    return f"{n / 2 ** 30:.2f} GiB"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--max-prompt-length", type=int, default=None, help="default: --max-length (a checkout that "
                   "refuses a row whose prompt fills max_length needs less)")
    p.add_argument("--parts", default="tokenise,dry_run,first_step")
    p.add_argument("--workers", default="1,2", help="tokenise: worker processes to measure")
    p.add_argument("--ranks", default="1,2", help="first_step: ranks to measure")
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout whose code the children run")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ift_data_scale")
    args = p.parse_args()
    data = args.work / f"ultrachat_{args.rows}"
    if not (data / "ultrachat_200k" / "data").is_dir():
        subprocess.run([sys.executable, "-m", "scripts.make_standins", str(data), "--rows", str(args.rows),
                        "--datasets", "ultrachat"], check=True, cwd=REPO)
    data = data / "ultrachat_200k"
    tokenizer = str(REPO / "models" / "tiny-mistral")
    print(f"repo {args.repo}, {args.rows} stand-in UltraChat rows, max_length {args.max_length}, "
          f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    results = {}

    def fresh_env():
        cache = tempfile.mkdtemp(dir=args.work, prefix="hf_cache_")
        return {**os.environ, **ENV, "HF_DATASETS_CACHE": cache}

    parts = args.parts.split(",")
    if "tokenise" in parts:
        for workers in map(int, args.workers.split(",")):
            code = TOKENISE.format(repo=str(args.repo), tokenizer=tokenizer, max_length=args.max_length,
                                   data=str(data), workers=workers,
                                   max_prompt_length=args.max_prompt_length or args.max_length)
            wall, cpu, rc, out, _ = run_child([sys.executable, "-c", code], {**fresh_env(), "PYTHONPATH": str(args.repo)},
                                              args.repo, poll=None)
            line = out.strip().splitlines()[-1] if out.strip() else ""
            r = json.loads(line) if rc == 0 and line.startswith("{") else {"error": out[-2000:]}
            results[f"tokenise_{workers}"] = r
            if "tokens" in r:
                print(f"tokenise, {workers} worker(s): {r['tokens']:,} tokens of {r['rows']:,} rows in {r['wall_s']:.1f} s "
                      f"wall / {r['cpu_s']:.1f} s CPU = {r['tokens_per_s'] / 1e6:.2f}M tokens/s; peak RSS "
                      f"{gib(r['peak_rss_bytes'])} ({r['bytes_per_token']:.1f} bytes per token)")
            else:
                print(f"tokenise, {workers} worker(s): {r}")
    common = [f"model.name_or_path={tokenizer}", "datasets=[ultrachat]", f"dataset_paths.ultrachat={data}",
              f"max_length={args.max_length}", f"max_prompt_length={args.max_prompt_length or args.max_length}", "wandb.enabled=false"]
    if "dry_run" in parts:
        wall, cpu, rc, out, peaks = run_child([sys.executable, str(args.repo / "train.py"), "dry_run=true", *common],
                                              fresh_env(), args.repo)
        peak = max((v.get("VmHWM", 0) for v in peaks.values()), default=0)
        main_peak = max((v.get("VmHWM", 0) for v in peaks.values() if v["root"]), default=0)
        workers = sorted((v.get("VmHWM", 0) for v in peaks.values() if not v["root"]), reverse=True)
        results["dry_run"] = {"rc": rc, "wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": peak,
                              "main_peak_rss_bytes": main_peak, "worker_peak_rss_bytes": workers,
                              "plan": out.strip().splitlines()[-1] if rc == 0 else out[-2000:]}
        print(f"dry_run: exit {rc}, {wall:.1f} s wall / {cpu:.1f} s CPU, peak RSS {gib(peak)} (main process "
              f"{gib(main_peak)}; other processes: {', '.join(gib(w) for w in workers[:4]) or 'none'})")
        if rc:
            print(out[-2000:])
    if "first_step" in parts:
        for ranks in map(int, args.ranks.split(",")):
            label = f"{ranks} rank{'s' if ranks > 1 else ''}"
            extra = ["trainer=BasicTrainer"] if ranks == 1 else ["trainer=FSDPTrainer", f"nproc={ranks}"]
            run_dir = tempfile.mkdtemp(dir=args.work, prefix="run_")
            cmd = [sys.executable, str(args.repo / "train.py"), *common, *extra, "loss=sft", "batch_size=2",
                   "eval_batch_size=2", "n_examples=2", "n_eval_examples=2", "do_first_eval=false", "n_samples=0",
                   f"run_dir={run_dir}/run"]
            wall, cpu, rc, out, peaks = run_child(cmd, fresh_env(), args.repo)
            procs = sorted((dict(v, role=_role(v, peaks)) for v in peaks.values()
                            if "train.py" in v["cmd"] or "multiprocessing" in v["cmd"]), key=lambda v: -v.get("VmHWM", 0))
            results[f"first_step_{label}"] = {"rc": rc, "wall_s": wall, "cpu_s": cpu, "processes": procs}
            print(f"first step, {label}: exit {rc}, {wall:.1f} s wall / {cpu:.1f} s CPU; per process: " + "; ".join(
                f"{v['role']}: RSS peak {gib(v.get('VmHWM', 0))} (private {gib(v.get('RssAnon', 0))}, file-backed "
                f"{gib(v.get('RssFile', 0))})" for v in procs))
            if rc:
                print(out[-3000:])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
