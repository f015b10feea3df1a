"""What the efficiency options buy: the chunked loss head's memory, and padding-free packing's speed.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.efficiency              # all parts (CPU: 20-40 min)
    .venv/bin/python -m benchmarks.efficiency --parts head --vocabs 32000,128256
    .venv/bin/python -m benchmarks.efficiency --device cuda --dtype bfloat16 --attn flash_attention_2

It prints figures and asserts nothing. Three parts, each a comparison inside one run:
  head     the output head alone: N target positions of hidden size H -> log-probs, forward and backward
           with a random upstream gradient. Unchunked (lm_head on all N rows, then forward.gather_logps:
           loss_chunk_tokens=null) against forward.ChunkedTargetLogps (--chunk). Peak memory above the start
           (the weight gradient included in both) and time.
  step     whole SFT and IFT optimizer steps (forward through losses.batch_loss, backward, AdamW) of
           ift_cost.py's model at each vocabulary, loss_chunk_tokens=null against --chunk; the four
           combinations interleaved round by round. Peak memory = growth during the step + resident
           (parameters, optimizer state, batch).
  packing  mixed-length rows (lengths log-normal, clipped to [--min-len, --max-len], prompt a quarter)
           in three batchings of the same epoch: padded random batches, length-grouped padded batches
           (preference_datasets.epoch_batches, what the trainer does) and packed random batches
           (packing=true). Non-padding fraction of the processed slots, and tokens/s of SFT and IFT
           steps over the whole epoch (real tokens / time), the batchings interleaved batch by batch.
Peak memory: on CUDA max_memory_allocated; on the CPU the allocator's events under torch.profiler
(ift_cost.cpu_step_growth: exactly the tensor bytes PyTorch allocates). Time: wall time on CUDA, the
process's CPU time on the CPU. On a shared CPU use one thread (the default here) and compare ratios
measured in the same run; the load average is printed.
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
import transformers

import forward
import losses
from benchmarks.ift_cost import (bench_loss, cpu_model, cpu_step_growth, load_average, make_batches, model_bytes,
                                 optimizer_bytes, tensor_bytes)
from forward import ModelCall
from training.batching import collate, epoch_batches
from training.tokenization import TokenizedData

REPO = Path(__file__).resolve().parents[1]

MIB = 2 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="head,step,packing")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--attn", default="sdpa", help="model attn_implementation")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0 = torch's default)")
    p.add_argument("--chunk", type=int, default=forward.DEFAULT_LOSS_CHUNK_TOKENS, help="loss_chunk_tokens")
    p.add_argument("--vocabs", default="32000,128256")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--head-tokens", type=int, default=4096,
                   help="head part: N target positions (default 4 x 1024; 8 x 1024 needs 12 GiB unchunked)")
    p.add_argument("--head-reps", type=int, default=1)
    p.add_argument("--batch", type=int, default=4, help="step part: rows")
    p.add_argument("--seq", type=int, default=512, help="step part: tokens per row (prompt a quarter)")
    p.add_argument("--reps", type=int, default=2, help="step part: timed rounds after one warm-up round")
    p.add_argument("--rows", type=int, default=32, help="packing part: rows in the epoch")
    p.add_argument("--packing-batch", type=int, default=8, help="packing part: rows per batch")
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--median-len", type=int, default=96)
    p.add_argument("--lam", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    args.parts = [s for s in args.parts.split(",") if s]
    args.vocabs = [int(v) for v in args.vocabs.split(",")]
    return args


def peak_growth(device, fn):
    """Bytes allocated at the peak of fn() above what was allocated when it started."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return cpu_step_growth(fn)


def timed(device, fn):
    """Seconds fn() took: wall time on CUDA; on the CPU this process's CPU time, which (with one thread)
    is the work itself, where wall time also counts the time other jobs on a shared CPU held the core."""
    if device == "cuda":
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def build_model(args, vocab):
    config = transformers.MistralConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
        intermediate_size=int(args.hidden * 2.75), vocab_size=vocab, tie_word_embeddings=False,
        max_position_embeddings=max(args.seq, args.max_len), attn_implementation=args.attn)
    torch.manual_seed(args.seed)
    return transformers.MistralForCausalLM(config).to(device=args.device, dtype=args.dtype).train()


def train_step(policy, optimizer, name, batch, lam, **settings):
    out = losses.batch_loss(bench_loss(name, lam), policy, None, batch, losses.ONE_STEP, ModelCall(**settings))
    ((out.row_losses * out.valid).sum() / out.row_losses.shape[0]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def ratio(a, b):
    return a / b if a is not None and b else float("nan")


# ------------------------------------------------------------------ parts

def part_head(args):
    print(f"\n## head: N = {args.head_tokens} target positions, H = {args.hidden}, {args.dtype}, "
          f"chunk {args.chunk}", flush=True)
    print("Peak = growth above the start; working = peak less the gradients of hidden and weight (outputs of any "
          "backward, the same bytes in both)")
    print("| V | unchunked peak / working (MiB) | chunked peak / working (MiB) | chunked / unchunked working memory | "
          "unchunked s | chunked s | time ratio |\n|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(args.seed)
    for V in args.vocabs:
        hidden = torch.randn(args.head_tokens, args.hidden, generator=g).to(args.device, args.dtype).requires_grad_()
        weight = (0.02 * torch.randn(V, args.hidden, generator=g)).to(args.device, args.dtype).requires_grad_()
        targets = torch.randint(0, V, (args.head_tokens,), generator=g).to(args.device)
        upstream = torch.randn(args.head_tokens, generator=g).to(args.device)

        def run(chunked):
            def fn():
                hidden.grad = weight.grad = None
                if chunked:
                    logps, _ = forward.ChunkedTargetLogps.apply(hidden, weight, None, targets, args.chunk, False)
                else:
                    logps = forward.gather_logps(F.linear(hidden, weight), targets)
                (logps * upstream).sum().backward()
            return fn

        mem = {c: peak_growth(args.device, run(c)) for c in (False, True)}
        grads = tensor_bytes([hidden, weight])
        work = {c: m - grads for c, m in mem.items()}
        secs = {c: statistics.median(timed(args.device, run(c)) for _ in range(args.head_reps)) for c in (False, True)}
        print(f"| {V} | {mem[False] / MIB:.0f} / {work[False] / MIB:.0f} | {mem[True] / MIB:.0f} / "
              f"{work[True] / MIB:.0f} | **{ratio(work[True], work[False]):.3f}** | {secs[False]:.2f} | "
              f"{secs[True]:.2f} | {ratio(secs[True], secs[False]):.2f} |", flush=True)
        del hidden, weight
    print(f"({load_average()})")


def part_step(args):
    print(f"\n## step: hidden {args.hidden}, {args.layers} layers, B = {args.batch}, T = {args.seq}, {args.dtype}, "
          f"AdamW; chunked = loss_chunk_tokens {args.chunk}", flush=True)
    print("| V | loss | head | step s (median, CPU time on the CPU) | peak MiB (step + resident) | chunked / unchunked time | "
          "chunked / unchunked memory |\n|---|---|---|---|---|---|---|")
    ift_sft = []
    for V in args.vocabs:
        policy = build_model(args, V)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
        batch, _ = make_batches(args.batch, args.seq, V, args.seed, args.device)
        combos = [(name, chunk) for name in ("sft", "ift") for chunk in (None, args.chunk)]
        step = {c: (lambda c=c: train_step(policy, optimizer, c[0], batch, args.lam, loss_chunk_tokens=c[1]))
                for c in combos}
        for c in combos:  # warm-up; creates the optimizer state
            step[c]()
        resident = model_bytes(policy) + optimizer_bytes(optimizer) + tensor_bytes(batch.values())
        peak = {c: resident + peak_growth(args.device, step[c]) for c in combos}
        times = {c: [] for c in combos}
        for r in range(args.reps):
            for c in combos[r % len(combos):] + combos[:r % len(combos)]:
                times[c].append(timed(args.device, step[c]))
        t = {c: statistics.median(v) for c, v in times.items()}
        for name in ("sft", "ift"):
            for chunk in (None, args.chunk):
                c = (name, chunk)
                extra = (f"**{ratio(t[c], t[name, None]):.3f}** | **{ratio(peak[c], peak[name, None]):.3f}**"
                         if chunk else "1 | 1")
                print(f"| {V} | {name} | {'chunked' if chunk else 'unchunked'} | {t[c]:.2f} | {peak[c] / MIB:.0f} | "
                      f"{extra} |", flush=True)
        for chunk in (None, args.chunk):
            ift_sft.append((V, chunk, ratio(t["ift", chunk], t["sft", chunk]),
                            ratio(peak["ift", chunk], peak["sft", chunk])))
        del policy, optimizer
    print("\n| V | head | IFT / SFT time | IFT / SFT memory |\n|---|---|---|---|")
    for V, chunk, tr, mr in ift_sft:
        print(f"| {V} | {'chunked' if chunk else 'unchunked'} | {tr:.2f} | {mr:.2f} |")
    print(f"({load_average()})")


def mixed_length_data(args):
    rng = np.random.default_rng(args.seed)
    lengths = np.clip(np.exp(rng.normal(np.log(args.median_len), 0.9, args.rows)), args.min_len, args.max_len)
    prompts, answers = [], []
    for n in lengths.astype(int):
        ids = rng.integers(1, 32000, n).tolist()
        prompts.append(ids[: max(1, n // 4)])
        answers.append(ids[max(1, n // 4):])
    table = datasets.Dataset.from_dict({"prompt_ids": prompts, "chosen_ids": answers,
                                        "rejected_ids": [[] for _ in prompts], "row": list(range(len(prompts)))})
    return TokenizedData(table, pairs=False, parts=[{"name": "mixed lengths", "rows": len(prompts),
                                                     "available": len(prompts)}], split="train")


def part_packing(args):
    data = mixed_length_data(args)
    lengths = data.lengths()
    B = args.packing_batch
    rng = np.random.default_rng([args.seed, 1])
    order = rng.permutation(len(lengths))
    random_batches = [order[i:i + B] for i in range(0, len(order) - B + 1, B)]
    grouped_batches = epoch_batches(lengths, B, args.seed, 0)
    modes = {"padded random": (random_batches, False), "length-grouped": (grouped_batches, False),
             "packed random": (random_batches, True)}
    print(f"\n## packing: {len(lengths)} rows, lengths {lengths.min()}-{lengths.max()} (median "
          f"{int(np.median(lengths))}), batches of {B}, V = 32000, hidden {args.hidden}, {args.layers} layers, "
          f"{args.dtype}, attention {args.attn}", flush=True)
    policy = build_model(args, 32000)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    batches = {m: [{k: v.to(args.device) for k, v in collate(data, rows, 0).items()} for rows in bs]
               for m, (bs, _) in modes.items()}
    tokens = {m: sum(int(b["attention_mask"].sum()) for b in bs) for m, bs in batches.items()}
    slots = {m: tokens[m] if modes[m][1] else sum(b["attention_mask"].numel() for b in bs) for m, bs in batches.items()}
    for name in ("sft", "ift"):  # warm-up
        train_step(policy, optimizer, name, batches["packed random"][0], args.lam, packing=True)
    secs = {(m, name): 0.0 for m in modes for name in ("sft", "ift")}
    for i in range(len(random_batches)):
        for m, (_, packing) in modes.items():
            for name in ("sft", "ift"):
                b = batches[m][i]
                secs[m, name] += timed(args.device, lambda: train_step(policy, optimizer, name, b, args.lam,
                                                                       packing=packing))
    print("| batching | non-padding fraction | SFT tokens/s | IFT tokens/s | SFT speed vs padded random | "
          "IFT / SFT time |\n|---|---|---|---|---|---|")
    for m in modes:
        sft, ift = tokens[m] / secs[m, "sft"], tokens[m] / secs[m, "ift"]
        base = tokens["padded random"] / secs["padded random", "sft"]
        print(f"| {m} | {tokens[m] / slots[m]:.3f} | {sft:.0f} | {ift:.0f} | **{sft / base:.2f}** | "
              f"{secs[m, 'ift'] / secs[m, 'sft']:.2f} |", flush=True)
    print(f"({load_average()})")


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    print(f"efficiency benchmark: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    print(f"{load_average()} at the start", flush=True)
    for part in args.parts:
        {"head": part_head, "step": part_step, "packing": part_packing}[part](args)


if __name__ == "__main__":
    main()
