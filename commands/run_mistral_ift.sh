#!/usr/bin/env bash
# The paper's recipe on Mistral-7B: 61,136 rows from each dataset (a random sample of UltraChat-200k's
# 207,865, and all 61,135 of UltraFeedback's chosen answers), 3 epochs over their union (122,271 rows:
# 238 optimizer steps of 512 an epoch, 714 in all, 107 of them warm-up), lr 5e-7, max length 1,024 for
# prompt and answer (longer prompts are cut from their start so answers keep 128 tokens;
# docs/data.md, "Truncation"): first the SFT-equivalent run (lambda = 0, gamma = 0), then IFT (lambda = 0.2, gamma = 0.95,
# propagation loss / L1 / left). One node: FSDP2 starts one process per GPU.
# Check the data and the plan first, without a model: bash commands/run_mistral_ift.sh dry_run=true
# Several nodes: run on each node
#   torchrun --nnodes N --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train.py <same args>
# Needs the network (or dataset_paths.* / model.name_or_path pointing at local copies).
# Checkpoints every 5,120 examples (10 optimizer steps), the newest 2 kept. On SIGTERM, SIGINT or SIGUSR1
# (e.g. Slurm's preemption, or `#SBATCH --signal=USR1@120`) the run saves and exits with status 75.
# Requeue, or recover from a crash, with the same command plus resume_from=latest (it continues each run
# in its run_dir, starts a run that has no checkpoint yet, and skips a finished one):
#   bash commands/run_mistral_ift.sh resume_from=latest
set -euo pipefail
cd "$(dirname "$0")/.."
source commands/python.sh  # PYTHON: $PYTHON, else .venv/bin/python, else python
COMMON=(model=mistral7b "datasets=[ultrachat,ultrafeedback]" trainer=FSDPTrainer
        n_epochs=3 rows_per_dataset=61136 batch_size=512 gradient_accumulation_steps=64 eval_batch_size=32
        lr=5e-7 warmup_ratio=0.15 lr_schedule=cosine optimizer=RMSprop max_length=1024 max_prompt_length=1024
        eval_every=10240 save_every=5120 keep_last=2 wandb.enabled=true wandb.mode=online "$@")

"$PYTHON" train.py loss=ift loss.min_lambda=0 loss.max_lambda=0 gamma=0 \
    exp_name=mistral7b_sft_equivalent run_dir=runs/mistral7b_sft_equivalent "${COMMON[@]}"
"$PYTHON" train.py loss=ift loss.min_lambda=0.2 loss.max_lambda=0.2 gamma=0.95 \
    propagation_type=loss propagation_norm=L1 propagation_side=left \
    exp_name=mistral7b_ift run_dir=runs/mistral7b_ift "${COMMON[@]}"
