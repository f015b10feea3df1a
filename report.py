"""Compare runs: one report.md and PNG plots from run directories or sweep directories.

    python report.py runs/sft_seed0 runs/ift_seed0 ...        # run directories (report in ./report)
    python report.py runs/my_sweep                            # every run below a directory (-> runs/my_sweep/report)

A run is a directory holding config.yaml and metrics.jsonl (what train.py writes). Runs are grouped
by the config keys that change the math (config_schema.NOT_MATH declares the others, for resume too)
except the seed: the runs of one group are the seeds of one setting, and a group's label names what
differs between groups. A `model.name_or_path` that points at another run's final/ counts as
"final/ of a <loss> run", so the seeds of a sequential recipe (SFT, then DPO from each SFT seed)
form one group. A run without final/ is marked unfinished.

report.md holds, per group, the final evaluation's method-independent metrics (nll, margin,
pref_accuracy), the task score (task_metrics.json's success_rate, written by an experiment's
evaluation, or the exact match of samples.jsonl), training tokens/s and wall time, each as mean ± std
over seeds, and the plots:
    eval_nll.png              eval nll against training examples per group (mean line, band = ± std over seeds)
    lambda.png                IFT's lambda against the optimizer step, one line per IFT run
    relation_propagation.png  one held-out answer's Relation Propagation weight per token under a final IFT model
PNG files that runs wrote at their top level (an experiment's figures) are copied and shown too; those
an earlier report wrote there (listed in its .report_files) are not. A plot that cannot be drawn is
skipped with a line; the tables always come out.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

SHARED_METRICS = ("nll", "margin", "pref_accuracy")


# ---------------------------------------------------------------- reading runs

def find_runs(paths):
    """Run directories at or below each path, sorted; a path that holds none is an error."""
    runs = []
    for p in map(Path, paths):
        if not p.exists():
            raise SystemExit(f"report: {p} does not exist")
        found = sorted({m.parent for m in p.rglob("metrics.jsonl") if (m.parent / "config.yaml").is_file()})
        if not found:
            raise SystemExit(f"report: no run below {p} (a run directory holds config.yaml and metrics.jsonl)")
        runs += [r for r in found if r not in runs]
    return runs


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_run(path):
    """{'path', 'config' (flat dotted keys), 'train', 'eval' (metric rows), 'task' (dict or None), 'wall_s',
    'finished' (whether it wrote final/: a run stopped before that is reported as unfinished)}."""
    from omegaconf import OmegaConf

    config = flatten(OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=False))
    rows = []
    with open(path / "metrics.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"report: {path / 'metrics.jsonl'}: line {i}: invalid JSON ({e.msg})") from None
    task = None
    if (path / "task_metrics.json").is_file():
        task = json.loads((path / "task_metrics.json").read_text())
    elif (path / "samples.jsonl").is_file():
        samples = [json.loads(line) for line in open(path / "samples.jsonl", encoding="utf-8") if line.strip()]
        if samples:
            task = {"task": "exact match", "success_rate": sum(s["exact"] for s in samples) / len(samples)}
    train_rows = [r for r in rows if r.get("split") == "train"]
    # config.yaml is written when the data is ready, metrics.jsonl's last line when the run ends
    wall = (path / "metrics.jsonl").stat().st_mtime - (path / "config.yaml").stat().st_mtime
    return {"path": path, "config": config, "train": train_rows,
            "eval": [r for r in rows if r.get("split") == "eval"], "task": task, "wall_s": wall,
            "finished": (path / "final").is_dir()}


def _describe(key, value):
    """A config value as the grouping sees it: another run's final/ becomes 'final/ of a <loss> run'."""
    if isinstance(value, str) and key.endswith("name_or_path"):
        parent = Path(value).parent
        if Path(value).name == "final" and (parent / "config.yaml").is_file():
            from omegaconf import OmegaConf
            return f"final/ of a {OmegaConf.load(parent / 'config.yaml').loss.name} run"
    return value


ABSENT = "<absent>"  # a key the run's config does not have (another loss's keys, lora.* without LoRA)


def grouping_keys(runs):
    """The config keys that tell settings apart: those that change the math (config_schema.NOT_MATH,
    the declaration resume uses too), less the seed, which is pooled."""
    from training.config_schema import changes_the_math

    return sorted(k for k in {k for r in runs for k in r["config"]} if k != "seed" and changes_the_math(k))


def group_runs(runs):
    """{label: [runs]} in a stable order, and the config keys that differ between runs.

    Runs with the same values of every key that changes the math (the seed aside) form a group. A
    label is the loss ('sft → dpo' for a run that starts from an SFT run's final/), 'LoRA' when some
    groups use it and others do not, and key=value for each key where the group departs from the
    value most groups share (every group shows it when no value is shared by most). A key only some
    groups have (another loss's keys, lora.*) is compared among those that have it, so no run is
    labelled by a key it does not have."""
    keys = grouping_keys(runs)
    described = [{k: _describe(k, r["config"].get(k, ABSENT)) for k in keys} for r in runs]
    encode = lambda v: json.dumps(v, sort_keys=True, default=str)  # noqa: E731
    signatures = {}
    for run, d in zip(runs, described):
        signatures.setdefault(encode(d), (d, []))[1].append(run)
    differing = [k for k in keys if len({encode(d[k]) for d in described}) > 1]
    settings = [d for d, _ in signatures.values()]
    some_lora = len({_uses_lora(rs[0]) for _, rs in signatures.values()}) > 1
    groups = {}
    for d, rs in signatures.values():
        label = str(d.get("loss.name", "run"))
        start = str(d.get("model.name_or_path", ""))
        implied = set()
        if start.startswith("final/ of a "):
            label = f"{start.split()[3]} → {label}"
            implied = {"model.name_or_path", "model.from_scratch"}  # the start is in the label already
        parts = [label] + (["LoRA"] if some_lora and _uses_lora(rs[0]) else [])
        parts += [f"{_short(k)}={_show(d[k])}" for k in differing
                  if k not in ("loss.name", "lora", *implied) and _departs(d, k, settings)]
        groups[", ".join(parts)] = rs
    return groups, differing


def _departs(setting, key, settings):
    """Whether a group's value of `key` is worth its label: it has the key, groups that have it differ,
    and its value is not the one most of them share."""
    if setting[key] == ABSENT:
        return False
    counts = {}
    for s in settings:
        if s[key] != ABSENT:
            value = json.dumps(s[key], sort_keys=True, default=str)
            counts[value] = counts.get(value, 0) + 1
    if len(counts) < 2:
        return False
    top = sorted(counts.values(), reverse=True)
    usual = [v for v, n in counts.items() if n == top[0]] if top[0] > top[1] else []
    return json.dumps(setting[key], sort_keys=True, default=str) not in usual


def _uses_lora(run):
    return any(k.startswith("lora.") for k in run["config"])


def _short(key):
    """A key as users write it on the command line: loss keys without `loss.` (train.py accepts them short)."""
    return key[len("loss."):] if key.startswith("loss.") else key


def _show(value):
    """A config value in a label: lists as [a, b], paths by their last parts."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, str) and os.sep in value and len(value) > 40:
        return "…/" + "/".join(Path(value).parts[-2:])
    return str(value)


# ---------------------------------------------------------------- numbers

def mean_std(values):
    """'m ± s' over the non-missing values ('—' when none; ± 0 for one value)."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "—"
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    digits = 3 if abs(m) < 10 else 1 if abs(m) < 1000 else 0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def final_eval(run, key):
    rows = [r for r in run["eval"] if key in r]
    return rows[-1][key] if rows else None


def tokens_per_s(run):
    values = [r["tokens_per_s"] for r in run["train"] if "tokens_per_s" in r]
    return statistics.fmean(values) if values else None


def table(groups):
    head = ["group", "seeds", "eval nll", "eval margin", "eval pref_accuracy", "eval loss (own)", "task success",
            "train tokens/s", "wall time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, runs in groups.items():
        unfinished = sum(not r["finished"] for r in runs)
        cells = [label, f"{len(runs)} ({unfinished} unfinished)" if unfinished else str(len(runs))]
        cells += [mean_std([final_eval(r, k) for r in runs]) for k in (*SHARED_METRICS, "loss")]
        cells.append(mean_std([(r["task"] or {}).get("success_rate") for r in runs]))
        cells += [mean_std([tokens_per_s(r) for r in runs]), mean_std([r["wall_s"] for r in runs])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_table(groups):
    """Every numeric field of the runs' task_metrics.json (an experiment's own score), mean ± std."""
    fields = []
    for runs in groups.values():
        for r in runs:
            for k, v in (r["task"] or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in fields:
                    fields.append(k)
    if not fields:
        return None
    lines = ["| group | seeds | " + " | ".join(fields) + " |", "|" + "---|" * (len(fields) + 2)]
    for label, runs in groups.items():
        lines.append(f"| {label} | {len(runs)} | "
                     + " | ".join(mean_std([(r["task"] or {}).get(k) for r in runs]) for k in fields) + " |")
    return "\n".join(lines)


def settings_table(groups, differing):
    keys = [k for k in differing if k not in ("loss.name", "lora")]
    if not keys:
        return None
    lines = ["| group | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for label, runs in groups.items():
        values = [_describe(k, runs[0]["config"].get(k, ABSENT)) for k in keys]
        lines.append(f"| {label} | " + " | ".join("—" if v == ABSENT else _show(v) for v in values) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def legend_below(ax, handles=None, labels=None):
    """The legend under the axes, where it covers no curve, with long labels wrapped; saved figures
    use bbox_inches='tight', so the legend is inside the image whatever its length."""
    import textwrap

    handles, labels = (handles, labels) if handles is not None else ax.get_legend_handles_labels()
    labels = [textwrap.fill(label, 70) for label in labels]
    return ax.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16),
                     ncol=2 if len(labels) > 3 else 1, frameon=False)


def save_figure(fig, path):
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)


def plot_eval_curves(groups, path):
    """Eval nll (or, where no run logged it, each method's own eval loss) against training examples."""
    import numpy as np

    shared = any("nll" in r for runs in groups.values() for run in runs for r in run["eval"])
    key = "nll" if shared else "loss"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in groups.items():
        curves = [{r["examples"]: r[key] for r in run["eval"] if key in r} for run in runs]
        xs = sorted(set.intersection(*[set(c) for c in curves])) if curves and all(curves) else []
        if not xs:
            continue
        ys = np.array([[c[x] for x in xs] for c in curves])
        mean, std = ys.mean(0), ys.std(0, ddof=1) if len(ys) > 1 else np.zeros(len(xs))
        line, = ax.plot(xs, mean, marker="o", markersize=3, label=f"{label} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training examples seen")
    if shared:
        ax.set_ylabel("eval NLL of the chosen answer (nats per token)")
        ax.set_title("Held-out NLL during training (mean over seeds, band = ± 1 std)")
    else:
        ax.set_ylabel("eval loss, the method's own (nats)")
        ax.set_title("Held-out loss during training (each method's own loss: not comparable across methods;\n"
                     "no run logged the shared `nll`); mean over seeds, band = ± 1 std", fontsize=9)
    ax.set_yscale("log")  # losses fall by orders of magnitude from a random start
    from matplotlib.ticker import FormatStrFormatter
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.grid(alpha=0.3, which="both")
    legend_below(ax)
    save_figure(fig, path)


def plot_lambda(groups, path):
    """IFT's lambda per optimizer step; returns False when no run logged one."""
    runs = [(label, run) for label, rs in groups.items() for run in rs if any("lambda" in r for r in run["train"])]
    if not runs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, run in runs:
        rows = [r for r in run["train"] if "lambda" in r]
        ax.plot([r["step"] for r in rows], [r["lambda"] for r in rows], linewidth=1,
                label=f"{label}, seed {run['config'].get('seed')}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("λ (dimensionless)")
    ax.set_title("IFT's λ, the weight of the model's own guess in its input\n(as applied at each step, "
                 "disturbance included)", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    legend_below(ax)
    save_figure(fig, path)
    return True


def relation_propagation_example(run, row_index=0):
    """(tokens, weights, token NLLs) for held-out row `row_index` of an IFT run, under its final/ model,
    computed as IFT's loss does at the end of training: the intuition pass, the blended pass with the
    final undisturbed lambda, then losses.relation_propagation_weights with the run's settings."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    import losses
    from forward import ModelCall
    from training.batching import collate
    from training.modeling import load_tokenizer
    from training.tokenization import load_split

    cfg = OmegaConf.load(run["path"] / "config.yaml")
    cfg.model.tokenizer_name_or_path = str(run["path"] / "final")
    tokenizer = load_tokenizer(cfg)
    data = load_split(list(cfg.datasets), "test", tokenizer, cfg.max_length, cfg.max_prompt_length, pairs=False,
                      dataset_paths=OmegaConf.to_container(cfg.dataset_paths) if cfg.dataset_paths else None)
    model = AutoModelForCausalLM.from_pretrained(str(run["path"] / "final"), dtype=torch.float32).eval()
    batch = collate(data, [row_index], tokenizer.pad_token_id)
    lam = [r["lambda"] for r in run["eval"] if "lambda" in r]
    lam = lam[-1] if lam else cfg.loss.max_lambda
    with torch.no_grad():
        args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        call = ModelCall()
        intuitive = call.intuition(model, *args)[0] if lam > 0 else None
        logps, mask = call.logps(model, *args, intuitive_ids=intuitive, lam=lam)
        w = losses.relation_propagation_weights(logps, mask, cfg.loss.gamma, cfg.loss.propagation_type,
                                                cfg.loss.propagation_side, cfg.loss.propagation_norm)
    targets = batch["labels"][0, 1:][mask[0]]
    tokens = [tokenizer.decode([int(t)]) for t in targets]
    return tokens, w[0][mask[0]].tolist(), (-logps[0][mask[0]]).tolist(), lam, cfg


def plot_relation_propagation(run, path):
    import numpy as np

    tokens, weights, nll, lam, cfg = relation_propagation_example(run)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.5, 0.35 * len(tokens) + 2), 4.5))
    x = np.arange(len(tokens))
    ax.bar(x, weights, color="#1f77b4", label="Relation Propagation weight w_t (left axis; mean 1)")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(x, [repr(t)[1:-1] or "␣" for t in tokens], rotation=90 if len(tokens) > 12 else 0, fontsize=8)
    ax.set_xlabel("answer token (held-out row 0)")
    ax.set_ylabel("weight w_t (dimensionless)")
    ax2 = ax.twinx()
    ax2.plot(x, nll, color="#d62728", marker="o", markersize=3, label="−log p(token) (right axis)")
    ax2.set_ylabel("token NLL (nats)")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    legend = legend_below(ax, handles, [h.get_label() for h in handles])
    legend.set_bbox_to_anchor((0.5, -0.22 if len(tokens) <= 12 else -0.3), transform=ax.transAxes)
    ax.set_title(f"What IFT emphasises: token weights under the final model of {run['path'].name}\n"
                 f"(λ = {lam:g}, γ = {cfg.loss.gamma}, {cfg.loss.propagation_type} / "
                 f"{cfg.loss.propagation_side} / {cfg.loss.propagation_norm})", fontsize=10)
    save_figure(fig, path)
    return tokens, weights


# ---------------------------------------------------------------- report.md

MANIFEST = ".report_files"  # in the output folder: what report.py wrote there, never read back as a run's figure


def write_report(paths, out):
    """report.md and its plots in `out`. The tables come first and always; a plot that cannot be drawn
    (a run's data or model moved, say) is skipped with a line saying why."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(p) for p in find_runs(paths)]
    groups, differing = group_runs(runs)
    written = []
    md = ["# Report", "",
          f"{len(runs)} run(s) in {len(groups)} group(s) (seeds pooled; the settings that tell groups apart "
          "are listed under Settings). "
          "Numbers are mean ± std over seeds (sample std; ± 0 for one seed), at each run's last evaluation: the "
          "final one, except for runs counted as unfinished (stopped before final/; see Runs).", "",
          "`nll` is the held-out per-token mean NLL of the chosen answer, `margin` the mean of log p(chosen) − "
          "log p(rejected) (per-token means) and `pref_accuracy` the fraction of held-out pairs with the chosen answer "
          "more likely: the same computation for every method (λ = 0, no weights). `eval loss (own)` is each "
          "method's own loss and is not comparable across methods. Task success is an experiment's score "
          "(task_metrics.json) or greedy exact match (samples.jsonl); wall time runs from config.yaml to the "
          "last metrics line.", "", table(groups), ""]
    extra = task_table(groups)
    if extra:
        md += ["## Task metrics", "", extra, ""]
    settings = settings_table(groups, differing)
    figures = []

    def plot(title, name, draw, text=()):
        """Draw one figure into out/name and add its section; on any error, a line instead."""
        try:
            result = draw(out / name)
        except Exception as e:  # noqa: BLE001 - a figure is never worth losing the report over
            line = f"{name} skipped: {type(e).__name__}: {e}".splitlines()[0]
            print(f"report: {line}", file=sys.stderr)
            figures.extend([f"## {title}", "", f"({line})", ""])
            return
        if result is False:
            return
        written.append(name)
        figures.extend([f"## {title}", "", *(text(result) if callable(text) else text), f"![{name}]({name})", ""])

    plot("Held-out NLL during training", "eval_nll.png", lambda path: plot_eval_curves(groups, path))
    plot("IFT's λ", "lambda.png", lambda path: plot_lambda(groups, path))
    ift = [r for rs in groups.values() for r in rs if r["config"].get("loss.name") == "ift" and r["finished"]]
    if ift:
        run = min(ift, key=lambda r: (r["config"].get("seed", 0), str(r["path"])))

        def emphasis(result):
            tokens, weights = result
            top = sorted(range(len(tokens)), key=lambda i: -weights[i])[:3]
            return [f"Relation Propagation weight of each token of the first held-out answer under the final model "
                    f"of `{run['path'].name}`; the heaviest tokens are "
                    + ", ".join(f"#{i} `{tokens[i]!r}` ({weights[i]:.2f})" for i in top) + ".", ""]
        plot("What IFT emphasises", "relation_propagation.png", lambda path: plot_relation_propagation(run, path),
             emphasis)
    md += figures
    copied = []
    for label, rs in groups.items():
        run = min(rs, key=lambda r: (r["config"].get("seed", 0), str(r["path"])))
        ours = {p.resolve() for p in [*report_outputs(run["path"]), *(out / name for name in written)]}
        for png in sorted(p for p in run["path"].glob("*.png") if p.resolve() not in ours):  # not a report's own
            name = f"{run['path'].name}_{png.name}"
            shutil.copyfile(png, out / name)
            written.append(name)
            copied.append(f"**{label}** (`{run['path'].name}`)\n\n![{name}]({name})\n")
    if copied:
        md += ["## Figures written by the runs (lowest seed of each group)", ""] + copied
    if settings:
        md += ["## Settings", "", "The config keys that change the math (config_schema.NOT_MATH lists those that do "
               "not) and whose values differ between runs, besides the seed; — = the run has no such key (another "
               "loss's key, or LoRA's without LoRA).", "", settings, ""]
    md += ["## Runs", ""] + [f"- `{r['path']}`" + ("" if r["finished"] else _unfinished(r)) for r in runs] + [""]
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(md), encoding="utf-8")
    tmp.replace(out / "report.md")
    (out / MANIFEST).write_text("".join(f"{name}\n" for name in ["report.md", *written]), encoding="utf-8")
    return out / "report.md"


def report_outputs(folder):
    """The files an earlier report.py wrote into `folder` (its manifest), so they are not taken for the
    run's own figures."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return []
    return [Path(folder) / name for name in manifest.read_text(encoding="utf-8").split()]


def _unfinished(run):
    last = max((r["step"] for r in run["train"]), default=0)
    evals = [r["step"] for r in run["eval"]]
    return (f" — **unfinished** (no final/): trained to step {last}"
            + (f", last evaluated at step {evals[-1]}" if evals else ", never evaluated"))


# `python report.py --protocol NAME --out DIR [--quick]` runs an experiment's whole equal-tuning protocol
# (experiments/protocol.py): tuning on validation, seeds at the chosen settings, report.md with intervals.
PROTOCOLS = {"frozen_lake_paper": "experiments.frozen_lake_paper.run", "frozen_lake": "experiments.frozen_lake.tune"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--protocol"]:
        if len(argv) < 2 or argv[1] not in PROTOCOLS:
            raise SystemExit(f"report: --protocol takes one of {', '.join(PROTOCOLS)}, got {argv[1:2] or 'nothing'}")
        import importlib
        return importlib.import_module(PROTOCOLS[argv[1]]).main(argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="run directories, or directories with runs below them (sweeps)")
    p.add_argument("--out", help="where report.md and the plots go (default: PATH/report for the one path given, "
                                 "else ./report)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = a.out or (Path(a.paths[0]) / "report" if len(a.paths) == 1 else "report")
    print(f"report: {write_report(a.paths, out)}")


if __name__ == "__main__":
    sys.exit(main())
