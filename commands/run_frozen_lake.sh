#!/usr/bin/env bash
# Frozen Lake, played for real: SFT, IFT, SFT -> DPO, ORPO and DFT trained from the tiny model's
# configuration (random weights, model.from_scratch=true), 3 seeds each, the same data, optimizer and
# number of training examples; every final model then answers the held-out maps greedily and its
# moves are played in gymnasium's FrozenLake-v1. Writes, under OUT (default runs/frozen_lake):
#   data/                 train.jsonl / test.jsonl (experiments/frozen_lake/build_data.py)
#   runs/METHOD_seedK/    one run per method and seed (with task_metrics.json and frozen_lake_path.png)
#   stages/               the SFT half of the SFT -> DPO recipe
#   report.md + *.png     python report.py over runs/
#   results.json          method -> per-seed success rates, mean, std
#   logs/                 each job's output
# DPO is the paper's sequential recipe: SFT on the first half of the example budget, then DPO from that
# SFT model (also its reference) on the second half, so it sees as many examples as the others.
# Runs already finished (holding final/) are kept, so `METHODS=dft bash commands/run_frozen_lake.sh`
# adds a method to an earlier sweep; an unfinished run directory is started again.
#
#   bash commands/run_frozen_lake.sh             # the full comparison (2 jobs at a time, one thread each)
#   QUICK=1 bash commands/run_frozen_lake.sh     # the same pipeline on tiny budgets (a test runs it)
# Environment: OUT, METHODS ("sft ift dpo orpo dft"), SEEDS ("0 1 2"), JOBS (2), PYTHON (commands/python.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1   # JOBS single-threaded jobs share the cores
source commands/python.sh  # PYTHON: $PYTHON, else .venv/bin/python, else python
JOBS=${JOBS:-2}
METHODS=${METHODS:-"sft ift dpo orpo dft"}
if [[ "${QUICK:-0}" == 1 ]]; then
    OUT=${OUT:-runs/frozen_lake_quick}; SEEDS=${SEEDS:-"0"}
    N_TRAIN=256; N_TEST=8; N_EXAMPLES=64; EVAL_EVERY=32; BATCH=16  # 4 steps; what the test needs, no more
else
    OUT=${OUT:-runs/frozen_lake}; SEEDS=${SEEDS:-"0 1 2"}
    N_TRAIN=8000; N_TEST=200; N_EXAMPLES=5120; EVAL_EVERY=1280; BATCH=32
fi
export PYTHON OUT N_EXAMPLES EVAL_EVERY BATCH
START=$(date +%s)
mkdir -p "$OUT/runs" "$OUT/stages" "$OUT/logs"
"$PYTHON" -m experiments.frozen_lake.build_data --out "$OUT/data" --n-train "$N_TRAIN" --n-test "$N_TEST"

# One training run: train.py with the settings every method shares, then play its held-out maps.
train_one() {  # NAME DIR EXAMPLES OVERRIDES...
    local name=$1 dir=$2 examples=$3; shift 3
    if [[ -d "$dir/final" ]]; then echo "kept $dir (finished earlier)"; return 0; fi
    rm -rf "$dir"  # an unfinished attempt of this script
    "$PYTHON" train.py model=tiny model.from_scratch=true device=cpu "datasets=[$OUT/data]" \
        optimizer=AdamW lr=2e-3 lr_schedule=cosine warmup_steps=20 max_grad_norm=1.0 \
        batch_size="$BATCH" n_epochs=100 n_examples="$examples" eval_every="$EVAL_EVERY" \
        n_eval_examples=200 eval_batch_size=100 max_length=128 max_prompt_length=112 run_dir="$dir" "$@" \
        > "$OUT/logs/$name.log" 2>&1 || { echo "FAILED: $name (see $OUT/logs/$name.log)"; return 1; }
}

job() {  # METHOD SEED
    local method=$1 seed=$2 name="$1_seed$2" dir="$OUT/runs/$1_seed$2"
    case $method in
        dpo)  # the sequential recipe: SFT on half the budget, then DPO from it on the other half
            train_one "sft_half_seed$seed" "$OUT/stages/sft_half_seed$seed" $((N_EXAMPLES / 2)) loss=sft seed="$seed"
            train_one "$name" "$dir" $((N_EXAMPLES / 2)) loss=dpo seed="$seed" \
                model.from_scratch=false model.name_or_path="$OUT/stages/sft_half_seed$seed/final" ;;
        *) train_one "$name" "$dir" "$N_EXAMPLES" loss="$method" seed="$seed" ;;
    esac
    "$PYTHON" -m experiments.frozen_lake.evaluate_env --data "$OUT/data" --skip-played "$dir" >> "$OUT/logs/$name.log" 2>&1
    echo "done $name: $(tr -d '\n ' < "$dir/task_metrics.json" | grep -o '"success_rate":[0-9.]*')"
}
export -f train_one job

# The slowest jobs first, so that the two workers finish together.
for method in dpo orpo ift sft dft; do
    [[ " $METHODS " == *" $method "* ]] || continue
    for seed in $SEEDS; do echo "$method $seed"; done
done | xargs -P "$JOBS" -L 1 bash -c 'set -euo pipefail; job "$0" "$1"'

RUNS=()
for method in $METHODS; do for seed in $SEEDS; do RUNS+=("$OUT/runs/${method}_seed$seed"); done; done
"$PYTHON" -m experiments.frozen_lake.evaluate_env --data "$OUT/data" --skip-played --results "$OUT/results.json" "${RUNS[@]}"
"$PYTHON" report.py "${RUNS[@]}" --out "$OUT"
echo "frozen lake: $(( $(date +%s) - START )) s wall time; $OUT/report.md, $OUT/results.json"
