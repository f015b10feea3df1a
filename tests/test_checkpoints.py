"""Checkpoints, preemption and exact resume: a run stopped by a signal (or killed with -9) and resumed
trains exactly like one that never stopped, on 1 or 2 ranks in any combination, and a resume whose
config changes the math is refused. One uninterrupted run (the module's `reference`) is the yardstick.

Exactness rests on data order being a function of (seed, epoch), lambda noise of (seed, step), and on
the checkpoint holding everything else (weights, optimizer, scheduler, step, RNG states)."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from training import checkpoints, launch as launcher, pipeline
from training.tokenization import TokenizedData
from utils import REPO_DIR, ConfigError

from conftest import forked_script, launch_run, make_cfg, read_rows, run_train_py
from test_trainers_fsdp import adam_reach

IFT_NOISY = ["loss=ift", "gamma=0.9", "loss.min_lambda=0.1", "loss.max_lambda=0.5", "lambda_schedule=linear",
             "lambda_disturb=normal", "disturb_std=0.5"]
# 6 optimizer steps of 8 rows; AdamW and a cosine schedule, so optimizer and scheduler state both matter
BASE = ["n_examples=48", "batch_size=8", "eval_batch_size=8", "n_eval_examples=8", "eval_every=1000",
        "warmup_steps=2", "lr_schedule=cosine", "optimizer=AdamW", "lr=1e-3"]
STEPS = BASE + IFT_NOISY
TOTAL = 6
ONE_PROCESS = dict(rel=1e-6, abs=1e-7)  # same process layout, same arithmetic
ACROSS_RANKS = dict(rel=1e-5, abs=1e-6)  # as in test_trainers_fsdp: another split of the sums


def launch(run_dir, *overrides):
    return launch_run(run_dir, *STEPS, *overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, saving (asynchronously) at steps 2 and 4: its metrics, weights, run dir."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    rows, weights = launch(run_dir, "save_every=16", "save_async=true")
    return rows, weights, run_dir


def assert_continues(reference, resumed, tol):
    """The resumed run's training rows and final weights equal the reference's (rows from its first step on)."""
    (ref_rows, ref_weights, _), (rows, weights) = reference, resumed
    ref_rows = ref_rows[len(ref_rows) - len(rows):]
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for a, b in zip(ref_rows, rows):
        for key in ("loss", "loss_sft", "loss_further", "lambda", "lr", "grad_norm", "examples"):
            assert b[key] == pytest.approx(a[key], **tol), (a["step"], key)
    assert weights.keys() == ref_weights.keys()
    for k in ref_weights:
        if tol is ONE_PROCESS:  # the same sums in the same order: only the checkpoint's round trip, which is exact
            assert (ref_weights[k] - weights[k]).norm() <= tol["rel"] * ref_weights[k].norm(), k
        else:  # other reduction orders: an element with a noise-level gradient may move as far as Adam can move
            # it, in each run (test_trainers_fsdp.assert_same_run's argument); the rows above stay tight
            assert ((ref_weights[k] - weights[k]).abs() <= 2 * adam_reach(1e-3, TOTAL) + 1e-6).all(), k


def assert_each_step_once(run_dir):
    rows = read_rows(run_dir)
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, TOTAL + 1))


def start_cli(run_dir, *overrides, env=None):
    """train.py from the command line in a child process (so it can be signalled or killed), forked from
    the tests' warm server (conftest.forked_script); its output goes to run_dir's sibling RUN.log."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})}
    return forked_script("train.py", f"run_dir={run_dir}", *STEPS, *overrides, env=env,
                        log=run_dir.parent / f"{run_dir.name}.log")


def signal_after_step(proc, run_dir, step, signum=signal.SIGTERM):
    """Send `signum` once metrics.jsonl shows training step `step`; return (exit status, output)."""
    path = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and any(r.get("step", 0) >= step and r["split"] == "train" for r in read_rows(run_dir)
                                 if path.stat().st_size):
            proc.send_signal(signum)
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.mark.integration
def test_a_run_stopped_by_sigterm_resumes_in_place_exactly(reference, tmp_path):
    run_dir = tmp_path / "run"
    status, out = signal_after_step(start_cli(run_dir), run_dir, 2)
    assert status == 75 == launcher.EXIT_PREEMPTED, out[-3000:]  # sysexits' EX_TEMPFAIL: schedulers requeue
    stopped = max(checkpoints.complete_checkpoints(run_dir))
    assert 2 <= stopped < TOTAL and not (run_dir / "final").exists()
    assert f"run_dir={run_dir} resume_from=latest" in out
    # the same command again is refused; with resume_from=latest it continues in the same directory
    with pytest.raises(ConfigError, match="already holds a run.*resume_from=latest"):
        pipeline.validate_config(make_cfg(f"run_dir={run_dir}", *STEPS))
    resumed = launch(run_dir, "resume_from=latest")
    assert_continues(reference, resumed, ONE_PROCESS)
    assert_each_step_once(run_dir)
    resume_rows = [r for r in read_rows(run_dir) if r["split"] == "resume"]
    assert [(r["step"], r["forced"]) for r in resume_rows] == [(stopped, False)]


@pytest.mark.integration
def test_a_signal_while_the_model_loads_ends_ready_for_the_requeue_which_then_finishes(tmp_path):
    """SIGTERM as the model loads (after the run dir exists): exit status 75 and the resume command,
    not 143. The requeued command (resume_from=latest, no checkpoint yet) starts from the beginning
    and finishes; requeued once more, it finds the finished run and ends with status 0."""
    run_dir = tmp_path / "run"
    # train.py as the command line runs it, with from_pretrained sending SIGTERM to its own process first
    signalled = ("import os, runpy, signal, sys, transformers; auto = transformers.AutoModelForCausalLM; "
                 "load = auto.from_pretrained; auto.from_pretrained = lambda *a, **k: "
                 "(os.kill(os.getpid(), signal.SIGTERM), load(*a, **k))[1]; sys.argv[0] = 'train.py'; "
                 "runpy.run_path('train.py', run_name='__main__')")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}

    proc = subprocess.run([sys.executable, "-c", signalled, f"run_dir={run_dir}", *STEPS], cwd=REPO_DIR, env=env,
                          capture_output=True, text=True, timeout=300)
    status, out = proc.returncode, proc.stdout + proc.stderr
    assert status == 75, out[-3000:]
    assert f"run_dir={run_dir} resume_from=latest" in out and (run_dir / "config.yaml").is_file()
    assert not checkpoints.complete_checkpoints(run_dir) and not (run_dir / "final").exists()
    # the requeues need no real process (no signal reaches them): train.py's __main__ in this one
    status, out, err = run_train_py(f"run_dir={run_dir}", *STEPS, "resume_from=latest")
    assert status == 0 and "no complete checkpoint yet; starting the run from the beginning" in out + err, err[-3000:]
    assert_each_step_once(run_dir)
    rows = (run_dir / "metrics.jsonl").read_text()
    status, out, err = run_train_py(f"run_dir={run_dir}", *STEPS, "resume_from=latest")
    assert status == 0 and "holds a finished run (final/); nothing to resume" in out + err, err[-3000:]
    assert (run_dir / "metrics.jsonl").read_text() == rows


@pytest.mark.distributed
def test_a_checkpoint_of_two_fsdp_ranks_resumes_in_one_process(reference, tmp_path):
    """SIGTERM reaches the launching process, which forwards it to both ranks; they agree on the step.
    The shards are written in the background (save_async) and published once both ranks are done."""
    run_dir = tmp_path / "run"
    proc = start_cli(run_dir, "trainer=FSDPTrainer", "nproc=2", "device=cpu", "save_async=true")
    status, out = signal_after_step(proc, run_dir, 2)
    assert status == launcher.EXIT_PREEMPTED, out[-3000:]
    stopped = max(checkpoints.complete_checkpoints(run_dir))
    assert {p.name for p in (run_dir / "checkpoints" / f"step-{stopped}").glob("rng-rank*.pt")} == \
        {"rng-rank0.pt", "rng-rank1.pt"}
    resumed = launch(run_dir, "resume_from=latest")  # BasicTrainer: plain tensors from DTensor shards
    assert_continues(reference, resumed, ACROSS_RANKS)
    assert_each_step_once(run_dir)


@pytest.mark.integration
def test_the_trainer_applies_the_scheduled_lambda_disturbed_in_training_and_undisturbed_in_evaluation(reference):
    """The reference run's λ, step by step, against spec §1 written out here: linear from min_lambda
    0.1 at the first step to max_lambda 0.5 at the last (step s of 6 is 0-based s - 1), times
    1 + 0.5·ε in training, ε ~ N(0, 1) from a generator seeded by seed·1000003 + step, clipped to
    [0, 1]; evaluation (before step 1 and after step 6) takes the scheduled λ, undisturbed."""
    rows, _, run_dir = reference

    def scheduled(step):  # 0-based; past the last step it stays at max_lambda
        return 0.1 + (0.5 - 0.1) * min(step, TOTAL - 1) / (TOTAL - 1)

    for row in rows:
        step = row["step"] - 1
        eps = torch.randn((), generator=torch.Generator().manual_seed(0 * 1_000_003 + step), dtype=torch.float64)
        assert row["lambda"] == pytest.approx(min(1.0, max(0.0, scheduled(step) * (1 + 0.5 * float(eps)))), rel=1e-6)
        assert abs(row["lambda"] - scheduled(step)) > 1e-3, step  # the noise reached training
    evals = [r for r in read_rows(run_dir) if r["split"] == "eval"]
    assert [(r["step"], r["lambda"]) for r in evals] == [(0, pytest.approx(0.1)), (TOTAL, pytest.approx(0.5))]


@pytest.mark.distributed
def test_a_checkpoint_of_one_process_resumes_on_two_fsdp_ranks(reference, tmp_path):
    checkpoint = reference[2] / "checkpoints" / "step-2"
    assert not (checkpoint / "model.safetensors").exists()  # Hugging Face weights only when asked for
    resumed = launch(tmp_path / "run", "trainer=FSDPTrainer", "nproc=2", f"resume_from={checkpoint}")
    assert_continues(reference, resumed, ACROSS_RANKS)
    # another run's checkpoint: the new run_dir holds only what came after it
    assert [r["step"] for r in read_rows(tmp_path / "run") if r["split"] == "train"] == list(range(3, TOTAL + 1))


@pytest.mark.integration
@pytest.mark.parametrize("point", ["state", "manifest", "retention"])
def test_kill_9_during_a_save_leaves_every_visible_checkpoint_loadable(point, reference, tmp_path):
    """The save of step 4 SIGKILLs itself before trainer_state.pt is written (state), between it and the
    manifest (manifest) or after the rename, before keep_last deletes step 2 (retention).
    resume_from=latest then finishes the run."""
    run_dir = tmp_path / "run"
    saving = ["save_every=16", "keep_last=1"]
    proc = start_cli(run_dir, *saving, env={checkpoints.CRASH_ENV: f"{point}@4"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    visible = checkpoints.complete_checkpoints(run_dir)
    assert sorted(visible) == ([2, 4] if point == "retention" else [2])
    assert (run_dir / "checkpoints" / "step-4.tmp").exists() == (point != "retention")
    resumed = launch(run_dir, *saving, "resume_from=latest")
    assert_continues(reference, resumed, ONE_PROCESS)
    assert_each_step_once(run_dir)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-4"]  # keep_last=1, no leftovers


def _truncate_a_shard(folder):
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return f"{shard.name} has"


DAMAGE = {  # how a cluster damages the newest checkpoint -> the start of what damage() says
    "a truncated shard": _truncate_a_shard,
    "a missing state file": lambda folder: (folder / checkpoints.TRAINER_STATE).unlink() or "trainer_state.pt is missing",
    "a missing manifest": lambda folder: (folder / checkpoints.MANIFEST).unlink() or "manifest.json is missing",
}


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_requeue_finishes_from_the_one_before(case, reference,
                                                                                                 tmp_path):
    """The reference run stopped after step 4 (its checkpoints, config and metrics copied; no final/), then
    step-4 damaged. The requeue (resume_from=latest) moves step-4 aside under a name it prints, resumes from
    step-2 and trains to the end exactly like the reference, saving a new step-4 on the way; a second
    requeue finds the run finished. Nothing is deleted: the damaged folder is still there, as it was."""
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(reference[2], run_dir, ignore=shutil.ignore_patterns("final"))
    said = DAMAGE[case](run_dir / "checkpoints" / "step-4")
    damaged = sorted(p.name for p in (run_dir / "checkpoints" / "step-4").rglob("*"))
    with pytest.raises(ConfigError, match=rf"^resume_from=\S+step-4 is a damaged checkpoint: {said}"):
        pipeline.validate_config(make_cfg(f"run_dir={tmp_path / 'other'}", *STEPS,
                                          f"resume_from={run_dir / 'checkpoints' / 'step-4'}"))
    outs = []
    for requeue in (1, 2):  # as a scheduler requeues: the same command, twice (run in this process: no signal)
        status, out, err = run_train_py(f"run_dir={run_dir}", *STEPS, "save_every=16", "resume_from=latest")
        outs.append(out + err)
        assert status == 0, outs[-1][-3000:]
    aside = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-4.damaged-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].rglob("*")) == damaged
    assert f"resume_from=latest: step-4 is damaged ({said}" in outs[0]
    assert f"moved it to {aside[0].name} and resuming from step-2" in outs[0]
    assert "holds a finished run" in outs[1]
    first = read_rows(run_dir)
    assert sorted(checkpoints.complete_checkpoints(run_dir)) == [2, 4] and (run_dir / "final").is_dir()
    assert_each_step_once(run_dir)
    ref_rows = [r for r in reference[0] if r["step"] > 2]
    assert [r["loss"] for r in first if r["split"] == "train" and r["step"] > 2] == \
        pytest.approx([r["loss"] for r in ref_rows], **ONE_PROCESS)


@pytest.mark.integration
def test_a_resume_that_reaches_a_damaged_step_folder_saves_over_it(reference, tmp_path):
    """resume_from=step-2 of the run itself, whose step-4 is damaged (so not a newer checkpoint that
    would refuse it): the save of step 4 moves the damaged folder aside instead of failing
    (once: OSError Directory not empty: step-4.tmp -> step-4)."""
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(reference[2], run_dir, ignore=shutil.ignore_patterns("final"))
    (run_dir / "checkpoints" / "step-4" / checkpoints.TRAINER_STATE).unlink()
    resumed = launch(run_dir, "save_every=16", f"resume_from={run_dir / 'checkpoints' / 'step-2'}")
    assert_continues(reference, resumed, ONE_PROCESS)
    assert sorted(checkpoints.complete_checkpoints(run_dir)) == [2, 4]
    assert [p.name for p in (run_dir / "checkpoints").glob("step-4.replaced-*")] != []


@pytest.mark.integration
def test_a_run_resumed_in_place_continues_its_wandb_run(tmp_path, monkeypatch):
    """Stopped after step 2 as by a signal (stop_requested answers yes), then resumed in place: wandb
    is asked to continue the first run's id. With save_hf_checkpoints the checkpoint is also a Hugging
    Face model directory."""
    import types
    inits = []

    def init(**kw):
        inits.append(kw)
        return types.SimpleNamespace(id=kw["id"] or "run-one", log=lambda *a, **k: None, finish=lambda: None)

    import wandb
    monkeypatch.setattr(wandb, "init", init)
    asks = iter(range(1, 100))
    # asked before step 1 (a signal while the models loaded), then after each step: yes after step 2
    monkeypatch.setattr(checkpoints.Checkpointer, "stop_requested", lambda self, device: next(asks) == 3)
    cfg = make_cfg(f"run_dir={tmp_path}", *BASE, "loss=sft", "n_examples=32", "wandb.enabled=true",
                   "save_hf_checkpoints=true")
    pipeline.validate_config(cfg)
    assert pipeline.launch(cfg) == launcher.EXIT_PREEMPTED
    assert sorted(checkpoints.complete_checkpoints(tmp_path)) == [2] and not (tmp_path / "final").exists()
    from transformers import AutoModelForCausalLM  # save_hf_checkpoints: the checkpoint loads for evaluation
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "step-2" / "hf")).__name__ == \
        "MistralForCausalLM"
    resumed = make_cfg(f"run_dir={tmp_path}", *BASE, "loss=sft", "n_examples=32", "wandb.enabled=true",
                       "resume_from=latest")
    pipeline.validate_config(resumed)
    assert pipeline.launch(resumed) == 0
    assert [kw["id"] for kw in inits] == [None, "run-one"] and (tmp_path / "final").exists()
    assert [r["step"] for r in read_rows(tmp_path) if r["split"] == "train"] == [1, 2, 3, 4]


@pytest.mark.integration
def test_a_resume_that_changes_the_math_is_refused_naming_each_key(reference, tmp_path):
    checkpoint = reference[2] / "checkpoints" / "step-4"
    changed = ["lr=2e-3", "seed=1", "loss=sft", "datasets=[ultrachat_sample]"]
    with pytest.raises(ConfigError) as refused:
        pipeline.validate_config(make_cfg(f"run_dir={tmp_path / 'a'}", *BASE, *changed, f"resume_from={checkpoint}"))
    message = str(refused.value)
    for expected in ("lr: 0.001 in the checkpoint, 0.002 now", "seed: 0 in the checkpoint, 1 now",
                     "loss.name: 'ift' in the checkpoint, 'sft' now", "loss.gamma: 0.9 in the checkpoint, '<absent>'",
                     "datasets: ['ultrachat_sample', 'ultrafeedback_sample'] in the checkpoint, ['ultrachat_sample']",
                     "resume_force=true"):
        assert expected in message
    # settings that do not change the math may differ
    pipeline.validate_config(make_cfg(f"run_dir={tmp_path / 'b'}", *STEPS, "eval_every=8", "keep_last=2",
                                   "trainer=FSDPTrainer", "nproc=2", f"resume_from={checkpoint}"))
    # nor does planning only (a requeue command, dry-run), nor the model's label
    pipeline.validate_config(make_cfg(f"run_dir={tmp_path / 'c'}", *STEPS, "dry_run=true", "model.name=other",
                                      f"resume_from={checkpoint}"))
    # resume_force=true continues, with the config's lr, and says so in metrics.jsonl
    rows, _ = launch_run(tmp_path / "forced", *STEPS, "lr=2e-3", "seed=1", f"resume_from={checkpoint}",
                         "resume_force=true")
    assert [r["step"] for r in rows] == [5, 6]
    resume = [r for r in read_rows(tmp_path / "forced") if r["split"] == "resume"]
    assert resume[0]["forced"] and resume[0]["differences"] == {"lr": [1e-3, 2e-3], "seed": [0, 1]}
    assert rows[0]["lr"] == pytest.approx(reference[0][4]["lr"] * 2)


@pytest.mark.integration
def test_tokenised_data_that_changed_under_the_same_config_is_refused(reference):
    checkpoint = reference[2] / "checkpoints" / "step-2"
    cfg = make_cfg(f"run_dir={reference[2]}", *STEPS, "resume_from=latest")
    import datasets
    table = datasets.Dataset.from_dict({"prompt_ids": [[1, 2]], "chosen_ids": [[3]], "rejected_ids": [[]], "row": [0]})
    other = TokenizedData(table, False, [{"name": "other", "rows": 1, "available": 1}], "train")
    with pytest.raises(ConfigError, match=r"tokenised training data \(sha256\): '[0-9a-f]{32}' in the checkpoint"):
        checkpoints.check_fingerprint(cfg, checkpoint, other)


@pytest.mark.unit
def test_preemption_signals_are_caught_once_and_then_restored():
    previous = signal.getsignal(signal.SIGUSR1)
    with launcher.preemption_signals(["SIGUSR1"]):
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal is only reported
        assert launcher.stop_signal() == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is previous and launcher.stop_signal() is None


def _stopped_while_importing(cfg, local_rank, world, port, checked):
    """A rank that has not installed its preemption handlers yet (still importing) dies of the signal."""
    if cfg["case"] == "a rank gets SIGTERM" and local_rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    if cfg["case"] == "the launcher gets SIGUSR1" and local_rank == 0:
        os.kill(cfg["launcher"], signal.SIGUSR1)  # forwarded to both ranks, which have no handler yet
    time.sleep(60)  # until the launcher's clean-up (SIGTERM) or its forwarded signal ends it


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["a rank gets SIGTERM", "the launcher gets SIGUSR1"])
def test_a_signal_that_kills_a_spawned_rank_before_its_handlers_exist_exits_preempted(case, capfd):
    cfg = {"trainer": "FSDPTrainer", "nproc": 2, "device": "cpu", "case": case, "launcher": os.getpid()}
    assert launcher.launch(_stopped_while_importing, cfg, signals=["SIGTERM", "SIGUSR1"]) == launcher.EXIT_PREEMPTED
    assert "resume_from=latest continues" in capfd.readouterr().err


@pytest.mark.unit
def test_leftovers_go_and_metrics_are_cut_back_to_the_checkpoint(tmp_path):
    (tmp_path / "checkpoints" / "step-6.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-2.old.tmp").mkdir()
    (tmp_path / "final.tmp").mkdir()
    (tmp_path / "checkpoints" / "step-4").mkdir()
    checkpoints.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "step-4"]
    rows = [{"split": "eval", "step": 0}, {"split": "train", "step": 1}, {"split": "train", "step": 2},
            {"split": "eval", "step": 2}, {"split": "train", "step": 3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"split": "tra')
    checkpoints.truncate_metrics(tmp_path / "metrics.jsonl", 2)
    assert read_rows(tmp_path) == rows[:4]


@pytest.mark.unit
@pytest.mark.parametrize("overrides, message", [
    (["keep_last=0"], r"keep_last=0 is out of range: allowed \[1, inf\)"),
    (["preempt_signals=[SIGKILL]"], r"preempt_signals has 'SIGKILL'; allowed: SIGTERM, SIGINT"),
    (["save_async=maybe"], r"save_async='maybe' is not allowed; choose one of True, False"),
    (["resume_from=latest"], r"resume_from=latest continues the run in run_dir: set run_dir"),
    (["resume_from=/no/such/step-3"], r"resume_from=/no/such/step-3 is not a checkpoint folder"),
])
def test_impossible_checkpoint_settings_fail_early(overrides, message):
    with pytest.raises(ConfigError, match=message):
        pipeline.validate_config(make_cfg(*overrides))


# ---------------------------------------------------------------- the state object and the Checkpointer's API

class OnlyStateDict:
    """A state object that refuses every attribute but state_dict/load_state_dict: the Checkpointer must
    take what it saves from state_dict() alone, never from attributes (as it once read a trainer's)."""

    def __init__(self, state):
        object.__setattr__(self, "wrapped", state)

    def state_dict(self):
        return self.wrapped.state_dict()

    def load_state_dict(self, saved):
        self.wrapped.load_state_dict(saved)

    def __getattr__(self, name):
        raise AssertionError(f"the Checkpointer read state.{name}")

    def __setattr__(self, name, value):
        raise AssertionError(f"the Checkpointer wrote state.{name}")


def _counters(**changes):
    state = checkpoints.TrainerState(step=3, scheduler={"last_epoch": 2, "base_lrs": [1e-3]}, tokens_seen=411,
                                     slots_seen=512, skipped_steps=1, consecutive_skips=1, wandb_run_id="run-one")
    return dataclasses.replace(state, **changes)


@pytest.mark.unit
def test_the_trainer_state_round_trips_through_its_state_dict():
    state, other = _counters(), checkpoints.TrainerState()
    saved = state.state_dict()
    other.load_state_dict(saved)
    assert other == state
    saved["scheduler"]["last_epoch"] = 7  # a copy both ways: an asynchronous save's snapshot stays as taken
    assert state.scheduler["last_epoch"] == other.scheduler["last_epoch"] == 2
    with pytest.raises(KeyError, match="tokens_seen"):
        other.load_state_dict({k: v for k, v in state.state_dict().items() if k != "tokens_seen"})


def _plain_run(seed):
    """A model, an AdamW optimizer one step in (so it has moments) and a float16 loss scaler, without any trainer."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).square().sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** (10 + seed))
    return model, optimizer, scaler


@pytest.mark.unit
@pytest.mark.parametrize("save_async", [False, True])
def test_the_checkpointer_saves_and_loads_plain_objects_without_a_trainer(save_async, tmp_path):
    """Model, optimizer, TrainerState (behind OnlyStateDict, which fails on any attribute read or write)
    and scaler come back equal in a fresh set of objects, with the RNG states as they were at the save."""
    cfg = make_cfg(f"save_async={str(save_async).lower()}")
    model, optimizer, scaler = _plain_run(seed=0)
    saver = checkpoints.Checkpointer(cfg, tmp_path, data_fingerprint="rows-sha")
    saver.save(3, model=model, optimizer=optimizer, state=OnlyStateDict(_counters()), scaler=scaler)
    saver.wait()
    after_save = torch.rand(3)
    assert checkpoints.read_trainer_state(tmp_path / "checkpoints" / "step-3")["fingerprint"]["data"] == "rows-sha"

    fresh_model, fresh_optimizer, fresh_scaler = _plain_run(seed=1)  # other weights, moments and scale
    fresh = checkpoints.TrainerState()
    world = checkpoints.Checkpointer(cfg, tmp_path, "rows-sha").load(
        tmp_path / "checkpoints" / "step-3", model=fresh_model, optimizer=fresh_optimizer, state=OnlyStateDict(fresh),
        scaler=fresh_scaler)
    assert world == 1 and fresh == _counters()
    assert torch.equal(torch.rand(3), after_save)  # the RNG continues from the save
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[a][key], fresh_optimizer.state[b][key])
    assert fresh_scaler.get_scale() == scaler.get_scale() == 2.0 ** 10


def closed_form_lr(lr, k, warmup, total, schedule):
    """The documented lr of update k (0-based), written out apart from training/planning.py: warm-up
    update k of W at lr·(k+1)/W; then lr (constant) or lr·(1 + cos(π·(k-W)/(total-W)))/2 (cosine)."""
    if k < warmup:
        return lr * (k + 1) / warmup
    return lr if schedule == "constant" else lr * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))) / 2


@pytest.mark.unit
@pytest.mark.parametrize("warmup,total,schedule", [(0, 5, "constant"), (0, 5, "cosine"), (3, 8, "constant"),
                                                   (3, 8, "cosine"), (4, 4, "cosine"), (1, 1, "constant"),
                                                   (10, 10, "constant"), (30, 1000, "cosine")])
def test_the_schedule_runs_every_update_at_its_closed_form_lr_and_none_at_zero(warmup, total, schedule):
    """The lr the trainer's scheduler gives each update equals the closed form, and is never 0: the first
    warm-up update already trains (transformers' schedulers run it at 0). Tolerance: the two sides round
    the cosine's argument π·(k-W)/(total-W) in a different order (at most 2 roundings of a value < π, so
    < 1e-15 apart; cos moves by no more than that), then round a product or two (< 3·2^-53 relative):
    lr·1e-15 absolute covers both (the warm-up values differ by one rounding at most)."""
    import types

    import trainers
    lr = 2e-3
    cfg = make_cfg(f"lr_schedule={schedule}", f"lr={lr}")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    owner = types.SimpleNamespace(cfg=cfg, optimizer=optimizer, warmup_steps=warmup, total_steps=total)
    scheduler = trainers.BasicTrainer.build_scheduler(owner)
    for k in range(total):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(closed_form_lr(lr, k, warmup, total, schedule),
                                                                rel=0, abs=lr * 1e-15), k
        assert optimizer.param_groups[0]["lr"] > 0, k
        optimizer.step()
        scheduler.step()


@pytest.mark.unit
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_a_rebuilt_schedule_gives_the_lr_of_one_stepped_as_far(schedule):
    """build_scheduler(done=k) (a resume) sets the lr a fresh schedule has after k updates, exactly."""
    import types

    import trainers
    cfg = make_cfg(f"lr_schedule={schedule}", "lr=1e-3")
    owner = lambda optimizer: types.SimpleNamespace(cfg=cfg, optimizer=optimizer, warmup_steps=2,  # noqa: E731
                                                    total_steps=6)
    stepped = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = trainers.BasicTrainer.build_scheduler(owner(stepped))
    for done in range(6):
        rebuilt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        trainers.BasicTrainer.build_scheduler(owner(rebuilt))  # at construction, as the trainer does before a resume
        resumed = trainers.BasicTrainer.build_scheduler(owner(rebuilt), done=done)
        assert rebuilt.param_groups[0]["lr"] == stepped.param_groups[0]["lr"], done
        assert resumed.get_last_lr() == scheduler.get_last_lr() and resumed.last_epoch == done
        stepped.step()
        scheduler.step()


@pytest.mark.unit
def test_a_rank_saves_its_own_cuda_generator_and_a_resume_gives_it_to_the_loading_ranks_device(monkeypatch):
    """CUDA RNG on a resume with another rank count: the saving rank's own device generator (device 1 of
    rank 1) goes to whatever device the loading rank drives (device 0), never a stale entry of a device
    the saving rank did not use. CUDA is faked: the calls are recorded."""
    generators = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([11], dtype=torch.uint8)}
    current, restored = {"device": 1}, []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: generators[device].clone())
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [g.clone() for g in generators.values()])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state[0]), device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(
        (int(s[0]), d) for d, s in enumerate(states)))
    state = checkpoints.rng_state()  # rank 1 of 2, on device 1
    current["device"] = 0  # resumed as rank 0 of 1 (or any rank on device 0)
    checkpoints.set_rng_state(state)
    assert restored == [(11, 0)]


@pytest.mark.unit
def test_the_step_clock_waits_for_the_device_and_the_loop_reads_time_only_through_it(monkeypatch):
    """CUDA kernels run asynchronously: the step's time is read after a synchronize of its device, so the
    optimizer's time is not billed to the next step. On the CPU nothing is synchronised."""
    import inspect

    import trainers
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    trainers.synced_clock(torch.device("cuda", 0))
    trainers.synced_clock(torch.device("cpu"))
    assert calls == [torch.device("cuda", 0)]
    source = inspect.getsource(trainers.BasicTrainer.train)
    assert "perf_counter" not in source and source.count("synced_clock(self.device)") == 2
