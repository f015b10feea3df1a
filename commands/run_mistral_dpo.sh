#!/usr/bin/env bash
# DPO baseline on Mistral-7B: UltraFeedback's 61,135 pairs for 3 epochs (119 optimizer steps of 512 pairs an
# epoch, 357 in all; lr 5e-7, cosine, 15% warm-up), a frozen reference model (also sharded), beta 0.1.
# The paper's "120k volume" for preference methods is 60k pairs x 2 answers: each pair puts its chosen and
# its rejected answer through the model, 122,270 sequences an epoch, as many as SFT/IFT's 122,271 rows.
# Conventionally DPO starts from an SFT model: pass model.name_or_path=runs/mistral7b_sft/final (from
# commands/run_mistral_sft.sh) to compare like for like. max_prompt_length 512 leaves room for both answers.
# Checkpoints every 5,120 examples (10 optimizer steps), the newest 2 kept. On SIGTERM, SIGINT or SIGUSR1
# (e.g. Slurm's preemption, or `#SBATCH --signal=USR1@120`) the run saves and exits with status 75.
# Requeue, or recover from a crash, with the same command plus resume_from=latest (it continues each run
# in its run_dir, starts a run that has no checkpoint yet, and skips a finished one):
#   bash commands/run_mistral_dpo.sh resume_from=latest
set -euo pipefail
cd "$(dirname "$0")/.."
source commands/python.sh  # PYTHON: $PYTHON, else .venv/bin/python, else python
"$PYTHON" train.py loss=dpo beta=0.1 model=mistral7b "datasets=[ultrafeedback]" trainer=FSDPTrainer \
    n_epochs=3 rows_per_dataset=61136 batch_size=512 gradient_accumulation_steps=64 eval_batch_size=32 \
    lr=5e-7 warmup_ratio=0.15 lr_schedule=cosine optimizer=RMSprop max_length=1024 max_prompt_length=512 \
    eval_every=10240 save_every=5120 keep_last=2 wandb.enabled=true wandb.mode=online \
    exp_name=mistral7b_dpo run_dir=runs/mistral7b_dpo "$@"
