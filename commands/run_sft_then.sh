#!/usr/bin/env bash
# The paper's sequential recipes from one command: SFT, then DPO (or ORPO, IPO, SimPO, ...) starting
# from the SFT run's final/ model, which is also the reference of DPO and IPO.
#
#   bash commands/run_sft_then.sh                                   # SFT then DPO on the bundled sample
#   bash commands/run_sft_then.sh orpo runs/sft_orpo lr=1e-4 n_examples=2000
#
# Arguments: [LOSS (dpo) [OUT (runs/sft_then_LOSS_<date_time>; the stages go to OUT/sft and OUT/LOSS)]],
# then overrides for both stages (datasets defaults to [ultrafeedback_sample], which has the rejected
# answers the second stage needs). SFT_ARGS and SECOND_ARGS (space-separated) add overrides to one
# stage only, e.g. SECOND_ARGS="beta=0.05 lr=5e-7". The second stage never trains from scratch.
# With dry_run=true each stage prints its plan; the second one then reads the first stage's model (its
# tokenizer is the one OUT/sft/final would have), since no SFT model is written.
set -euo pipefail
loss=dpo out=
# LOSS and OUT are optional: the first argument with a '=' starts the overrides
if [[ $# -gt 0 && $1 != *=* ]]; then loss=$1; shift; if [[ $# -gt 0 && $1 != *=* ]]; then out=$1; shift; fi; fi
out=${out:-runs/sft_then_${loss}_$(date +%Y%m%d_%H%M%S)}
case " $* " in *" datasets="*) ;; *) set -- "datasets=[ultrafeedback_sample]" "$@" ;; esac
REPO="$(cd "$(dirname "$0")/.." && pwd)"
source "$REPO/commands/python.sh"  # PYTHON: $PYTHON, else .venv/bin/python, else python
case $out in /*) ;; *) out="$PWD/$out" ;; esac  # the second stage reads OUT/sft/final from anywhere
# shellcheck disable=SC2086
"$PYTHON" "$REPO/train.py" loss=sft "$@" ${SFT_ARGS:-} run_dir="$out/sft"
# shellcheck disable=SC2086
case " $* ${SECOND_ARGS:-} " in
    *" dry_run=true "*) start=() ;;
    *) start=(model.from_scratch=false model.name_or_path="$out/sft/final") ;;
esac
"$PYTHON" "$REPO/train.py" loss="$loss" "$@" ${SECOND_ARGS:-} "${start[@]}" run_dir="$out/$loss"
