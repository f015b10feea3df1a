"""report.py: runs found below sweep directories, grouped by the settings that differ (seeds pooled),
mean ± std against hand-computed values, plots written, a single run, and the Relation Propagation
weights of the explainable view against a float64 loop."""

import json
import statistics

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import report
from utils import REPO_DIR

TINY = REPO_DIR / "models" / "tiny-mistral"


def fake_run(path, loss, seed, nll, task=None, **config):
    """A run directory as train.py leaves it: config.yaml and metrics.jsonl (train rows, eval rows whose
    last nll is `nll`), optionally task_metrics.json."""
    path.mkdir(parents=True)
    loss_cfg = {"name": loss, **({"gamma": 0.95, "max_lambda": 0.2} if loss == "ift" else {})}
    OmegaConf.save(OmegaConf.create({"seed": seed, "run_dir": str(path), "exp_name": f"{loss}_{seed}", "lr": 1e-3,
                                     "loss": loss_cfg, "model": {"name": "tiny"}, **config}), path / "config.yaml")
    rows = [{"split": "eval", "step": 0, "examples": 0, "loss": 5.0, "nll": 5.0},
            {"split": "train", "step": 1, "examples": 8, "loss": 4.0, "tokens_per_s": 100.0 * (seed + 1),
             **({"lambda": 0.2} if loss == "ift" else {})},
            {"split": "eval", "step": 1, "examples": 8, "loss": nll + 1, "nll": nll, "margin": -nll,
             "pref_accuracy": 0.5}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if task is not None:
        (path / "task_metrics.json").write_text(json.dumps({"success_rate": task}))
    return path


def test_runs_group_by_differing_settings_with_mean_and_std_over_seeds(tmp_path):
    for seed, (nll, task) in enumerate([(1.0, 0.2), (2.0, 0.4), (4.0, 0.9)]):
        fake_run(tmp_path / "sweep" / f"sft_{seed}", "sft", seed, nll, task)
    fake_run(tmp_path / "sweep" / "ift_0", "ift", 0, 0.5, 0.6)
    fake_run(tmp_path / "other" / "ift_lr", "ift", 1, 0.7, lr=1e-2)
    runs = [report.load_run(p) for p in report.find_runs([tmp_path / "sweep", tmp_path / "other"])]
    groups, differing = report.group_runs(runs)
    assert sorted(groups) == ["ift, lr=0.001", "ift, lr=0.01", "sft, lr=0.001"]
    assert "seed" not in differing and "run_dir" not in differing and "lr" in differing
    assert len(groups["sft, lr=0.001"]) == 3

    out = report.write_report([tmp_path / "sweep", tmp_path / "other"], tmp_path / "out")
    text = out.read_text()
    nll = f"{statistics.fmean([1, 2, 4]):.3f} ± {statistics.stdev([1, 2, 4]):.3f}"
    task = f"{statistics.fmean([0.2, 0.4, 0.9]):.3f} ± {statistics.stdev([0.2, 0.4, 0.9]):.3f}"
    sft_row = next(line for line in text.splitlines() if line.startswith("| sft, lr=0.001 |"))
    assert sft_row.startswith(f"| sft, lr=0.001 | 3 | {nll} |") and task in sft_row
    assert "200.0 ± 100.0" in sft_row  # tokens/s of seeds 0, 1, 2: 100, 200, 300
    for png in ("eval_nll.png", "lambda.png"):
        assert (tmp_path / "out" / png).stat().st_size > 10_000


def test_a_single_run_makes_a_report_in_its_own_directory(tmp_path):
    run = fake_run(tmp_path / "one", "sft", 0, 1.5)
    report.main([str(run)])
    text = (run / "report.md").read_text()
    assert "| sft | 1 | 1.500 ± 0.000 |" in text and (run / "eval_nll.png").is_file()


def test_a_path_without_runs_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no run below"):
        report.main([str(tmp_path / "empty")])


def test_relation_propagation_view_matches_a_float64_loop(tmp_path):
    run_dir = fake_run(tmp_path / "ift", "ift", 0, 1.0, datasets=["ultrachat_sample"], dataset_paths={},
                       max_length=64, max_prompt_length=32)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    cfg.loss = {"name": "ift", "gamma": 0.9, "max_lambda": 0.3, "propagation_type": "loss",
                "propagation_side": "left", "propagation_norm": "L1"}
    cfg.model = {"name": "tiny", "name_or_path": str(TINY), "tokenizer_name_or_path": None, "trust_remote_code": False}
    OmegaConf.save(cfg, run_dir / "config.yaml")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(TINY))).save_pretrained(run_dir / "final")
    AutoTokenizer.from_pretrained(str(TINY)).save_pretrained(run_dir / "final")

    tokens, weights, nll, lam, _ = report.relation_propagation_example(report.load_run(run_dir))
    assert lam == 0.3 and len(tokens) == len(weights) == len(nll) > 3
    # left / L1 / loss: w_t ∝ sum_{k >= t} γ^(k-t) · nll_k / n, rescaled to mean 1
    n = len(nll)
    c = [sum(0.9 ** (k - t) * nll[k] / n for k in range(t, n)) for t in range(n)]
    expected = [ct * n / sum(c) for ct in c]
    assert weights == pytest.approx(expected, rel=1e-5)
