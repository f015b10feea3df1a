"""The Frozen Lake experiment: map text tokenises one cell per token, answers are true shortest safe
paths (checked by exhaustive search and by gymnasium), rejected answers fail in gymnasium, held-out
maps never appear in training, the batched greedy decoder equals `generate`, and the whole pipeline
(commands/run_frozen_lake.sh in QUICK mode) writes its report and results."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gymnasium.envs.toy_text.frozen_lake import generate_random_map
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from experiments.frozen_lake import build_data, game
from experiments.frozen_lake.evaluate_env import greedy_decode, write_results
from preference_datasets import encode_chat, ensure_chat_template, load_split
from utils import REPO_DIR

TINY = REPO_DIR / "models" / "tiny-mistral"


@pytest.fixture(scope="module")
def tokenizer():
    return ensure_chat_template(AutoTokenizer.from_pretrained(str(TINY)))


def test_every_cell_and_every_move_is_one_token(tokenizer):
    # BPE merges pairs, so if no two letters merge, no longer string of them can either.
    for alphabet in ("SFHG", "LDRU"):
        for a, b in itertools.product(alphabet, repeat=2):
            assert tokenizer.tokenize(a + b) == [a, b]
    desc = ["SFFH", "FHFF", "FFFH", "HFFG"]
    prompt_ids, answer_ids = encode_chat(tokenizer, [{"role": "user", "content": game.prompt_text(desc)}], "RRDD")
    tokens = tokenizer.convert_ids_to_tokens(prompt_ids)
    assert tokenizer.convert_ids_to_tokens(answer_ids) == ["R", "R", "D", "D", "</s>"]
    start = tokens.index("S")  # the map: 4 rows of 4 one-letter tokens separated by newline tokens
    assert tokens[start:start + 19] == list("SFFH") + ["Ċ"] + list("FHFF") + ["Ċ"] + list("FFFH") + ["Ċ"] + list("HFFG")


def brute_force_shortest(desc, max_len=10):
    """Length of the shortest action string that reaches G without entering H, by trying all of them."""
    n = len(desc)
    start = next((r, c) for r in range(n) for c in range(n) if desc[r][c] == "S")
    delta = {"L": (0, -1), "D": (1, 0), "R": (0, 1), "U": (-1, 0)}
    for length in range(1, max_len + 1):
        for path in itertools.product("LDRU", repeat=length):
            r, c = start
            for a in path:
                r, c = min(max(r + delta[a][0], 0), n - 1), min(max(c + delta[a][1], 0), n - 1)
                if desc[r][c] in "HG":
                    break
            if desc[r][c] == "G":
                return length
    return None


@pytest.mark.parametrize("seed", range(6))
def test_the_answer_is_a_shortest_safe_path_and_the_rejected_one_fails_in_gymnasium(seed):
    desc = generate_random_map(size=4, seed=seed)
    best = game.shortest_path(desc)
    assert len(best) == brute_force_shortest(desc)
    assert game.play(desc, best) == (1.0, len(best))
    rng = np.random.default_rng(seed)
    for _ in range(5):
        wrong = game.wrong_path(desc, best, rng)
        assert game.play(desc, wrong)[0] == 0.0


def test_unsolvable_maps_have_no_path_and_answers_parse_strictly():
    assert game.shortest_path(["SH", "HG"]) is None
    assert game.parse_answer(" RRDD\n") == "RRDD"
    assert game.parse_answer("RRxD") is None and game.parse_answer("") is None


def test_the_data_is_deterministic_holds_maps_out_and_loads_as_preference_pairs(tmp_path, tokenizer):
    train, test = build_data.build(tmp_path / "a", n_train=60, n_test=12, seed=3)
    again, _ = build_data.build(tmp_path / "b", n_train=60, n_test=12, seed=3)
    assert train == again
    assert not {tuple(r["map"]) for r in test} & {tuple(r["map"]) for r in train}
    assert {len(r["map"]) for r in train} == {4, 5, 6}
    for r in test:
        assert game.play(r["map"], r["chosen"][-1]["content"])[0] == 1.0
        assert game.play(r["map"], r["rejected"][-1]["content"])[0] == 0.0
    data = load_split([str(tmp_path / "a")], "test", tokenizer, 128, 112, pairs=True)
    assert len(data) == 12 and data.answers[0] == test[0]["chosen"][-1]["content"]


def test_batched_greedy_decoding_equals_generate_one_prompt_at_a_time(tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(TINY))).eval()
    prompts = [[1, 5, 9, 40], [1, 7], [1, 300, 301, 302, 303, 304, 8]]
    ours, probs = greedy_decode(model, prompts, 6, eos_id=2, pad_id=3, track_ids=[10, 11], batch_size=2)
    for p, new, pr in zip(prompts, ours, probs):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=6, do_sample=False, pad_token_id=3, eos_token_id=2)[0, len(p):].tolist()
        assert new == [t for t in ref if t != 2][:len(new)] and len(new) == len([t for t in ref if t != 2])
        assert pr.shape == (len(new) + (2 in ref), 2)


def test_results_hold_per_seed_success_with_mean_and_sample_std(tmp_path):
    out = write_results({"r/ift_seed0": {"success_rate": 0.5}, "r/ift_seed1": {"success_rate": 0.7},
                         "r/sft_seed0": {"success_rate": 0.25}}, tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text()) == out
    assert out["ift"]["success_rate"] == [0.5, 0.7] and out["ift"]["mean"] == pytest.approx(0.6)
    assert out["ift"]["std"] == pytest.approx(((0.1 ** 2 + 0.1 ** 2) / 1) ** 0.5)
    assert out["sft"] == {"success_rate": [0.25], "mean": 0.25, "std": 0.0, "n_seeds": 1}


def test_quick_mode_runs_every_method_end_to_end_and_writes_report_and_results(tmp_path):
    methods = ["sft", "ift", "dpo", "orpo", "dft"]
    env = dict(os.environ, QUICK="1", OUT=str(tmp_path / "fl"), PYTHON=sys.executable, METHODS=" ".join(methods))
    proc = subprocess.run(["bash", str(REPO_DIR / "commands" / "run_frozen_lake.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = tmp_path / "fl"
    results = json.loads((out / "results.json").read_text())
    assert sorted(results) == sorted(methods)
    for method, r in results.items():
        assert len(r["success_rate"]) == r["n_seeds"] == 1 and 0 <= r["mean"] <= 1
        metrics = json.loads((out / "runs" / f"{method}_seed0" / "task_metrics.json").read_text())
        assert metrics["n_maps"] == 16 and metrics["success_rate"] == r["success_rate"][0]
    report = (out / "report.md").read_text()
    # the DPO stage trains on half the budget (after its SFT half): its label says so
    for label in ("| sft |", "| ift |", "| sft → dpo, n_examples=64 |", "| orpo |", "| dft |"):
        assert label in report
    for png in ("eval_nll.png", "lambda.png", "relation_propagation.png", "ift_seed0_frozen_lake_path.png"):
        assert (out / png).stat().st_size > 10_000, png
    # the DPO run starts from the SFT half of its recipe, which is also its reference
    dpo_config = (out / "runs" / "dpo_seed0" / "config.yaml").read_text()
    assert "stages/sft_half_seed0/final" in dpo_config
