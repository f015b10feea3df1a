"""Fine-tune a causal LM with IFT, SFT, DPO, IPO, ORPO, DFT or SimPO.

    python train.py                                   # IFT on the bundled tiny model and sample data (CPU)
    python train.py loss=sft lr=1e-4 n_epochs=2       # any key of config/, Hydra syntax
    python train.py loss=ift gamma=0.9                # loss keys may be given short (== loss.gamma=0.9)
    python train.py trainer=FSDPTrainer               # FSDP2, one process per GPU (or nproc on the CPU)
    torchrun --nnodes 2 --nproc_per_node 8 train.py trainer=FSDPTrainer ...   # joins torchrun's launch

A run is compose (Hydra, here) -> check (training/config_schema.py's declarations, `pipeline.validate_config`)
-> build (data, run directory, models: `pipeline.build`) -> launch (`pipeline.launch`) -> train and
report (`pipeline.run`). Every dataset row is checked before any model loads, so a typo never costs
a 7B model load. Code that starts runs itself (experiments/, benchmarks/) calls training/pipeline.py, not this file.
"""

import sys

import hydra
from omegaconf import DictConfig

from training import config_schema, modeling, planning, run_data
from training.pipeline import launch, validate_config
from training.sweeps import sweep_run_dir
from utils import ConfigError, NonFiniteError

# ---------------------------------------------------------------- compose and check

def main():
    """The command line: short loss keys and unknown keys are handled before Hydra composes."""
    try:
        sys.argv[1:] = config_schema.rewrite_argv(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    compose_and_launch()


@hydra.main(config_path="config", config_name="config", version_base=None)
def compose_and_launch(cfg: DictConfig):
    from preference_datasets import DataError
    try:
        checked = validate_config(sweep_run_dir(cfg))
        if cfg.dry_run:  # the data and the plan, without a model, a run directory or wandb
            return planning.dry_run(cfg, checked.loss, modeling.load_tokenizer, run_data.load_data)
        if checked.resume.finished:  # e.g. a job requeued after its run completed
            print(f"run_dir={cfg.run_dir} holds a finished run (final/); nothing to resume")
            return
        status = launch(cfg, checked)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except DataError as e:  # a bad file or row: the message names it; a traceback would only bury it
        sys.exit(f"data error: {e}")
    except NonFiniteError as e:  # names the step and the metric; what was written before it stays
        sys.exit(f"training stopped: {e}")
    if status:  # launch.EXIT_PREEMPTED after a preemption signal (checkpoint written)
        sys.exit(status)


if __name__ == "__main__":
    main()
