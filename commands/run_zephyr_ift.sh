#!/usr/bin/env bash
# IFT from Zephyr's SFT checkpoint (HuggingFaceH4/mistral-7b-sft-beta) on UltraFeedback's chosen answers (the
# paper's sequential scenario): all 61,135 rows (rows_per_dataset=61136), 3 epochs, 357 optimizer steps of 512. FSDP2, one process per GPU (or under torchrun).
# Checkpoints and requeue as in commands/run_mistral_ift.sh: add resume_from=latest to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
source commands/python.sh  # PYTHON: $PYTHON, else .venv/bin/python, else python
"$PYTHON" train.py model=zephyr7b-sft "datasets=[ultrafeedback]" trainer=FSDPTrainer loss=ift \
    loss.min_lambda=0.2 loss.max_lambda=0.2 gamma=0.95 \
    n_epochs=3 rows_per_dataset=61136 batch_size=512 gradient_accumulation_steps=64 eval_batch_size=32 \
    lr=5e-7 warmup_ratio=0.15 lr_schedule=cosine optimizer=RMSprop max_length=1024 max_prompt_length=1024 \
    eval_every=10240 save_every=5120 keep_last=2 wandb.enabled=true wandb.mode=online \
    exp_name=zephyr7b_ift run_dir=runs/zephyr7b_ift "$@"
