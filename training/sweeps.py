"""Sweeps (`python train.py -m loss=sft,ift seed=0,1`): where each job of a Hydra multirun writes.

config.yaml names a sweep's directory by its swept keys and each job's folder by its swept values,
through the two resolvers registered here (imported by train.py before Hydra composes)."""

import contextlib
import shutil
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


def sweep_dir(argv=None):
    """hydra.sweep.dir: the command's run_dir when it sets one for all jobs (they run in its sub-folders),
    else runs/sweep_<swept keys>_<date_time>. A run_dir that interpolates a swept key (run_dir=runs/lr_${lr})
    names each job's own folder instead, and the sweep folder is left out (sweep_run_dir)."""
    import datetime
    for arg in (sys.argv[1:] if argv is None else argv):
        key, eq, value = arg.lstrip("+").partition("=")
        if key == "run_dir" and eq and "${" not in value and value != "null":
            return value
    return f"runs/sweep_{'+'.join(swept_keys(argv)) or 'none'}_{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}"


def sweep_size(argv=None):
    """How many jobs a `-m` command line runs: the product of the swept keys' numbers of values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    n = 1
    for o in OverridesParser.create().parse_overrides(args):
        if o.is_sweep_override():
            n *= len(list(o.sweep_string_iterator()))
    return n


# config.yaml names a sweep directory and its jobs' folders with these (hydra.sweep.dir / subdir)
OmegaConf.register_new_resolver("sweep_dir", sweep_dir, replace=True, use_cache=True)  # one time stamp per sweep
OmegaConf.register_new_resolver("sweep_job_name", sweep_job_name, replace=True)


def sweep_run_dir(cfg):
    """Under `python train.py -m`, each job runs in its own folder of the sweep directory
    (hydra.sweep.dir / hydra.sweep.subdir, which Hydra has created; hydra.sweep.dir is run_dir when
    the command sets it), and says which job of how many it is."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        hydra = HydraConfig.get()
        job_dir, sweep = Path(hydra.runtime.output_dir), Path(hydra.sweep.dir)
        if cfg.run_dir is None or Path(cfg.run_dir).resolve() == sweep.resolve():
            cfg.run_dir = str(job_dir)
        else:  # each job names its own run_dir: Hydra's folders for it would be litter
            with contextlib.suppress(OSError):
                job_dir.rmdir()
                outside = sweep.resolve() not in Path(cfg.run_dir).resolve().parents
                if outside and {p.name for p in sweep.iterdir()} <= {"multirun.yaml"}:
                    shutil.rmtree(sweep)
                    sweep.parent.rmdir()  # runs/, when the sweep made it and nothing else is there
        print(f"job {hydra.job.num + 1}/{sweep_size()}: {sweep_job_name()} -> {cfg.run_dir}", flush=True)
    return cfg
