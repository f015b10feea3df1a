"""The game itself: maps as text, shortest safe paths, plausible wrong paths, and playing an answer
in gymnasium's FrozenLake-v1.

A map is a list of equal-length row strings over S (start), F (frozen), H (hole), G (goal), as
`gymnasium.envs.toy_text.frozen_lake.generate_random_map` returns them. Positions are (row, col);
actions are gymnasium's: 0 = LEFT, 1 = DOWN, 2 = RIGHT, 3 = UP, written as the letters L D R U.
The tiny model's byte-level BPE has no merge between any two of S F H G (nor of L D R U), so every
cell and every action is exactly one token (tests/test_frozen_lake.py checks this).
"""

import re
from collections import deque

import numpy as np

ACTIONS = "LDRU"                                   # index = gymnasium's action id
MOVES = {"L": (0, -1), "D": (1, 0), "R": (0, 1), "U": (-1, 0)}
# Among shortest paths we take, at every cell, the first action of this order that gets one step
# closer to the goal: a rule that depends on the cell alone, so the answer is a function of the map.
TIE_ORDER = "DRLU"
ANSWER_RE = re.compile(r"^[LDRU]+$")
# Short on purpose: every prompt token costs compute, and the legend is the same for every map.
TASK = "Frozen lake:\n{map}\nShortest safe path?"


def map_text(desc):
    return "\n".join(desc)


def prompt_text(desc):
    return TASK.format(map=map_text(desc))


def find(desc, letter):
    for r, row in enumerate(desc):
        if letter in row:
            return r, row.index(letter)
    raise ValueError(f"map {desc} has no {letter!r}")


def step(desc, pos, action):
    """The deterministic (is_slippery=False) move: walking off the map leaves the agent in place."""
    dr, dc = MOVES[action]
    r, c = pos[0] + dr, pos[1] + dc
    return (r, c) if 0 <= r < len(desc) and 0 <= c < len(desc[0]) else pos


def distances_to_goal(desc):
    """(rows, cols) int array: moves from each cell to G over safe cells (S, F, G); -1 = unreachable or a hole.
    Breadth-first search backwards from G (moves are reversible on safe cells)."""
    dist = np.full((len(desc), len(desc[0])), -1, dtype=np.int64)
    goal = find(desc, "G")
    dist[goal] = 0
    queue = deque([goal])
    while queue:
        pos = queue.popleft()
        for a in ACTIONS:
            nxt = step(desc, pos, a)
            if nxt != pos and desc[nxt[0]][nxt[1]] != "H" and dist[nxt] < 0:
                dist[nxt] = dist[pos] + 1
                queue.append(nxt)
    return dist


def shortest_path(desc):
    """The canonical shortest safe path from S to G as a string of actions, or None when G is unreachable."""
    dist = distances_to_goal(desc)
    pos = find(desc, "S")
    if dist[pos] < 0:
        return None
    path = ""
    while dist[pos] > 0:
        a = next(a for a in TIE_ORDER if dist[step(desc, pos, a)] == dist[pos] - 1 and step(desc, pos, a) != pos)
        path += a
        pos = step(desc, pos, a)
    return path


def outcome(desc, actions):
    """Where a path ends by our own rules: 'goal', 'hole' or 'short' (stops elsewhere)."""
    pos = find(desc, "S")
    for a in actions:
        pos = step(desc, pos, a)
        if desc[pos[0]][pos[1]] in "GH":
            return "goal" if desc[pos[0]][pos[1]] == "G" else "hole"
    return "short"


def wrong_path(desc, best, rng):
    """A plausible wrong answer: the shortest path's first k moves, then either a step into an adjacent
    hole, or a different turn followed by the rest of the original moves, or simply stopping early.
    Each candidate must fail (fall into a hole or not reach G); one is drawn with `rng`."""
    candidates = []
    pos = find(desc, "S")
    for k in range(len(best)):
        prefix = best[:k]
        for a in ACTIONS:
            if a == best[k]:
                continue
            nxt = step(desc, pos, a)
            if desc[nxt[0]][nxt[1]] == "H":
                candidates.append(prefix + a)                  # walks into a hole next to the path
            elif nxt != pos:
                candidates.append(prefix + a + best[k + 1:])   # a wrong turn, then the old plan
        if k > 0:
            candidates.append(prefix)                          # gives up before the goal
        pos = step(desc, pos, best[k])
    candidates = sorted({c for c in candidates if c and outcome(desc, c) != "goal"})
    return candidates[rng.integers(len(candidates))]


def parse_answer(text):
    """The actions of a model's answer, or None when it is not a non-empty string of L/D/R/U."""
    text = text.strip()
    return text if ANSWER_RE.match(text) else None


def play(desc, actions):
    """Execute `actions` in gymnasium's FrozenLake-v1 (is_slippery=False, this map) until the episode
    ends. Returns (reward, moves taken): reward 1.0 only when the environment says G was reached."""
    import gymnasium as gym

    env = gym.make("FrozenLake-v1", desc=desc, is_slippery=False)
    try:
        env.reset(seed=0)
        reward, taken = 0.0, 0
        for a in actions:
            _, reward, terminated, truncated, _ = env.step(ACTIONS.index(a))
            taken += 1
            if terminated or truncated:
                break
        return float(reward), taken
    finally:
        env.close()


def optimal_moves(desc, pos, dist=None):
    """The moves from `pos` that get one step closer to G over safe cells (empty when G is unreachable)."""
    dist = distances_to_goal(desc) if dist is None else dist
    if dist[pos] <= 0:
        return ""
    return "".join(a for a in ACTIONS if step(desc, pos, a) != pos and dist[step(desc, pos, a)] == dist[pos] - 1)


def cell_prefixes(desc):
    """For every safe cell from which G can be reached, the shortest safe prefix that gets there from S
    (breadth-first over S/F cells, never through G or a hole; moves tried in TIE_ORDER) and the optimal
    moves there: [(pos, prefix, optimal_moves)], S first (with the empty prefix). Cells the agent cannot
    reach from S, or from which G cannot be reached, are left out."""
    dist = distances_to_goal(desc)
    start = find(desc, "S")
    prefix, queue = {start: ""}, deque([start])
    while queue:
        pos = queue.popleft()
        for a in TIE_ORDER:
            nxt = step(desc, pos, a)
            if nxt not in prefix and desc[nxt[0]][nxt[1]] in "SF":
                prefix[nxt] = prefix[pos] + a
                queue.append(nxt)
    return [(pos, p, optimal_moves(desc, pos, dist)) for pos, p in prefix.items() if dist[pos] > 0]


def detour_prefix(desc):
    """The recovery test's prefix: the shortest path's first k moves, then one safe move that is not
    optimal (it stays on the lake, enters no hole, does not reach G and leaves G reachable), at the
    first k where such a move exists; None when the path offers none."""
    dist = distances_to_goal(desc)
    best, pos = shortest_path(desc), find(desc, "S")
    for k in range(len(best)):
        for a in ACTIONS:
            nxt = step(desc, pos, a)
            if nxt != pos and a not in optimal_moves(desc, pos, dist) and dist[nxt] > 0:
                return best[:k] + a
        pos = step(desc, pos, best[k])
    return None
