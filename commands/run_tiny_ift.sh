#!/usr/bin/env bash
# IFT on the bundled tiny Mistral and UltraChat sample, on the CPU, offline: what `make demo` runs.
# 1,000 steps of 16 examples (AdamW 2e-3, cosine after 30 warm-up steps, clip 1.0; docs/performance.md, "The demo",
# gives the measured time); at the end 100 held-out prompts are answered greedily and scored by exact match.
# Extra arguments override anything, e.g. `bash commands/run_tiny_ift.sh loss=sft run_dir=runs/tiny_sft`.
set -euo pipefail
cd "$(dirname "$0")/.."
source commands/python.sh  # PYTHON: $PYTHON, else .venv/bin/python, else python
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$PYTHON" train.py loss=ift model=tiny device=cpu "datasets=[ultrachat_sample]" \
    optimizer=AdamW lr=2e-3 lr_schedule=cosine warmup_steps=30 max_grad_norm=1.0 \
    batch_size=16 n_epochs=10 n_examples=16000 \
    eval_every=4000 n_eval_examples=200 eval_batch_size=50 n_samples=100 max_new_tokens=24 \
    run_dir=runs/tiny_ift_$(date +%Y%m%d_%H%M%S) "$@"
