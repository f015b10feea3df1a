"""Sweeps (`python train.py -m loss=sft,ift seed=0,1`): where each job of a Hydra multirun writes.

config.yaml names a sweep's directory by its swept keys and each job's folder by its swept values,
through the two resolvers registered here (imported by train.py before Hydra composes)."""

import contextlib
import sys
from pathlib import Path

from omegaconf import OmegaConf


def swept_keys(argv=None):
    """The keys a `-m` command line sweeps: `loss=sft,ift seed=0,1 lr=1e-3` -> ['loss', 'seed']."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(args) if o.is_sweep_override()]


def sweep_job_name():
    """hydra.sweep.subdir: this job's values of the swept keys, e.g. 'loss=sft,seed=0', so the jobs of a
    sweep are told apart by what differs between them (a '/' in a value becomes '_')."""
    from hydra.core.hydra_config import HydraConfig

    swept = set(swept_keys())
    parts = [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]
    return ",".join(parts).replace("/", "_") or f"job{HydraConfig.get().job.num}"


# config.yaml names a sweep directory and its jobs' folders with these (hydra.sweep.dir / subdir)
OmegaConf.register_new_resolver("swept_keys", lambda: "+".join(swept_keys()) or "none", replace=True)
OmegaConf.register_new_resolver("sweep_job_name", sweep_job_name, replace=True)


def sweep_run_dir(cfg):
    """Under `python train.py -m`, a job without run_dir runs in its own folder of the sweep directory
    (hydra.sweep.dir / hydra.sweep.subdir, which Hydra has created)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        if cfg.run_dir is None:
            cfg.run_dir = str(job_dir)
        elif job_dir.resolve() != Path(cfg.run_dir).resolve():
            with contextlib.suppress(OSError):  # Hydra made it for the job, which writes elsewhere: leave no litter
                job_dir.rmdir()
    return cfg
