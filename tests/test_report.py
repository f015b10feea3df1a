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


pytestmark = pytest.mark.unit


def fake_run(path, loss, seed, nll, task=None, finished=True, **config):
    """A run directory as train.py leaves it: config.yaml and metrics.jsonl (train rows, eval rows whose
    last nll is `nll`), optionally task_metrics.json, and final/ unless it is unfinished."""
    path.mkdir(parents=True)
    if finished:
        (path / "final").mkdir()
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
    assert sorted(groups) == ["ift", "ift, lr=0.01", "sft"]  # lr=0.001 is what most groups share
    assert "seed" not in differing and "run_dir" not in differing and "lr" in differing
    assert len(groups["sft"]) == 3

    out = report.write_report([tmp_path / "sweep", tmp_path / "other"], tmp_path / "out")
    text = out.read_text()
    nll = f"{statistics.fmean([1, 2, 4]):.3f} ± {statistics.stdev([1, 2, 4]):.3f}"
    task = f"{statistics.fmean([0.2, 0.4, 0.9]):.3f} ± {statistics.stdev([0.2, 0.4, 0.9]):.3f}"
    sft_row = next(line for line in text.splitlines() if line.startswith("| sft |"))
    assert sft_row.startswith(f"| sft | 3 | {nll} |") and task in sft_row
    assert "200.0 ± 100.0" in sft_row  # tokens/s of seeds 0, 1, 2: 100, 200, 300
    for png in ("eval_nll.png", "lambda.png"):
        assert (tmp_path / "out" / png).stat().st_size > 10_000


def test_a_single_run_makes_a_report_in_its_own_directory_and_never_reads_it_back(tmp_path):
    """The report of one run goes to RUN/report/; run twice, or written into the run directory itself
    (--out RUN), it never copies its own plots back as figures the run wrote."""
    run = fake_run(tmp_path / "one", "sft", 0, 1.5)
    _png(run / "demo.png")  # a figure the run itself wrote
    for _ in range(2):
        report.main([str(run)])
    text = (run / "report" / "report.md").read_text()
    assert "| sft | 1 | 1.500 ± 0.000 |" in text and (run / "report" / "eval_nll.png").is_file()
    assert sorted(p.name for p in (run / "report").glob("*.png")) == ["eval_nll.png", "one_demo.png"]
    for _ in range(2):
        report.main([str(run), "--out", str(run)])
    assert sorted(p.name for p in run.glob("*.png")) == ["demo.png", "eval_nll.png", "one_demo.png"]
    assert (run / "report.md").read_text().count("![") == 2  # eval_nll.png and the run's demo.png


def _png(path):
    report._plt().imsave(path, [[0.0, 1.0], [1.0, 0.0]])


def test_runs_group_by_the_keys_that_change_the_math_and_labels_name_what_differs(tmp_path):
    """Bookkeeping keys (config_schema.NOT_MATH, which resume reads too) do not split a group; labels
    name every key that differs between groups (lr, datasets), never a key a run does not have."""
    fake_run(tmp_path / "sft_0", "sft", 0, 1.0, lr=1e-4, datasets=["a"], lora=None)
    fake_run(tmp_path / "sft_1", "sft", 1, 2.0, lr=1e-4, datasets=["a"], lora=None, save_every=32,
             eval_every=64, gradient_accumulation_steps=4, wandb={"name": "x"}, resume_from="latest")
    fake_run(tmp_path / "ift_0", "ift", 0, 0.5, lr=1e-3, datasets=["a", "b"], lora=None)
    fake_run(tmp_path / "ift_lora", "ift", 0, 0.5, lr=1e-3, datasets=["a", "b"], lora={"r": 8, "alpha": 16})
    runs = [report.load_run(p) for p in report.find_runs([tmp_path])]
    groups, differing = report.group_runs(runs)
    assert {label: sorted(r["path"].name for r in rs) for label, rs in groups.items()} == {
        "sft, datasets=[a], lr=0.0001": ["sft_0", "sft_1"],  # where it departs from what most groups share
        "ift": ["ift_0"],
        "ift, LoRA": ["ift_lora"]}
    # a third lr: 0.001 is still what most groups share; datasets split 2 : 2, so every group names its own
    fake_run(tmp_path / "sft_lr", "sft", 0, 1.0, lr=1e-2, datasets=["a"], lora=None)
    groups, _ = report.group_runs([report.load_run(p) for p in report.find_runs([tmp_path])])
    assert sorted(groups) == ["ift, LoRA, datasets=[a, b]", "ift, datasets=[a, b]", "sft, datasets=[a], lr=0.0001",
                              "sft, datasets=[a], lr=0.01"]
    assert not {"save_every", "eval_every", "gradient_accumulation_steps", "wandb.name", "seed"} & set(differing)
    from training import checkpoints  # the same declaration decides what a resume may change
    assert "save_every" not in checkpoints.config_fingerprint({"save_every": 32, "lr": 1e-3})
    from training import config_schema  # and names keys that exist: a renamed key would otherwise count silently

    from conftest import make_cfg
    cfg = make_cfg()
    assert all(OmegaConf.select(cfg, k, default="<none>") != "<none>" for k in config_schema.NOT_MATH if k != "hydra")


def test_an_unfinished_run_is_marked_so(tmp_path):
    fake_run(tmp_path / "done", "sft", 0, 1.0)
    fake_run(tmp_path / "stopped", "sft", 1, 3.0, finished=False)
    text = report.write_report([tmp_path], tmp_path / "out").read_text()
    assert "| sft | 2 (1 unfinished) |" in text
    assert f"`{tmp_path / 'stopped'}` — **unfinished** (no final/): trained to step 1, last evaluated at step 1" \
        in text


def test_a_plot_that_cannot_be_drawn_is_skipped_and_the_tables_come_out(tmp_path, capsys):
    """An IFT run whose final/ and data are gone (moved, or a path relative to another directory):
    its Relation Propagation plot is skipped with one line."""
    fake_run(tmp_path / "ift", "ift", 0, 1.0, datasets=["elsewhere/train.jsonl"], dataset_paths={})
    text = report.write_report([tmp_path / "ift"], tmp_path / "out").read_text()
    assert "| ift | 1 | 1.000 ± 0.000 |" in text and (tmp_path / "out" / "eval_nll.png").is_file()
    assert "(relation_propagation.png skipped: " in text
    assert "report: relation_propagation.png skipped: " in capsys.readouterr().err


def test_legends_sit_below_the_curves_inside_the_saved_image(tmp_path):
    plt = report._plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i in range(6):
        ax.plot([0, 1], [i, i + 1], label=f"ift, LoRA, datasets=[ultrachat_sample, ultrafeedback_sample], lr={i}e-4, "
                                          f"gamma=0.9{i}, lambda_schedule=linear")
    legend = report.legend_below(ax)
    fig.canvas.draw()
    box, axes = legend.get_window_extent(), ax.get_window_extent()
    assert box.y1 <= axes.y0  # below the axes: it covers no curve
    assert fig.get_tightbbox().transformed(fig.dpi_scale_trans).contains(box.x0 + 1, box.y0 + 1)
    report.save_figure(fig, tmp_path / "legend.png")
    image = plt.imread(tmp_path / "legend.png")
    assert image.shape[0] > 4.5 * 110  # the tight bounding box grew to hold the legend


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


def test_config_yaml_stores_the_paths_a_run_read_resolved(tmp_path, monkeypatch):
    """A dataset path relative to the directory train.py ran in still names the file when report.py
    (or anyone) reads config.yaml from elsewhere; registry names and hub ids stay as written."""
    from training import config_schema

    from conftest import make_cfg
    (tmp_path / "mine.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg("datasets=[mine.jsonl,ultrachat_sample]", "dataset_paths.hh=.", "model.tokenizer_name_or_path=hub/id")
    saved = config_schema.with_resolved_paths(cfg)
    assert list(saved.datasets) == [str(tmp_path / "mine.jsonl"), "ultrachat_sample"]
    assert saved.dataset_paths.hh == str(tmp_path) and saved.dataset_paths.shp is None
    assert saved.model.name_or_path == str(REPO_DIR / "models" / "tiny-mistral")
    assert saved.model.tokenizer_name_or_path == "hub/id" and cfg.datasets[0] == "mine.jsonl"
