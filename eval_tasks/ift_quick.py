"""Rows of the `ift_quick` lm-eval task (ift_quick.yaml): the bundled UltraChat test sample's
single-turn conversations as (question, answer) pairs."""

import json
from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent.parent / "data" / "ultrachat_200k" / "test_sft.jsonl"


def single_turn_rows(path=DATA_FILE):
    """[{question, answer}] for every row whose `messages` are one user turn and one assistant turn,
    in file order. Multi-turn rows are left out: the harness puts a task's prompt in one user message."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            messages = json.loads(line)["messages"]
            if [m["role"] for m in messages] == ["user", "assistant"]:
                rows.append({"question": messages[0]["content"], "answer": messages[1]["content"]})
    return rows


def load(**_metadata):
    """lm-eval's `custom_dataset` hook: a DatasetDict with one `test` split (it passes the task's
    metadata as keyword arguments, which are not needed here)."""
    import datasets
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(single_turn_rows())})
