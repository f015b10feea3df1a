"""The GPU checks as one command: on a GPU machine it finishes in about 8 minutes and writes
OUT/gpu_check.md, each check with its figures and PASS or FAIL.

    .venv/bin/python benchmarks/gpu_check.py --out runs/gpu_check           # on a GPU machine
    .venv/bin/python benchmarks/gpu_check.py --smoke --out /tmp/gpu_smoke   # every step on the CPU, tiny

The checks, in the order they run (the report is rewritten after each, so a machine taken away midway
still leaves what was measured):
  suite       `pytest -q tests` with CUDA visible, in the background from the start (niced, 4 threads),
              so the whole script fits the budget; the GPU checks run meanwhile (the figures of a run
              are therefore taken beside the suite's CPU work and its brief, small GPU use).
  demo        commands/run_tiny_ift.sh on the device: eval loss before and after, greedy exact match,
              tokens/s; on the CPU the README gives IFT's eval loss 6.81 -> 0.457 (-93%) and exact match
              0.57 (0.70 and 0.56 with seeds 1 and 2).
  throughput  a randomly initialised Mistral-shaped model of ~1B parameters (hidden 2048, 18 layers,
              16 heads, 8 kv heads, intermediate 5632, vocabulary 32000, untied: 0.98B) in bfloat16
              compute, float32 master weights, AdamW, built directly on the GPU; synthetic rows of random
              words (prompt 8-120 words, answers 16-400, max_length 1024) so that lengths vary as in
              real data. SFT, IFT and DPO by BasicTrainer and by FSDPTrainer in one process; DPO with
              reference_logps=precompute; padded against packed (sdpa, and flash_attention_2 when
              flash-attn imports); compile off against on. Each row: the medians over the steps after
              the first two of tokens/s, tflops and MFU (training/flops.py), and torch.cuda.max_memory_allocated
              over the run; the losses must be finite (and fall for SFT and IFT).
  resume      the tiny model on the device: a run with save_every, one stopped by SIGTERM (exit 75,
              checkpoint written) and continued with resume_from=latest: its losses against the
              uninterrupted run's.

--smoke runs every step on the CPU in a minute or two: the tiny model instead of the 1B one, a few
steps, the suite reduced to one quick test file, compile with the `eager` backend, and MFU over this
CPU's measured float32 matmul rate (there is no data-sheet peak for a CPU). The tests run it, so the
script cannot rot. Nothing here is a timed assertion: figures are reported, PASS/FAIL is about
correctness (finite, falling losses, a resume that continues).
"""

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

WORDS = ("the a of to and in is it that for on with as was at by be this from or have an they which one you were "
         "her all she there would their we him been has when who will more no if out so said what up its about "
         "into than them can only other new some could time these two may then do first any my now such like our "
         "over man me even most made after also did many before must through back years where much your way well "
         "down should because each just those people how too little state good very make world still own see men "
         "work long get here between both life being under never day same another know while last might us great "
         "old year off come since against go came right used take three").split()
BIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=16,
           num_key_value_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=4096,
           tie_word_embeddings=False, sliding_window=None, rms_norm_eps=1e-5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.md and the runs")
    p.add_argument("--smoke", action="store_true", help="every step on the CPU with the tiny model (a minute or two)")
    p.add_argument("--steps", type=int, default=None, help="training steps per throughput row (default 8; smoke 3)")
    p.add_argument("--suite-timeout", type=int, default=420, help="seconds the test suite may take (not in smoke)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the report

class Report:
    """Rows of checks, written to OUT/gpu_check.md after every check."""

    def __init__(self, path, header):
        self.path, self.header, self.sections = path, header, []

    def add(self, title, ok, lines):
        """One check: a title, True/False/None (PASS/FAIL/SKIPPED), and markdown lines of figures."""
        self.sections.append((title, ok, lines))
        self.write()
        print(f"[{_verdict(ok)}] {title}", flush=True)

    def write(self):
        out = [*self.header, "", "| check | result |", "|---|---|"]
        out += [f"| {title} | {_verdict(ok)} |" for title, ok, _ in self.sections]
        for title, ok, lines in self.sections:
            out += ["", f"## {title}: {_verdict(ok)}", "", *lines]
        self.path.write_text("\n".join(out) + "\n")

    @property
    def passed(self):
        return all(ok is not False for _, ok, _ in self.sections)


def _verdict(ok):
    return {True: "PASS", False: "FAIL", None: "SKIPPED"}[ok]


def machine_header(args, device, peak, peak_note):
    import transformers
    flash = "not installed"
    if importlib.util.find_spec("flash_attn") is not None:
        try:
            import flash_attn
            flash = flash_attn.__version__
        except Exception as e:  # installed but broken (a wrong CUDA build): say so
            flash = f"does not import ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        card = f"{torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB), {torch.cuda.device_count()} visible"
        cuda = f", CUDA {torch.version.cuda}"
    else:
        card = f"CPU ({os.cpu_count()} cores; no GPU)"
        cuda = ""
    return [f"# GPU check{' (--smoke: CPU, tiny model)' if args.smoke else ''}", "",
            f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
            f"- device: {card}",
            f"- torch {torch.__version__}{cuda}, transformers {transformers.__version__}, flash-attn {flash}",
            f"- MFU over: {peak:.3g} TFLOP/s ({peak_note})" if peak else "- MFU: no peak known for this device"]


def cpu_matmul_tflops():
    """This CPU's float32 matmul rate (TFLOP/s): the smoke run's stand-in for a data-sheet peak."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = 0.0
    for _ in range(5):  # the best of a few windows: on a shared machine other work only slows one down
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 0.1:
            a @ b
            n += 1
        best = max(best, 2 * 1024 ** 3 * n / (time.perf_counter() - start) / 1e12)
    return best


# ---------------------------------------------------------------- data, config, models

def write_synthetic_data(folder, n_train, n_test, seed=0):
    """train.jsonl / test.jsonl of {"prompt", "chosen", "rejected"} strings of random words."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        with open(folder / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"prompt": text(8, 120), "chosen": text(16, 400), "rejected": text(16, 400)}) + "\n")
    return folder


def compose(*overrides):
    """The run config for these overrides, as train.py composes it (short loss keys allowed)."""
    from training import config_schema
    from hydra import compose as hydra_compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(config_schema.CONFIG_DIR), version_base=None):
        return hydra_compose("config", overrides=config_schema.expand_short_overrides(list(overrides)))


def models_for(cfg, config, device, with_reference):
    """A random model of `config` built directly on `device` (float32: the trainer's master weights),
    and an identical reference in reference_dtype when the loss needs one."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        policy = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                  attn_implementation=cfg.model.attn_implementation)
    reference = None
    if with_reference:
        reference = copy.deepcopy(policy).to(getattr(torch, cfg.model.reference_dtype))
    return policy, reference


# ---------------------------------------------------------------- checks

def start_suite(args, out):
    """The test suite in the background (smoke: one quick file). Returns (process, log path)."""
    targets = ["tests/test_flops.py"] if args.smoke else ["tests"]
    log = out / "suite.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "4"}
    proc = subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             *targets], cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    return proc, log, targets, time.time()


def finish_suite(report, args, suite):
    proc, log, targets, start = suite
    try:
        proc.wait(timeout=max(30, args.suite_timeout - (time.time() - start)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    text = log.read_text().strip().splitlines()
    summary = text[-1] if text else "(no output)"
    failed = [line for line in text if line.startswith("FAILED") or line.startswith("ERROR")]
    report.add("test suite" + (" (smoke: tests/test_flops.py only)" if args.smoke else ", CUDA visible"),
               proc.returncode == 0,
               [f"`pytest -q {' '.join(targets)}`: exit {proc.returncode} after {time.time() - start:.0f} s "
                f"(limit {args.suite_timeout} s); last line: `{summary}`", *[f"- `{f}`" for f in failed[:30]],
                f"(full log: {log.name})"])


def demo(report, args, out, device):
    """commands/run_tiny_ift.sh on the device."""
    run_dir = out / "demo"
    extra = (["n_examples=32", "n_epochs=1", "eval_every=32", "n_eval_examples=16", "eval_batch_size=16",
              "n_samples=2", "max_new_tokens=8", "warmup_steps=1"] if args.smoke else [])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    start = time.time()
    proc = subprocess.run(["bash", "commands/run_tiny_ift.sh", f"device={device.type}", f"run_dir={run_dir}", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True)
    (out / "demo.log").write_text(proc.stdout + proc.stderr)
    lines = [f"`bash commands/run_tiny_ift.sh device={device.type} run_dir={run_dir} {' '.join(extra)}`: exit "
             f"{proc.returncode}, {time.time() - start:.0f} s wall"]
    ok = proc.returncode == 0
    if ok:
        rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        train_rows = [r for r in rows if r["split"] == "train"]
        evals = [r["loss"] for r in rows if r["split"] == "eval"]
        exact = [line for line in proc.stdout.splitlines() if "exact match" in line and "held-out" in line]
        tok_s = statistics.median(r["tokens_per_s"] for r in train_rows)
        drop = (evals[0] - evals[-1]) / evals[0]
        match = _exact_rate(run_dir)
        lines += ["", "| figure | this run | CPU (README) |", "|---|---|---|",
                  f"| eval loss (IFT's) | {evals[0]:.2f} -> {evals[-1]:.3f} ({-drop:+.0%}) | 6.81 -> 0.457 (-93%) |",
                  f"| greedy exact match | {match:.2f} ({len(_samples(run_dir))} prompts) | 0.57 (100 prompts; "
                  f"seeds 1, 2: 0.70, 0.56) |",
                  f"| tokens/s (median over steps) | {tok_s:,.0f} | |", "", *[f"`{e.strip()}`" for e in exact]]
        ok = drop > 0 if args.smoke else (drop >= 0.8 and match >= 0.4)
        lines.append(f"\npass: eval loss falls{'' if args.smoke else ' by >= 80% and exact match >= 0.4'}")
    else:
        lines += ["```", *(proc.stdout + proc.stderr).strip().splitlines()[-15:], "```"]
    report.add("demo on " + device.type, ok, lines)


def _samples(run_dir):
    path = run_dir / "samples.jsonl"
    return [json.loads(line) for line in open(path)] if path.exists() else []


def _exact_rate(run_dir):
    samples = _samples(run_dir)
    return sum(s["exact"] for s in samples) / max(1, len(samples))


def throughput_rows(args, device):
    """(label, loss, overrides) of the throughput table."""
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    rows = []
    for trainer in ("BasicTrainer", "FSDPTrainer"):
        for loss in ("sft", "ift", "dpo"):
            rows.append((f"{trainer} {loss}", loss, [f"trainer={trainer}"]))
    rows.append(("BasicTrainer dpo, reference_logps=precompute", "dpo", ["reference_logps=precompute"]))
    rows.append(("BasicTrainer sft, sdpa, packed", "sft", ["packing=true"]))
    if flash:
        rows.append(("BasicTrainer sft, flash_attention_2, padded", "sft", ["model.attn_implementation=flash_attention_2"]))
        rows.append(("BasicTrainer sft, flash_attention_2, packed", "sft",
                     ["model.attn_implementation=flash_attention_2", "packing=true"]))
    backend = "eager" if args.smoke else "inductor"
    rows.append((f"BasicTrainer sft, compile ({backend})", "sft", ["compile=true", f"compile_backend={backend}"]))
    return rows, flash


def reset_peak_rss():
    """Reset the process's peak resident set size (Linux: VmHWM), so peak_rss() reports one run's."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss():
    """The process's peak resident set size in bytes since reset_peak_rss() (Linux), or None."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def measure(cfg, config, device, run_dir):
    """One throughput row: train cfg's steps with a fresh random model; figures from metrics.jsonl."""
    from training import modeling
    from training import pipeline
    from training import run_data
    from training.tokenization import end_of_turn_token
    from trainers import TRAINERS

    loss = pipeline.validate_config(cfg, world=1).loss
    tokenizer = modeling.load_tokenizer(cfg)
    eot = end_of_turn_token(tokenizer, cfg.model.eot_token)
    train_data, eval_data = run_data.load_data(cfg, tokenizer, pairs=loss.needs_pairs, eot_token=eot)
    run_dir.mkdir(parents=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    policy, reference = models_for(cfg, config, device, loss.needs_reference)
    trainer = TRAINERS[cfg.trainer](cfg, policy, reference, tokenizer, train_data, eval_data, run_dir, device, loss=loss)
    del policy, reference
    trainer.save = lambda directory: None  # final/ of a random model is not what is measured
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    n_params = sum(p.numel() for p in trainer.policy.parameters())
    del trainer
    gc.collect()
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r for r in rows if r["split"] == "train"]
    timed = steps[2:] or steps
    med = {k: statistics.median(r[k] for r in timed) if all(k in r for r in timed) else None
           for k in ("tokens_per_s", "tflops", "mfu", "step_time_s")}
    losses_ = [r["loss"] for r in steps]
    finite = all(x == x and abs(x) != float("inf") for x in losses_)
    falls = losses_[-1] < losses_[0]
    return {**med, "peak": peak, "wall": wall, "params": n_params, "losses": losses_, "finite": finite,
            "falls": falls, "ok": finite and (falls or cfg.loss.name == "dpo")}


def throughput(report, args, out, device, config, base):
    rows, flash = throughput_rows(args, device)
    results, lines = {}, []
    for label, loss, overrides in rows:
        data = ["datasets=[" + str(out / "data") + "]"]
        cfg = compose(*base, f"loss={loss}", *data, *overrides,
                      f"run_dir={out / 'throughput' / re.sub('[^A-Za-z0-9_]+', '_', label)}")
        try:
            results[label] = measure(cfg, config, device, Path(cfg.run_dir))
        except Exception as e:  # one failing row must not hide the others' figures
            results[label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", "ok": False}
        r = results[label]
        print(f"  {label}: " + (r.get("error") or f"{r['tokens_per_s']:,.0f} tok/s, {r['tflops']:.3g} TFLOP/s, "
                                                   f"loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}"), flush=True)

    def gib(x):
        return "n/a" if x is None else f"{x / 2**30:.2f}"

    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    n_params = next((r["params"] for r in results.values() if "params" in r), 0)
    common = compose(*base)
    lines += [f"Model: {config.model_type} {n_params / 1e6:,.1f}M parameters (hidden {config.hidden_size}, "
              f"{config.num_hidden_layers} layers), compute {common.model.policy_dtype}, master weights float32, "
              f"{common.optimizer}; batch {common.batch_size} rows, max_length {common.max_length}; synthetic rows "
              f"of random words; medians over the steps after the first two of {args.steps}."
              + (" On a CPU, MFU is over a matmul rate measured once at the start: on a machine shared with other "
                 "jobs it can exceed 100%." if device.type == "cpu" else ""), "",
              f"Peak memory: {'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'the process peak RSS (VmHWM, reset before each run: includes the Python process, allocator slack and cached data)'}.", "",
              "| run | tokens/s | step s | TFLOP/s | MFU | peak memory GiB | loss first -> last | ok |",
              "|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        if "error" in r:
            lines.append(f"| {label} | error: {r['error']} | | | | | | FAIL |")
            continue
        lines.append(f"| {label} | {r['tokens_per_s']:,.0f} | {r['step_time_s']:.3f} | {r['tflops']:.3g} | "
                     f"{fmt(r['mfu'], '.1%')} | {gib(r['peak'])} | {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    lines += ["", "Ratios (step time, peak memory):", ""]
    for trainer in ("BasicTrainer", "FSDPTrainer"):
        for a, b in (("ift", "sft"), ("ift", "dpo"), ("dpo", "sft")):
            ra, rb = results.get(f"{trainer} {a}", {}), results.get(f"{trainer} {b}", {})
            if "step_time_s" in ra and "step_time_s" in rb:
                mem = f"{ra['peak'] / rb['peak']:.2f}" if ra["peak"] and rb["peak"] else "n/a"
                lines.append(f"- {trainer} {a.upper()}/{b.upper()}: time {ra['step_time_s'] / rb['step_time_s']:.2f}, "
                             f"memory {mem}")
    pre, live = results.get("BasicTrainer dpo, reference_logps=precompute", {}), results.get("BasicTrainer dpo", {})
    if "step_time_s" in pre and "step_time_s" in live:
        mem = f"{pre['peak'] / live['peak']:.2f}" if pre["peak"] and live["peak"] else "n/a"
        lines.append(f"- DPO precompute/live: time {pre['step_time_s'] / live['step_time_s']:.2f}, memory {mem}; "
                     f"largest |loss difference| over the steps "
                     f"{max(abs(x - y) for x, y in zip(pre['losses'], live['losses'])):.2e}")
    if not flash:
        lines.append("- flash_attention_2: SKIPPED (" + ("not on the CPU" if device.type != "cuda" else
                                                        "flash-attn does not import") + ")")
    lines.append("\npass: every run finishes with finite losses, and SFT and IFT losses fall")
    report.add("throughput, MFU and memory (BasicTrainer, FSDPTrainer x1; kernels, packing, compile)",
               all(r["ok"] for r in results.values()), lines)


def base_value(base, key):
    return next((o.split("=", 1)[1] for o in base if o.startswith(key + "=")), "default")


def resume(report, args, out, device):
    """Save, SIGTERM and resume_from=latest on the device, against an uninterrupted run."""
    steps = ["loss=ift", f"device={device.type}", "datasets=[ultrachat_sample]", "batch_size=8", "n_examples=48",
             "save_every=16", "eval_every=1000", "n_eval_examples=8", "eval_batch_size=8", "optimizer=AdamW",
             "lr=1e-3", "warmup_steps=0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "train.py", *steps]
    start = time.time()
    whole = subprocess.run([*cmd, f"run_dir={out / 'resume' / 'whole'}"], cwd=REPO, env=env, capture_output=True,
                           text=True)
    stopped_dir = out / "resume" / "stopped"
    proc = subprocess.Popen([*cmd, f"run_dir={stopped_dir}", "resume_from=latest"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = stopped_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # SIGTERM once step 2 is logged
        if metrics.exists() and sum('"split": "train"' in line for line in open(metrics)) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    stop_out, _ = proc.communicate(timeout=300)
    checkpoints = sorted(p.name for p in (stopped_dir / "checkpoints").glob("step-*")) \
        if (stopped_dir / "checkpoints").exists() else []
    resumed = subprocess.run([*cmd, f"run_dir={stopped_dir}", "resume_from=latest"], cwd=REPO, env=env,
                             capture_output=True, text=True)
    (out / "resume.log").write_text("\n".join([whole.stdout, whole.stderr, stop_out, resumed.stdout, resumed.stderr]))
    lines = [f"`train.py {' '.join(steps)}` (6 steps, checkpoints every 2): uninterrupted exit {whole.returncode}; "
             f"SIGTERM after step 2: exit {proc.returncode} (75 expected), checkpoints {checkpoints}; "
             f"`resume_from=latest`: exit {resumed.returncode}; {time.time() - start:.0f} s wall in all"]
    ok = whole.returncode == 0 and proc.returncode == 75 and bool(checkpoints) and resumed.returncode == 0
    if ok:
        def train_losses(d):
            rows = [json.loads(line) for line in open(d / "metrics.jsonl")]
            return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
        a, b = train_losses(out / "resume" / "whole"), train_losses(stopped_dir)
        diff = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
        tol = 1e-6 if device.type == "cpu" else 1e-3  # CUDA kernels need not be deterministic
        lines.append(f"\nsteps in the resumed run's metrics.jsonl: {sorted(b)}; largest relative loss difference from the "
                     f"uninterrupted run {diff:.2e} (pass: <= {tol:g})")
        ok = sorted(b) == sorted(a) and diff <= tol
    else:
        lines += ["```", *(resumed.stdout + resumed.stderr + stop_out).strip().splitlines()[-15:], "```"]
    report.add("save, SIGTERM and resume_from=latest on " + device.type, ok, lines)


# ---------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    from transformers import MistralConfig
    from training import launch

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    args.steps = args.steps or (3 if args.smoke else 8)
    if cuda:
        from training import flops
        peak, peak_note = flops.device_peak_tflops(device), "the card's data-sheet bf16 dense peak, flops.PEAK_TFLOPS"
    else:
        peak, peak_note = cpu_matmul_tflops(), "this CPU's measured float32 1024x1024 matmul rate, not a data sheet"
    report = Report(out / "gpu_check.md", machine_header(args, device, peak, peak_note))
    start = time.time()
    suite = start_suite(args, out)

    demo(report, args, out, device)

    write_synthetic_data(out / "data", n_train=400 if args.smoke else 1200, n_test=16 if args.smoke else 64)
    if args.smoke:
        config = MistralConfig.from_pretrained(REPO / "models" / "tiny-mistral")
        base = ["model=tiny", "device=cpu", "batch_size=4", "max_length=128", "max_prompt_length=64"]
    else:
        config = MistralConfig(**BIG)
        config.save_pretrained(out / "mistral-1b")  # the shape only; the weights are random, made on the GPU
        base = [f"model.name_or_path={out / 'mistral-1b'}", "model.from_scratch=true",  # no weights files: random
                "model.tokenizer_name_or_path=models/tiny-mistral",
                "model.policy_dtype=bfloat16", "model.reference_dtype=bfloat16", "device=cuda", "batch_size=16",
                "max_length=1024", "max_prompt_length=256"]
    base += [f"n_examples={args.steps * int(base_value(base, 'batch_size'))}", "n_eval_examples=16",
             "eval_batch_size=16", "eval_every=100000", "do_first_eval=false", "optimizer=AdamW", "lr=1e-4",
             "warmup_steps=0", "max_grad_norm=1.0"] + ([f"peak_tflops={peak}"] if peak else [])
    # FSDPTrainer in this process: a process group of one (nccl on the GPU, gloo on the CPU)
    with launch.process_group(compose(*base), 0, 1, launch.free_port()):
        throughput(report, args, out, device, config, base)
    resume(report, args, out, device)
    finish_suite(report, args, suite)
    report.header.append(f"- total: {time.time() - start:.0f} s wall")
    report.write()
    print(f"report: {out / 'gpu_check.md'} ({time.time() - start:.0f} s)")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
