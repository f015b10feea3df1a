#!/usr/bin/env bash
# The LLM Frozen Lake under the equal-tuning protocol (experiments/frozen_lake/tune.py): SFT, IFT, ORPO,
# DFT and ASFT from the tiny model's configuration, and DPO from SFT's chosen model (the paper's sequential
# recipe), each with a declared grid of 2 settings tried on validation maps (training stops where
# validation NLL is lowest), then 5 seeds of the chosen setting played on the held-out test maps, with
# the next-move quality at every cell and the recovery test.
# Writes OUT/results.json, OUT/report.md, OUT/protocol.png and OUT/nll_curves.png. Finished runs are
# reused (each run directory's protocol_scores.json), so rerunning continues a stopped sweep.
#
#   bash commands/run_frozen_lake_protocol.sh           # the full protocol (35 training runs + 5 SFT stages)
#   QUICK=1 bash commands/run_frozen_lake_protocol.sh   # tiny budgets, 1 setting per method
# Environment: OUT (runs/frozen_lake_protocol or runs/frozen_lake_protocol_quick), JOBS (2), PYTHON (commands/python.sh),
# METHODS (a comma-separated subset of sft,ift,orpo,dft,asft,dpo; default all; dpo needs sft).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 TQDM_DISABLE=1
source commands/python.sh  # PYTHON: $PYTHON, else .venv/bin/python, else python
if [[ "${QUICK:-0}" == 1 ]]; then
    OUT=${OUT:-runs/frozen_lake_protocol_quick}; QUICK_FLAG=--quick
else
    OUT=${OUT:-runs/frozen_lake_protocol}; QUICK_FLAG=
fi
"$PYTHON" -m experiments.frozen_lake.tune --out "$OUT" --jobs "${JOBS:-2}" --python "$PYTHON" ${METHODS:+--methods "$METHODS"} $QUICK_FLAG
