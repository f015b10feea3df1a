"""How long a checkpoint takes to save and to resume, with 1 and 2 ranks (training/checkpoints.py).

For each rank count R: a run of `train.py` writes checkpoints/step-2 and step-4 (save_every), then a
second run resumes from step-4 into a new run directory. Both print their timings ("saved ... in X s", "resumed ...
in X s"); this script collects and prints them. It asserts nothing.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.checkpoint_io                   # the bundled tiny model
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.checkpoint_io --hidden 512 --layers 8   # a random Mistral
    .venv/bin/python -m benchmarks.checkpoint_io --device cuda --ranks 1,8 --hidden 4096 --layers 32

Save time is from the start of the save to the renamed, fsynced folder (all ranks); resume time is
reading the shards into the model and optimizer plus the RNG and trainer state (not the model load).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "models" / "tiny-mistral"


def random_model(hidden, layers, folder):
    """A randomly initialised Mistral with the tiny model's vocabulary, saved to `folder`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(TINY)
    config.update(dict(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=hidden * 11 // 4,
                       num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                       head_dim=64))
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def train(args, *overrides):
    cmd = [sys.executable, str(REPO / "train.py"), "loss=sft", "optimizer=AdamW", "n_examples=48", "batch_size=8",
           "eval_batch_size=8", "n_eval_examples=8", "eval_every=1000", "do_first_eval=false", "max_length=128",
           "max_prompt_length=64", f"device={args.device}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        sys.exit(proc.stdout[-2000:] + proc.stderr[-3000:])
    return proc.stdout + proc.stderr


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts (FSDPTrainer when > 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, help="with --layers: a random Mistral of this width instead of tiny")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--save-async", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = [f"model.name_or_path={TINY}"]
        if args.hidden:
            n = random_model(args.hidden, args.layers, tmp / "model")
            model = [f"model.name_or_path={tmp / 'model'}", f"model.tokenizer_name_or_path={TINY}"]
            print(f"random Mistral: hidden {args.hidden}, {args.layers} layers, {n / 1e6:.1f}M parameters")
        print(f"{'ranks':>5} {'checkpoint (MiB)':>17} {'1st save (s)':>13} {'2nd save (s)':>13} {'resume (s)':>11}")
        for ranks in map(int, args.ranks.split(",")):
            layout = ["trainer=FSDPTrainer", f"nproc={ranks}"] if ranks > 1 else []
            first = tmp / f"save{ranks}"
            out = train(args, *model, *layout, f"run_dir={first}", "save_every=16",
                        f"save_async={str(args.save_async).lower()}")
            saved = re.findall(r"saved \S+step-\d+ \(([\d.]+) MiB\) in ([\d.]+) s", out)
            out = train(args, *model, *layout, f"run_dir={tmp / f'resume{ranks}'}",
                        f"resume_from={first / 'checkpoints' / 'step-4'}")
            resumed = re.search(r"resumed from \S+ .* in ([\d.]+) s", out)
            print(f"{ranks:>5} {saved[0][0]:>17} {saved[0][1]:>13} {saved[1][1]:>13} {resumed.group(1):>11}")


if __name__ == "__main__":
    main()
