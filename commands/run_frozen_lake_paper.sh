#!/usr/bin/env bash
# The paper's Frozen Lake (ACL 2025 §5.3, App. B.2): a Markov policy over grid states (a zero-layer
# Mistral trained from scratch through train.py's own code), SFT / IFT / DFT / ASFT on each map's optimal
# trajectory, DPO / ORPO on optimal (chosen) vs sub-optimal (rejected), scored by the MSE between the
# policy's state-transition matrix and value iteration's. Equal tuning (experiments/protocol.py): each
# method's 8 settings are tried on the 10 validation maps, the chosen one runs on 20 test maps x 10
# seeds (SFT, IFT, DFT, ASFT, DPO, ORPO).
# Writes OUT/results.json (per method: chosen setting, budget, and per test metric {"mean", "ci95",
# "per_seed"}, plus paired differences against SFT), OUT/report.md and OUT/protocol.png.
#
#   bash commands/run_frozen_lake_paper.sh           # the full protocol (1,400 runs of 20 steps)
#   QUICK=1 bash commands/run_frozen_lake_paper.sh   # 1 map per split, 1 setting, 5 seeds (a test runs it)
# Environment: OUT (runs/frozen_lake_paper or runs/frozen_lake_paper_quick), JOBS (2 worker processes),
# PYTHON (commands/python.sh). Finished runs are reused (each run directory's scores.json): rerunning continues.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 TQDM_DISABLE=1  # single-threaded workers; no progress bars
source commands/python.sh  # PYTHON: $PYTHON, else .venv/bin/python, else python
if [[ "${QUICK:-0}" == 1 ]]; then
    OUT=${OUT:-runs/frozen_lake_paper_quick}; QUICK_FLAG=--quick
else
    OUT=${OUT:-runs/frozen_lake_paper}; QUICK_FLAG=
fi
"$PYTHON" -m experiments.frozen_lake_paper.run --out "$OUT" --jobs "${JOBS:-2}" $QUICK_FLAG
