"""benchmarks/gpu_check.py --smoke: every step of the GPU checks on the CPU with the tiny model, so
the one command a GPU session runs cannot rot. One run, several assertions on its report."""

import os
import re
import subprocess
import sys

import pytest

from utils import REPO_DIR


pytestmark = pytest.mark.integration


def test_the_smoke_run_writes_a_report_with_throughput_mfu_memory_and_resume_rows(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=900)
    report = (tmp_path / "gpu_check.md").read_text()
    assert proc.returncode == 0, (report, proc.stdout[-3000:], proc.stderr[-3000:])
    assert "torch " in report and "transformers " in report and "flash-attn " in report
    for check in ("demo on cpu", "throughput, MFU and memory", "save, SIGTERM and resume_from=latest on cpu",
                  "test suite"):
        assert re.search(rf"\| {re.escape(check)}[^|]* \| PASS \|", report), check
    table = [line for line in report.splitlines() if line.startswith("| BasicTrainer") or line.startswith("| FSDPTrainer")]
    labels = [line.split(" | ")[0][2:] for line in table]
    for label in ("BasicTrainer sft", "BasicTrainer ift", "BasicTrainer dpo", "FSDPTrainer sft", "FSDPTrainer ift",
                  "FSDPTrainer dpo", "BasicTrainer dpo, reference_logps=precompute", "BasicTrainer sft, sdpa, packed",
                  "BasicTrainer sft, compile (eager)"):
        assert label in labels, label
    for line in table:  # tokens/s, step s, TFLOP/s, MFU and peak memory (the process's peak RSS on the CPU)
        cells = line.split(" | ")
        assert float(cells[1].replace(",", "")) > 0 and float(cells[3]) > 0 and cells[4].endswith("%"), line
        assert float(cells[5]) > 0, line
        assert cells[-1] == "yes |", line
    assert "IFT/SFT: time" in report and "DPO precompute/live: time" in report
    assert "largest relative loss difference from the uninterrupted run" in report
