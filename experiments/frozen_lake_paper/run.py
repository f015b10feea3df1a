"""The paper's Frozen Lake, every method through train.py's own code, under experiments/protocol.py.

    python -m experiments.frozen_lake_paper.run --out runs/frozen_lake_paper [--quick] [--jobs 2]

One training run = one method, one setting, one map, one seed: `pipeline.run` (what `python train.py`
runs after composing its config) on the map's single (optimal, sub-optimal) row, from a zero-layer
Mistral with random weights (build.py), then the final policy's transition matrix is scored against
value iteration's (lake.py). Runs are done in this process and its worker processes, not as
hundreds of `python train.py` commands, only to save the interpreter start-up of each; the config is
composed by Hydra from config/ exactly as the command line would, and checked by
`pipeline.validate_config`. A run directory that already holds scores.json is reused, so a stopped
sweep continues where it stopped.

Protocol: validation maps (lake.VALIDATION_MAPS) choose each method's setting from its declared grid
(the same number of settings for every method), then the chosen setting runs on the 20 test maps
(lake.TEST_MAPS) with 10 seeds. A seed's score is the mean over the maps.
"""

import argparse
import contextlib
import json
import os
import re
import time
from pathlib import Path

METRIC_NOTES = {
    "mse": "mean over the non-terminal states s and all states s' of (P(s'|s) − P*(s'|s))², P the policy's "
           "transition matrix (softmax of its logits over the states one move reaches), P* value iteration's; lower is better",
    "greedy_optimal": "fraction of non-terminal states whose most probable next state is one an optimal move reaches",
    "solved": "fraction of maps where the greedy policy, followed from S, reaches G",
}

STEPS = 20          # optimizer steps of one run (batch 1: the map's one row); the paper gives no number
QUICK_STEPS = 10


def grids(quick=False):
    """The declared tuning budget: 8 settings per method (1 in quick mode), all six methods. The grids
    span the learning rates 1e-3 to 3e-2 (DPO's 3e-4 to 1e-2, where its best lies); SFT and DFT, whose
    one knob is the learning rate, spend their 8 tries on 8 learning rates, the others on 4 learning
    rates x 2 values of their own knobs (IFT's (lambda, gamma), DPO's and ORPO's beta, ASFT's KL weight:
    the authors' 0.1 and a lighter 0.02, since here its anchor is the random initialisation)."""
    if quick:
        return {m: [{"lr": 1e-2}] for m in ("sft", "ift", "dpo", "orpo", "dft", "asft")}
    lrs = [1e-3, 3e-3, 1e-2, 3e-2]
    dense = [1e-3, 2e-3, 3e-3, 5e-3, 7e-3, 1e-2, 2e-2, 3e-2]
    dpo_lrs = [3e-4, 1e-3, 3e-3, 1e-2]  # shifted down: DPO's best was 1e-3 on [1e-3, 3e-2], the grid's edge
    return {
        "sft": [{"lr": lr} for lr in dense],
        "ift": [{"lr": lr, "max_lambda": lam, "min_lambda": lam, "gamma": g} for lr in lrs
                for lam, g in ((0.2, 0.95), (0.5, 0.5))],
        "dpo": [{"lr": lr, "beta": b} for lr in dpo_lrs for b in (0.1, 0.5)],
        "orpo": [{"lr": lr, "beta": b} for lr in lrs for b in (0.1, 0.5)],
        "dft": [{"lr": lr} for lr in dense],
        "asft": [{"lr": lr, "kl_weight": w} for lr in lrs for w in (0.1, 0.02)],
    }


def compose(method, setting, model_dir, data_dir, steps):
    """The run config (a plain dict) as `python train.py loss=METHOD key=value ...` composes it, checked
    with data_dir as its dataset; datasets, seed and run_dir are filled in per run."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    from training import config_schema, pipeline

    overrides = [f"loss={method}", "model=tiny", f"model.name_or_path={model_dir}", "model.from_scratch=true",
                 "device=cpu", "optimizer=AdamW", "lr_schedule=constant", "warmup_steps=0",
                 "batch_size=1", "eval_batch_size=1", f"n_examples={steps}", f"n_epochs={steps}",
                 f"eval_every={10 * steps}", "do_first_eval=false", "n_eval_examples=1", "max_length=64",
                 "max_prompt_length=8", "loss_chunk_tokens=null", f"datasets=[{data_dir}]"]
    overrides += [f"{k}={v}" for k, v in setting.items()]
    with initialize_config_dir(config_dir=str(config_schema.CONFIG_DIR), version_base=None):
        cfg = hydra_compose("config", overrides=config_schema.expand_short_overrides(overrides))
    pipeline.validate_config(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def policy_logits(model_dir, desc):
    """(nS, nS) logits of the trained policy: row s = its logits for every state token at state s's token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from experiments.frozen_lake_paper.build import state_token

    logging.disable_progress_bar()

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    ids = tok.convert_tokens_to_ids([state_token(s) for s in range(len(desc) * len(desc[0]))])
    with torch.no_grad():  # one-token sequences: the zero-layer model is Markov, context would not matter
        logits = model(input_ids=torch.tensor(ids)[:, None]).logits[:, 0, :]
    return logits[:, ids].numpy()


def train_and_score(task):
    """One run (task: cfg dict, map, run_dir, data_dir): train, score, write scores.json; returns scores."""
    import torch

    from experiments.frozen_lake_paper import lake
    from training import pipeline

    cfg, desc, run_dir, data_dir = task
    done = Path(run_dir) / "scores.json"
    if done.is_file():
        return json.loads(done.read_text())
    if Path(run_dir).exists():  # an unfinished attempt
        import shutil
        shutil.rmtree(run_dir)
    Path(run_dir).parent.mkdir(parents=True, exist_ok=True)
    cpu0 = time.process_time()
    torch.set_num_threads(1)
    cfg = {**cfg, "datasets": [str(data_dir)], "run_dir": str(run_dir)}
    log = Path(str(run_dir) + ".log")
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        pipeline.run(cfg)
    log.unlink()
    P = lake.policy_transitions(desc, policy_logits(Path(run_dir) / "final", desc))
    scores = {**lake.scores(desc, P), "_cpu_s": time.process_time() - cpu0}
    tmp = done.with_name(".scores.json.tmp")
    tmp.write_text(json.dumps(scores))
    tmp.replace(done)
    return scores


def _init_worker():
    import torch
    torch.set_num_threads(1)


class Experiment:
    """evaluate_many for the protocol: every (job, map) run, in a pool of `jobs` processes."""

    def __init__(self, out, quick, jobs):
        from experiments.frozen_lake_paper import build, lake

        self.out, self.jobs = Path(out), jobs
        self.steps = QUICK_STEPS if quick else STEPS
        self.maps = {"validation": lake.VALIDATION_MAPS[:1] if quick else lake.VALIDATION_MAPS,
                     "test": lake.TEST_MAPS[:1] if quick else lake.TEST_MAPS}
        self.model_dir = build.build_model_dir(self.out / "model")
        self.data = {split: [build.write_map_data(self.out / "data" / f"{split}_map{i}", d) for i, d in enumerate(maps)]
                     for split, maps in self.maps.items()}
        self._cfgs = {}

    def cfg(self, method, setting):
        key = (method, json.dumps(setting, sort_keys=True))
        if key not in self._cfgs:
            self._cfgs[key] = compose(method, setting, self.model_dir, self.data["validation"][0], self.steps)
        return self._cfgs[key]

    def run_dir(self, method, setting, split, i, seed):
        name = re.sub(r"[^A-Za-z0-9.=_-]", "", ",".join(f"{k}={v}" for k, v in setting.items()))
        return self.out / "runs" / method / name / f"{split}_map{i}_seed{seed}"

    def evaluate_many(self, jobs):
        import multiprocessing

        tasks, owners = [], []
        for j, (method, setting, split, seed) in enumerate(jobs):
            cfg = {**self.cfg(method, setting), "seed": seed}
            for i, desc in enumerate(self.maps[split]):
                tasks.append((cfg, desc, str(self.run_dir(method, setting, split, i, seed)), str(self.data[split][i])))
                owners.append(j)
        if self.jobs > 1:
            with multiprocessing.get_context("fork").Pool(self.jobs, initializer=_init_worker) as pool:
                scores = pool.map(train_and_score, tasks, chunksize=1)
        else:
            scores = [train_and_score(t) for t in tasks]
        out = []
        for j in range(len(jobs)):
            mine = [s for s, o in zip(scores, owners) if o == j]
            out.append({**{k: sum(s[k] for s in mine) / (1 if k == "_cpu_s" else len(mine)) for k in mine[0]},
                        "_runs": len(mine)})
        return out


def main(argv=None):
    from experiments import protocol

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="1 map per split, 1 setting per method, 5 seeds, 10 steps")
    p.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", 2)))
    a = p.parse_args(argv)
    t0 = time.time()
    exp = Experiment(a.out, a.quick, a.jobs)
    budget = protocol.Budget(grids(a.quick), val_seeds=(0,), test_seeds=tuple(range(5 if a.quick else 10)),
                             select="mse", lower_is_better=True, baseline="sft",
                             metrics=("mse", "greedy_optimal", "solved"))
    results = protocol.run_protocol(budget, exp.evaluate_many, min_test_seeds=5)
    # For scale, the untrained policy (each test seed's random initialisation): the same pipeline with a
    # learning rate so small that 20 AdamW steps move no weight by more than about 1e-10.
    untrained = exp.evaluate_many([("sft", {"lr": 1e-12}, "test", seed) for seed in budget.test_seeds])
    untrained = {k: protocol.mean_ci95([u[k] for u in untrained]) for k in budget.metrics}
    wall = time.time() - t0
    order = sorted(results, key=lambda m: results[m]["test"]["mse"]["mean"])
    ift_sft = results.get("ift", {}).get("paired_vs_sft", {}).get("mse")
    notes = (f"The paper's Frozen Lake (ACL 2025 §5.3): {len(exp.maps['test'])} test maps and "
             f"{len(exp.maps['validation'])} validation maps (experiments/frozen_lake_paper/lake.py), a Markov policy "
             f"(a zero-layer Mistral: embedding, norm, head) trained from scratch for {exp.steps} steps on the map's optimal "
             f"trajectory (SFT, IFT, DFT, ASFT) or optimal vs sub-optimal (DPO, ORPO). Wall time of this invocation: {wall:.0f} s "
             f"(runs finished by an earlier invocation are reused; the CPU seconds below count every run once).\n\n"
             f"Order by test mse (best first): {' > '.join(order)}. The paper reports DPO > IFT > ORPO > SFT."
             f" The untrained policy (the test seeds' initialisations, not tuned): "
             + ", ".join(f"{k} {v['mean']:.4g} [{v['ci95'][0]:.4g}, {v['ci95'][1]:.4g}]" for k, v in untrained.items())
             + ".")
    if ift_sft:
        notes += (f" IFT − SFT mse: {ift_sft['mean']:.4g} [{ift_sft['ci95'][0]:.4g}, {ift_sft['ci95'][1]:.4g}] "
                  "(negative = IFT closer to the optimal policy).")
    for r in results.values():
        r["wall_s_experiment"] = wall
    (Path(a.out) / "untrained.json").write_text(json.dumps(untrained, indent=1) + "\n")
    protocol.write_report(results, a.out, "Frozen Lake as in the paper: transition-matrix MSE to the optimal policy",
                          notes=notes, metric_notes=METRIC_NOTES)
    print(notes)
    print(f"wrote {Path(a.out) / 'results.json'}, report.md and untrained.json ({wall:.0f} s)")


if __name__ == "__main__":
    main()
