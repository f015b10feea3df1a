#!/usr/bin/env bash
# SFT baseline on Mistral-7B with the data and budget of commands/run_mistral_ift.sh (61,136 rows from each
# dataset, 3 epochs: 714 optimizer steps of 512). FSDP2, one process per GPU.
# Checkpoints every 5,120 examples (10 optimizer steps), the newest 2 kept. On SIGTERM, SIGINT or SIGUSR1
# (e.g. Slurm's preemption, or `#SBATCH --signal=USR1@120`) the run saves and exits with status 75.
# Requeue, or recover from a crash, with the same command plus resume_from=latest (it continues each run
# in its run_dir, starts a run that has no checkpoint yet, and skips a finished one):
#   bash commands/run_mistral_sft.sh resume_from=latest
set -euo pipefail
cd "$(dirname "$0")/.."
source commands/python.sh  # PYTHON: $PYTHON, else .venv/bin/python, else python
"$PYTHON" train.py loss=sft model=mistral7b "datasets=[ultrachat,ultrafeedback]" trainer=FSDPTrainer \
    n_epochs=3 rows_per_dataset=61136 batch_size=512 gradient_accumulation_steps=64 eval_batch_size=32 \
    lr=5e-7 warmup_ratio=0.15 lr_schedule=cosine optimizer=RMSprop max_length=1024 max_prompt_length=1024 \
    eval_every=10240 save_every=5120 keep_last=2 wandb.enabled=true wandb.mode=online \
    exp_name=mistral7b_sft run_dir=runs/mistral7b_sft "$@"
