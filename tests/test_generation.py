"""run_eval.py --generate: answers to AlpacaEval, Arena-Hard and MT-Bench prompts in each judge's
input format, offline, on the tiny model. Its head is edited so that the end-of-turn token replaces
one frequent token: some greedy answers end early, and text follows the end-of-turn token in the
unstopped continuation, so a missed stop shows. Checked: each file against the tool's documented
schema; answers against the trainer's greedy samples and against an unstopped greedy continuation
cut by hand; MT-Bench's second prompt as rendered; a killed run resumed; one-line errors."""

import json
import time
from types import SimpleNamespace

import pytest
import torch

import run_eval
from training import generation, modeling
from training.tokenization import encode_chat, end_of_turn_token

from utils import REPO_DIR

pytestmark = pytest.mark.integration  # loads and runs the tiny model

MAX_NEW = 10
QUESTIONS = ["Name a colour.", "What is the capital of France?", "Write a short poem about the sea and the wind.",
             "Hi", "List three fruits, please, in order of size."]
REPLACED = 761  # a token the untrained tiny model often picks greedily for these questions


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory whose final/ is the tiny model with the end-of-turn row of its head made the
    replaced token's row x 1.05: wherever that token wins with a positive logit, the turn ends."""
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp("gen") / "run"
    tokenizer = generation.load_tokenizer(REPO_DIR / "models" / "tiny-mistral")
    model = AutoModelForCausalLM.from_pretrained(REPO_DIR / "models" / "tiny-mistral")
    eot = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    with torch.no_grad():
        model.lm_head.weight[eot] = 1.05 * model.lm_head.weight[REPLACED]
    model.save_pretrained(root / "final")
    tokenizer.save_pretrained(root / "final")
    return root


@pytest.fixture(scope="module")
def loaded(run):
    tokenizer = generation.load_tokenizer(run / "final")
    eot = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    settings = generation.Settings(max_new_tokens=MAX_NEW)
    return SimpleNamespace(tokenizer=tokenizer, eot=eot, settings=settings,
                           generator=generation.HFGenerator(run / "final", tokenizer, [eot], settings, device="cpu"))


def alpaca_prompts(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": q, "output": "ref", "generator": "gpt4", "dataset": f"set{i % 2}"}
                                for i, q in enumerate(QUESTIONS)]))
    return generation.read_prompts("alpaca_eval", path)


@pytest.fixture(scope="module")
def alpaca_file(loaded, tmp_path_factory):
    """An uninterrupted AlpacaEval answer file (batches of 2: left padding in every batch but the last)."""
    tmp = tmp_path_factory.mktemp("alpaca")
    out = tmp / "answers.json"
    generation.answer_all("alpaca_eval", alpaca_prompts(tmp), out, loaded.generator, loaded.tokenizer, "tiny",
                          loaded.settings, batch_size=2, progress=False)
    return out


# ---------------------------------------------------------------- the tools' schemas, as documented

def check_alpaca_eval(path, n):
    """alpaca_eval --model_outputs: a JSON list of {instruction, output, generator, dataset} (strings),
    one generator, each instruction once."""
    rows = json.loads(path.read_text())
    assert isinstance(rows, list) and len(rows) == n
    for r in rows:
        assert all(isinstance(r[k], str) for k in ("instruction", "output", "generator", "dataset")), r
    assert len({r["generator"] for r in rows}) == 1 and len({r["instruction"] for r in rows}) == n
    return rows


def check_jsonl(path, n, id_key):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == n and len({r[id_key] for r in rows}) == n  # the tools key answers by id
    return rows


def check_arena_hard(path, n):
    """arena-hard-auto (v2.0 code): {uid, ans_id, model, messages, tstamp}; its judge reads
    messages[-1]["content"]["answer"]."""
    rows = check_jsonl(path, n, "uid")
    for r in rows:
        assert isinstance(r["ans_id"], str) and isinstance(r["model"], str) and isinstance(r["tstamp"], float)
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert isinstance(r["messages"][-1]["content"]["answer"], str)
    return rows


def check_choices(path, n, turns, content_dicts):
    """FastChat llm_judge's model_answer (and old arena-hard-auto's): {question_id, answer_id, model_id,
    choices: [{index: 0, turns: [...]}], tstamp}; turns are strings (FastChat) or {content} (arena-hard)."""
    rows = check_jsonl(path, n, "question_id")
    for r in rows:
        assert isinstance(r["answer_id"], str) and isinstance(r["model_id"], str) and isinstance(r["tstamp"], float)
        assert len(r["choices"]) == 1 and r["choices"][0]["index"] == 0 and len(r["choices"][0]["turns"]) == turns
        for t in r["choices"][0]["turns"]:
            assert isinstance(t["content"] if content_dicts else t, str)
    return rows


# ---------------------------------------------------------------- answers

def test_greedy_answers_are_the_trainers_greedy_samples_and_end_at_the_end_of_turn_token(run, loaded, alpaca_file):
    rows = check_alpaca_eval(alpaca_file, len(QUESTIONS))
    assert [r["instruction"] for r in rows] == QUESTIONS  # the prompt file's order, not the length order
    assert [r["dataset"] for r in rows] == [f"set{i % 2}" for i in range(len(QUESTIONS))]
    assert rows[0]["generation"] == {"do_sample": False, "max_new_tokens": MAX_NEW}

    # the trainer's own greedy answers (one by one, its prompt encoding, its stop at the end of turn)
    tokenizer, eot = loaded.tokenizer, loaded.eot
    model = loaded.generator.model
    modeling.stop_at_end_of_turn(model, tokenizer, tokenizer.convert_ids_to_tokens(eot))
    data = SimpleNamespace(questions=QUESTIONS, answers=["x"] * len(QUESTIONS),
                           prompt_ids=[encode_chat(tokenizer, [{"role": "user", "content": q}], "x")[0]
                                       for q in QUESTIONS])
    ours = modeling.greedy_samples(model, tokenizer, data, len(QUESTIONS), MAX_NEW, torch.device("cpu"))
    assert [r["output"] for r in rows] == [s["answer"] for s in ours]

    # by hand: the unstopped greedy continuation, cut before its first end-of-turn token
    stopped = 0
    for q, r in zip(QUESTIONS, rows):
        ids = data.prompt_ids[QUESTIONS.index(q)]
        new = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=[],
                             pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        cut = new.index(eot) if eot in new else len(new)
        assert r["output"] == tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
        stopped += cut < len(new) - 1 and tokenizer.decode(new[cut + 1:], skip_special_tokens=True).strip() != ""
    assert stopped >= 2  # text follows the end of turn in some continuations: a missed stop would show


def test_a_killed_run_resumes_without_duplicates_into_the_uninterrupted_file(loaded, alpaca_file, tmp_path):
    prompts, out = alpaca_prompts(tmp_path), tmp_path / "answers.json"
    asked = []

    class Killed(Exception):
        pass

    def answer_then_die(conversations):
        if asked:
            raise Killed
        asked.append(len(conversations))
        return loaded.generator.answer(conversations)

    with pytest.raises(Killed):
        generation.answer_all("alpaca_eval", prompts, out, SimpleNamespace(answer=answer_then_die), loaded.tokenizer,
                              "tiny", loaded.settings, batch_size=2, progress=False)
    assert len(check_alpaca_eval(out, 2)) == 2 and not (tmp_path / "answers.json.tmp").exists()

    rest = []
    resumed = SimpleNamespace(answer=lambda c: rest.append(len(c)) or loaded.generator.answer(c))
    generation.answer_all("alpaca_eval", prompts, out, resumed, loaded.tokenizer, "tiny", loaded.settings,
                          batch_size=2, progress=False)
    assert rest == [2, 1]  # only the three unanswered prompts
    assert out.read_text() == alpaca_file.read_text()
    generation.answer_all("alpaca_eval", prompts, out, SimpleNamespace(answer=pytest.fail), loaded.tokenizer,
                          "tiny", loaded.settings, batch_size=2, progress=False)  # all done: nothing asked


def test_mt_bench_asks_the_second_turn_after_the_models_own_first_answer(run, loaded, monkeypatch, tmp_path):
    questions = [{"question_id": 81, "category": "writing", "turns": [QUESTIONS[0], "Now another one."]},
                 {"question_id": 82, "category": "math", "turns": [QUESTIONS[1], "And of Spain?"]}]
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    rendered = []
    prompt_ids = generation.prompt_ids

    def capture(tokenizer, messages):
        ids = prompt_ids(tokenizer, messages)
        rendered.append((list(messages), tokenizer.decode(ids)))  # a copy: the loop appends the answer later
        return ids

    monkeypatch.setattr(generation, "prompt_ids", capture)
    out = tmp_path / "tiny.jsonl"
    run_eval.main([str(run), "--generate", "mt_bench", "--prompts", str(path), "--out", str(out), "--device", "cpu",
                   "--max-new-tokens", str(MAX_NEW), "--model-id", "tiny"])
    rows = check_choices(out, 2, turns=2, content_dicts=False)
    assert [r["question_id"] for r in rows] == [81, 82] and rows[0]["model_id"] == "tiny"
    tok = loaded.tokenizer
    for q, r in zip(questions, rows):
        first, second = r["choices"][0]["turns"]
        chat = [{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": first},
                {"role": "user", "content": q["turns"][1]}]
        expected = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        fed = [text for messages, text in rendered if messages == chat]
        assert fed and fed[-1].replace(tok.bos_token, "", 1) == expected and first in fed[-1]
    assert any(r["choices"][0]["turns"][0] for r in rows)  # some first answer is not empty


class Scripted:
    """Stands in for the model: 'answer N to <last user message>'."""

    def __init__(self):
        self.calls = 0

    def answer(self, conversations):
        self.calls += 1
        return [f"answer {len(c)} to {c[-1]['content']}" for c in conversations]


@pytest.mark.parametrize("rows, check", [
    ([{"uid": "a1", "category": "hard_prompt", "subcategory": "x", "prompt": "Q one"},
      {"uid": "b2", "category": "hard_prompt", "subcategory": "y", "prompt": "Q two"}],
     lambda out: [r["messages"][-1]["content"]["answer"] for r in check_arena_hard(out, 2)]),
    ([{"question_id": "a1", "category": "arena-hard-v0.1", "cluster": "c", "turns": [{"content": "Q one"}]},
      {"question_id": "b2", "category": "arena-hard-v0.1", "cluster": "c", "turns": [{"content": "Q two"}]}],
     lambda out: [r["choices"][0]["turns"][0]["content"] for r in check_choices(out, 2, 1, content_dicts=True)]),
])
def test_arena_hard_answers_in_the_format_of_their_question_file(loaded, tmp_path, rows, check):
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    settings = generation.Settings(max_new_tokens=5, temperature=0.7, top_p=0.9, seed=3)
    before = time.time()
    generation.answer_all("arena_hard", generation.read_prompts("arena_hard", path), out, Scripted(),
                          loaded.tokenizer, "tiny", settings, batch_size=8, progress=False)
    assert check(out) == ["answer 1 to Q one", "answer 1 to Q two"]
    record = json.loads(out.read_text().splitlines()[0])
    assert record["generation"] == {"do_sample": True, "max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9, "seed": 3}
    assert before <= record["tstamp"] <= time.time()
    with pytest.raises(generation.GenerationError, match="give another --out"):  # greedy answers do not mix in
        generation.load_done(out, "tiny", generation.Settings(max_new_tokens=5))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("name, rows, message", [
    ("alpaca_eval", [{"prompt": "hi"}], "row 0 has no 'instruction'"),
    ("mt_bench", [{"question_id": 1, "turns": ["only one"]}], "row 0 (question_id=1): the prompt turns"),
    ("arena_hard", [{"uid": "a", "prompt": "x"}, {"uid": "a", "prompt": "y"}], "row 1: uid='a' appears twice"),
])
def test_a_bad_prompt_file_stops_with_one_line_before_the_model_loads(run, tmp_path, monkeypatch, name, rows, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(generation, "make_generator", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as e:
        run_eval.main([str(run), "--generate", name, "--prompts", str(path), "--out", str(tmp_path / "o")])
    assert str(e.value).startswith(f"run_eval.py: {path}: {message}")
    assert "\n" not in str(e.value)


def test_offline_without_prompts_the_error_names_the_hub_file_and_prompts(run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(generation, "make_generator", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as e:
        run_eval.main([str(run), "--generate", "mt_bench", "--out", str(run / "never.jsonl")])
    assert "HuggingFaceH4/mt_bench_prompts/raw/question.jsonl" in str(e.value) and "--prompts FILE" in str(e.value)


def test_a_runs_own_end_of_turn_token_other_than_eos_stops_and_cuts_answers(run, loaded, tmp_path, monkeypatch):
    """model.eot_token of the run's config.yaml (a ChatML-like turn end, not eos) joins eos as a stop
    token, and an answer ends before the first of either."""
    tokenizer, other = loaded.tokenizer, 5  # any single token other than eos stands in for '<|im_end|>'
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "final").symlink_to(run / "final")
    (tmp_path / "run" / "config.yaml").write_text(f"model:\n  eot_token: '{tokenizer.convert_ids_to_tokens(other)}'\n")
    (tmp_path / "q.json").write_text(json.dumps([{"instruction": "Hi"}]))
    captured = []

    def capture(final, tok, stop_ids, *a):
        captured.append(stop_ids)
        raise generation.GenerationError("captured")

    monkeypatch.setattr(generation, "make_generator", capture)
    with pytest.raises(SystemExit):
        run_eval.main([str(tmp_path / "run"), "--generate", "alpaca_eval", "--prompts", str(tmp_path / "q.json")])
    assert captured == [[other, tokenizer.eos_token_id]]

    cutter = SimpleNamespace(tokenizer=tokenizer, stop_ids=captured[0])
    words = tokenizer("blue sky", add_special_tokens=False)["input_ids"]
    for stop in captured[0]:
        assert generation.HFGenerator._text(cutter, words + [stop] + words) == tokenizer.decode(words).strip()
