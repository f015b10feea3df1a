"""benchmarks/gpu_check.py --smoke: every check of the GPU window on the CPU with tiny sizes, so the one
command a GPU session runs cannot rot. One run, with one row's model deliberately perturbed (--perturb
packed): that row must FAIL, its siblings PASS, what cannot run here SKIPPED with its reason, never PASS.
Its resume check starts train.py from a fork server; the GPU run's `python train.py` is checked apart."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from utils import REPO_DIR


def rows(report):
    """{check: (verdict, wall seconds, note)} from the report's table."""
    found = re.findall(r"^\| (.+?) \| (PASS|FAIL|SKIPPED) \| (\d+) \| (.*) \|$", report, re.M)
    return {check: (verdict, int(wall), note) for check, verdict, wall, note in found}


@pytest.mark.integration
def test_the_smoke_run_passes_compares_every_row_fails_the_perturbed_one_and_skips_with_reasons(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--perturb", "packed",
                           "--out", str(tmp_path)], cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=900)
    report = (tmp_path / "gpu_check.md").read_text()
    got = rows(report)
    assert proc.returncode == 1, (report, proc.stderr[-3000:])  # the perturbed row's FAIL, nothing else
    assert [c for c, (v, _, _) in got.items() if v == FAIL] == ["throughput: sft packed (sdpa)"], report
    assert "differs from `sft`" in got["throughput: sft packed (sdpa)"][2]
    for check in ("throughput: FSDPTrainer x1 sft", "throughput: dpo reference_logps=precompute",
                  "throughput: sft compile (eager)", "throughput: FSDPTrainer x1 ift", "throughput: FSDPTrainer x1 dpo"):
        verdict, _, note = got[check]
        assert verdict == PASS and note.startswith("agrees with"), (check, note)
    for check in ("throughput: BasicTrainer sft (plain: sdpa, padded, eager)", "FSDP2 x1 save, SIGTERM, resume; async save",
                  "demo (commands/run_tiny_ift.sh)", "CPU suite, CUDA hidden"):
        assert got[check][0] == PASS, (check, got[check])
    skipped = {"CUDA tests (pytest -m cuda)": "no CUDA device", "throughput: sft flash_attention_2, padded": "CUDA",
               "throughput: sft flash_attention_2, packed": "CUDA", "throughput: sft float16 + gradient scaler": "CUDA",
               "QLoRA 4-bit: checkpoints and merged final/": "CUDA"}
    for check, reason in skipped.items():
        assert got[check][0] == SKIPPED and reason in got[check][2], (check, got[check])
    assert "| run | tokens/s | step s | TFLOP/s | MFU |" in report
    assert "largest relative difference" in report and "wall s" in report


@pytest.mark.unit
def test_a_check_that_does_not_fit_the_budget_is_skipped_not_run(tmp_path):
    from benchmarks import gpu_check
    report = gpu_check.Report(tmp_path / "r.md", ["# r"])
    budget = gpu_check.Budget(10)
    assert gpu_check.run_check(report, budget, "fits", 5, lambda: (PASS, ["ran"])) == PASS
    assert gpu_check.run_check(report, budget, "too long", 60, lambda: 1 / 0) is None
    assert gpu_check.run_check(report, budget, "raises", 1, lambda: 1 / 0) == FAIL
    got = rows((tmp_path / "r.md").read_text())
    assert got["too long"][0] == SKIPPED and "needs about 60 s" in got["too long"][2]
    assert got["raises"][0] == FAIL and "ZeroDivisionError" in got["raises"][2]


@pytest.mark.integration
def test_on_the_gpu_train_runs_train_py_in_a_new_interpreter_and_logs_its_output(tmp_path):
    """The smoke run starts train.py from its fork server; the GPU run starts it as `python train.py`,
    the branch checked here: train.py's own exit status and message (a refused config, the quickest run)."""
    from benchmarks import gpu_check
    proc = gpu_check.train(tmp_path, "refused", "no_such_key=1")
    assert proc.returncode == 1 and "unknown config key 'no_such_key'" in proc.output, proc.output
    assert proc.log.parent == tmp_path / "logs" and proc.log.read_text() == proc.output


@pytest.mark.unit
def test_the_fork_servers_preload_modules_that_exist():
    """gpu_check's smoke mode and the tests' rank server (conftest) preload benchmarks.forked.TRAIN_MODULES.
    multiprocessing skips a name that does not import, silently: a module renamed or moved would cost every
    child its import again with nothing failing (three names had gone stale so)."""
    from benchmarks import forked
    assert [m for m in forked.TRAIN_MODULES if importlib.util.find_spec(m) is None] == []


PASS, FAIL, SKIPPED = "PASS", "FAIL", "SKIPPED"
