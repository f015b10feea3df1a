"""A fair comparison protocol, the same for every experiment:

1. Every method declares its tuning grid (`Budget`): the settings it may try. The grids have the same
   number of settings for every method (checked), so no method gets more tries than another: a
   method whose only knob is the learning rate gets a denser lr grid; IFT spends its settings on lr,
   lambda and gamma, DPO/ORPO/SimPO on lr and beta.
2. Each setting is scored on the VALIDATION split (maps, prompts, ... disjoint from the test split)
   with `val_seeds`; the setting with the best mean of the selection metric is chosen.
3. The chosen setting alone runs on the TEST split with `test_seeds` (at least 5); the test split is
   never looked at before this step.
4. Each test metric gets its mean over seeds with a 95% Student-t interval, and each method its
   per-seed difference from the baseline (same seed: same initial weights and data order), with its
   own interval: the paired difference.

An experiment supplies `evaluate(method, setting, split, seed) -> {metric: value}` (one number per
metric per seed, e.g. the mean over that split's maps), and `run_protocol` does the rest; its
results are JSON-ready: per method {"chosen", "validation", "budget", "test": {metric: {"mean",
"ci95": [lo, hi], "per_seed"}}, "paired_vs_<baseline>": {...}}. `write_report` turns them into a
markdown report with a plot.
"""

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (standard tables).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def t975(df):
    """The 0.975 quantile of Student's t with df degrees of freedom (1.96 beyond the table's 30)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 values (df={df})")
    return T975[df - 1] if df <= len(T975) else 1.96


def mean_ci95(values):
    """{'mean', 'ci95': [lo, hi], 'per_seed'}: mean ± t(0.975, n-1) · s / sqrt(n), s the sample std.
    One value gives the interval [mean, mean] (no spread can be estimated; the report says n)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values")
    m = statistics.fmean(values)
    if len(values) == 1:
        return {"mean": m, "ci95": [m, m], "per_seed": values}
    half = t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": m, "ci95": [m - half, m + half], "per_seed": values}


def paired(a, b):
    """mean_ci95 of the per-seed differences a[i] - b[i] (the same seeds, in the same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired difference of {len(a)} and {len(b)} values")
    return mean_ci95([x - y for x, y in zip(a, b)])


@dataclass
class Budget:
    """The declared tuning budget: method -> its list of settings (dicts of config overrides)."""
    grids: dict
    val_seeds: tuple = (0,)
    test_seeds: tuple = tuple(range(5))
    select: str = "loss"            # the validation metric that picks the setting
    lower_is_better: bool = True
    baseline: str = "sft"
    metrics: tuple = field(default_factory=tuple)  # test metrics to report (default: all evaluate returns)

    def check(self, min_test_seeds=5):
        sizes = {m: len(g) for m, g in self.grids.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"unequal tuning budgets (settings per method): {sizes}")
        if len(self.test_seeds) < min_test_seeds:
            raise ValueError(f"{len(self.test_seeds)} test seeds; the protocol needs at least {min_test_seeds}")
        return self


def setting_label(setting):
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "(defaults)"


def run_protocol(budget, evaluate_many, min_test_seeds=5, log=print):
    """Tune on validation, test the chosen settings; returns the results dict (see the module text).

    evaluate_many(jobs) -> list of {metric: float}, one per job (method, setting, split, seed), split
    'validation' or 'test'; all validation jobs come in one call, then all test jobs, so an experiment
    may run them in parallel. Keys starting with "_" are bookkeeping, summed into the method's budget
    and not reported as metrics: "_cpu_s" (the CPU seconds the job took) and "_runs" (the training runs
    it made, e.g. one per map; 1 when absent)."""
    budget.check(min_test_seeds)
    jobs = [(m, st, "validation", seed) for m, grid in budget.grids.items() for st in grid for seed in budget.val_seeds]
    scores = dict(zip(_keys(jobs), evaluate_many(jobs)))
    results = {}
    for method, grid in budget.grids.items():
        val = []
        for setting in grid:
            mine = [scores[_key(method, setting, "validation", s)] for s in budget.val_seeds]
            val.append({"setting": setting, budget.select: statistics.fmean(x[budget.select] for x in mine)})
            log(f"{method} [{setting_label(setting)}] validation {budget.select} = {val[-1][budget.select]:.4g}")
        pick = (min if budget.lower_is_better else max)(range(len(val)), key=lambda i: val[i][budget.select])
        mine = [scores[_key(method, st, "validation", s)] for st in grid for s in budget.val_seeds]
        results[method] = {"chosen": grid[pick], "validation": val,
                           "budget": {"settings": len(grid), "validation_runs": sum(x.get("_runs", 1) for x in mine),
                                      "tuning_cpu_s": sum(x.get("_cpu_s", 0.0) for x in mine)}}
    jobs = [(m, r["chosen"], "test", s) for m, r in results.items() for s in budget.test_seeds]
    scores = dict(zip(_keys(jobs), evaluate_many(jobs)))
    for method, r in results.items():
        per_seed = [scores[_key(method, r["chosen"], "test", s)] for s in budget.test_seeds]
        names = budget.metrics or tuple(k for k in per_seed[0] if not k.startswith("_"))
        r["budget"]["test_runs"] = sum(x.get("_runs", 1) for x in per_seed)
        r["budget"]["cpu_s"] = r["budget"]["tuning_cpu_s"] + sum(x.get("_cpu_s", 0.0) for x in per_seed)
        r["test"] = {k: mean_ci95([x[k] for x in per_seed]) for k in names}
        log(f"{method}: chose [{setting_label(r['chosen'])}]; test " + ", ".join(
            f"{k} {v['mean']:.4g} [{v['ci95'][0]:.4g}, {v['ci95'][1]:.4g}]" for k, v in r["test"].items()))
    base = results.get(budget.baseline)
    if base is not None:
        for method, r in results.items():
            if method != budget.baseline:
                r[f"paired_vs_{budget.baseline}"] = {k: paired(r["test"][k]["per_seed"], base["test"][k]["per_seed"])
                                                     for k in r["test"]}
    return results


def _key(method, setting, split, seed):
    return method, json.dumps(setting, sort_keys=True), split, seed


def _keys(jobs):
    return [_key(*j) for j in jobs]


def _fmt(stat, digits=4):
    lo, hi = stat["ci95"]
    return f"{stat['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def write_report(results, out, title, notes="", metric_notes=None, baseline="sft"):
    """out/results.json, out/report.md (chosen settings marked, mean [95% CI], paired differences
    against the baseline, the budget) and out/protocol.png (each test metric's mean with its interval)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out / "results.json")
    methods = list(results)
    metrics = list(results[methods[0]]["test"])
    n = len(results[methods[0]]["test"][metrics[0]]["per_seed"])
    lines = [f"# {title}", "", notes, "",
             f"Test split, {n} seeds per method at its chosen setting: mean [95% t-interval over seeds].", "",
             "| method | chosen setting | " + " | ".join(metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for m in methods:
        r = results[m]
        lines.append(f"| {m} | **{setting_label(r['chosen'])}** | " + " | ".join(_fmt(r["test"][k]) for k in metrics) + " |")
    key = f"paired_vs_{baseline}"
    if any(key in r for r in results.values()):
        lines += ["", f"Paired differences against {baseline} (method − {baseline}, the same seeds): mean [95% CI]; "
                  "an interval that excludes 0 is a difference the seeds resolve.", "",
                  "| method | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for m in methods:
            if key in results[m]:
                lines.append(f"| {m} − {baseline} | " + " | ".join(_fmt(results[m][key][k]) for k in metrics) + " |")
    if metric_notes:
        lines += [""] + [f"- `{k}`: {v}" for k, v in metric_notes.items()]
    lines += ["", "Tuning budget (the same number of settings for every method; validation split only):", "",
              "| method | settings tried (validation score; chosen in bold) | runs (validation + test) | CPU s (tuning / all) |",
              "|---|---|---|---|"]
    for m in methods:
        r, b = results[m], results[m]["budget"]
        sel = [k for k in r["validation"][0] if k != "setting"][0]
        tried = "; ".join((f"**{setting_label(v['setting'])}: {v[sel]:.4g}**" if v["setting"] == r["chosen"]
                           else f"{setting_label(v['setting'])}: {v[sel]:.4g}") for v in r["validation"])
        lines.append(f"| {m} | {tried} | {b['validation_runs']} + {b['test_runs']} | "
                     f"{b['tuning_cpu_s']:.0f} / {b['cpu_s']:.0f} |")
    plot_metrics(results, out / "protocol.png", title)
    lines += ["", "![test metrics, mean and 95% interval per method](protocol.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def plot_metrics(results, path, title):
    """One panel per test metric: each method's mean with its 95% interval, and every seed's value."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    metrics = list(results[methods[0]]["test"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
    for ax, k in zip(axes[0], metrics):
        for i, m in enumerate(methods):
            s = results[m]["test"][k]
            ax.errorbar([i], [s["mean"]], yerr=[[s["mean"] - s["ci95"][0]], [s["ci95"][1] - s["mean"]]],
                        fmt="o", color=f"C{i}", capsize=4)
            ax.scatter([i + 0.15] * len(s["per_seed"]), s["per_seed"], s=8, color=f"C{i}", alpha=0.4)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(k, fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
