"""Evaluate a run's final model with lm-eval-harness.

    python run_eval.py RUN_DIR [--suite paper|quick] [--tasks NAME ...] [--limit N] [--batch-size B]
                               [--device D] [--dtype T] [--num-fewshot K] [--chat-template] [--log-samples]

Loads RUN_DIR/final (a Hugging Face directory) through lm-eval's `hf` model, runs the suite's tasks
with their few-shot settings, and writes

    RUN_DIR/eval/results.json   every task evaluated so far: its few-shot count, headline metric and
                                all lm-eval metrics (a later call adds tasks or replaces same-named ones)
    RUN_DIR/eval/results.md     the same as a markdown table
    RUN_DIR/eval/samples_<task>.jsonl   per-row prompts, answers and scores (with --log-samples)

Suites: `paper` is the paper's benchmark list with the Open LLM Leaderboard (v1) few-shot settings
(see PAPER_SUITE and docs/evaluation.md); it downloads the benchmarks from the hub. `quick` is the bundled
task eval_tasks/ift_quick.yaml (greedy answers to the UltraChat test sample, exact match), which
runs offline. lm-eval is installed from requirements-eval.txt.

    python run_eval.py RUN_DIR --generate alpaca_eval|arena_hard|mt_bench [--prompts FILE] [--out FILE]
                               [--max-new-tokens N] [--temperature T --top-p P] [--batch-size B]

answers a judge-based benchmark's prompts with RUN_DIR/final instead, in the judging tool's own input
format (training/generation.py; how to run each judge on the file: docs/evaluation.md).
"""

import argparse
import datetime
import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from training import generation
from utils import write_atomic

REPO_DIR = Path(__file__).resolve().parent
TASKS_DIR = REPO_DIR / "eval_tasks"


@dataclass(frozen=True)
class TaskSpec:
    """One lm-eval task as this script runs it. `metric` is lm-eval's "<metric>,<filter>" key of the
    headline number (None: report every metric); `num_fewshot` None keeps the task's own default."""
    name: str
    num_fewshot: int | None
    metric: str | None
    chat_template: bool = False


# The paper's table (ARC, HellaSwag, MMLU, TruthfulQA, WinoGrande, GSM8K) with the settings of the
# Open LLM Leaderboard v1, where that list of six comes from: base-model prompts (no chat template),
# few-shot counts and metrics as the leaderboard's About page states them.
PAPER_SUITE = [
    TaskSpec("arc_challenge", 25, "acc_norm,none"),
    TaskSpec("hellaswag", 10, "acc_norm,none"),
    TaskSpec("mmlu", 5, "acc,none"),
    TaskSpec("truthfulqa_mc2", 0, "acc,none"),
    TaskSpec("winogrande", 5, "acc,none"),
    TaskSpec("gsm8k", 5, "exact_match,strict-match"),
]
# Rendered with the model's chat template: the model answers as it was trained to.
QUICK_SUITE = [TaskSpec("ift_quick", 0, "exact_match,none", chat_template=True)]
SUITES = {"paper": PAPER_SUITE, "quick": QUICK_SUITE}
KNOWN = {spec.name: spec for suite in SUITES.values() for spec in suite}


class EvalError(ValueError):
    """Bad input to run_eval.py (a missing model, an unknown task): reported as one line."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run directory holding final/")
    p.add_argument("--suite", choices=sorted(SUITES), default="paper", help="which task list to run (default: paper)")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="lm-eval task names to run instead of the suite's; a task of either suite keeps that "
                        "suite's few-shot count and chat setting")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="few-shot count for tasks outside the suites (default: the task's own)")
    p.add_argument("--chat-template", action="store_true",
                   help="render prompts with the model's chat template for tasks outside the suites")
    p.add_argument("--limit", type=float, default=None,
                   help="at most this many rows per task (a fraction if < 1): for smoke tests, not comparable")
    p.add_argument("--batch-size", type=_batch_size, default=8, help="an integer, or 'auto' (GPU) (default: 8)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    p.add_argument("--dtype", default="auto", help="float32 / bfloat16 / float16 / auto = as saved (default)")
    p.add_argument("--log-samples", action="store_true", help="also write eval/samples_<task>.jsonl")
    g = p.add_argument_group("answers for judge-based benchmarks (instead of lm-eval; docs/evaluation.md)")
    g.add_argument("--generate", choices=sorted(generation.BENCHMARKS), default=None,
                   help="answer the benchmark's prompts and write them in its judge's input format")
    g.add_argument("--prompts", type=Path, default=None,
                   help="the prompt file (default: from the hub: " + "; ".join(
                       f"{k}: {b.hub_repo}/{b.hub_file}" for k, b in generation.BENCHMARKS.items()) + ")")
    g.add_argument("--out", type=Path, default=None, help="the answer file (default: RUN/eval/<benchmark>_answers"
                   ".json[l]); a rerun skips the prompts it holds")
    g.add_argument("--model-id", default=None, help="the model's name in the answer file (default: RUN's name)")
    g.add_argument("--max-new-tokens", type=int, default=2048, help="per answer (default: 2048)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, with --temperature (default: 1)")
    g.add_argument("--seed", type=int, default=0, help="of the sampling (default: 0)")
    g.add_argument("--engine", choices=["auto", "hf", "vllm"], default="auto",
                   help="auto: vLLM when installed and a GPU is present, else transformers' generate")
    return p.parse_args(argv)


def _batch_size(text):
    if text == "auto" or (text.isdigit() and int(text) > 0):
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")


def task_specs(args):
    """The TaskSpecs to run, in order."""
    if args.tasks is None:
        return list(SUITES[args.suite])
    return [KNOWN.get(name, TaskSpec(name, args.num_fewshot, None, args.chat_template)) for name in args.tasks]


def check_model_dir(run_dir):
    """RUN_DIR/final must be a Hugging Face model directory; checked before anything loads."""
    final = run_dir / "final"
    if not (final / "config.json").is_file() and not (final / "adapter_config.json").is_file():
        raise EvalError(f"no model to evaluate: {final}/config.json does not exist "
                        f"(RUN_DIR must be a run directory whose training finished)")


def task_manager(specs):
    """lm-eval's TaskManager with the bundled tasks, once lm-eval is known to be installed and to
    know every task name in `specs` (checked before the model loads)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("lm-eval is not installed: run `pip install -r requirements-eval.txt` "
                        "(or `make eval`, which installs it)") from None
    # indexing the harness's own ~15k task files takes seconds: skip it when only bundled tasks run
    bundled = {s.name for s in QUICK_SUITE}
    manager = _task_manager(TaskManager, with_harness_tasks=any(s.name not in bundled for s in specs))
    unknown = [s.name for s in specs if s.name not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task(s): {', '.join(unknown)} (bundled: "
                        f"{', '.join(s.name for s in QUICK_SUITE)}; paper suite: "
                        f"{', '.join(s.name for s in PAPER_SUITE)}; `lm_eval ls tasks` lists them all)")
    return manager


@functools.lru_cache(maxsize=2)
def _task_manager(manager_class, with_harness_tasks):
    return manager_class(include_path=str(TASKS_DIR), include_defaults=with_harness_tasks)


def load_lm(final, device, dtype, batch_size):
    """lm-eval's HF model on `final` (loaded once, shared by every task of the call)."""
    import torch
    from lm_eval.models.huggingface import HFLM
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = {"pretrained": str(final)}
    if (final / "adapter_config.json").is_file():  # lora.merge=false: the adapter on top of its base
        base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = {"pretrained": base, "peft": str(final), "tokenizer": str(final)}
    return HFLM(**model, device=device, dtype=dtype, batch_size=batch_size, trust_remote_code=False)


def run_tasks(lm, specs, manager, limit=None, log_samples=False):
    """Run `specs` on `lm`, one simple_evaluate call per (few-shot count, chat setting), since
    simple_evaluate takes one of each. Returns {task name: simple_evaluate's output for the call
    that ran it} (its "results", "n-shot", "n-samples", "group_subtasks", and "samples" if logged)."""
    from lm_eval import simple_evaluate
    out = {}
    groups = {}
    for spec in specs:
        groups.setdefault((spec.num_fewshot, spec.chat_template), []).append(spec.name)
    for (shots, chat), names in groups.items():
        try:
            res = simple_evaluate(model=lm, tasks=names, num_fewshot=shots, limit=limit, task_manager=manager,
                                  apply_chat_template=chat, fewshot_as_multiturn=chat and bool(shots),
                                  # standard errors of means are closed-form; bootstrap serves other aggregates
                                  log_samples=log_samples, bootstrap_iters=1000)
        except ConnectionError as e:  # the benchmark's rows come from the hub, which is out of reach
            offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "0") not in ("", "0")]
            fix = (f"unset {' and '.join(offline)} (set here) on a machine with network" if offline else
                   "run where the Hugging Face hub is reachable")
            raise EvalError(f"{', '.join(names)}: {str(e).splitlines()[0]}: its data downloads from the hub; {fix}, or "
                            "fill HF_DATASETS_CACHE there first. Offline, --suite quick (bundled) runs") from None
        for name in names:
            out[name] = res
    return out


def task_entry(spec, res, limit):
    """results.json's entry of one task: settings, headline value and stderr, all metrics."""
    from lm_eval import __version__ as lm_eval_version
    metrics = res["results"][spec.name]
    metrics = {k: v for k, v in metrics.items() if k != "alias"}
    value = metrics.get(spec.metric) if spec.metric else None
    stderr_key = spec.metric.replace(",", "_stderr,", 1) if spec.metric else None
    stderr = metrics.get(stderr_key) if spec.metric else None
    subtasks = _subtasks(res.get("group_subtasks", {}), spec.name)
    n_samples = res.get("n-samples", {})
    n = sum(n_samples.get(t, {}).get("effective", 0) for t in subtasks) if subtasks else \
        n_samples.get(spec.name, {}).get("effective")
    entry = {"num_fewshot": spec.num_fewshot if spec.num_fewshot is not None else res["n-shot"].get(spec.name),
             "chat_template": spec.chat_template, "metric": spec.metric, "value": value,
             "stderr": stderr if isinstance(stderr, float) else None, "n_samples": n, "limit": limit,
             "metrics": metrics, "lm_eval_version": lm_eval_version,
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if subtasks:  # a group (MMLU): every member's metrics, so other averages can be computed later
        entry["subtasks"] = {t: {k: v for k, v in res["results"][t].items() if k != "alias"}
                             for t in subtasks if t in res["results"]}
    return entry


def _subtasks(group_subtasks, name):
    """The leaf tasks under group `name` (lm-eval's group_subtasks maps a group to its members,
    which may be groups themselves); [] for a plain task."""
    leaves = []
    for member in group_subtasks.get(name, []):
        leaves += _subtasks(group_subtasks, member) if member in group_subtasks else [member]
    return leaves


def markdown_table(results):
    """results.json's tasks as a markdown table (percentages), with the leaderboard average when
    all six paper tasks are there."""
    lines = ["| task | shots | metric | value (%) | ± stderr | rows |", "|---|---|---|---|---|---|"]
    for name, t in results["tasks"].items():
        if t["value"] is None:  # no headline: one row per metric
            for key, v in t["metrics"].items():
                if "_stderr" not in key and isinstance(v, (int, float)):
                    lines.append(f"| {name} | {t['num_fewshot']} | {key} | {100 * v:.2f} | | {t['n_samples']} |")
            continue
        stderr = f"{100 * t['stderr']:.2f}" if t["stderr"] is not None else ""
        limited = f" (limit {t['limit']:g})" if t["limit"] is not None else ""
        lines.append(f"| {name}{limited} | {t['num_fewshot']} | {t['metric']} | {100 * t['value']:.2f} | {stderr} "
                     f"| {t['n_samples']} |")
    paper = [results["tasks"].get(s.name) for s in PAPER_SUITE]
    if all(t is not None and t["value"] is not None and t["limit"] is None for t in paper):
        mean = sum(t["value"] for t in paper) / len(paper)
        lines.append(f"| **average of the paper's six** | | | **{100 * mean:.2f}** | | |")
    return f"Model: `{results['model']}`\n\n" + "\n".join(lines) + "\n"


def write_samples(eval_dir, name, res):
    """eval/samples_<task>.jsonl: one row per document (its prompt, target, response, scores)."""
    from lm_eval.utils import handle_non_serializable
    with open(eval_dir / f"samples_{name}.jsonl.tmp", "w", encoding="utf-8") as f:
        for s in res["samples"][name]:
            row = {"doc": s["doc"], "target": s["target"], "prompt": s["arguments"][0][0],
                   "response": s["filtered_resps"][0]}
            row.update({m: s[m] for m in s.get("metrics", []) if m in s})
            f.write(json.dumps(row, default=handle_non_serializable) + "\n")
    os.replace(eval_dir / f"samples_{name}.jsonl.tmp", eval_dir / f"samples_{name}.jsonl")


def evaluate(args):
    """The whole command: check, load, run, write. Returns results.json's content."""
    run_dir = args.run_dir.resolve()
    specs = task_specs(args)
    check_model_dir(run_dir)
    manager = task_manager(specs)
    lm = load_lm(run_dir / "final", args.device, args.dtype, args.batch_size)
    outputs = run_tasks(lm, specs, manager, args.limit, args.log_samples)

    eval_dir = run_dir / "eval"
    eval_dir.mkdir(exist_ok=True)
    path = eval_dir / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"tasks": {}}
    results["model"] = str(run_dir / "final")
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    for spec in specs:
        results["tasks"][spec.name] = task_entry(spec, outputs[spec.name], limit)
        if args.log_samples:
            write_samples(eval_dir, spec.name, outputs[spec.name])
    write_atomic(path, json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    write_atomic(eval_dir / "results.md", table)
    print(table)
    print(f"wrote {path} and {eval_dir / 'results.md'}")
    return results


def generate_answers(args):
    """--generate: the benchmark's prompts answered by RUN/final, written to the judge's input file."""
    from omegaconf import OmegaConf

    from training.tokenization import end_of_turn_token
    run_dir = args.run_dir.resolve()
    check_model_dir(run_dir)
    if args.batch_size == "auto" or args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        raise EvalError("--generate needs an integer --batch-size, --temperature >= 0, 0 < --top-p <= 1 and "
                        "--max-new-tokens >= 1")
    prompts = generation.read_prompts(args.generate, args.prompts or generation.fetch_prompts(args.generate))
    out = args.out or run_dir / "eval" / f"{args.generate}_answers{generation.BENCHMARKS[args.generate].suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = generation.Settings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    model_id = args.model_id or run_dir.name
    generation.load_done(out, model_id, settings)  # other settings stop here, before the model loads

    tokenizer = generation.load_tokenizer(run_dir / "final")
    config = run_dir / "config.yaml"  # the run's own model.eot_token, if it set one
    configured = OmegaConf.load(config).get("model", {}).get("eot_token") if config.is_file() else None
    try:
        stop_ids = [tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer, configured))]
    except ValueError as e:  # DataError: no end-of-turn token found, or model.eot_token is not one token
        raise EvalError(f"{run_dir / 'final'}: {e}") from None
    stop_ids += [tokenizer.eos_token_id] if tokenizer.eos_token_id not in (None, *stop_ids) else []
    generator = generation.make_generator(run_dir / "final", tokenizer, stop_ids, settings, args.engine,
                                          args.device, args.dtype)
    generation.answer_all(args.generate, prompts, out, generator, tokenizer, model_id, settings, args.batch_size)
    print(f"wrote {len(prompts)} answers to {out}")
    return out


def main(argv=None):
    try:
        args = parse_args(argv)
        generate_answers(args) if args.generate else evaluate(args)
    except (EvalError, generation.GenerationError) as e:
        sys.exit(f"run_eval.py: {e}")


if __name__ == "__main__":
    main()
