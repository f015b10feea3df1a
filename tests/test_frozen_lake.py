"""The Frozen Lake experiment: map text tokenises one cell per token, answers are true shortest safe
paths (checked by exhaustive search and by gymnasium), rejected answers fail in gymnasium, held-out
maps never appear in training, the batched greedy decoder equals `generate`, and the whole pipeline
(commands/run_frozen_lake.sh in QUICK mode) writes its report and results."""

import itertools
import json
import os
import subprocess

import numpy as np
import pytest
import torch
import transformers
from gymnasium.envs.toy_text.frozen_lake import generate_random_map
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from experiments.frozen_lake import build_data, game
from experiments.frozen_lake.evaluate_env import greedy_decode, write_results
from training.tokenization import encode_chat, ensure_chat_template, load_split
from utils import REPO_DIR

from conftest import warm_python

TINY = REPO_DIR / "models" / "tiny-mistral"


@pytest.fixture(scope="module")
def tokenizer():
    return ensure_chat_template(AutoTokenizer.from_pretrained(str(TINY)))


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
def test_unsolvable_maps_have_no_path_and_answers_parse_strictly():
    assert game.shortest_path(["SH", "HG"]) is None
    assert game.parse_answer(" RRDD\n") == "RRDD"
    assert game.parse_answer("RRxD") is None and game.parse_answer("") is None


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
def test_results_hold_per_seed_success_with_mean_and_sample_std(tmp_path):
    out = write_results({"r/ift_seed0": {"success_rate": 0.5}, "r/ift_seed1": {"success_rate": 0.7},
                         "r/sft_seed0": {"success_rate": 0.25}}, tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text()) == out
    assert out["ift"]["success_rate"] == [0.5, 0.7] and out["ift"]["mean"] == pytest.approx(0.6)
    assert out["ift"]["std"] == pytest.approx(((0.1 ** 2 + 0.1 ** 2) / 1) ** 0.5)
    assert out["sft"] == {"success_rate": [0.25], "mean": 0.25, "std": 0.0, "n_seeds": 1}


@pytest.mark.integration
def test_quick_mode_runs_the_pipeline_end_to_end_and_writes_report_and_results(tmp_path):
    # The script has two kinds of job: DPO's sequential recipe (an SFT stage, then DPO from it) and one
    # train.py run for every other method (sft, orpo and dft take IFT's path with another loss=; each
    # loss's training is tested in test_losses_*). IFT also draws the IFT-only plots.
    # Two methods cover every line of the pipeline at a third of the five methods' cost.
    methods = ["ift", "dpo"]
    # Its Python calls read what earlier ones wrote: they run as written, each forked from a warm server
    with warm_python(tmp_path) as python:
        env = dict(os.environ, QUICK="1", OUT=str(tmp_path / "fl"), PYTHON=str(python), METHODS=" ".join(methods))
        proc = subprocess.run(["bash", str(REPO_DIR / "commands" / "run_frozen_lake.sh")], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = tmp_path / "fl"
    results = json.loads((out / "results.json").read_text())
    assert sorted(results) == sorted(methods)
    for method, r in results.items():
        assert len(r["success_rate"]) == r["n_seeds"] == 1 and 0 <= r["mean"] <= 1
        metrics = json.loads((out / "runs" / f"{method}_seed0" / "task_metrics.json").read_text())
        assert metrics["n_maps"] == 8 and metrics["success_rate"] == r["success_rate"][0]
    report = (out / "report.md").read_text()
    # the DPO stage trains on half the budget (after its SFT half): its label says so
    # a group is labelled by its method and the settings that tell it from the other group
    assert "\n| ift, " in report and "\n| sft → dpo, n_examples=32 |" in report
    for png in ("eval_nll.png", "lambda.png", "relation_propagation.png", "ift_seed0_frozen_lake_path.png"):
        assert (out / png).stat().st_size > 10_000, png
    # the DPO run starts from the SFT half of its recipe, which is also its reference
    dpo_config = (out / "runs" / "dpo_seed0" / "config.yaml").read_text()
    assert "stages/sft_half_seed0/final" in dpo_config


# ---------------------------------------------------------------- the scorer on hand-made answers

def simulate(desc, moves):
    """(reward, moves played) by our own reading of the rules, independent of gymnasium: a move off the
    map stays put; the episode ends in a hole (0) or at G (1)."""
    n_rows, n_cols = len(desc), len(desc[0])
    r, c = next((i, row.index("S")) for i, row in enumerate(desc) if "S" in row)
    delta = {"L": (0, -1), "D": (1, 0), "R": (0, 1), "U": (-1, 0)}
    for k, a in enumerate(moves, start=1):
        r, c = min(max(r + delta[a][0], 0), n_rows - 1), min(max(c + delta[a][1], 0), n_cols - 1)
        if desc[r][c] in "HG":
            return float(desc[r][c] == "G"), k
    return 0.0, len(moves)


def into_a_hole(desc, best):
    """The shortest path's first k moves, then a step into a neighbouring hole, then more moves (which
    must not be played: the episode has ended); None if the path passes no hole."""
    pos = game.find(desc, "S")
    for k, a in enumerate(best):
        for b in game.ACTIONS:
            nxt = game.step(desc, pos, b)
            if desc[nxt[0]][nxt[1]] == "H":
                return best[:k] + b + "RRDD"
        pos = game.step(desc, pos, a)
    return None


@pytest.mark.unit
def test_the_scorer_on_hand_made_answers_replayed_in_gymnasium(tmp_path):
    from experiments.frozen_lake.evaluate_env import score_answers

    _, rows = build_data.build(tmp_path, n_train=4, n_test=24, seed=5)
    cases = []  # (row, answer text, expected (reward, moves played, parseable))
    for r in rows:
        best = r["chosen"][-1]["content"]
        bump = ("U" if game.find(r["map"], "S")[0] == 0 else "L" * 9) + best  # walks into the edge first
        cases += [(r, best, (1.0, len(best), True)), (r, " " + best + "\n", (1.0, len(best), True)),
                  (r, best[:-1] or "U", (0.0, max(len(best) - 1, 1), True)),  # stops short of G
                  (r, bump, (*simulate(r["map"], bump), True)),
                  (r, "go right", (0.0, 0, False)), (r, "", (0.0, 0, False)),
                  (r, best[:1] + " " + best[1:], (0.0, 0, False))]
        hole = into_a_hole(r["map"], best)
        if hole is not None:
            cases.append((r, hole, (0.0, len(hole) - 4, True)))  # the moves after the hole are not played
    for r, text, want in cases:
        if want[2]:
            assert simulate(r["map"], text.strip()) == want[:2], (r["map"], text)  # the hand count is right
    records, metrics = score_answers([c[0] for c in cases], [c[1] for c in cases])
    assert [(x["reward"], x["moves"], x["parseable"]) for x in records] == [c[2] for c in cases]
    assert sum(1 for c in cases if c[1].endswith("RRDD")) >= 3  # several maps had a hole next to the path
    solved = [c[2] for c in cases if c[2][0] == 1.0]
    assert len(solved) >= 2 * len(rows) and metrics["n_maps"] == len(cases)
    assert metrics["success_rate"] == pytest.approx(len(solved) / len(cases))
    assert metrics["unparseable_rate"] == pytest.approx(sum(not c[2][2] for c in cases) / len(cases))
    assert metrics["mean_length"] == pytest.approx(np.mean([s[1] for s in solved]))
    _, none_solved = score_answers(rows[:2], ["x", "LLLL"])
    assert none_solved["success_rate"] == 0.0 and none_solved["mean_length"] is None


def markov_model(next_token, vocab, eot):
    """A real zero-layer Mistral made to emit next_token[t] after token t (greedy): one-hot embeddings,
    and an output head that scores only that successor."""
    config = transformers.MistralConfig(vocab_size=vocab, hidden_size=vocab, intermediate_size=vocab,
                                        num_hidden_layers=0, num_attention_heads=1, num_key_value_heads=1,
                                        max_position_embeddings=64, tie_word_embeddings=False, eos_token_id=eot)
    model = transformers.MistralForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(vocab, vocab)
        for t, nxt in next_token.items():
            head[nxt, t] = 5.0
        model.lm_head.weight.copy_(head)
    return model


@pytest.mark.unit
def test_batched_greedy_decoding_stops_each_row_at_its_end_of_turn_token():
    eot, pad, vocab = 2, 0, 12
    # 3 -> 4 -> 5 -> eot; 6 -> 7 -> eot; 8 -> 8 -> ... (never ends); 9 -> eot at once
    model = markov_model({3: 4, 4: 5, 5: eot, 6: 7, 7: eot, 8: 8, 9: eot, 1: 1, 10: 1, 11: 1, 0: 1, 2: 1}, vocab, eot)
    prompts = [[1, 10, 3], [11, 6], [1, 1, 1, 1, 8], [9], [1, 3]]
    new, probs = greedy_decode(model, prompts, max_new_tokens=6, eos_id=eot, pad_id=pad, track_ids=[eot, 4],
                               batch_size=3)
    assert new == [[4, 5], [7], [8] * 6, [], [4, 5]]
    assert [p.shape[0] for p in probs] == [3, 2, 6, 1, 3]  # the end-of-turn step is tracked, then nothing
    for p, n in zip(probs, new):
        if len(p) > len(n):
            assert p[-1, 0] > 0.9  # the row stopped because the model put its mass on end-of-turn
    for p, ours in zip(prompts, new):  # the same as generate(), one prompt at a time
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=6, do_sample=False, pad_token_id=pad, eos_token_id=eot)[0, len(p):]
        assert ours == [t for t in ref.tolist() if t != eot][:6] and (eot in ref.tolist()) == (len(ours) < 6)


# ---------------------------------------------------------------- next-move quality and recovery

def floyd_warshall(desc, allowed):
    """All-pairs shortest move counts over the cells whose letter is in `allowed` (float64; inf = none)."""
    n_rows, n_cols = len(desc), len(desc[0])
    cells = [(r, c) for r in range(n_rows) for c in range(n_cols)]
    d = np.full((len(cells), len(cells)), np.inf)
    for i, (r, c) in enumerate(cells):
        d[i, i] = 0.0
        for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0)):
            r2, c2 = r + dr, c + dc
            if 0 <= r2 < n_rows and 0 <= c2 < n_cols and desc[r][c] in allowed and desc[r2][c2] in allowed:
                d[i, r2 * n_cols + c2] = 1.0
    for k in range(len(cells)):
        d = np.minimum(d, d[:, k:k + 1] + d[k:k + 1, :])
    return d


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(5))
def test_cell_prefixes_and_optimal_moves_against_floyd_warshall(seed):
    desc = generate_random_map(size=5, seed=seed)
    n_cols = len(desc[0])
    walk = floyd_warshall(desc, "SF")     # prefixes never pass through G or a hole
    to_goal = floyd_warshall(desc, "SFG")
    s, g = [r * n_cols + c for r, row in enumerate(desc) for c, x in enumerate(row) if x == "S"][0], \
        [r * n_cols + c for r, row in enumerate(desc) for c, x in enumerate(row) if x == "G"][0]
    cells = game.cell_prefixes(desc)
    want = {i for i in range(len(walk)) if np.isfinite(walk[s, i]) and np.isfinite(to_goal[i, g])
            and desc[i // n_cols][i % n_cols] in "SF"}
    assert {r * n_cols + c for (r, c), _, _ in cells} == want
    for (r, c), prefix, best in cells:
        i = r * n_cols + c
        assert len(prefix) == walk[s, i]
        pos = game.find(desc, "S")
        for a in prefix:
            pos = game.step(desc, pos, a)
            assert desc[pos[0]][pos[1]] in "SF"
        assert pos == (r, c)
        closer = {a for a in game.ACTIONS if game.step(desc, pos, a) != pos and
                  to_goal[np.ravel_multi_index(game.step(desc, pos, a), (5, 5)), g] == to_goal[i, g] - 1}
        assert set(best) == closer and best
    detour = game.detour_prefix(desc)
    if detour is not None:
        assert game.shortest_path(desc).startswith(detour[:-1])
        pos = game.find(desc, "S")
        for a in detour[:-1]:
            pos = game.step(desc, pos, a)
        assert detour[-1] not in game.optimal_moves(desc, pos)
        nxt = game.step(desc, pos, detour[-1])
        assert nxt != pos and desc[nxt[0]][nxt[1]] in "SF"


@pytest.mark.unit
def test_prefix_prompts_are_the_training_tokens_and_the_measures_count_every_cell(tmp_path, tokenizer):
    from experiments.frozen_lake.evaluate_env import move_quality, prefix_prompts, recovery

    _, rows = build_data.build(tmp_path, n_train=4, n_test=6, seed=2)
    row = rows[0]
    best = row["chosen"][-1]["content"]
    prompt, answer = encode_chat(tokenizer, row["chosen"][:-1], best)
    for k in range(len(best)):
        assert prefix_prompts(tokenizer, row, [best[:k]], "</s>")[0] == list(prompt) + list(answer[:k])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(TINY))).eval()
    q = move_quality(model, tokenizer, rows, "</s>")
    assert q["n_cells"] == sum(len(game.cell_prefixes(r["map"])) for r in rows)
    assert 0 <= q["move_mse"] <= 1 and 0 <= q["move_greedy_optimal"] <= 1
    rec = recovery(model, tokenizer, rows, "</s>", max_new_tokens=4)
    assert rec["n_recovery_maps"] == sum(game.detour_prefix(r["map"]) is not None for r in rows)
    assert rec["recovery_rate"] == 0.0  # a random model does not find its way back
