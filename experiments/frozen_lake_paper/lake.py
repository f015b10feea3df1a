"""The paper's Frozen Lake (ACL 2025 §5.3, App. B.2) as pure functions: maps with one optimal and one
sub-optimal trajectory, the optimal policy by value iteration on gymnasium's own transition table,
and the scores of a policy's state-transition matrix.

States are gymnasium's: s = row * ncol + col. Moves are gymnasium's actions 0..3 = LEFT, DOWN, RIGHT,
UP, deterministic (is_slippery=False); a move off the map leaves the agent where it is. Holes (H) and
the goal (G) end an episode: they are the terminal states. Every other state (S and F) is
non-terminal and is scored.

The transition matrix of a policy (what the score compares), for a non-terminal state s:
    N(s) = the distinct states that one move from s reaches (gymnasium's P[s][a] for a = 0..3);
    P(s' | s) = the policy's probability of moving to s', over s' in N(s) (0 for every other s').
A language-model policy whose tokens are states gives P(s' | s) = softmax of its logits for the
tokens of N(s) at the position of state s's token (`policy_transitions`). The optimal policy's
matrix P* puts equal mass on the states that the optimal moves reach: the moves a with
Q*(s, a) = max_a' Q*(s, a') (value iteration, discount GAMMA, reward 1 on reaching G).
    mse(P, P*)        = mean over non-terminal s and all states s' of (P(s'|s) - P*(s'|s))^2
    greedy_optimal(P) = fraction of non-terminal s whose most probable next state is one of P*'s
"""

from collections import deque

import numpy as np

GAMMA = 0.9  # value iteration's discount: any value in (0, 1) gives the same optimal moves here


def transition_table(desc):
    """gymnasium's own table for this map: P[s][a] = [(prob, next_state, reward, terminated)]."""
    import gymnasium as gym

    env = gym.make("FrozenLake-v1", desc=list(desc), is_slippery=False)
    try:
        return env.unwrapped.P
    finally:
        env.close()


def terminal(desc):
    """(nS,) bool: holes and the goal."""
    return np.array([c in "HG" for row in desc for c in row])


def value_iteration(P, n_states, gamma=GAMMA, tol=1e-12):
    """Q* (nS, 4) of the table P: Q(s, a) = sum over outcomes of p * (r + gamma * V(s') * (not terminated))."""
    v = np.zeros(n_states)
    while True:
        q = np.array([[sum(p * (r + gamma * v[s2] * (not done)) for p, s2, r, done in P[s][a]) for a in range(4)]
                      for s in range(n_states)])
        new = q.max(1)
        if np.abs(new - v).max() < tol:
            return q
        v = new


def successors(P, s):
    """N(s): the distinct states one move from s reaches, in action order (deterministic table)."""
    out = []
    for a in range(4):
        (_, s2, _, _), = P[s][a]
        if s2 not in out:
            out.append(s2)
    return out


def optimal_transitions(desc):
    """P* (nS, nS): on each non-terminal row, equal mass on the states the Q*-maximising moves reach;
    terminal rows are zero (never scored)."""
    P, n = transition_table(desc), len(desc) * len(desc[0])
    q = value_iteration(P, n)
    out, term = np.zeros((n, n)), terminal(desc)
    for s in np.flatnonzero(~term):
        best = {P[s][a][0][1] for a in range(4) if q[s, a] >= q[s].max() - 1e-9}
        out[s, sorted(best)] = 1.0 / len(best)
    return out


def policy_transitions(desc, logits_by_state):
    """P (nS, nS) of a policy from its logits: logits_by_state (nS, nS), row s = the policy's logit of
    each state's token at state s. Each non-terminal row is the softmax over N(s); terminal rows are zero."""
    P, n = transition_table(desc), len(desc) * len(desc[0])
    out, term = np.zeros((n, n)), terminal(desc)
    for s in np.flatnonzero(~term):
        nxt = successors(P, s)
        z = np.asarray(logits_by_state[s], dtype=np.float64)[nxt]
        e = np.exp(z - z.max())
        out[s, nxt] = e / e.sum()
    return out


def scores(desc, policy, optimal=None):
    """{'mse', 'greedy_optimal', 'solved'} of policy matrix `policy` against P* (see the module text).
    solved: the greedy policy, followed from S for at most nS moves, reaches G (1.0) or not (0.0)."""
    optimal = optimal_transitions(desc) if optimal is None else optimal
    rows = np.flatnonzero(~terminal(desc))
    mse = float(((policy[rows] - optimal[rows]) ** 2).mean())
    greedy = policy[rows].argmax(1)
    good = float(np.mean(optimal[rows, greedy] > 0))
    flat, s = "".join(desc), "".join(desc).index("S")
    for _ in range(len(flat)):
        if flat[s] in "HG":
            break
        s = int(policy[s].argmax())
    return {"mse": mse, "greedy_optimal": good, "solved": float(flat[s] == "G")}


# ---------------------------------------------------------------- maps and trajectories

def _neighbours(desc, s):
    n_cols = len(desc[0])
    r, c = divmod(s, n_cols)
    for dr, dc in ((0, -1), (1, 0), (0, 1), (-1, 0)):
        if 0 <= r + dr < len(desc) and 0 <= c + dc < n_cols:
            yield (r + dr) * n_cols + c + dc


def safe_path(desc, banned=frozenset()):
    """A shortest S -> G state path over safe cells that avoids `banned` (breadth-first search, neighbours
    in gymnasium's action order), or None."""
    flat = "".join(desc)
    start, goal = flat.index("S"), flat.index("G")
    prev, queue = {start: None}, deque([start])
    while queue:
        s = queue.popleft()
        if s == goal:
            path = [s]
            while prev[path[-1]] is not None:
                path.append(prev[path[-1]])
            return path[::-1]
        for s2 in _neighbours(desc, s):
            if s2 not in prev and flat[s2] != "H" and s2 not in banned:
                prev[s2] = s
                queue.append(s2)
    return None


def trajectories(desc):
    """(optimal, sub_optimal) state paths from S to G: a shortest safe path, and the shortest safe path
    that shares no cell with it except S and G (a different route, longer); sub_optimal is None when
    no such route is at least 2 moves longer (both None when G cannot be reached)."""
    best = safe_path(desc)
    other = None if best is None else safe_path(desc, banned=frozenset(best[1:-1]))
    if other is None or len(other) < len(best) + 2:
        return best, None
    return best, other


def wall_map(size, rng, hole_p=0.15):
    """One map of the paper's kind, or None: a wall of holes across the lake with two gaps at least
    two cells apart, S on one side and G on the other, a few random holes elsewhere (probability
    hole_p per cell), then at random transposed and flipped. Accepted only when the route through the
    far gap is at least 2 moves longer than the shortest one (`trajectories`)."""
    n = size
    wall = int(rng.integers(2, n - 2))
    g1, g2 = sorted(int(x) for x in rng.choice(n, 2, replace=False))
    if g2 - g1 < 2:
        return None
    grid = [["H" if rng.random() < hole_p else "F" for _ in range(n)] for _ in range(n)]
    grid[wall] = ["H"] * n
    for r in (wall - 1, wall, wall + 1):  # each gap can be entered and left
        grid[r][g1] = grid[r][g2] = "F"
    grid[0][int(rng.integers(n))] = "S"
    grid[n - 1][int(rng.integers(n))] = "G"
    desc = ["".join(row) for row in grid]
    if rng.random() < 0.5:
        desc = ["".join(col) for col in zip(*desc)]
    if rng.random() < 0.5:
        desc = desc[::-1]
    return desc if trajectories(desc)[1] is not None else None


def generate_maps(n, seed=7, sizes=(5, 6, 7)):
    """n distinct maps of `wall_map`, map i of size sizes[i % len(sizes)]: how MAPS were drawn."""
    rng, maps = np.random.default_rng(seed), []
    while len(maps) < n:
        desc = wall_map(sizes[len(maps) % len(sizes)], rng)
        if desc is not None and desc not in maps:
            maps.append(desc)
    return maps


# generate_maps(30): the first 20 are the test maps, the last 10 the validation maps (tuning only).
TEST_MAPS = [
    ['FFHHF', 'FFFFF', 'FFHFF', 'SFFFG', 'FFHFF'],
    ['GFFFFF', 'FFFHFF', 'HHFHFH', 'HFFFFF', 'FFFFHF', 'FFFSFF'],
    ['FFFFSFF', 'FHFFFFF', 'FFFFFFF', 'HHFHHHF', 'FFFFFHF', 'FFFFHFF', 'FGFFFFF'],
    ['FFFFF', 'FFHFF', 'FFFFG', 'SFHFF', 'FHHFF'],
    ['GFFFFF', 'FFFFHH', 'FFFFFF', 'HHFHFH', 'FHFFFF', 'FFSFHF'],
    ['FFFFFFF', 'FFHFHFF', 'SFFFHHG', 'FFFFHFF', 'FFHFHFF', 'HFFFHFF', 'FFFFFFF'],
    ['FFGFH', 'FFFFF', 'FHHFH', 'FFFFH', 'SFFFF'],
    ['FFFHFF', 'FFFFFF', 'FHFHHF', 'FFFHFF', 'SFFHFF', 'FFFFFG'],
    ['FFSFFFF', 'FFFFFFF', 'HHHFHHF', 'FFFFFFF', 'FFFFFFF', 'FFFFFFF', 'GFFFHFF'],
    ['SFFFF', 'FFFFF', 'HFHHF', 'FFFFF', 'GFFFF'],
    ['FFGFFF', 'FHHFFF', 'FFFFFF', 'FHHHFH', 'FFFHFH', 'SFFFFF'],
    ['FFSFFFF', 'HFFFFHF', 'HFFFFFF', 'HFHHFHH', 'FFFFFHF', 'FFFFFFF', 'FFGFHHF'],
    ['FFGFF', 'FFFFF', 'HHFHF', 'FFFFF', 'FFFSF'],
    ['FSFHFF', 'FFFFFF', 'FHHHHF', 'FFFFFF', 'FFFHFF', 'FFFFFG'],
    ['HFFFFFF', 'HFHFFFF', 'FFHFFFF', 'FFHFFFG', 'FFHHFHF', 'SFFFFFH', 'HFHFFHF'],
    ['FFHFF', 'FFFFH', 'SHHFF', 'FFHFF', 'FFFFG'],
    ['FFFFFH', 'SFFHFF', 'FFFHFF', 'FHHHHF', 'FFFHFF', 'FFFFFG'],
    ['FFFFFGF', 'FFFFFFF', 'HHFHHFH', 'HFFFFFF', 'FFFFFFF', 'FFHFHFH', 'FFSFFFH'],
    ['HFFGH', 'FFFFF', 'FHHFH', 'FFFFF', 'HSFFF'],
    ['FFFFFH', 'FFHFFG', 'FFHFFF', 'FFHFFH', 'SFFFFH', 'HHHFFF'],
]

VALIDATION_MAPS = [
    ['FFFFFFF', 'FFFFHFF', 'FFFFHFF', 'FFFHHFG', 'FFFFHFF', 'SFFFFFF', 'FFFFHHF'],
    ['FFFFF', 'SFHFH', 'FFHFF', 'FFFFF', 'FFHFG'],
    ['FSFFFF', 'FFFFFF', 'FHFHFF', 'HHFHFH', 'HFFHFF', 'FFGFFF'],
    ['FFHFFFF', 'FFFFFFF', 'SFHFHFG', 'FFHFHFF', 'FFHFFFF', 'HFFFFFF', 'FFHFFFH'],
    ['FGFFF', 'FFFFF', 'HFHHF', 'FFFFF', 'FFSFF'],
    ['FFGHFF', 'FFFFFF', 'HFHHHF', 'FFFFFF', 'HFFFHF', 'FFFFFS'],
    ['FFGFFHH', 'FHFFFFF', 'FHHHFHH', 'FFFFFFH', 'HFFFFFF', 'HFFFFFF', 'FFFFSHF'],
    ['FSFFF', 'FFFFF', 'FHFHH', 'FFFFF', 'HFGFH'],
    ['FFFFGH', 'FHFFFF', 'FHHHHF', 'FFFFFF', 'HFFFFF', 'FFFSFF'],
    ['FFFFSFF', 'FFFHHFF', 'FFFFFFF', 'HHFFFHF', 'HHFHHHF', 'FFFFFFF', 'FFGFFHF'],
]
