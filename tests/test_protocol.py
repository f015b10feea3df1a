"""experiments/protocol.py: the t quantiles against a numerical integral of Student's t density, the
interval and the paired difference against hand computations, and the protocol's rules: equal
budgets, the setting chosen on validation only, test runs only for the chosen setting."""

import math
import statistics

import pytest

from experiments import protocol

pytestmark = pytest.mark.unit


def t_cdf(x, df, steps=20000):
    """P(T <= x) for x > 0 by Simpson's rule on the density from 0 to x (the density is symmetric)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    f = lambda t: c * (1 + t * t / df) ** (-(df + 1) / 2)  # noqa: E731
    h = x / steps
    s = f(0) + f(x) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps))
    return 0.5 + s * h / 3


@pytest.mark.parametrize("df", [1, 2, 4, 9, 19, 30])
def test_t_quantiles_are_the_975th_percentiles(df):
    assert t_cdf(protocol.t975(df), df) == pytest.approx(0.975, abs=2e-4)


def test_interval_and_paired_difference_by_hand():
    a, b = [0.2, 0.4, 0.3, 0.5, 0.1], [0.1, 0.1, 0.3, 0.2, 0.0]
    s = math.sqrt(sum((x - 0.3) ** 2 for x in a) / 4)
    got = protocol.mean_ci95(a)
    assert got["mean"] == pytest.approx(0.3) and got["per_seed"] == a
    assert got["ci95"] == pytest.approx([0.3 - 2.776 * s / math.sqrt(5), 0.3 + 2.776 * s / math.sqrt(5)])
    d = [x - y for x, y in zip(a, b)]
    sd = statistics.stdev(d)
    assert protocol.paired(a, b)["ci95"] == pytest.approx([statistics.fmean(d) - 2.776 * sd / math.sqrt(5),
                                                          statistics.fmean(d) + 2.776 * sd / math.sqrt(5)])
    with pytest.raises(ValueError):
        protocol.paired(a, b[:4])


def test_the_protocol_tunes_on_validation_and_tests_only_the_chosen_setting(tmp_path):
    # validation loss is lowest at lr=2 for "sft" and at lr=1 for "ift"; the test split would prefer others
    calls = []

    def evaluate_many(jobs):
        calls.append(jobs)
        out = []
        for method, setting, split, seed in jobs:
            best = 2 if method == "sft" else 1
            loss = abs(setting["lr"] - best) if split == "validation" else -setting["lr"] + 0.01 * seed
            out.append({"loss": loss, "acc": 1 - loss, "_cpu_s": 1.5})
        return out

    budget = protocol.Budget({"sft": [{"lr": 1}, {"lr": 2}, {"lr": 3}], "ift": [{"lr": 1}, {"lr": 2}, {"lr": 3}]},
                             val_seeds=(0, 1), test_seeds=tuple(range(5)), select="loss")
    results = protocol.run_protocol(budget, evaluate_many, log=lambda *_: None)
    assert [s for _, _, s, _ in calls[0]] == ["validation"] * 12  # every setting, only validation, first
    assert {(m, st["lr"], sp) for m, st, sp, _ in calls[1]} == {("sft", 2, "test"), ("ift", 1, "test")}
    assert results["sft"]["chosen"] == {"lr": 2} and results["ift"]["chosen"] == {"lr": 1}
    assert results["sft"]["test"]["loss"]["per_seed"] == pytest.approx([-2 + 0.01 * s for s in range(5)])
    assert results["ift"]["paired_vs_sft"]["loss"]["mean"] == pytest.approx(1.0)
    assert results["sft"]["budget"] == {"settings": 3, "validation_runs": 6, "test_runs": 5,
                                        "tuning_cpu_s": 9.0, "cpu_s": 16.5}
    assert "_cpu_s" not in results["sft"]["test"]
    report = protocol.write_report(results, tmp_path, "toy").read_text()
    assert "| sft | **lr=2** |" in report and "| ift − sft |" in report and "**lr=1: 0**" in report
    assert (tmp_path / "protocol.png").stat().st_size > 5000


def test_unequal_budgets_and_too_few_seeds_are_refused():
    with pytest.raises(ValueError, match="unequal tuning budgets"):
        protocol.Budget({"sft": [{"lr": 1}], "ift": [{"lr": 1}, {"lr": 2}]}).check()
    with pytest.raises(ValueError, match="at least 5"):
        protocol.Budget({"sft": [{"lr": 1}]}, test_seeds=(0, 1, 2)).check()


def test_report_runs_a_named_protocol_and_refuses_an_unknown_one(monkeypatch):
    import report
    from experiments.frozen_lake_paper import run

    seen = []
    monkeypatch.setattr(run, "main", lambda argv: seen.append(argv) or 0)
    assert report.main(["--protocol", "frozen_lake_paper", "--out", "x", "--quick"]) == 0
    assert seen == [["--out", "x", "--quick"]]
    with pytest.raises(SystemExit, match="one of frozen_lake_paper, frozen_lake"):
        report.main(["--protocol", "lake"])


def stand_in_lake(tmp_path, monkeypatch, curves, train_cpu=2.0, jobs=1):
    """tune.Experiment (QUICK sizes shrunk) with train.py and the evaluation replaced by stand-ins that
    write what they would (the real ones are tested elsewhere): train.py writes its eval rows from
    `curves` (lr -> nll at 16, 32, 48, 64 examples) and costs train_cpu, the play costs 2 CPU s.
    Returns (experiment, the train.py command lines launched, as dicts; a later key=value wins)."""
    import json
    from pathlib import Path

    from experiments.frozen_lake import tune

    launched = []

    def fake_child(cmd, log):
        if "experiments.frozen_lake.evaluate_env" in cmd:  # the play of the test maps: its task metrics
            (Path(cmd[-1]) / "task_metrics.json").write_text(json.dumps(
                {"success_rate": 0.5, "move_mse": 0.1, "move_greedy_optimal": 0.7, "recovery_rate": 0.2}))
            return 2.0
        args = dict(a.split("=", 1) for a in cmd if "=" in a)
        launched.append(args)
        run = Path(args["run_dir"])
        (run / "final").mkdir(parents=True, exist_ok=True)
        with open(run / "metrics.jsonl", "w") as f:
            for i, nll in enumerate(curves[float(args["lr"])][:int(args["n_examples"]) // 16]):
                f.write(json.dumps({"split": "eval", "examples": 16 * (i + 1), "nll": nll}) + "\n")
        return train_cpu

    monkeypatch.setattr(tune, "run_child", fake_child)
    monkeypatch.setattr(tune, "QUICK", dict(n_train=20, n_val=4, n_test=4, max_examples=64, eval_every=16,
                                           batch=16, test_seeds=5))
    return tune.Experiment(tmp_path / "out", quick=True, jobs=jobs), launched


def test_the_llm_lake_stops_each_setting_where_validation_nll_was_lowest_and_tests_it_there(tmp_path, monkeypatch):
    """experiments/frozen_lake/tune.py's bookkeeping alone (stand_in_lake)."""
    curves = {2e-3: [0.9, 0.5, 0.4, 0.45], 4e-3: [0.8, 0.3, 0.35, 0.5]}  # nll at 16, 32, 48, 64 examples
    exp, launched = stand_in_lake(tmp_path, monkeypatch, curves)
    budget = protocol.Budget({"sft": [{"lr": 2e-3}, {"lr": 4e-3}]}, val_seeds=(0,), test_seeds=tuple(range(5)),
                             select="nll")
    results = protocol.run_protocol(budget, exp.evaluate_many, log=lambda *_: None)
    assert results["sft"]["chosen"] == {"lr": 4e-3}  # lowest validation nll: 0.3
    tests = [a for a in launched if "validation" not in a["datasets"]]
    assert len(tests) == 5 and {a["n_examples"] for a in tests} == {"32"}  # stopped where nll was lowest
    assert {a["seed"] for a in tests} == {"0", "1", "2", "3", "4"}
    assert results["sft"]["test"]["nll"]["per_seed"] == [0.3] * 5
    assert results["sft"]["budget"]["cpu_s"] == pytest.approx(2.0 * 2 + 5 * 4.0)


def test_the_llm_lakes_dpo_starts_from_sfts_chosen_setting_at_its_stopping_point(tmp_path, monkeypatch):
    """DPO's SFT stage is SFT's chosen setting trained to SFT's stopping point: trained for DPO's
    tuning (seed 0, its CPU DPO's), and SFT's own test run of the seed for each test seed."""
    curves = {2e-3: [0.9, 0.5, 0.4, 0.45], 4e-3: [0.8, 0.3, 0.35, 0.5], 5e-4: [0.7, 0.6, 0.65, 0.7],
              1e-3: [0.75, 0.8, 0.85, 0.9]}  # nll at 16, 32, 48, 64 examples, by lr
    exp, launched = stand_in_lake(tmp_path, monkeypatch, curves, train_cpu=3.0, jobs=2)
    budget = protocol.Budget({"sft": [{"lr": 2e-3}, {"lr": 4e-3}], "dpo": [{"lr": 5e-4}, {"lr": 1e-3}]},
                             val_seeds=(0,), test_seeds=tuple(range(5)), select="nll")
    results = protocol.run_protocol(budget, exp.evaluate_many, log=lambda *_: None)
    assert results["sft"]["chosen"] == {"lr": 4e-3} and results["dpo"]["chosen"] == {"lr": 5e-4}
    stages = [a for a in launched if "/stage/" in a["run_dir"]]
    assert len(stages) == 1 and stages[0]["seed"] == "0"  # trained once, for tuning
    assert (stages[0]["loss"], stages[0]["lr"], stages[0]["n_examples"]) == ("sft", "0.004", "32")  # SFT's stop
    assert "validation" in stages[0]["datasets"]  # never evaluated on the test maps
    dpo = [a for a in launched if a["loss"] == "dpo"]
    assert len(dpo) == 2 + 5 and all(a["model.from_scratch"] == "false" for a in dpo)
    for a in dpo:
        seed = int(a["seed"]) if "validation" not in a["datasets"] else 0
        stage = exp.run_dir("sft", {"lr": 4e-3}, "stage", seed) / "final"
        assert a["model.name_or_path"] == str(stage)
        if seed:  # SFT's own test run of that seed
            assert stage.resolve() == (exp.run_dir("sft", {"lr": 4e-3}, "test", seed) / "final").resolve()
    assert {a["n_examples"] for a in dpo if "validation" not in a["datasets"]} == {"32"}  # DPO's own stop
    # DPO's budget: 2 tuning runs, 5 test runs (3 CPU s each + 2 for the play) and the tuning stage
    assert results["dpo"]["budget"]["cpu_s"] == pytest.approx(2 * 3.0 + 5 * (3.0 + 2.0) + 3.0)
