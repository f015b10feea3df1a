#!/usr/bin/env bash
# IFT on the bundled tiny Mistral and sample data, on the CPU (what `make demo` runs). Offline.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python train.py loss=ift device=cpu run_dir=runs/tiny_ift_$(date +%Y%m%d_%H%M%S) "$@"
