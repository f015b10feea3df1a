"""run_eval.py: lm-eval-harness on a run's final/. The bundled quick task end to end on a freshly
trained tiny model (its answers checked against the trainer's own greedy samples at lm-eval's batch
size, on a model that answers some rows right), the task's scoring
against a hand count, the paper suite's tasks and metrics in the installed harness, results that
accumulate across calls, and one-line errors for bad input."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import run_eval
from training import modeling, run_data
from utils import REPO_DIR

from conftest import run_inprocess

sys.path.insert(0, str(REPO_DIR / "eval_tasks"))
import ift_quick  # noqa: E402

QUICK_ROWS = 16  # the quick task's first rows: the fixture's model learns them, the test evaluates them


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run directory with final/ from an SFT run of the tiny model on the quick task's first rows
    (train and test split alike), long enough that it answers some of them exactly, not all."""
    root = tmp_path_factory.mktemp("eval")
    rows = "".join(json.dumps({"prompt": r["question"], "chosen": r["answer"]}) + "\n"
                   for r in ift_quick.single_turn_rows()[:QUICK_ROWS])
    (root / "rows").mkdir()
    for split in ("train", "test"):
        (root / "rows" / f"{split}.jsonl").write_text(rows)
    run_inprocess(root / "run", "loss=sft", f"datasets=[{root / 'rows'}]", "n_epochs=30", "batch_size=8", "lr=3e-3",
                  "optimizer=AdamW", "warmup_steps=0", "eval_batch_size=8", "eval_every=100000", "do_first_eval=false")
    return root / "run"


@pytest.fixture(scope="module")
def harness_tasks():
    """lm-eval's TaskManager as run_eval.py builds it for harness tasks (the bundled tasks and the
    harness's own), less the harness folders that define none of the paper's tasks: indexing all ~15k
    task files costs ~15 s of CPU, these few ~0.5 s. A text search of every harness task file (~1 s)
    finds the one file that defines each paper task's name; since no other file does, the full index
    maps each name to that same file."""
    import lm_eval.tasks
    harness = Path(lm_eval.tasks.__file__).parent
    names = [s.name for s in run_eval.PAPER_SUITE]
    defines = re.compile(r"^(?:task|group):\s*[\"']?(%s)[\"']?\s*(?:#.*)?$" % "|".join(names), re.M)
    files = {name: [] for name in names}
    for path in sorted(harness.rglob("*.yaml")):
        for m in defines.finditer(path.read_text(encoding="utf-8", errors="replace")):
            files[m.group(1)].append(path)
    assert all(len(f) == 1 for f in files.values()), files  # each name defined once in the harness
    folders = sorted({f[0].parent for f in files.values()})
    return lm_eval.tasks.TaskManager(include_path=[*map(str, folders), str(run_eval.TASKS_DIR)],
                                     include_defaults=False)


def use_harness_tasks(monkeypatch, manager):
    """run_eval.task_manager builds `manager` where it would index the whole harness."""
    def harness_manager(manager_class, with_harness_tasks):
        assert with_harness_tasks
        return manager
    monkeypatch.setattr(run_eval, "_task_manager", harness_manager)


def our_greedy_answer(model, tokenizer, question, max_new_tokens):
    """The answer as train.py's own sampling produces it: bos + the chat template's prompt, greedy."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if ids[0] != tokenizer.bos_token_id:
        ids = [tokenizer.bos_token_id] + ids
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


@pytest.mark.integration
def test_quick_suite_runs_end_to_end_and_answers_as_our_own_greedy_generation(trained_run):
    # an earlier result of another task must survive this call
    (trained_run / "eval").mkdir()
    earlier = {"num_fewshot": 25, "chat_template": False, "metric": "acc_norm,none", "value": 0.5, "stderr": 0.01,
               "n_samples": 1172, "limit": None, "metrics": {"acc_norm,none": 0.5}}
    (trained_run / "eval" / "results.json").write_text(json.dumps({"tasks": {"arc_challenge": earlier}}))

    n = QUICK_ROWS
    # lm-eval's batch size (run_eval.py's default, 8): left-padded batches against our one-by-one answers.
    # The command line's main() in this process (a new interpreter would only add seconds of imports); an
    # error would end it with SystemExit and fail the test.
    run_eval.main([str(trained_run), "--suite", "quick", "--limit", str(n), "--device", "cpu", "--log-samples"])

    results = json.loads((trained_run / "eval" / "results.json").read_text())
    assert results["model"] == str(trained_run / "final")
    assert results["tasks"]["arc_challenge"] == earlier
    quick = results["tasks"]["ift_quick"]
    assert quick["num_fewshot"] == 0 and quick["chat_template"] and quick["limit"] == n and quick["n_samples"] == n

    samples = [json.loads(line) for line in open(trained_run / "eval" / "samples_ift_quick.jsonl")]
    rows = ift_quick.single_turn_rows()[:n]
    assert [s["doc"] for s in samples] == rows

    # the trainer's own greedy answers (modeling.greedy_samples, what n_samples reports) to the same rows
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM
    cfg = OmegaConf.load(trained_run / "config.yaml")
    tokenizer = modeling.load_tokenizer(cfg)
    _, data = run_data.load_data(cfg, tokenizer, pairs=False)
    model = AutoModelForCausalLM.from_pretrained(trained_run / "final").eval()
    ours = {s["prompt"]: s for s in modeling.greedy_samples(model, tokenizer, data, n, 24, torch.device("cpu"))}
    assert sorted(ours) == sorted(r["question"] for r in rows)
    assert [s["response"].strip() for s in samples] == [ours[r["question"]]["answer"] for r in rows]
    exact = [float(ours[r["question"]]["exact"]) for r in rows]
    assert [s["exact_match"] for s in samples] == exact
    assert 0 < sum(exact) < n  # some answers right, some wrong: the comparison can tell them apart
    assert quick["value"] == pytest.approx(sum(exact) / n, abs=1e-12)

    table = (trained_run / "eval" / "results.md").read_text()
    assert f"| ift_quick (limit {n}) | 0 | exact_match,none | {100 * sum(exact) / n:.2f} |" in table
    assert "| arc_challenge | 25 | acc_norm,none | 50.00 | 1.00 | 1172 |" in table


class ScriptedLM:
    """Stands in for a model: answers each prompt with the answer listed for its question."""

    def __new__(cls, answers):
        from lm_eval.api.model import LM

        class _LM(LM):
            tokenizer_name = "scripted"

            def apply_chat_template(self, chat_history, add_generation_prompt=True):
                return "\n".join(m["content"] for m in chat_history)

            def generate_until(self, requests):
                return [answers[r.doc["question"]] for r in requests]

            def loglikelihood(self, requests):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests):
                raise NotImplementedError

        return _LM()


@pytest.mark.integration
def test_the_quick_task_reads_every_single_turn_row_and_scores_stripped_exact_match():
    with open(REPO_DIR / "data" / "ultrachat_200k" / "test_sft.jsonl") as f:
        chats = [json.loads(line)["messages"] for line in f]
    single = [m for m in chats if len(m) == 2 and m[0]["role"] == "user" and m[1]["role"] == "assistant"]
    assert 100 < len(single) < len(chats)
    # right with surrounding whitespace on every third row, a near miss (a doubled first letter, an extra
    # word) on the others
    answers, right = {}, 0
    for i, (user, assistant) in enumerate(single):
        ref = assistant["content"]
        if i % 3 == 0:
            answers[user["content"]], right = f"  {ref}\n", right + 1
        else:
            answers[user["content"]] = ref[0] + ref if i % 3 == 1 else ref + " ok"
    assert len(answers) == len(single)  # every question is distinct, so the script is unambiguous

    spec = run_eval.QUICK_SUITE[0]
    manager = run_eval.task_manager([spec])
    res = run_eval.run_tasks(ScriptedLM(answers), [spec], manager)[spec.name]
    assert res["n-samples"]["ift_quick"]["effective"] == len(single)
    assert res["results"]["ift_quick"]["exact_match,none"] == pytest.approx(right / len(single), abs=1e-12)


@pytest.mark.integration
def test_every_paper_task_exists_in_the_installed_harness_with_its_headline_metric(harness_tasks, monkeypatch):
    from lm_eval.tasks._yaml_loader import load_yaml
    use_harness_tasks(monkeypatch, harness_tasks)
    manager = run_eval.task_manager(run_eval.PAPER_SUITE)
    for spec in run_eval.PAPER_SUITE:
        entry = manager.task_index[spec.name]
        cfg = load_yaml(entry.yaml_path, resolve_func=False)
        metric, filt = spec.metric.split(",")
        metrics = cfg.get("metric_list") or cfg.get("aggregate_metric_list") or []
        assert metric in [m["metric"] for m in metrics], spec.name
        assert filt in ["none"] + [f["name"] for f in cfg.get("filter_list", [])], spec.name
    assert [(s.name, s.num_fewshot) for s in run_eval.PAPER_SUITE] == [
        ("arc_challenge", 25), ("hellaswag", 10), ("mmlu", 5), ("truthfulqa_mc2", 0), ("winogrande", 5), ("gsm8k", 5)]


@pytest.mark.unit
def test_the_table_averages_the_six_paper_tasks_only_when_all_ran_in_full():
    tasks = {s.name: {"num_fewshot": s.num_fewshot, "metric": s.metric, "value": v, "stderr": None,
                      "n_samples": 10, "limit": None, "metrics": {}}
             for s, v in zip(run_eval.PAPER_SUITE, [0.6, 0.8, 0.55, 0.45, 0.75, 0.35])}
    assert "| **average of the paper's six** | | | **58.33** | | |" in run_eval.markdown_table(
        {"model": "m", "tasks": tasks})
    tasks["gsm8k"]["limit"] = 5
    assert "average" not in run_eval.markdown_table({"model": "m", "tasks": tasks})


@pytest.mark.integration
@pytest.mark.parametrize("make_final, tasks, message", [
    (False, [], "no model to evaluate: {run}/final/config.json does not exist"),
    (True, ["--tasks", "arc_challenge", "no_such_task"], "unknown lm-eval task(s): no_such_task"),
])
def test_bad_input_stops_with_one_line_before_any_model_loads(tmp_path, monkeypatch, harness_tasks, make_final, tasks,
                                                             message):
    use_harness_tasks(monkeypatch, harness_tasks)  # arc_challenge is there, no_such_task is not
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    if make_final:
        (run / "final" / "config.json").write_text("{}")  # not loadable: reaching the load would fail differently
    monkeypatch.setattr(run_eval, "load_lm", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as e:
        run_eval.main([str(run), *tasks])
    assert str(e.value).startswith("run_eval.py: " + message.format(run=run))
    assert "\n" not in str(e.value)
    assert not (run / "eval").exists()


@pytest.mark.unit
def test_a_hub_benchmark_offline_stops_with_one_line_naming_the_setting(monkeypatch):
    import lm_eval

    def offline(**kwargs):  # what datasets raises for lm-eval's arc_challenge under HF_DATASETS_OFFLINE=1
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(run_eval.EvalError) as e:
        run_eval.run_tasks(None, [run_eval.KNOWN["arc_challenge"]], None)
    message = str(e.value)
    assert message.startswith("arc_challenge: Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled): ")
    assert "unset HF_DATASETS_OFFLINE (set here)" in message and "--suite quick" in message and "\n" not in message
