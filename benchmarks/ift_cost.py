"""What does an IFT step cost next to SFT, DPO and ORPO? Step time and peak memory, measured in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.ift_cost            # defaults (4-6 min on a shared 2-core CPU)
    .venv/bin/python -m benchmarks.ift_cost --device cuda --batch 8     # on a GPU (bfloat16 by default there)
    .venv/bin/python -m benchmarks.ift_cost --losses sft,ift --reps 3 --skip-long

This script prints figures; it asserts nothing about speed.

The model: a randomly initialised `transformers.MistralForCausalLM` (default hidden 512, 8 layers, 8 heads,
8 key/value heads, intermediate 1408, vocabulary 32000, untied embeddings, SDPA attention: about 58M
parameters), compute-bound enough that the loss code around it is not what gets measured. The data: random
token ids with a fixed seed, --batch rows (default 2) of length --seq (default 512), the first quarter of
each row the prompt (labels -100), no padding. (B = 2 rather than 4 by default only to keep the run under
6 minutes on a 2-core CPU; the model is unchanged. B = 4 measured the same IFT/SFT ratios, 1.31-1.33 in
time and 1.00 in memory; pass --batch 4.) The preference batch takes the SFT batch's rows as `chosen` and
the same prompts with different random answers as `rejected`, so every loss sees the same prompts and
answers.

What is timed: a full optimizer step exactly as the trainer takes it, through `losses.batch_loss`:
forward (batch_loss) -> `((row_losses * valid).sum() / B).backward()` -> optimizer.step() (AdamW by default,
--optimizer RMSprop for the reference code's) -> optimizer.zero_grad(set_to_none=True). (The trainer also
measures/clips the gradient norm; that is the same for every loss and is left out.) All losses train the
same policy with one optimizer; DPO's reference is a frozen copy of it (requires_grad False, eval mode).
  sft   {"name": "sft"}
  ift   {"name": "ift", "gamma": 0.95, "propagation_type": "loss", "propagation_side": "left",
         "propagation_norm": "L1"}, lambda = 0.2 (--lam)
  dpo   {"name": "dpo", "beta": 0.1, "label_smoothing": 0.0, "reference_free": False}
  orpo  {"name": "orpo", "beta": 0.1}
The losses are interleaved: each repetition runs one step of every loss (round-robin, the starting loss
rotating from one repetition to the next), so a change in machine load (other processes on a shared CPU)
hits all of them alike. After --warmup rounds (default 2), --reps rounds (default 5) are timed; the table
shows each loss's median step time and its forward / backward / optimizer split, and the ratios are given
two ways: the ratio of the medians, and the median over rounds of the ratio within a round (the more
robust one on a noisy machine). For IFT, the time spent inside `forward.ModelCall.intuition` (the no-grad
forward of spec §1.1) and in the forward of `losses.relation_propagation_weights` is recorded too (the
functions are wrapped by timers for the run; they are called exactly as before).

Peak memory of a step. Two numbers per loss, in MiB:
  growth  the peak, during one step, of the memory allocated above what was allocated when the step began
          (activations, logits, gradients, temporaries). Between steps the gradients are None, so what is
          allocated then is the parameters, the optimizer state, the batch and, for DPO, the reference.
  total   resident + growth, where resident = the bytes of the policy's parameters and buffers, its
          optimizer state, the batch the loss reads and, only for DPO (the one loss that needs it), the
          reference model. This is what one process training with that loss alone must hold at its peak,
          the analogue of CUDA's max_memory_allocated; the IFT/SFT memory target is on this number.
How growth is measured:
  CUDA  torch.cuda.reset_peak_memory_stats() before every timed step, then
        max_memory_allocated() - memory_allocated() at the step's start; the median over the timed steps.
  CPU   there is no allocator counter on the CPU, and the process RSS is a poor proxy (glibc keeps freed
        blocks, ru_maxrss is a high-water mark over the whole life of the process, and the other losses'
        steps in the same process would set it). Instead, one untimed step per loss (the last warm-up
        round, after the optimizer state exists) runs under torch.profiler with profile_memory=True. The CPU
        allocator then reports every allocation and free of every thread, with its running total of
        allocated bytes, to the profiler; growth = max of that running total - its value before the first
        allocation of the step. This counts exactly the tensor bytes PyTorch allocates (what
        max_memory_allocated counts on CUDA), not allocator slack or the few MB of oneDNN scratch space.
        It is deterministic: the same step gives the same number whatever the machine's load.

Relation propagation at long context (skipped with --skip-long): the same model at T = --long-seq (4096),
batch --long-batch (1), prompt a quarter. One IFT step is timed (--long-reps after --long-warmup), and
`losses.relation_propagation_weights` alone, forward and backward, on a (B, T-1) float32 tensor of
log-probabilities requiring grad with that step's mask, many times (median). Its share of the IFT step
is the ratio of the two medians (target <= 1%). The float64 scan is also timed against the same scan in
float32 to show what the float64 accumulation costs.

Threads and noise on a shared CPU. By default the CPU runs use ONE intra-op thread (--threads 1; --threads 0
keeps torch's default). On a 2-core machine shared with other jobs (load average 4-6), torch's default of
2 OpenMP threads made every measurement meaningless: each parallel region waits at a barrier for a
sibling thread that the scheduler has parked, the waiting threads spin, and the same step took anywhere
from 1.9 s to 21 s, wall and CPU time alike (the identical AdamW step measured 0.75 s in one loss's median
and 3.9 s in another's; DPO/SFT came out at 1.2 instead of ~2.6). With one thread the process's CPU time is
the work itself, and its wall time only stretches by the share of a core it gets: in the same conditions
the spread of a loss's step over the rounds was a few percent and DPO/SFT came out at 2.62, next to the
8/3 the FLOP count predicts. The absolute times are then one core's; the ratios are what to compare. Both
wall time and process CPU time are printed on the CPU; the load average is printed at the start, after
every round and at the end. Heavy load still biases the ratios somewhat even with one thread (shared
caches and memory bandwidth): the same defaults gave IFT/SFT 1.31-1.33 at load average ~1 and 1.37-1.42
at load average ~4. Trust the run with the lowest load.
"""

import argparse
import contextlib
import copy
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import forward
import losses
from forward import ModelCall
from training import scan

REPO = Path(__file__).resolve().parents[1]

MIB = 2 ** 20

LOSS_CONFIGS = {
    "sft": {"name": "sft"},
    "ift": {"name": "ift", "gamma": 0.95, "propagation_type": "loss", "propagation_side": "left",
            "propagation_norm": "L1"},
    "dpo": {"name": "dpo", "beta": 0.1, "label_smoothing": 0.0, "reference_free": False},
    # DPO with reference_logps=precompute: the reference's sums ride in the batch, no reference model is held
    "dpo_pre": {"name": "dpo", "beta": 0.1, "label_smoothing": 0.0, "reference_free": False},
    "orpo": {"name": "orpo", "beta": 0.1},
}



def bench_loss(name, lam):
    """The losses.Loss of LOSS_CONFIGS[name], IFT's λ fixed at `lam` (a constant schedule, no noise); a
    benchmark step calls it with losses.ONE_STEP."""
    fixed = {"min_lambda": lam, "max_lambda": lam} if name == "ift" else {}
    return losses.build({**LOSS_CONFIGS[name], **fixed})


TARGETS = {"ift/sft time": 1.35, "ift/sft memory": 1.10, "relation propagation share": 0.01}


# ------------------------------------------------------------------------------------------------
# Set-up
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--attn", default="sdpa", help="attn_implementation (the trainer's default is sdpa)")
    p.add_argument("--seq", type=int, default=512, help="tokens per row; the prompt is the first quarter")
    p.add_argument("--batch", type=int, default=2,
                   help="rows per step (default 2; B=4 doubles the main part's time, ~10 min on one core)")
    p.add_argument("--reps", type=int, default=5, help="timed rounds (one step of every loss per round)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed rounds first (on the CPU at least 2: the last one measures memory, after the "
                        "first has created the optimizer state)")
    p.add_argument("--losses", default="sft,ift,dpo,orpo", help="comma-separated subset of sft,ift,dpo,dpo_pre,orpo (dpo_pre: DPO with "
                        "reference_logps=precompute; not in the default set)")
    p.add_argument("--lam", type=float, default=0.2, help="IFT's lambda")
    p.add_argument("--optimizer", default="AdamW", choices=("AdamW", "RMSprop"))
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; 0 = torch's default. Default: 1 on the CPU (see the docstring), "
                        "torch's default on CUDA")
    p.add_argument("--skip-long", action="store_true", help="skip the relation-propagation share at --long-seq")
    p.add_argument("--long-seq", type=int, default=4096)
    p.add_argument("--long-batch", type=int, default=1)
    p.add_argument("--long-reps", type=int, default=1, help="timed IFT steps at --long-seq")
    p.add_argument("--long-warmup", type=int, default=1, help="untimed IFT steps at --long-seq first")
    p.add_argument("--rp-reps", type=int, default=200, help="repetitions of relation propagation alone")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.losses.split(",") if s.strip()]
    unknown = [n for n in names if n not in LOSS_CONFIGS]
    if unknown or not names:
        p.error(f"--losses: unknown {unknown}; choose from {list(LOSS_CONFIGS)}")
    args.losses = [n for n in LOSS_CONFIGS if n in names]  # canonical order
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.device == "cpu" and args.warmup < 2:
        print(f"--warmup {args.warmup} raised to 2 on the CPU (see --help)", file=sys.stderr)
        args.warmup = 2
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average():
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def print_machine(args):
    print("=" * 100)
    print("IFT cost benchmark")
    if args.device == "cuda":
        gib = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        print(f"device   : cuda, {torch.cuda.get_device_name()} ({gib:.0f} GiB)")
    print(f"cpu      : {cpu_model()}; os.cpu_count() = {os.cpu_count()}; "
          f"usable cores = {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}; "
          f"torch threads = {torch.get_num_threads()}")
    print(f"software : python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"machine  : {load_average()} (at the start)")


def build_model(args, max_positions):
    config = transformers.MistralConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
        tie_word_embeddings=False, max_position_embeddings=max_positions, attn_implementation=args.attn)
    torch.manual_seed(args.seed)
    model = transformers.MistralForCausalLM(config)
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).train()


def make_batches(B, T, vocab, seed, device):
    """(SFT batch, preference batch). Prompt = first T // 4 tokens (labels -100), no padding."""
    g = torch.Generator().manual_seed(seed)
    prompt = T // 4
    ids = torch.randint(0, vocab, (B, T), generator=g)
    rejected = ids.clone()
    rejected[:, prompt:] = torch.randint(0, vocab, (B, T - prompt), generator=g)

    def labelled(x):
        y = x.clone()
        y[:, :prompt] = forward.IGNORE_INDEX
        return y

    mask = torch.ones(B, T, dtype=torch.long)
    sft = {"input_ids": ids, "attention_mask": mask, "labels": labelled(ids)}
    pref = {"chosen_input_ids": ids, "chosen_attention_mask": mask, "chosen_labels": labelled(ids),
            "rejected_input_ids": rejected, "rejected_attention_mask": mask.clone(),
            "rejected_labels": labelled(rejected)}
    to = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return to(sft), to(pref)


def tensor_bytes(tensors):
    """Bytes of the distinct storages behind `tensors`."""
    seen, total = set(), 0
    for t in tensors:
        if not torch.is_tensor(t):
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def model_bytes(model):
    return tensor_bytes(list(model.parameters()) + list(model.buffers()))


def optimizer_bytes(optimizer):
    return tensor_bytes([v for state in optimizer.state.values() for v in state.values()])


# ------------------------------------------------------------------------------------------------
# Clocks and memory
# ------------------------------------------------------------------------------------------------

class Clock:
    """Time marks. CPU: (perf_counter, process_time). CUDA: events, read after one synchronize (no sync
    inside a step).

    On the CPU the process's CPU time (all its threads) is kept beside the wall time: when other jobs
    share the cores, the wall time of a step stretches with their load while its CPU time mostly does not
    (it still includes OpenMP threads spinning at a barrier while a sibling thread is descheduled, so
    it is not perfectly immune; --threads 1 removes that).
    """

    def __init__(self, device):
        self.cuda = device == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter(), time.process_time()

    def seconds(self, a, b):
        """Wall-clock seconds from mark a to mark b."""
        if self.cuda:
            return a.elapsed_time(b) / 1000.0
        return b[0] - a[0]

    def cpu_seconds(self, a, b):
        """CPU seconds of this process from mark a to mark b (None on CUDA)."""
        return None if self.cuda else b[1] - a[1]

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


@contextlib.contextmanager
def timed_calls(clock, spans):
    """Wrap forward.ModelCall.intuition (IFT's intuition pass) and losses.relation_propagation_weights
    with timers.

    ift_rows looks both up at call time (a method, a module global), so the wrappers see every call;
    each call appends (name, start mark, end mark) to `spans`. Nothing else about the call changes.
    """
    owners = {"intuition_pass": (forward.ModelCall, "intuition"),
              "relation_propagation_weights": (losses, "relation_propagation_weights")}
    originals = {name: getattr(*owner) for name, owner in owners.items()}

    def wrap(name, fn):
        def timed(*a, **kw):
            start = clock.mark()
            out = fn(*a, **kw)
            spans.append((name, start, clock.mark()))
            return out
        return timed

    for name, fn in originals.items():
        setattr(*owners[name], wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(*owners[name], fn)


@contextlib.contextmanager
def profiler_log_filtered():
    """Drop the two lines Kineto writes to stderr (fd 2) at each profiler start/stop; keep anything else."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if not (line.startswith("USDT:") and ("profiler_start" in line or "profiler_stop" in line)):
                    print(line, file=sys.stderr)


def cpu_step_growth(fn):
    """Run fn() under torch.profiler's memory profiling; return the peak bytes allocated above the start.

    The CPU allocator reports each allocation/free with its running total of allocated bytes; the
    growth is the largest total minus the total just before the step's first allocation.
    """
    from torch.profiler import ProfilerActivity, profile

    with profiler_log_filtered(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:  # a private API of torch.profiler: degrade to "n/a" rather than lose the timings
        from torch._C._profiler import _EventType
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
    except (ImportError, AttributeError) as e:
        print(f"  (peak memory unavailable: this torch's profiler has no event tree: {e})", flush=True)
        return None
    events = []
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            if f.device.type == "cpu":
                events.append((node.start_time_ns, f.alloc_size, f.total_allocated))
        stack.extend(node.children)
    if not events:
        return None
    events.sort(key=lambda e: e[0])
    base = events[0][2] - events[0][1]
    return max(e[2] for e in events) - base


# ------------------------------------------------------------------------------------------------
# One optimizer step
# ------------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, args, policy, reference, optimizer, clock):
        self.args, self.policy, self.reference, self.optimizer, self.clock = args, policy, reference, optimizer, clock

    def step(self, name, batch, lam):
        """One training step with loss `name`. Returns marks (start, after forward, after backward, end)."""
        clock, loss = self.clock, bench_loss(name, lam)
        t0 = clock.mark()
        reference = None if name == "dpo_pre" else self.reference  # dpo_pre reads the sums from its batch
        out = losses.batch_loss(loss, self.policy, reference, batch, losses.ONE_STEP)
        loss = losses.reduce_rows(out.row_losses, out.valid, {})[0] / out.row_losses.shape[0]  # the trainer's reduction
        t1 = clock.mark()
        loss.backward()
        t2 = clock.mark()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = clock.mark()
        return t0, t1, t2, t3


@torch.no_grad()
def with_reference_sums(batch, reference):
    """The preference batch plus the reference's summed log-probs, as reference_logps=precompute gives them
    (computed once, before the timed steps)."""
    pair = ModelCall().pair_logps(reference, batch)
    return {**batch, "reference_chosen_logps": pair.chosen.double(), "reference_rejected_logps": pair.rejected.double()}


def summarize_step(clock, marks, spans):
    t0, t1, t2, t3 = marks
    out = {"step": clock.seconds(t0, t3), "forward": clock.seconds(t0, t1), "backward": clock.seconds(t1, t2),
           "optimizer": clock.seconds(t2, t3), "step_cpu": clock.cpu_seconds(t0, t3)}
    for key, name in (("intuition", "intuition_pass"), ("rp_forward", "relation_propagation_weights")):
        out[key] = sum(clock.seconds(a, b) for n, a, b in spans if n == name)
        out[key + "_cpu"] = None if clock.cuda else sum(clock.cpu_seconds(a, b) for n, a, b in spans if n == name)
    return out


def run_main(args, policy, reference, optimizer, clock):
    """Warm-up and timed rounds. Returns {loss: {"times": [per-round dicts], "growth": [bytes], ...}}."""
    sft_batch, pref_batch = make_batches(args.batch, args.seq, args.vocab, args.seed + 1, args.device)
    batches = {"sft": sft_batch, "ift": sft_batch, "dpo": pref_batch, "orpo": pref_batch}
    if "dpo_pre" in args.losses:
        batches["dpo_pre"] = with_reference_sums(pref_batch, reference)
    lams = {name: (args.lam if name == "ift" else 0.0) for name in args.losses}
    runner = Runner(args, policy, reference, optimizer, clock)
    results = {name: {"times": [], "growth": []} for name in args.losses}
    names = args.losses

    def one(name, record, profile_memory=False):
        spans = []
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_alloc = torch.cuda.memory_allocated()
        with timed_calls(clock, spans):
            if profile_memory:
                holder = {}
                growth = cpu_step_growth(lambda: holder.setdefault("m", runner.step(name, batches[name], lams[name])))
                results[name]["growth"].append(growth)
                marks = holder["m"]
            else:
                marks = runner.step(name, batches[name], lams[name])
        clock.sync()
        if args.device == "cuda" and record:
            results[name]["growth"].append(torch.cuda.max_memory_allocated() - start_alloc)
        if record:
            results[name]["times"].append(summarize_step(clock, marks, spans))
        return marks

    # Warm-up. On the CPU the last warm-up round, which comes after the first has created the optimizer
    # state, is the memory-profiled one.
    cpu_mem = args.device == "cpu"
    warm_rounds = args.warmup  # >= 2 on the CPU (parse_args)
    for r in range(warm_rounds):
        t = time.perf_counter()
        profile_now = cpu_mem and r == warm_rounds - 1
        for name in names:
            one(name, record=False, profile_memory=profile_now)
        print(f"  warm-up round {r + 1}/{warm_rounds}{' (memory-profiled, untimed)' if profile_now else ''}: "
              f"{time.perf_counter() - t:.1f} s", flush=True)

    for r in range(args.reps):
        t = time.perf_counter()
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            one(name, record=True)
        last = {n: results[n]["times"][-1] for n in names}
        line = ", ".join(f"{n} {last[n]['step']:.2f}" + ("" if last[n]["step_cpu"] is None else
                                                         f" ({last[n]['step_cpu']:.2f})") for n in names)
        print(f"  round {r + 1}/{args.reps} (order {'>'.join(order)}): {line} s wall (CPU)  "
              f"[{time.perf_counter() - t:.0f} s, {load_average()}]", flush=True)
    return results


# ------------------------------------------------------------------------------------------------
# Relation propagation at long context
# ------------------------------------------------------------------------------------------------

def run_long(args, policy, optimizer, clock):
    T, B = args.long_seq, args.long_batch
    batch, _ = make_batches(B, T, args.vocab, args.seed + 2, args.device)
    runner = Runner(args, policy, None, optimizer, clock)
    steps = []
    for i in range(args.long_warmup + args.long_reps):
        spans = []
        t = time.perf_counter()
        with timed_calls(clock, spans):
            marks = runner.step("ift", batch, args.lam)
        clock.sync()
        s = summarize_step(clock, marks, spans)
        timed = i >= args.long_warmup
        if timed:
            steps.append(s)
        cpu = "" if s["step_cpu"] is None else f" (CPU {s['step_cpu']:.2f} s)"
        print(f"  IFT step at T={T}, B={B} ({'timed' if timed else 'warm-up'}): {s['step']:.2f} s{cpu} "
              f"[{load_average()}]", flush=True)

    # Relation propagation alone, forward + backward, on that step's mask.
    cfg = LOSS_CONFIGS["ift"]
    mask = batch["labels"][:, 1:] != forward.IGNORE_INDEX
    g = torch.Generator().manual_seed(args.seed + 3)
    values = (-10.0 * torch.rand(mask.shape, generator=g, dtype=torch.float32)).to(args.device)
    values = torch.where(mask, values, torch.zeros((), device=args.device))

    def rp_once():
        logps = values.clone().requires_grad_(True)
        w = losses.relation_propagation_weights(logps, mask, cfg["gamma"], cfg["propagation_type"],
                                                cfg["propagation_side"], cfg["propagation_norm"])
        (-(logps * w)).sum().backward()
        return logps.grad

    def median_time(fn, reps):
        """(median wall seconds, median CPU seconds or None) of fn() over reps calls, after 10 untimed."""
        for _ in range(min(10, reps)):
            fn()
        clock.sync()
        wall, cpu = [], []
        for _ in range(reps):
            a = clock.mark()
            fn()
            b = clock.mark()
            clock.sync()
            wall.append(clock.seconds(a, b))
            cpu.append(clock.cpu_seconds(a, b))
        return med(wall), med(cpu)

    rp = median_time(rp_once, args.rp_reps)
    # The scan of spec §2.3 as relation propagation runs it (left side: on the flipped row), once with
    # the float64 accumulation losses.py uses and once in float32.
    scan64 = median_time(lambda: scan._discounted_scan(values.flip(-1).double(), cfg["gamma"]), args.rp_reps)
    scan32 = median_time(lambda: scan._discounted_scan(values.flip(-1).float(), cfg["gamma"]), args.rp_reps)
    return {"steps": steps, "rp": rp, "scan64": scan64, "scan32": scan32, "T": T, "B": B}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec=".2f", none="n/a"):
    return none if x is None else format(x, spec)


def verdict(value, target):
    if value is None:
        return ""
    return "ok" if value <= target else "MISSED"


def report(args, results, resident, long):
    names = args.losses
    on_cpu = args.device == "cpu"
    med_time = {n: med([t["step"] for t in results[n]["times"]]) for n in names}
    med_cpu = {n: med([t["step_cpu"] for t in results[n]["times"]]) for n in names}
    growth = {n: med(results[n]["growth"]) for n in names}
    total = {n: (resident[n] + growth[n]) if growth[n] is not None else None for n in names}
    has_sft = "sft" in names

    def ratio(a, b):
        return None if a is None or not b else a / b

    def round_ratio(a, b, key):
        """Median over rounds of time(a) / time(b) within the same round."""
        pairs = zip(results[a]["times"], results[b]["times"])
        return med([ratio(x[key], y[key]) for x, y in pairs])

    print()
    print("=" * 100)
    mem_how = ("torch.cuda.max_memory_allocated - memory_allocated at the step's start" if not on_cpu
               else "CPU allocator bytes via torch.profiler(profile_memory=True), one untimed step")
    print(f"Results: B={args.batch}, T={args.seq} (prompt {args.seq // 4}), {args.dtype}, {args.optimizer}, "
          f"{args.device}; medians of {args.reps} timed rounds after {args.warmup} warm-up rounds")
    print(f"time  : wall seconds per optimizer step" + ("; cpu = CPU seconds of the process (all threads)"
                                                        if on_cpu else ""))
    print(f"memory: growth = {mem_how}; total = growth + resident (params + buffers + optimizer state + "
          f"batch, + reference for DPO)")
    print()
    hdr = (f"{'loss':<7} {'wall s':>7} {'min':>6} {'max':>6} {'fwd':>6} {'bwd':>6} {'opt':>5} {'xSFT':>5} "
           f"{'cpu s':>7} {'xSFT':>5} {'growth MiB':>10} {'total MiB':>9} {'xSFT':>5}")
    print(hdr)
    print("-" * len(hdr))
    for n in names:
        ts = results[n]["times"]
        print(f"{n:<7} {med_time[n]:>7.2f} {min(t['step'] for t in ts):>6.2f} {max(t['step'] for t in ts):>6.2f} "
              f"{med([t['forward'] for t in ts]):>6.2f} {med([t['backward'] for t in ts]):>6.2f} "
              f"{med([t['optimizer'] for t in ts]):>5.2f} "
              f"{fmt(ratio(med_time[n], med_time.get('sft'))):>5} "
              f"{fmt(med_cpu[n]):>7} {fmt(ratio(med_cpu[n], med_cpu.get('sft'))):>5} "
              f"{fmt(growth[n] / MIB if growth[n] is not None else None, '.0f'):>10} "
              f"{fmt(total[n] / MIB if total[n] is not None else None, '.0f'):>9} "
              f"{fmt(ratio(total[n], total.get('sft'))):>5}")
    if "ift" in names:
        ts = results["ift"]["times"]
        intu, rpf = med([t["intuition"] for t in ts]), med([t["rp_forward"] for t in ts])
        intu_cpu = med([t["intuition_cpu"] for t in ts])
        print(f"\nIFT step (medians): intuition pass (no-grad forward + argmax + its NLL) {intu:.2f} s wall = "
              f"{100 * intu / med_time['ift']:.1f}% of the step"
              + (f", {intu_cpu:.2f} s CPU = {100 * intu_cpu / med_cpu['ift']:.1f}%" if on_cpu else "")
              + f"; relation propagation forward {1000 * rpf:.2f} ms wall"
              + (f" ({1000 * med([t['rp_forward_cpu'] for t in ts]):.2f} ms CPU)" if on_cpu else "")
              + f" = {100 * rpf / med_time['ift']:.3f}%")
        if has_sft:
            sft_fwd = med([t["forward"] for t in results["sft"]["times"]])
            ift_fwd = med([t["forward"] for t in ts])
            print(f"  forward: SFT {sft_fwd:.2f} s; IFT {ift_fwd:.2f} s = intuition pass {intu:.2f} s + blended "
                  f"pass and the rest {ift_fwd - intu:.2f} s (wall)")
            extra = med([x["step"] - y["step"] for x, y in zip(ts, results["sft"]["times"])])
            print(f"  IFT step - SFT step (median over rounds) {extra:.2f} s wall, of which the intuition pass "
                  f"{intu:.2f} s; the one-extra-forward floor for this run, 1 + SFT forward / SFT step = "
                  f"{1 + sft_fwd / med_time['sft']:.3f}")

    print("\nRatios (this run; 'of medians' = ratio of the two medians, 'per round' = median over rounds of the")
    print("ratio within a round; memory: total and growth)")
    print(f"  {'':<34} {'wall: of medians':>16} {'per round':>10}" + (f" {'cpu: of medians':>16} {'per round':>10}"
                                                                        if on_cpu else "") + "   target")
    lines = []

    def add(label, a, b, kind, target=None, note=""):
        if a not in names or b not in names:
            return
        if kind == "time":
            per_round_wall, per_round_cpu = round_ratio(a, b, "step"), round_ratio(a, b, "step_cpu")
            cells = f"{fmt(ratio(med_time[a], med_time[b]), '.3f'):>16} {fmt(per_round_wall, '.3f'):>10}"
            if on_cpu:
                cells += f" {fmt(ratio(med_cpu[a], med_cpu[b]), '.3f'):>16} {fmt(per_round_cpu, '.3f'):>10}"
            if target:
                check = [verdict(per_round_wall, target)] + ([verdict(per_round_cpu, target)] if on_cpu else [])
                note = f"<= {target:.2f}: " + "/".join(check) + (" (wall/cpu per round)" if on_cpu else "")
        else:
            if total[a] is None or total[b] is None:
                return
            cells = (f"{'total ' + fmt(ratio(total[a], total[b]), '.3f'):>16} {'':>10}"
                     f" {'growth ' + fmt(ratio(growth[a], growth[b]), '.3f'):>16}" + (f" {'':>10}" if on_cpu else ""))
            if target:
                note = f"<= {target:.2f}: {verdict(ratio(total[a], total[b]), target)} (total)"
        lines.append(f"  {label:<34} {cells}   {note}")

    add("IFT / SFT  step time", "ift", "sft", "time", TARGETS["ift/sft time"])
    add("IFT / SFT  peak memory", "ift", "sft", "mem", TARGETS["ift/sft memory"])
    add("IFT / DPO  step time", "ift", "dpo", "time", note="expected ~0.5 or less")
    add("IFT / DPO  peak memory", "ift", "dpo", "mem")
    add("IFT / ORPO step time", "ift", "orpo", "time")
    add("IFT / ORPO peak memory", "ift", "orpo", "mem")
    add("ORPO / SFT step time", "orpo", "sft", "time")
    add("ORPO / SFT peak memory", "orpo", "sft", "mem")
    add("DPO / SFT  step time", "dpo", "sft", "time")
    add("DPO / SFT  peak memory", "dpo", "sft", "mem")
    add("DPO precomputed / live step time", "dpo_pre", "dpo", "time")
    add("DPO precomputed / live peak memory", "dpo_pre", "dpo", "mem")
    print("\n".join(lines) if lines else "  (needs at least two losses)")

    if long is not None and long["steps"]:
        step = med([s["step"] for s in long["steps"]])
        step_cpu = med([s["step_cpu"] for s in long["steps"]])
        intu = med([s["intuition"] for s in long["steps"]])
        rp, rp_cpu = long["rp"]
        share = rp / step
        print(f"\nRelation propagation at T={long['T']}, B={long['B']} (prompt {long['T'] // 4}; "
              f"{len(long['steps'])} timed IFT step(s) after {args.long_warmup} warm-up):")
        print(f"  IFT step                               {step:10.2f} s wall" +
              (f"   {step_cpu:10.2f} s CPU" if on_cpu else "") + f"   (intuition pass {intu:.2f} s wall)")
        print(f"  relation_propagation_weights fwd+bwd   {1000 * rp:10.3f} ms  " +
              (f"   {1000 * rp_cpu:10.3f} ms CPU" if on_cpu else "") + f"  (median of {args.rp_reps})")
        print(f"  share of the IFT step                  {100 * share:10.4f} %   " +
              (f"   {100 * rp_cpu / step_cpu:10.4f} % CPU" if on_cpu else "") +
              f"  target <= 1%: {verdict(share, TARGETS['relation propagation share'])}"
              + (f"/{verdict(rp_cpu / step_cpu, TARGETS['relation propagation share'])} (wall/cpu)" if on_cpu else ""))
        print(f"  the discounted scan alone (forward): float64 {1000 * long['scan64'][0]:.3f} ms, same scan in "
              f"float32 {1000 * long['scan32'][0]:.3f} ms (wall)")

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"\nprocess peak RSS over the whole run (all its losses and models"
          f"{'' if long is None else ', the long part included'}): {peak_rss:.0f} MiB; "
          f"{load_average()} (at the end)")


def main(argv=None):
    args = parse_args(argv)
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    print_machine(args)
    max_positions = max(args.seq, 0 if args.skip_long else args.long_seq)
    policy = build_model(args, max_positions)
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"model    : MistralForCausalLM hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
          f"{args.kv_heads} kv heads, intermediate {args.intermediate}, vocab {args.vocab}, untied, "
          f"{args.attn}; {n_params / 1e6:.1f}M parameters, {args.dtype}")
    print(f"run      : losses {','.join(args.losses)}; B={args.batch}, T={args.seq}, prompt {args.seq // 4}; "
          f"IFT lambda {args.lam}; {args.optimizer} lr {args.lr}; warm-up {args.warmup}, reps {args.reps}"
          + ("" if args.skip_long else f"; long part T={args.long_seq}, B={args.long_batch}"))
    print("=" * 100, flush=True)

    reference = None
    if "dpo" in args.losses or "dpo_pre" in args.losses:
        reference = copy.deepcopy(policy).eval()
        reference.requires_grad_(False)
    if args.optimizer == "RMSprop":
        optimizer = torch.optim.RMSprop(policy.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr)
    clock = Clock(args.device)

    t_start = time.perf_counter()
    results = run_main(args, policy, reference, optimizer, clock)

    sft_batch, pref_batch = make_batches(args.batch, args.seq, args.vocab, args.seed + 1, "cpu")
    base = model_bytes(policy) + optimizer_bytes(optimizer)
    resident = {}
    for n in args.losses:
        b = tensor_bytes((pref_batch if n in ("dpo", "dpo_pre", "orpo") else sft_batch).values())
        # dpo_pre holds no reference model, only its two float64 sums per row
        resident[n] = base + b + (model_bytes(reference) if n == "dpo" else 2 * 8 * args.batch if n == "dpo_pre" else 0)

    long = None
    if not args.skip_long:
        print(flush=True)
        long = run_long(args, policy, optimizer, clock)
    report(args, results, resident, long)
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
