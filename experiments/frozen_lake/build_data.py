"""Write the Frozen Lake data set: random solvable maps of 4x4 to 6x6 from gymnasium's
`generate_random_map` (each map seeded by its index), the shortest safe path as the answer and a
plausible wrong path as the rejected answer, in the ultrafeedback schema that train.py reads
(`datasets=[DIR]` loads DIR/train.jsonl and DIR/test.jsonl):

    {"prompt": str, "chosen": [user, assistant], "rejected": [user, assistant], "messages": [user, assistant],
     "map": [row, ...], "optimal_length": int, "rejected_outcome": "hole" | "short"}

Test maps are drawn first and never appear in train.jsonl (maps are compared as text).

    python -m experiments.frozen_lake.build_data --out runs/frozen_lake/data --n-train 4000 --n-test 200
"""

import argparse
import json
from pathlib import Path

import numpy as np

from experiments.frozen_lake.game import outcome, prompt_text, shortest_path, wrong_path

SIZES = (4, 5, 6)


def random_maps(n, seed, exclude=(), sizes=SIZES):
    """n distinct maps, not in `exclude`; map i has size sizes[i % len(sizes)] and gymnasium seed
    (seed, i), so the set is a function of (n, seed). generate_random_map only returns solvable maps."""
    from gymnasium.envs.toy_text.frozen_lake import generate_random_map

    seen, maps, i = {tuple(m) for m in exclude}, [], 0
    while len(maps) < n:
        desc = generate_random_map(size=sizes[len(maps) % len(sizes)], p=0.8, seed=seed * 1_000_003 + i)
        i += 1
        if tuple(desc) not in seen:
            seen.add(tuple(desc))
            maps.append(desc)
        if i > 100 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct maps; ask for fewer")
    return maps


def make_row(desc, rng):
    best = shortest_path(desc)
    bad = wrong_path(desc, best, rng)
    user = {"role": "user", "content": prompt_text(desc)}
    chosen = [user, {"role": "assistant", "content": best}]
    return {"prompt": user["content"], "chosen": chosen, "rejected": [user, {"role": "assistant", "content": bad}],
            "messages": chosen, "map": list(desc), "optimal_length": len(best),
            "rejected_outcome": outcome(desc, bad)}


def build(out, n_train, n_test, seed=0, n_val=0):
    """Write out/train.jsonl and out/test.jsonl; returns (train rows, test rows). With n_val > 0 also
    out/validation/, a data set of its own for tuning: the same train.jsonl, and n_val maps drawn apart
    from both the test and the training maps as its test.jsonl (what train.py evaluates on)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    test_maps = random_maps(n_test, seed=2 * seed + 1)
    val_maps = random_maps(n_val, seed=VALIDATION_SEED + seed, exclude=test_maps) if n_val else []
    train_maps = random_maps(n_train, seed=2 * seed, exclude=test_maps + val_maps)
    rng = np.random.default_rng(seed)
    splits = {"test": [make_row(m, rng) for m in test_maps], "train": [make_row(m, rng) for m in train_maps]}
    for name, rows in splits.items():
        write_rows(out / f"{name}.jsonl", rows)
    if n_val:
        (out / "validation").mkdir(exist_ok=True)
        write_rows(out / "validation" / "test.jsonl", [make_row(m, rng) for m in val_maps])
        write_rows(out / "validation" / "train.jsonl", splits["train"])
    return splits["train"], splits["test"]


VALIDATION_SEED = 10_000  # validation maps are drawn from their own seeds (then kept apart from the test maps)


def write_rows(path, rows):
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)  # a crash never leaves half a file under the real name


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for train.jsonl and test.jsonl")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-val", type=int, default=0, help="also write OUT/validation/ with this many tuning maps")
    a = p.parse_args()
    train, test = build(a.out, a.n_train, a.n_test, a.seed, a.n_val)
    lengths = [r["optimal_length"] for r in train]
    print(f"frozen lake data: {len(train)} train / {len(test)} test maps in {a.out}; "
          f"optimal path length {min(lengths)}-{max(lengths)} (mean {np.mean(lengths):.1f})")


if __name__ == "__main__":
    main()
