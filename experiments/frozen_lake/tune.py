"""The LLM Frozen Lake under experiments/protocol.py: equal tuning on validation maps, early stopping
on validation NLL, then seeds on the held-out test maps.

    python -m experiments.frozen_lake.tune --out runs/frozen_lake_protocol [--quick] [--jobs 2]

- Data (build_data.py): training maps, validation maps and test maps, pairwise disjoint. A tuning run
  trains on the training maps and evaluates on the validation maps (data/validation); a test run
  trains on the same training maps and is played on the test maps (data).
- Tuning: every setting of a method's declared grid (the same number of settings per method) trains
  for at most MAX_EXAMPLES examples with a constant learning rate after warm-up, evaluating the
  held-out NLL of the chosen answer (`nll`, the same for every loss) every EVAL_EVERY examples. The
  setting's score is its lowest validation NLL, and the point where it was reached is where that
  setting stops: training "until held-out NLL stops improving". With a constant learning rate a run
  stopped there is exactly the first part of the longer run.
- Test: the chosen setting trains to its stopping point with each test seed (`python train.py`, one
  process per run), then plays the test maps (evaluate_env.py with the two extra measures: next-move
  quality at every cell, and recovery after a forced detour).
- DPO is the paper's sequential recipe: DPO from an SFT model, which is also its reference. Its SFT
  stage is SFT's own chosen setting trained to SFT's stopping point (one stage per seed, trained on
  the training maps; test seed k's DPO starts from stage seed k, the tuning runs from stage seed 0).
  DPO's grid and stopping point then count from there: it sees SFT's examples plus its own, as in
  the paper. The tuning stage is trained for DPO (evaluated on the validation maps only; its CPU is
  DPO's); a test seed's stage is SFT's own test run of that seed, the same weights (sft_stage).
Writes OUT/results.json, OUT/report.md, OUT/protocol.png and OUT/nll_curves.png.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from experiments import protocol

REPO = Path(__file__).resolve().parents[2]

FULL = dict(n_train=4000, n_val=50, n_test=100, max_examples=4096, eval_every=256, batch=32, test_seeds=5)
QUICK = dict(n_train=256, n_val=8, n_test=8, max_examples=64, eval_every=32, batch=16, test_seeds=5)

METRIC_NOTES = {
    "success_rate": "fraction of the test maps whose greedy answer, played in gymnasium, reaches G",
    "move_mse": "for every safe cell of a test map, the model's next-move distribution (L D R U, renormalised) after "
                "the shortest safe prefix reaching it, against equal mass on the optimal moves: mean squared "
                "difference; lower is better",
    "move_greedy_optimal": "fraction of those cells whose most probable move is optimal",
    "recovery_rate": "the answer forced to start with one safe non-optimal move; fraction of maps where the model's "
                     "greedy continuation still reaches G",
    "nll": "held-out NLL of the test maps' shortest paths at the end of training (per answer token mean)",
}


def grids(quick=False):
    """The declared budget: 2 settings per method (1 in quick mode). Learning rate for all; IFT's
    second setting moves lambda and gamma as well, ORPO's and DPO's beta. DPO starts from an SFT
    model (see the module text), hence its lower learning rates."""
    if quick:
        return {m: [{"lr": 2e-3}] for m in ("sft", "ift", "orpo", "dft", "asft")} | {"dpo": [{"lr": 1e-3}]}
    return {
        "sft": [{"lr": 2e-3}, {"lr": 4e-3}],
        "ift": [{"lr": 2e-3, "max_lambda": 0.2, "min_lambda": 0.2, "gamma": 0.95},
                {"lr": 4e-3, "max_lambda": 0.5, "min_lambda": 0.5, "gamma": 0.5}],
        "orpo": [{"lr": 2e-3, "beta": 0.1}, {"lr": 4e-3, "beta": 0.5}],
        "dft": [{"lr": 2e-3}, {"lr": 4e-3}],
        "asft": [{"lr": 2e-3, "kl_weight": 0.1}, {"lr": 4e-3, "kl_weight": 0.02}],
        "dpo": [{"lr": 5e-4, "beta": 0.1}, {"lr": 1e-3, "beta": 0.5}],
    }


def run_child(cmd, log):
    """Run cmd (a list) with its output in `log`; returns its CPU seconds (user + system, its own and
    its children's). Raises with the log's tail when it fails. Each child gets a datasets cache of its
    own (next to its log, removed when it succeeds): runs in parallel that tokenise the same data
    would otherwise write the same cache folder at once, and one can delete the other's files."""
    import shutil
    import tempfile

    cache = tempfile.mkdtemp(prefix=Path(log).stem + ".", suffix=".hf_cache", dir=Path(log).parent)
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                env=dict(os.environ, HF_DATASETS_CACHE=cache))
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode == 0:
        shutil.rmtree(cache, ignore_errors=True)
    else:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed; see {log}:\n" + Path(log).read_text()[-2000:])
    return usage.ru_utime + usage.ru_stime


def eval_curve(run_dir):
    """[(examples, nll)] of the run's evaluations, in order."""
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl") if line.strip()]
    return [(r["examples"], r["nll"]) for r in rows if r.get("split") == "eval"]


class Experiment:
    def __init__(self, out, quick, jobs, python=sys.executable):
        from experiments.frozen_lake import build_data

        self.out, self.jobs, self.python = Path(out), jobs, python
        self.size = QUICK if quick else FULL
        self.data = self.out / "data"
        build_data.build(self.data, self.size["n_train"], self.size["n_test"], seed=0, n_val=self.size["n_val"])
        self.stop = {}  # (method, setting) -> examples where its validation NLL was lowest
        self.sft_chosen = None  # SFT's chosen setting: DPO's SFT stage
        (self.out / "logs").mkdir(parents=True, exist_ok=True)

    def args(self, method, setting, seed, data, examples, run_dir):
        s = self.size
        return [self.python, "train.py", f"loss={method}", "model=tiny", "model.from_scratch=true", "device=cpu",
                f"datasets=[{data}]", "optimizer=AdamW", "lr_schedule=constant", "warmup_steps=10",
                "max_grad_norm=1.0", f"batch_size={s['batch']}", "n_epochs=100", f"n_examples={examples}",
                f"eval_every={s['eval_every']}", "n_eval_examples=null", "eval_batch_size=100", "max_length=128",
                "max_prompt_length=112", f"seed={seed}", f"run_dir={run_dir}"] + [f"{k}={v}" for k, v in setting.items()]

    def run_dir(self, method, setting, split, seed):
        label = re.sub(r"[^A-Za-z0-9._-]", "", "_".join(f"{k}{v}" for k, v in setting.items()))  # no "=": Hydra grammar
        return self.out / "runs" / split / method / label / f"seed{seed}"

    def sft_stage(self, seed):
        """DPO's SFT stage for `seed`: SFT's chosen setting trained to SFT's stopping point on the
        training maps (evaluated on the validation maps only). Where SFT's test run of that seed has
        finished, it is the stage (the same seed, training maps and stopping point give the same
        weights; the evaluation data do not touch training), linked rather than trained again, and its
        CPU stays in SFT's budget. Returns (final model dir, the stage's CPU s charged to DPO)."""
        run = self.run_dir("sft", self.sft_chosen, "stage", seed)
        done = run / "stage.json"
        if not done.is_file():
            if run.exists():
                import shutil
                shutil.rmtree(run)
            run.mkdir(parents=True)
            stop = self.stop[("sft", json.dumps(self.sft_chosen, sort_keys=True))]
            sft_test = self.run_dir("sft", self.sft_chosen, "test", seed)
            if (sft_test / "protocol_scores.json").is_file():
                (run / "final").symlink_to(os.path.relpath(sft_test / "final", run))
                cpu = 0.0
            else:
                run.rmdir()  # train.py makes its run directory
                cpu = run_child(self.args("sft", self.sft_chosen, seed, self.data / "validation", stop, run),
                                self.out / "logs" / f"stage_sft_seed{seed}.log")
            done.write_text(json.dumps({"_cpu_s": cpu, "examples": stop}))
        return run / "final", json.loads(done.read_text())["_cpu_s"]

    def one(self, job):
        method, setting, split, seed = job
        run = self.run_dir(method, setting, split, seed)
        done = run / "protocol_scores.json"
        if done.is_file():  # finished by an earlier invocation
            return json.loads(done.read_text())
        if run.exists():
            import shutil
            shutil.rmtree(run)
        run.parent.mkdir(parents=True, exist_ok=True)
        log = self.out / "logs" / f"{split}_{method}_{run.parent.name}_seed{seed}.log"
        key = (method, json.dumps(setting, sort_keys=True))
        extra, stage_cpu, runs = [], 0.0, 1
        if method == "dpo":  # from its SFT stage (also its reference); its CPU is charged to the test seed using it
            stage, cpu = self.sft_stage(seed if split == "test" else 0)
            extra = ["model.from_scratch=false", f"model.name_or_path={stage}"]
            stage_cpu, runs = (cpu, 2) if split == "test" else (0.0, 1)
        if split == "validation":
            cpu = run_child(self.args(method, setting, seed, self.data / "validation", self.size["max_examples"], run)
                            + extra, log)
            curve = eval_curve(run)
            examples, nll = min(curve, key=lambda x: x[1])
            scores = {"nll": nll, "stop_examples": max(examples, self.size["batch"]), "curve": curve, "_cpu_s": cpu}
        else:
            stop = self.stop[key]
            cpu = run_child(self.args(method, setting, seed, self.data, stop, run) + extra, log)
            cpu += run_child([self.python, "-m", "experiments.frozen_lake.evaluate_env", "--data", str(self.data),
                              "--measures", str(run)], log)
            task = json.loads((run / "task_metrics.json").read_text())
            scores = {k: task[k] for k in ("success_rate", "move_mse", "move_greedy_optimal", "recovery_rate")}
            scores.update(nll=eval_curve(run)[-1][1], curve=eval_curve(run), _cpu_s=cpu + stage_cpu, _runs=runs)
        tmp = done.with_name(".protocol_scores.json.tmp")
        tmp.write_text(json.dumps(scores))
        tmp.replace(done)
        return scores

    def evaluate_many(self, jobs):
        """Every job in a pool of `jobs` threads (each runs its child processes); DPO's jobs after the
        others, since their SFT stage needs SFT's chosen setting and stopping point."""
        first = [i for i, j in enumerate(jobs) if j[0] != "dpo"]
        later = [i for i, j in enumerate(jobs) if j[0] == "dpo"]
        scores = [None] * len(jobs)
        with ThreadPoolExecutor(self.jobs) as pool:
            for wave in (first, later):
                if wave is later and later:
                    if self.sft_chosen is None:
                        self.choose_sft(jobs, scores)
                    seeds = {jobs[i][3] if jobs[i][2] == "test" else 0 for i in later}
                    list(pool.map(self.sft_stage, sorted(seeds)))
                for i, s in zip(wave, pool.map(self.one, [jobs[i] for i in wave])):
                    scores[i] = s
                    method, setting, split, _ = jobs[i]
                    if split == "validation":  # one validation seed: its best point is the setting's stopping point
                        self.stop[(method, json.dumps(setting, sort_keys=True))] = s["stop_examples"]
        return [{k: v for k, v in s.items() if k not in ("curve", "stop_examples")} for s in scores]

    def choose_sft(self, jobs, scores):
        """SFT's chosen setting by the protocol's rule (the lowest validation nll), for DPO's stage."""
        sft = [(s["nll"], j[1]) for j, s in zip(jobs, scores) if j[0] == "sft" and j[2] == "validation"]
        if not sft:
            raise ValueError("DPO's SFT stage is SFT's chosen setting: tune sft together with dpo (METHODS)")
        self.sft_chosen = min(sft, key=lambda x: x[0])[1]


def plot_curves(exp, results, path):
    """Validation NLL of every tuning run (the chosen setting's line solid, its stopping point marked),
    and the test runs' held-out NLL (mean over seeds) against training examples."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (method, r) in enumerate(results.items()):
        for v in r["validation"]:
            curve = eval_curve(exp.run_dir(method, v["setting"], "validation", 0))
            chosen = v["setting"] == r["chosen"]
            left.plot(*zip(*curve), color=f"C{i}", ls="-" if chosen else ":",
                      label=f"{method} {protocol.setting_label(v['setting'])}" + (" (chosen)" if chosen else ""))
            if chosen:
                left.axvline(exp.stop[(method, json.dumps(v["setting"], sort_keys=True))], color=f"C{i}", lw=0.6)
        curves = [eval_curve(exp.run_dir(method, r["chosen"], "test", s)) for s in range(len(r["test"]["nll"]["per_seed"]))]
        xs = [x for x, _ in curves[0]]
        right.plot(xs, [sum(c[j][1] for c in curves) / len(curves) for j in range(len(xs))], color=f"C{i}", label=method)
    left.set(xlabel="training examples", ylabel="validation nll", title="tuning runs (vertical: chosen stopping point)")
    right.set(xlabel="training examples", ylabel="test-map nll", title="test runs, chosen setting (mean over seeds)")
    left.legend(fontsize=6)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", 2)))
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--methods", default=None, help="a comma-separated subset of the grids' methods (default: all)")
    a = p.parse_args(argv)
    names = list(grids(a.quick)) if a.methods is None else a.methods.split(",")
    if unknown := [m for m in names if m not in grids(a.quick)]:
        p.error(f"unknown method(s) {unknown} in --methods; known: {','.join(grids(a.quick))}")
    if "dpo" in names and "sft" not in names:
        p.error("--methods: dpo needs sft as well (DPO's SFT stage is SFT's chosen setting)")
    methods = {m: grids(a.quick)[m] for m in names}
    t0 = time.time()
    exp = Experiment(a.out, a.quick, a.jobs, a.python)
    s = exp.size
    budget = protocol.Budget(methods, val_seeds=(0,), test_seeds=tuple(range(s["test_seeds"])), select="nll",
                             metrics=("success_rate", "move_mse", "move_greedy_optimal", "recovery_rate", "nll"))
    results = protocol.run_protocol(budget, exp.evaluate_many)
    wall = time.time() - t0
    for method, r in results.items():
        r["stop_examples"] = exp.stop[(method, json.dumps(r["chosen"], sort_keys=True))]
    stops = ", ".join(f"{m} {r['stop_examples']}" for m, r in results.items())
    notes = (f"The LLM Frozen Lake (the tiny model from scratch reads a map and writes its moves): {s['n_train']} "
             f"training maps, {s['n_val']} validation maps (tuning), {s['n_test']} test maps; batch {s['batch']}, "
             f"constant lr after 10 warm-up steps, at most {s['max_examples']} training examples, validation NLL every "
             f"{s['eval_every']}. Stopping points (examples, lowest validation NLL of the chosen setting): {stops}"
             + (" (DPO's counted from its SFT stage: SFT's chosen setting trained to SFT's stopping point). "
                if "dpo" in results else ". ") +
             f"Wall time {wall:.0f} s on a shared 2-core machine.")
    protocol.write_report(results, a.out, "LLM Frozen Lake under the equal-tuning protocol", notes=notes,
                          metric_notes=METRIC_NOTES)
    plot_curves(exp, results, Path(a.out) / "nll_curves.png")
    with open(Path(a.out) / "report.md", "a") as f:
        f.write("![validation NLL of the tuning runs and test NLL of the chosen settings](nll_curves.png)\n")
    print(notes)
    print(f"wrote {a.out}/results.json and report.md ({wall:.0f} s)")


if __name__ == "__main__":
    main()
