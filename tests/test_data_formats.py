"""The data formats users bring from other trainers (TRL conversational preference and prompt/completion,
ShareGPT, Alpaca, a 'system' column, UTF-8 with a byte-order mark): each is detected from its first row,
normalised to the messages written out by hand below, planned by a dry run, and trained by a real run.
Also: a null field names itself, a dataset named twice is refused, the Zephyr fallback is announced."""

import json

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

import preference_datasets as pd
from training import pipeline, sources, tokenization
from utils import REPO_DIR, ConfigError

from conftest import make_cfg, run_inprocess, run_train_py


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# Each format: raw rows as users' files hold them, and the normalised rows expected, written by hand.
FORMATS = {
    "trl_preference": (
        [{"prompt": [system("Be brief."), user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]},
         {"prompt": [user("Hi"), assistant("Hello!"), user("A fruit?")], "chosen": [assistant("Apple.")],
          "rejected": [assistant("Carrot.")]},
         # a 'chosen'/'rejected' that already holds the prompt's messages is not given them twice
         {"prompt": [user("Sky?")], "chosen": [user("Sky?"), assistant("Blue.")],
          "rejected": [user("Sky?"), assistant("Green.")]}],
        [{"prompt": [system("Be brief."), user("2+2?")], "chosen": "4", "rejected": "5"},
         {"prompt": [user("Hi"), assistant("Hello!"), user("A fruit?")], "chosen": "Apple.", "rejected": "Carrot."},
         {"prompt": [user("Sky?")], "chosen": "Blue.", "rejected": "Green."}]),
    "prompt_completion": (
        [{"prompt": "Capital of France?", "completion": "Paris."},
         {"system": "Answer in one word.", "prompt": "Capital of Italy?", "completion": "Rome."},
         {"system": "", "prompt": "Capital of Spain?", "completion": "Madrid."}],
        [{"prompt": [user("Capital of France?")], "chosen": "Paris.", "rejected": None},
         {"prompt": [system("Answer in one word."), user("Capital of Italy?")], "chosen": "Rome.", "rejected": None},
         {"prompt": [user("Capital of Spain?")], "chosen": "Madrid.", "rejected": None}]),
    "prompt_completion_messages": (
        [{"prompt": [user("Hi")], "completion": [assistant("Hello!")]},
         {"prompt": [system("S"), user("a"), assistant("b"), user("c")], "completion": [assistant("d")]}],
        [{"prompt": [user("Hi")], "chosen": "Hello!", "rejected": None},
         {"prompt": [system("S"), user("a"), assistant("b"), user("c")], "chosen": "d", "rejected": None}]),
    "sharegpt": (
        [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "hi"},
                            {"from": "gpt", "value": "hello"}, {"from": "human", "value": "2+2?"},
                            {"from": "gpt", "value": "4"}]},
         {"system": "Be kind.",
         "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]}],
        [{"prompt": [system("S"), user("hi"), assistant("hello"), user("2+2?")], "chosen": "4", "rejected": None},
         {"prompt": [system("Be kind."), user("q")], "chosen": "a", "rejected": None}]),
    "alpaca": (
        [{"instruction": "Translate to French.", "input": "cat", "output": "chat"},
         {"instruction": "Name a colour.", "input": "", "output": "Blue."},
         {"instruction": "Add.", "output": "3", "system": "You are a calculator."}],
        [{"prompt": [user("Translate to French.\n\ncat")], "chosen": "chat", "rejected": None},
         {"prompt": [user("Name a colour.")], "chosen": "Blue.", "rejected": None},
         {"prompt": [system("You are a calculator."), user("Add.")], "chosen": "3", "rejected": None}]),
    "prompt_strings_with_system": (
        [{"system": "Be brief.", "prompt": "q", "chosen": "a", "rejected": "b"}],
        [{"prompt": [system("Be brief."), user("q")], "chosen": "a", "rejected": "b"}]),
}


def _write_jsonl(path, rows, bom=False):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


def _all_rows(path):
    """Every normalised row of a file, in order (its train rows, then its held-out tail)."""
    return sources.load_normalised(str(path), "train") + sources.load_normalised(str(path), "test")


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))


@pytest.mark.unit
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_is_detected_from_its_first_row_and_normalised_to_these_messages(fmt, tmp_path, own_cache):
    raw, expected = FORMATS[fmt]
    path = _write_jsonl(tmp_path / f"{fmt}.jsonl", raw)
    assert _all_rows(path) == expected
    # the eval split keeps its rejected answers (the preference metrics) exactly for the formats that have them
    assert sources.has_rejected_answers(str(path), "test") == (expected[-1]["rejected"] is not None)


@pytest.mark.unit
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_file_with_a_utf8_byte_order_mark_is_read(tmp_path, suffix):
    raw, expected = FORMATS["alpaca"]
    path = tmp_path / f"bom{suffix}"
    if suffix == ".json":  # a list of rows, as Excel or a Windows editor saves it
        path.write_bytes(b"\xef\xbb\xbf" + json.dumps(raw, indent=1).encode())
    else:
        _write_jsonl(path, raw, bom=True)
    assert _all_rows(path) == expected


@pytest.mark.unit
@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": None, "rejected": "b"}, "field 'chosen' is null"),
    ({"prompt": None, "completion": "a"}, "field 'prompt' is null"),
    ({"conversations": None}, "field 'conversations' is null"),
    ({"instruction": "i", "input": "x", "output": None}, "field 'output' is null"),
    ({"prompt": [user("q")], "chosen": None, "rejected": [assistant("b")]}, "field 'chosen' is null"),
])
def test_a_null_field_names_itself(tmp_path, row, message):
    path = _write_jsonl(tmp_path / "null.jsonl", [row])
    with pytest.raises(pd.DataError, match=rf"^{path}: line 1: {message}$"):
        sources.load_normalised(str(path), "train")


@pytest.mark.unit
@pytest.mark.parametrize("row, message", [
    ({"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [user("x"), assistant("b")]},
     "'chosen' and 'rejected' differ before their final assistant turn"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": [assistant("a")]},
     r"field 'prompt\[0\].role' is 'robot'"),
    ({"prompt": [system("s")], "chosen": [assistant("a")]}, "'prompt' \\+ 'chosen' has no user turn before"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
     r"field 'conversations\[1\]' must be a \{'from': human\|user\|gpt\|assistant\|system, 'value': str\} turn"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "field 'conversations' must end with an assistant turn"),
    ({"system": "s", "conversations": [{"from": "system", "value": "t"}, {"from": "human", "value": "q"},
                                       {"from": "gpt", "value": "a"}]}, "field 'system' and a system turn"),
    ({"instruction": "i", "input": 3, "output": "o"}, "field 'input' must be str, got int"),
    ({"prompt": "q", "completion": "a", "label": False},
     r"'prompt'/'completion' rows with a 'label' \(TRL's unpaired preference format"),
])
def test_bad_rows_of_the_new_formats_name_the_line_and_field(tmp_path, row, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(pd.DataError, match=rf"^{path}: line 1: {message}"):
        sources.load_normalised(str(path), "train")


@pytest.mark.unit
def test_a_dataset_named_twice_is_refused_in_one_line_before_anything_loads(tmp_path, monkeypatch):
    path = _write_jsonl(tmp_path / "a.jsonl", FORMATS["alpaca"][0])
    monkeypatch.chdir(tmp_path)
    for names, message in [
        (f"[{path},{path}]", f"names '{path}' twice"),
        ("[a.jsonl,ultrachat_sample,./a.jsonl]", f"names 'a.jsonl' and './a.jsonl', the same path {path}"),
        (f"[ultrachat_sample,{REPO_DIR / 'data/ultrachat_200k'}]", "names 'ultrachat_sample' and '"),
    ]:
        with pytest.raises(ConfigError, match="its rows would be read twice; name each dataset once$") as error:
            pipeline.validate_config(make_cfg(f"datasets={names}"))
        assert message in str(error.value) and "\n" not in str(error.value)
    # the command line: one line, and nothing loaded (no data lines printed)
    status, out, err = run_train_py("dry_run=true", f"datasets=[{path},{path}]")
    assert status == 1 and out == "" and err.strip().splitlines() == [
        f"config error: datasets=['{path}', '{path}'] names '{path}' twice: its rows would be read twice; "
        "name each dataset once"]


@pytest.mark.unit
def test_the_zephyr_fallback_template_is_announced_once_on_rank_0(capsys, monkeypatch):
    tok = AutoTokenizer.from_pretrained(str(REPO_DIR / "models/tiny-mistral"))
    tokenization.ensure_chat_template(tok)  # it has a template of its own: nothing to say
    assert capsys.readouterr().out == ""
    tok.chat_template = None
    tokenization.ensure_chat_template(tok)
    assert tok.chat_template == tokenization.ZEPHYR_CHAT_TEMPLATE
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("chat template: the tokenizer of ") and "Zephyr" in lines[0]
    tok.chat_template = None
    monkeypatch.setattr(tokenization, "is_main", lambda: False)  # the other ranks stay quiet
    tokenization.ensure_chat_template(tok)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- dry runs and one real run

ROWS = 12  # per format file: 11 train rows (batches of 4), 1 held out


def _many(fmt, n=ROWS):
    """n rows of a format, distinct (a number in every text), cycling through its hand-written rows."""
    raw = FORMATS[fmt][0]
    text = json.dumps
    return [json.loads(text(raw[i % len(raw)]).replace('."', f' {i}."').replace('?"', f' {i}?"')) for i in range(n)]


@pytest.fixture(scope="module")
def format_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    return {fmt: _write_jsonl(folder / f"{fmt}.jsonl", _many(fmt))
            for fmt in ("trl_preference", "prompt_completion", "prompt_completion_messages", "sharegpt", "alpaca")}


SMALL = ["batch_size=4", "eval_batch_size=4", "n_eval_examples=4", "max_length=64", "max_prompt_length=48",
         "min_answer_tokens=8"]


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["trl_preference", "prompt_completion", "prompt_completion_messages", "sharegpt",
                                 "alpaca"])
def test_a_dry_run_of_each_format_prints_its_plan(fmt, format_files, tmp_path, own_cache):
    loss = "loss=dpo" if fmt == "trl_preference" else "loss=sft"  # pairs for the format that has them
    status, out, err = run_train_py("dry_run=true", f"datasets=[{format_files[fmt]}]", loss, *SMALL,
                                    f"run_dir={tmp_path / 'run'}")
    assert status == 0, err[-2000:]
    plan = json.loads(out.strip().splitlines()[-1])
    assert (plan["rows"], plan["eval_rows"], plan["steps_per_epoch"]) == (ROWS - 1, 1, (ROWS - 1) // 4)
    assert "plan: 11 training rows" in out and not (tmp_path / "run").exists()


@pytest.mark.integration
def test_a_run_over_every_format_at_once_trains(format_files, tmp_path, own_cache):
    files = ",".join(str(format_files[f]) for f in ("trl_preference", "prompt_completion", "sharegpt", "alpaca"))
    rows = run_inprocess(tmp_path / "run", f"datasets=[{files}]", "loss=ift", *SMALL, "n_examples=8",
                         "eval_every=8", "warmup_steps=0", "n_samples=0")
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 2 and all(np.isfinite(r["loss"]) for r in train)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
