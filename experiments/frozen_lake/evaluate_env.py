"""Play the held-out maps: each trained model answers every test map greedily, and its moves are
executed in gymnasium's FrozenLake-v1 (is_slippery=False, the map passed as `desc`). A map is solved
when the environment returns reward 1.

    python -m experiments.frozen_lake.evaluate_env --data runs/frozen_lake/data RUN_DIR...
    python -m experiments.frozen_lake.evaluate_env --data ... --skip-played --results runs/frozen_lake/results.json RUN_DIR...

Writes into each run directory:
    task_metrics.json        success_rate, unparseable_rate, mean_length / mean_optimal (over solved maps), n_maps
    frozen_lake_answers.jsonl  one row per map: map, answer, reward, moves, optimal_length
    frozen_lake_path.png     one map with the model's path and, per visited cell, its probability of each
                             move given its own path so far (--picture-map picks the map; default the first 6x6)
With --results: method -> per-seed success rates, mean and std (run directories named METHOD_seedK).
"""

import argparse
import json
import re
import statistics
from pathlib import Path

import numpy as np
import torch

from experiments.frozen_lake.game import ACTIONS, MOVES, cell_prefixes, detour_prefix, find, parse_answer, play


@torch.no_grad()
def greedy_decode(model, prompts, max_new_tokens, eos_id, pad_id, track_ids=(), batch_size=64):
    """Greedy continuations of token-id prompts, without a KV cache (the tiny model does not need one).

    prompts: list of lists of ids. Rows are right-padded; each row's next token is read at its own last
    position, so padding after a row never affects it (causal attention).
    Returns (new_ids per prompt, without eos; probs per prompt: (steps, len(track_ids)) array of the
    probability of each tracked token at every generated step, eos step included).
    """
    model.eval()
    device = next(model.parameters()).device
    outs, probs = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        B = len(chunk)
        lengths = torch.tensor([len(p) for p in chunk], device=device)
        ids = torch.full((B, int(lengths.max()) + max_new_tokens), pad_id, dtype=torch.long, device=device)
        for b, p in enumerate(chunk):
            ids[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        new = [[] for _ in range(B)]
        tracked = [[] for _ in range(B)]
        rows = torch.arange(B, device=device)
        for _ in range(max_new_tokens):
            width = int(lengths.max())
            mask = (torch.arange(width, device=device)[None] < lengths[:, None]).long()
            logits = model(input_ids=ids[:, :width], attention_mask=mask, use_cache=False).logits
            last = logits[rows, lengths - 1].float()  # (B, V)
            nxt = last.argmax(-1)
            p = torch.softmax(last, -1)[:, list(track_ids)] if track_ids else None
            for b in range(B):
                if done[b]:
                    continue
                if p is not None:
                    tracked[b].append(p[b].cpu().numpy())
                if int(nxt[b]) == eos_id:
                    done[b] = True
                else:
                    new[b].append(int(nxt[b]))
            active = ~done
            ids[rows[active], lengths[active]] = nxt[active]
            lengths = lengths + active.long()
            if bool(done.all()):
                break
        outs += new
        probs += [np.array(t).reshape(len(t), len(track_ids)) for t in tracked]
    return outs, probs


def load_rows(data_dir):
    path = Path(data_dir) / "test.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (write it with python -m experiments.frozen_lake.build_data)")
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def write_json(path, obj):
    """Write through a temporary file and a rename, so a crash never leaves half a file."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def evaluate_run(run_dir, rows, max_new_tokens=40, picture_map=None, measures=False):
    """Play every map of `rows` with the run's final/ model; write the run's task files; return its metrics.
    measures: also the next-move quality at every cell (move_quality) and the recovery test (recovery)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.tokenization import encode_chat, end_of_turn_token, ensure_chat_template

    run_dir = Path(run_dir)
    tokenizer = ensure_chat_template(AutoTokenizer.from_pretrained(str(run_dir / "final")))
    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "final"), dtype=torch.float32)
    eot = end_of_turn_token(tokenizer)
    # The prompt exactly as training tokenised it (the ids before the answer's first character); the
    # answer passed here only marks where the prompt ends, none of its tokens are kept.
    prompts = [encode_chat(tokenizer, r["chosen"][:-1], r["chosen"][-1]["content"], eot)[0] for r in rows]
    action_ids = [tokenizer.convert_tokens_to_ids(a) for a in ACTIONS]
    new_ids, probs = greedy_decode(model, prompts, max_new_tokens, tokenizer.convert_tokens_to_ids(eot),
                                   tokenizer.pad_token_id, track_ids=action_ids)
    answers, metrics = score_answers(rows, [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids])
    if measures:
        metrics.update(move_quality(model, tokenizer, rows, eot))
        metrics.update(recovery(model, tokenizer, rows, eot, max_new_tokens))
    with open(run_dir / "frozen_lake_answers.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in answers)
    write_json(run_dir / "task_metrics.json", metrics)
    if picture_map is None:
        picture_map = next((i for i, r in enumerate(rows) if len(r["map"]) == 6), 0)
    shown = answers[picture_map]
    draw_path(shown["map"], shown["answer"], probs[picture_map], run_dir / "frozen_lake_path.png",
              title=f"{run_dir.name}, held-out map {picture_map}: "
                    f"{'solved' if shown['reward'] == 1.0 else 'not solved'} (shortest path: {shown['optimal_length']} moves)")
    return metrics


def score_answers(rows, texts):
    """Score one answer text per map. An answer is parseable when, stripped, it is a non-empty string of
    L D R U (game.parse_answer); its moves are played in gymnasium's FrozenLake-v1 until the episode
    ends (a hole or the goal) or the moves run out, and the map is solved when the environment returns
    reward 1. Unparseable text, a path into a hole and a path that stops short of G all score 0.
    Returns (one record per map: map, answer, reward, moves (played), optimal_length, parseable;
    the metrics: success_rate, unparseable_rate, mean_length / mean_optimal over solved maps, n_maps)."""
    records = []
    for row, text in zip(rows, texts, strict=True):
        actions = parse_answer(text)
        reward, moves = play(row["map"], actions) if actions else (0.0, 0)
        records.append({"map": row["map"], "answer": text, "reward": reward, "moves": moves,
                        "optimal_length": row["optimal_length"], "parseable": actions is not None})
    solved = [r for r in records if r["reward"] == 1.0]
    metrics = {"task": "frozen_lake", "n_maps": len(rows), "success_rate": len(solved) / len(rows),
               "unparseable_rate": sum(not r["parseable"] for r in records) / len(rows),
               "mean_length": float(np.mean([r["moves"] for r in solved])) if solved else None,
               "mean_optimal": float(np.mean([r["optimal_length"] for r in solved])) if solved else None}
    return records, metrics


def prefix_prompts(tokenizer, row, prefixes, eot):
    """Token ids of the map's prompt followed by each prefix of moves, as training tokenised a chat whose
    answer starts with those moves (each move one token)."""
    from training.tokenization import encode_chat

    messages = row["chosen"][:-1]
    prompt = encode_chat(tokenizer, messages, row["chosen"][-1]["content"], eot)[0]
    out = []
    for p in prefixes:
        out.append(list(prompt) + (list(encode_chat(tokenizer, messages, p, eot)[1][:-1]) if p else []))
    return out


def move_quality(model, tokenizer, rows, eot, batch_size=64):
    """The paper's quantity for a sequence model: on every held-out map, for every safe cell the agent
    can reach and leave towards G (game.cell_prefixes), the model's next-move distribution after the
    shortest safe prefix that reaches the cell (its probabilities of L D R U, renormalised over the
    four) against the optimal policy there (equal mass on the moves that get closer to G).
    Returns {'move_mse': mean over cells of the mean over the 4 moves of the squared difference,
    'move_greedy_optimal': fraction of cells whose most probable move is optimal, 'n_cells'}."""
    action_ids = [tokenizer.convert_tokens_to_ids(a) for a in ACTIONS]
    prompts, optimal = [], []
    for row in rows:
        cells = cell_prefixes(row["map"])
        prompts += prefix_prompts(tokenizer, row, [p for _, p, _ in cells], eot)
        optimal += [m for _, _, m in cells]
    _, probs = greedy_decode(model, prompts, 1, tokenizer.convert_tokens_to_ids(eot), tokenizer.pad_token_id,
                             track_ids=action_ids, batch_size=batch_size)
    sq, hits = [], []
    for p, best in zip(probs, optimal):
        q = p[0] / p[0].sum()
        target = np.array([1.0 / len(best) if a in best else 0.0 for a in ACTIONS])
        sq.append(float(((q - target) ** 2).mean()))
        hits.append(ACTIONS[int(q.argmax())] in best)
    return {"move_mse": float(np.mean(sq)), "move_greedy_optimal": float(np.mean(hits)), "n_cells": len(sq)}


def recovery(model, tokenizer, rows, eot, max_new_tokens=40, batch_size=64):
    """The recovery test: the answer is forced to start with one safe but non-optimal move
    (game.detour_prefix), the model continues greedily, and the whole answer is played in gymnasium.
    Returns {'recovery_rate': fraction of the maps with such a prefix where the goal is reached,
    'n_recovery_maps'}."""
    chosen = [(r, detour_prefix(r["map"])) for r in rows]
    chosen = [(r, p) for r, p in chosen if p is not None]
    prompts = [prefix_prompts(tokenizer, r, [p], eot)[0] for r, p in chosen]
    new_ids, _ = greedy_decode(model, prompts, max_new_tokens, tokenizer.convert_tokens_to_ids(eot),
                               tokenizer.pad_token_id, batch_size=batch_size)
    texts = [p + tokenizer.decode(ids, skip_special_tokens=True).strip() for (_, p), ids in zip(chosen, new_ids)]
    _, metrics = score_answers([r for r, _ in chosen], texts)
    return {"recovery_rate": metrics["success_rate"], "n_recovery_maps": len(chosen)}


CELL_COLOURS = {"S": "#9ecae1", "F": "#f0f8ff", "H": "#08306b", "G": "#74c476"}


def draw_path(desc, answer, probs, path, title):
    """The map, the model's path (its parseable prefix), and in each cell the path visits before a
    move the model's probability of each move (L/D/R/U, written at that side of the cell) given its
    own path so far; the move it took is in bold red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows, cols = len(desc), len(desc[0])
    fig, ax = plt.subplots(figsize=(1.1 * cols + 1.2, 1.1 * rows + 1.3))
    for r in range(rows):
        for c in range(cols):
            ax.add_patch(Rectangle((c, r), 1, 1, facecolor=CELL_COLOURS[desc[r][c]], edgecolor="grey"))
            if desc[r][c] != "F":
                ax.text(c + 0.5, r + 0.5, desc[r][c], ha="center", va="center", fontsize=14, alpha=0.5,
                        color="white" if desc[r][c] == "H" else "black")
    moves = re.match(r"[LDRU]*", answer.strip()).group(0)
    pos, trail = find(desc, "S"), [find(desc, "S")]
    for i in range(len(probs)):
        for a, p in zip(ACTIONS, probs[i]):
            dr, dc = MOVES[a]
            taken = i < len(moves) and a == moves[i]
            ax.text(pos[1] + 0.5 + 0.33 * dc, pos[0] + 0.5 + 0.33 * dr, f"{p:.2f}", ha="center", va="center",
                    fontsize=7, color="#d62728" if taken else "#333333", fontweight="bold" if taken else "normal")
        if i >= len(moves):
            break
        dr, dc = MOVES[moves[i]]
        pos = (min(max(pos[0] + dr, 0), rows - 1), min(max(pos[1] + dc, 0), cols - 1))
        trail.append(pos)
        if desc[pos[0]][pos[1]] in "GH":  # the episode ends here
            break
    for (r0, c0), (r1, c1) in zip(trail, trail[1:]):
        ax.annotate("", xy=(c1 + 0.5, r1 + 0.5), xytext=(c0 + 0.5, r0 + 0.5),
                    arrowprops=dict(arrowstyle="->", color="#d62728", lw=1.8, alpha=0.6))
    ax.plot([], [], color="#d62728", label=f"model's path: {answer.strip() or '(empty)'}")
    ax.plot([], [], color="none", label="numbers: P(move to that side | the model's own path so far)")
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_aspect("equal")
    ax.set_xticks([c + 0.5 for c in range(cols)], [str(c) for c in range(cols)])
    ax.set_yticks([r + 0.5 for r in range(rows)], [str(r) for r in range(rows)])
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def method_of(run_dir):
    """'ift' for a run directory named 'ift_seed2' (the layout commands/run_frozen_lake.sh writes)."""
    return re.sub(r"_seed\d+$", "", Path(run_dir).name)


def write_results(metrics_by_run, path):
    """results.json: method -> {"success_rate": per-seed list, "mean", "std" (sample std; 0 for one seed), "n_seeds"}."""
    by_method = {}
    for run_dir, m in sorted(metrics_by_run.items()):
        by_method.setdefault(method_of(run_dir), []).append(m["success_rate"])
    out = {k: {"success_rate": v, "mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
               "n_seeds": len(v)} for k, v in by_method.items()}
    write_json(path, out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories holding final/")
    p.add_argument("--data", required=True, help="the directory build_data wrote (its test.jsonl is played)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--picture-map", type=int, default=None, help="index of the test map to draw")
    p.add_argument("--results", help="also write this results.json over all the runs")
    p.add_argument("--skip-played", action="store_true", help="reuse the task_metrics.json of runs that have one")
    p.add_argument("--measures", action="store_true",
                   help="also the next-move quality at every cell and the recovery test (move_quality, recovery)")
    a = p.parse_args()
    rows = load_rows(a.data)
    all_metrics = {}
    for run in a.runs:
        if not (Path(run) / "final").is_dir():
            raise SystemExit(f"{run}: no final/ model (did the run finish?)")
        played = Path(run) / "task_metrics.json"
        if a.skip_played and played.is_file():
            all_metrics[run] = json.loads(played.read_text())
            continue
        m = all_metrics[run] = evaluate_run(run, rows, a.max_new_tokens, a.picture_map, a.measures)
        print(f"{run}: solved {m['success_rate']:.1%} of {m['n_maps']} held-out maps, "
              f"unparseable {m['unparseable_rate']:.1%}")
    if a.results:
        for method, r in write_results(all_metrics, a.results).items():
            print(f"{method}: success {r['mean']:.3f} ± {r['std']:.3f} over {r['n_seeds']} seeds")


if __name__ == "__main__":
    main()
