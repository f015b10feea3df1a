"""The paper's Frozen Lake (experiments/frozen_lake_paper): the fixed maps have one optimal and one
longer route, value iteration on gymnasium's table agrees with breadth-first search, the transition
matrices and scores against float64 loops, the tokenizer and the Markov policy, and the whole
protocol in QUICK mode (commands/run_frozen_lake_paper.sh)."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

from experiments.frozen_lake import game
from experiments.frozen_lake_paper import build, lake
from training.tokenization import encode_chat, end_of_turn_token
from utils import REPO_DIR

from conftest import python_calls

ALL_MAPS = lake.TEST_MAPS + lake.VALIDATION_MAPS


def cell(desc, s):
    return divmod(s, len(desc[0]))


@pytest.mark.unit
def test_the_fixed_maps_are_what_the_generator_draws_and_the_splits_are_disjoint():
    assert lake.generate_maps(30) == lake.TEST_MAPS + lake.VALIDATION_MAPS
    assert len(lake.TEST_MAPS) == 20 and len(lake.VALIDATION_MAPS) == 10
    assert len({tuple(m) for m in ALL_MAPS}) == 30


@pytest.mark.unit
@pytest.mark.parametrize("i", range(len(ALL_MAPS)))
def test_each_map_has_an_optimal_and_a_longer_disjoint_route(i):
    desc = ALL_MAPS[i]
    best, other = lake.trajectories(desc)
    dist = game.distances_to_goal(desc)
    start, goal = cell(desc, best[0]), cell(desc, best[-1])
    assert desc[start[0]][start[1]] == "S" and desc[goal[0]][goal[1]] == "G"
    assert len(best) - 1 == dist[start]  # a shortest path
    assert other[0] == best[0] and other[-1] == best[-1] and len(other) >= len(best) + 2
    assert not set(best[1:-1]) & set(other)
    for path in (best, other):
        for a, b in zip(path, path[1:]):
            (r0, c0), (r1, c1) = cell(desc, a), cell(desc, b)
            assert abs(r0 - r1) + abs(c0 - c1) == 1 and desc[r1][c1] != "H"


@pytest.mark.unit
@pytest.mark.parametrize("i", [0, 5, 13, 22])
def test_value_iteration_optimal_moves_are_the_moves_that_shorten_the_safe_distance(i):
    desc = ALL_MAPS[i]
    dist, optimal = game.distances_to_goal(desc), lake.optimal_transitions(desc)
    n_cols = len(desc[0])
    for s in range(len(desc) * n_cols):
        r, c = cell(desc, s)
        if desc[r][c] in "HG":
            assert not optimal[s].any()
            continue
        nexts = {game.step(desc, (r, c), a) for a in game.ACTIONS}
        want = {x for x in nexts if dist[r, c] > 0 and dist[x] == dist[r, c] - 1} or nexts  # unreachable: all
        got = {cell(desc, x) for x in np.flatnonzero(optimal[s])}
        assert got == want, (s, got, want)
        assert optimal[s].sum() == pytest.approx(1.0)


@pytest.mark.unit
def test_gymnasiums_table_moves_as_the_game_does():
    desc = lake.TEST_MAPS[2]
    P = lake.transition_table(desc)
    for s in range(len(desc) * len(desc[0])):
        for a, name in enumerate(game.ACTIONS):
            (p, s2, _, _), = P[s][a]
            r, c = cell(desc, s)
            if desc[r][c] not in "HG":
                assert p == 1.0 and cell(desc, s2) == game.step(desc, (r, c), name)


@pytest.mark.unit
def test_transition_matrices_and_scores_against_float64_loops():
    rng = np.random.default_rng(0)
    desc = lake.TEST_MAPS[1]
    n = len(desc) * len(desc[0])
    logits = rng.normal(size=(n, n)) * 3
    P = lake.policy_transitions(desc, logits)
    optimal = lake.optimal_transitions(desc)
    flat = "".join(desc)
    live = [s for s in range(n) if flat[s] not in "HG"]
    sq, greedy_ok = 0.0, 0
    for s in live:
        r, c = cell(desc, s)
        nexts = sorted({np.ravel_multi_index(game.step(desc, (r, c), a), (len(desc), len(desc[0])))
                        for a in game.ACTIONS})
        z = sum(np.exp(logits[s, x]) for x in nexts)
        for x in range(n):
            want = np.exp(logits[s, x]) / z if x in nexts else 0.0
            assert P[s, x] == pytest.approx(want, rel=1e-12, abs=1e-15)
            sq += (want - optimal[s, x]) ** 2
        greedy_ok += optimal[s, max(nexts, key=lambda x: logits[s, x])] > 0
    got = lake.scores(desc, P)
    assert got["mse"] == pytest.approx(sq / (len(live) * n), rel=1e-12)
    assert got["greedy_optimal"] == pytest.approx(greedy_ok / len(live))
    perfect = lake.scores(desc, optimal)
    assert perfect == {"mse": 0.0, "greedy_optimal": 1.0, "solved": 1.0}


@pytest.mark.unit
def test_states_are_single_tokens_and_the_answer_is_the_trajectory(tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(str(build.build_model_dir(tmp_path / "m")))
    best, _ = lake.trajectories(lake.TEST_MAPS[0])
    eot = end_of_turn_token(tok)
    prompt, answer = encode_chat(tok, [{"role": "user", "content": build.PROMPT}], build.trajectory_text(best), eot)
    assert eot == "<eot>" and tok.convert_ids_to_tokens(prompt) == ["<user>", "go", "<assistant>"]
    assert tok.convert_ids_to_tokens(answer) == [f"s{s}" for s in best] + ["<eot>"]


@pytest.mark.unit
def test_the_zero_layer_policy_is_markov(tmp_path):
    config = transformers.AutoConfig.from_pretrained(str(build.build_model_dir(tmp_path / "m")))
    assert config.num_hidden_layers == 0
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        a = model(input_ids=torch.tensor([[2, 4, 3, 9, 17, 12]])).logits[0, -1]
        b = model(input_ids=torch.tensor([[12]])).logits[0, -1]
    assert torch.allclose(a, b, atol=1e-6)  # the last token alone decides the next-state distribution


@pytest.mark.integration
def test_quick_protocol_end_to_end(tmp_path, monkeypatch):
    from experiments.frozen_lake_paper import run as paper_run

    out = tmp_path / "paper"
    # The script as written, its one Python call recorded, then run in this process (its runs already
    # are: a new interpreter would only add its seconds of imports)
    (cwd, argv), = python_calls(REPO_DIR / "commands" / "run_frozen_lake_paper.sh",
                                env=dict(os.environ, QUICK="1", OUT=str(out), JOBS="1"), cwd=tmp_path)
    assert cwd == REPO_DIR and argv == ["-m", "experiments.frozen_lake_paper.run", "--out", str(out), "--jobs", "1",
                                        "--quick"]
    monkeypatch.chdir(cwd)
    threads = torch.get_num_threads()
    try:
        paper_run.main(argv[2:])
    finally:
        torch.set_num_threads(threads)  # each run sets one thread, as the script's workers do
    results = json.loads((out / "results.json").read_text())
    assert sorted(results) == ["asft", "dft", "dpo", "ift", "orpo", "sft"]
    for method, r in results.items():
        for metric in ("mse", "greedy_optimal", "solved"):
            stat = r["test"][metric]
            assert len(stat["per_seed"]) == 5 and stat["ci95"][0] <= stat["mean"] <= stat["ci95"][1]
            assert stat["mean"] == pytest.approx(np.mean(stat["per_seed"]))
        assert 0 <= r["test"]["mse"]["mean"] <= 1 and r["budget"]["test_runs"] == 5
        if method != "sft":
            diff = r["paired_vs_sft"]["mse"]["per_seed"]
            assert diff == pytest.approx(np.subtract(r["test"]["mse"]["per_seed"], results["sft"]["test"]["mse"]["per_seed"]))
    untrained = json.loads((out / "untrained.json").read_text())  # the same seeds' initialisations, not trained
    assert len(untrained["mse"]["per_seed"]) == 5
    assert all(np.less(results["sft"]["test"]["mse"]["per_seed"], untrained["mse"]["per_seed"]))  # training helps
    # one test run scored again from its saved weights, by a loop over the states
    run = out / "runs" / "ift" / "lr=0.01" / "test_map0_seed3"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(run / "final"), dtype=torch.float64)
    desc = lake.TEST_MAPS[0]
    ids = [build.SPECIALS.__len__() + 1 + s for s in range(len(desc) * len(desc[0]))]
    with torch.no_grad():
        logits = np.stack([model(input_ids=torch.tensor([[i]])).logits[0, 0, ids].numpy() for i in ids])
    saved = json.loads((run / "scores.json").read_text())
    assert lake.scores(desc, lake.policy_transitions(desc, logits))["mse"] == pytest.approx(saved["mse"], rel=1e-9)
    assert "ift" in (run / "config.yaml").read_text() and (out / "protocol.png").stat().st_size > 10_000
    assert "| ift − sft |" in (out / "report.md").read_text()
