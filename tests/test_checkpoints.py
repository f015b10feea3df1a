"""Checkpoints, preemption and exact resume: a run stopped by a signal (or killed with -9) and resumed
trains exactly like one that never stopped, on 1 or 2 ranks in any combination, and a resume whose
config changes the math is refused. One uninterrupted run (the module's `reference`) is the yardstick.

Exactness rests on data order being a function of (seed, epoch), lambda noise of (seed, step), and on
the checkpoint holding everything else (weights, optimizer, scheduler, step, RNG states)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from training import checkpoints
from training import launch as launcher
from training import pipeline
from conftest import launch_run, make_cfg, read_rows
from training.tokenization import TokenizedData
from utils import REPO_DIR, ConfigError

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
        assert (ref_weights[k] - weights[k]).norm() <= tol["rel"] * ref_weights[k].norm(), k


def assert_each_step_once(run_dir):
    rows = read_rows(run_dir)
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, TOTAL + 1))


def start_cli(run_dir, *overrides, env=None):
    """train.py from the command line in a child process (so it can be signalled or killed)."""
    cmd = [sys.executable, "train.py", f"run_dir={run_dir}", *STEPS, *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})}
    return subprocess.Popen(cmd, cwd=REPO_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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

    def cli(*args):
        proc = subprocess.run([sys.executable, *args, f"run_dir={run_dir}", *STEPS], cwd=REPO_DIR, env=env,
                              capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr

    status, out = cli("-c", signalled)
    assert status == 75, out[-3000:]
    assert f"run_dir={run_dir} resume_from=latest" in out and (run_dir / "config.yaml").is_file()
    assert not checkpoints.complete_checkpoints(run_dir) and not (run_dir / "final").exists()
    status, out = cli("train.py", "resume_from=latest")
    assert status == 0 and "no complete checkpoint yet; starting the run from the beginning" in out, out[-3000:]
    assert_each_step_once(run_dir)
    rows = (run_dir / "metrics.jsonl").read_text()
    status, out = cli("train.py", "resume_from=latest")
    assert status == 0 and "holds a finished run (final/); nothing to resume" in out, out[-3000:]
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
@pytest.mark.parametrize("point", ["state", "retention"])
def test_kill_9_during_a_save_leaves_every_visible_checkpoint_loadable(point, reference, tmp_path):
    """The save of step 4 SIGKILLs itself before trainer_state.pt is written (state) or after the rename,
    before keep_last deletes step 2 (retention). resume_from=latest then finishes the run."""
    run_dir = tmp_path / "run"
    saving = ["save_every=16", "keep_last=1"]
    proc = start_cli(run_dir, *saving, env={checkpoints.CRASH_ENV: f"{point}@4"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    visible = checkpoints.complete_checkpoints(run_dir)
    assert sorted(visible) == ([2] if point == "state" else [2, 4])
    assert (run_dir / "checkpoints" / "step-4.tmp").exists() == (point == "state")
    resumed = launch(run_dir, *saving, "resume_from=latest")
    assert_continues(reference, resumed, ONE_PROCESS)
    assert_each_step_once(run_dir)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-4"]  # keep_last=1, no leftovers


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
