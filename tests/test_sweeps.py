"""Sweeps and recipes: `python train.py -m` gives every job its own run directory under one sweep
directory named by what differs (and leaves no Hydra multirun/ folder behind), run directories are
reserved atomically, and the SFT -> DPO recipe runs from one command."""

import datetime
import multiprocessing
import os

import pytest
from omegaconf import OmegaConf

import report
import utils
from training import sweeps
from utils import REPO_DIR, ConfigError

from conftest import python_calls, run_train_py

TINY_RUN = ["n_examples=32", "batch_size=16", "eval_batch_size=16", "n_eval_examples=16", "eval_every=32",
            "warmup_steps=0", "datasets=[ultrafeedback_sample]", "max_length=96", "max_prompt_length=64"]


def env():
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.mark.integration
def test_multirun_gives_each_job_its_own_run_dir_named_by_the_swept_values(tmp_path):
    status, stdout, stderr = run_train_py("-m", "loss=sft,ift", "seed=0,1", *TINY_RUN, cwd=tmp_path)
    assert status == 0, stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["runs"]  # no multirun/ or outputs/ litter
    (sweep,) = (tmp_path / "runs").iterdir()
    assert sweep.name.startswith("sweep_loss+seed_")
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["loss=ift,seed=0", "loss=ift,seed=1", "loss=sft,seed=0", "loss=sft,seed=1"]
    for job in jobs:
        cfg = OmegaConf.load(sweep / job / "config.yaml")
        assert (cfg.loss.name, cfg.seed) == (job[5:8], int(job[-1])) and cfg.run_dir == str(sweep / job)
        assert (sweep / job / "final" / "model.safetensors").is_file()
    groups, _ = report.group_runs([report.load_run(p) for p in report.find_runs([sweep])])
    assert {k: len(v) for k, v in groups.items()} == {"ift": 2, "sft": 2}
    assert [line.split(":")[0] for line in stdout.splitlines() if line.startswith("job ")] == \
        ["job 1/4", "job 2/4", "job 3/4", "job 4/4"]


@pytest.mark.integration
def test_a_sweep_with_run_dir_runs_its_jobs_in_it_or_in_their_own_and_leaves_no_empty_sweep_folder(tmp_path):
    """run_dir=X: X is the sweep's folder (a job per sub-folder); run_dir=X_${seed}: each job's own,
    and no runs/sweep_* folder holding only Hydra's multirun.yaml is left."""
    base = ["-m", "seed=0,1", *TINY_RUN, "n_examples=16", "do_first_eval=false"]
    status, _, stderr = run_train_py(*base, "run_dir=sweep", cwd=tmp_path)
    assert status == 0, stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["multirun.yaml", "seed=0", "seed=1"]
    status, _, stderr = run_train_py(*base, "run_dir=own_${seed}", cwd=tmp_path)
    assert status == 0, stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["own_0", "own_1", "sweep"]
    assert (tmp_path / "own_1" / "final").is_dir()


@pytest.mark.unit
def test_the_swept_keys_come_from_the_command_line():
    assert sweeps.swept_keys(["loss=sft,ift", "seed=0,1", "lr=1e-3", "datasets=[a,b]"]) == ["loss", "seed"]
    assert sweeps.swept_keys(["lr=1e-3"]) == []


@pytest.mark.integration
def test_exactly_one_of_many_parallel_launchers_reserves_a_run_dir(tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        won = pool.map(utils.reserve_run_dir, [tmp_path / "run"] * 8)
    assert sum(won) == 1
    assert not utils.reserve_run_dir(tmp_path / "run")


@pytest.mark.unit
def test_default_run_dirs_started_in_the_same_second_differ(tmp_path, monkeypatch):
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2026, 1, 1, 12, 0, 0)

    monkeypatch.setattr(datetime, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    first, second = utils.make_run_dir(None, "x"), utils.make_run_dir(None, "x")
    assert first.name == "x_2026-01-01_12-00-00" and second.name == "x_2026-01-01_12-00-00_1"
    with pytest.raises(ConfigError, match="already holds a run"):
        utils.make_run_dir(str(first), "x")


@pytest.mark.integration
def test_sft_then_dpo_runs_from_one_command_and_dpo_starts_from_the_sft_model(tmp_path):
    # The script as written, its two Python calls recorded, then run in this process in the same order
    calls = python_calls(REPO_DIR / "commands" / "run_sft_then.sh", "dpo", tmp_path / "out", *TINY_RUN,
                         env=dict(env(), SECOND_ARGS="beta=0.2"), cwd=tmp_path)
    assert [argv[0] for _, argv in calls] == [str(REPO_DIR / "train.py")] * 2
    for cwd, argv in calls:
        status, _, stderr = run_train_py(*argv[1:], cwd=cwd)
        assert status == 0, stderr[-3000:]
    sft, dpo = (OmegaConf.load(tmp_path / "out" / s / "config.yaml") for s in ("sft", "dpo"))
    assert sft.loss.name == "sft" and (dpo.loss.name, dpo.loss.beta) == ("dpo", 0.2)
    assert dpo.model.name_or_path == str(tmp_path / "out" / "sft" / "final")
    assert (tmp_path / "out" / "dpo" / "final" / "model.safetensors").is_file()
