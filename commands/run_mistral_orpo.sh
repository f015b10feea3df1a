#!/usr/bin/env bash
# ORPO baseline on Mistral-7B: UltraFeedback pairs, one model (no reference), beta (the paper's lambda) 0.1,
# the budget of commands/run_mistral_ift.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py loss=orpo beta=0.1 model=mistral7b "datasets=[ultrafeedback]" trainer=FSDPTrainer \
    n_epochs=3 n_examples=61136 batch_size=512 gradient_accumulation_steps=64 eval_batch_size=32 \
    lr=5e-7 warmup_ratio=0.15 lr_schedule=cosine optimizer=RMSprop max_length=1024 max_prompt_length=512 \
    eval_every=10240 wandb.enabled=true wandb.mode=online \
    exp_name=mistral7b_orpo run_dir=runs/mistral7b_orpo "$@"
