#!/usr/bin/env python
"""Generate small synthetic sample datasets in the exact schemas of the hub datasets.

Run from the repo root:  python -m scripts.make_sample_data

Writes (all JSON Lines, one record per line, deterministic for a fixed --seed):

  data/ultrachat_200k/{train_sft,test_sft}.jsonl            HuggingFaceH4/ultrachat_200k
  data/ultrafeedback_binarized/{train_prefs,test_prefs}.jsonl HuggingFaceH4/ultrafeedback_binarized
  data/hh-rlhf/{train,test}.jsonl                           Anthropic/hh-rlhf
  data/shp/{train,test}.jsonl                               stanfordnlp/SHP
  data/orca_dpo_pairs/train.jsonl                           Intel/orca_dpo_pairs (train only, as on the hub)

The content is synthetic: a mix of short, deterministic tasks that a ~1M parameter model
can learn in a couple of minutes of CPU training (task weights in TASK_MIX):

  copy      repeat a list of 3-4 words (list on its own line)           "lamp star boat"
  sort      sort 3-5 distinct single digits                             "1 2 5 8"
  minmax    largest / smallest of 3-5 distinct digits                   "8"
  sequence  next / previous weekday or month    "The day after Monday is Tuesday."
  add       add two single-digit numbers                                "3 + 4 = 7"
  fact      colour of a fruit, capital of a made-up country, opposite of a word
                                                "The capital of Zorland is Brimtown."
Every prompt may get one of a few fixed prefixes ("Quick question: ", ...).  Answers of
the closed tasks restate the question in one canonical form; this is what lets a tiny model
transfer an item learned under some templates to a held-out template.  A "reverse" task is
implemented but disabled (weight 0): with byte-level BPE the first/last word of a reversed
list is a different token (" lamp" vs "lamp"), and a tiny model does not learn it in the
demo budget.

Preference datasets pair the correct answer (chosen) with a plausible wrong one
(rejected): off-by-one sums, wrong order, dropped/swapped words, a different item, ...
"""

import argparse
import hashlib
import json
import os
import random

# ---------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------

WORDS = [
    "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "car", "book",
    "door", "ring", "cup", "hat", "key", "box", "pen", "egg", "map", "bell",
    "rose", "lamp", "frog", "kite", "boat", "cake", "milk", "rain", "snow", "leaf",
]

SEQUENCES = {
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "month": ["January", "February", "March", "April", "May", "June", "July",
              "August", "September", "October", "November", "December"],
}
CYCLIC = {"day": True, "month": True}

FRUIT_COLOURS = {
    "banana": "yellow", "lemon": "yellow", "apple": "red", "cherry": "red",
    "strawberry": "red", "raspberry": "red", "lime": "green", "pear": "green",
    "avocado": "green", "grape": "purple", "plum": "purple", "blueberry": "blue",
    "orange": "orange", "tangerine": "orange", "coconut": "brown",
}
COLOURS = sorted(set(FRUIT_COLOURS.values()))

CAPITALS = {
    "Zorland": "Brimtown", "Quexia": "Kelport", "Borlavia": "Ashford",
    "Tamoria": "Duvale", "Velnor": "Moravik", "Krastia": "Stelby",
    "Lumeria": "Pirran", "Pondavia": "Tarnis", "Drevia": "Olvetta",
    "Sarnok": "Fenmark", "Mirelia": "Quillon", "Gostavia": "Harnwick",
}

OPPOSITE_PAIRS = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"),
    ("happy", "sad"), ("light", "dark"), ("old", "new"), ("open", "closed"),
    ("wet", "dry"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
    ("loud", "quiet"), ("rich", "poor"), ("thick", "thin"), ("win", "lose"),
    ("first", "last"), ("push", "pull"), ("day", "night"),
]
OPPOSITES = {}
for _a, _b in OPPOSITE_PAIRS:
    OPPOSITES[_a] = _b
    OPPOSITES[_b] = _a

PREFIXES = ["", "Quick question: ", "Please answer briefly. ", "Help me with this. "]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Reply with the answer only.",
]

ORCA_SYSTEMS = [
    "",
    "You are an AI assistant. Answer the question exactly.",
    "You are a helpful assistant, who always provides a short answer.",
]

# ---------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------

LIST_TEMPLATES = {
    # the word list goes on its own line, so the answer's first word is the same token
    # as in the prompt (byte-level BPE: "lamp" at a line start != " lamp" mid-line)
    "copy": [
        "Repeat these words:\n{x}",
        "Copy this list of words:\n{x}",
        "Say these words again in the same order:\n{x}",
        "Write the following words exactly:\n{x}",
    ],
    "reverse": [
        "Reverse the order of these words:\n{x}",
        "Write these words in reverse order:\n{x}",
        "List these words backwards:\n{x}",
    ],
    "minmax": [
        "What is the largest of these numbers: {x}",
        "Find the biggest number: {x}",
        "Which number is the largest? {x}",
        "What is the smallest of these numbers: {x}",
        "Find the smallest number: {x}",
        "Which number is the smallest? {x}",
    ],
    "sort": [
        "Sort these numbers from smallest to largest: {x}",
        "Put these numbers in increasing order: {x}",
        "Arrange these digits in ascending order: {x}",
    ],
}

SEQ_TEMPLATES = {
    "next": [
        "What {kind} comes after {x}?",
        "Which {kind} follows {x}?",
        "Name the {kind} right after {x}.",
        "Tell me the {kind} that follows {x}.",
    ],
    "prev": [
        "What {kind} comes before {x}?",
        "Which {kind} precedes {x}?",
        "Name the {kind} right before {x}.",
        "Tell me the {kind} just before {x}.",
    ],
}

ADD_TEMPLATES = [
    "What is {a} + {b}?",
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "Compute the sum of {a} and {b}.",
]

FACT_TEMPLATES = {
    "colour": [
        "What colour is {art} {x}?",
        "What is the colour of {art} {x}?",
        "Tell me the colour of {art} {x}.",
        "A ripe {x} is usually what colour?",
    ],
    "capital": [
        "What is the capital of {x}?",
        "Name the capital city of {x}.",
        "Which city is the capital of {x}?",
        "The capital of {x} is which city?",
    ],
    "opposite": [
        "What is the opposite of {x}?",
        "Give the opposite of the word {x}.",
        "Name a word that means the opposite of {x}.",
        "What word is the antonym of {x}?",
    ],
}

TASK_MIX = {"copy": 0.22, "reverse": 0.0, "sort": 0.12, "minmax": 0.12,
            "sequence": 0.16, "add": 0.16, "fact": 0.22}
TASKS = [t for t, w in TASK_MIX.items() if w > 0]
TASK_WEIGHTS = [TASK_MIX[t] for t in TASKS]

LIST_HOLDOUT_MOD = 8        # ~1/8 of word/number lists are test-only
CLOSED_HOLDOUT_P = 0.30     # fraction of closed-task items with one test-only template


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def _stable_hash(obj):
    return int(hashlib.sha256(repr(obj).encode()).hexdigest(), 16)


# ---------------------------------------------------------------------------------------
# Task generator with a fixed train/test partition of keys
# ---------------------------------------------------------------------------------------

class TaskBank:
    """Builds task instances; ``split`` in {"train", "test"} selects the key partition."""

    def __init__(self, seed):
        rng = random.Random(seed * 7919 + 1)
        # closed items: (kind, item) -> list of templates; choose held-out templates
        self.closed = {}  # name -> list of (item, template_index, split)
        items = {
            "sequence": [(kind, x, d) for kind, seq in SEQUENCES.items() for i, x in enumerate(seq)
                         for d in ("next", "prev")
                         if CYCLIC[kind] or (d == "next" and i < len(seq) - 1) or (d == "prev" and i > 0)],
            "add": [(a, b) for a in range(10) for b in range(10)],
            "fact": [("colour", f) for f in FRUIT_COLOURS] + [("capital", c) for c in CAPITALS]
                    + [("opposite", w) for w in OPPOSITES],
        }
        for name, its in items.items():
            keys = {"train": [], "test": []}
            for it in its:
                n_t = len(self._templates(name, it))
                held = rng.randrange(n_t) if rng.random() < CLOSED_HOLDOUT_P else None
                for t in range(n_t):
                    keys["test" if t == held else "train"].append((it, t))
            self.closed[name] = keys

    # -- templates & answers -------------------------------------------------------------
    @staticmethod
    def _templates(name, item):
        if name == "sequence":
            return SEQ_TEMPLATES[item[2]]
        if name == "add":
            return ADD_TEMPLATES
        if name == "fact":
            return FACT_TEMPLATES[item[0]]
        return LIST_TEMPLATES[name]

    @staticmethod
    def _list_split(name, values):
        return "test" if _stable_hash((name, tuple(values))) % LIST_HOLDOUT_MOD == 0 else "train"

    def sample(self, rng, split, task=None):
        """Return a dict with task, key, prompt (without prefix), answer, wrong (list)."""
        name = task or rng.choices(TASKS, TASK_WEIGHTS)[0]
        if name in LIST_TEMPLATES:
            while True:
                if name in ("sort", "minmax"):
                    values = [str(d) for d in rng.sample(range(10), rng.randint(3, 5))]
                elif name == "reverse":
                    values = rng.sample(WORDS, rng.randint(3, 4))
                else:
                    values = rng.sample(WORDS, rng.randint(3, 4))
                if self._list_split(name, values) == split:
                    break
            t = rng.randrange(len(LIST_TEMPLATES[name]))
            prompt = LIST_TEMPLATES[name][t].format(x=" ".join(values))
            answer, wrong = self._list_answer(name, values, rng, t)
            return dict(task=name, key=(name, tuple(values)), prompt=prompt, answer=answer, wrong=wrong)

        item, t = rng.choice(self.closed[name][split])
        tmpl = self._templates(name, item)[t]
        if name == "sequence":
            kind, x, d = item
            seq = SEQUENCES[kind]
            i = seq.index(x)
            step = 1 if d == "next" else -1
            rel = "after" if d == "next" else "before"
            # canonical answer restating the question: transfers across templates
            answer = f"The {kind} {rel} {x} is {seq[(i + step) % len(seq)]}."
            cands = [f"The {kind} {rel} {x} is {seq[(i + k) % len(seq)]}."
                     for k in (-step, 2 * step, 0)]
            prompt = tmpl.format(kind=kind, x=x)
        elif name == "add":
            a, b = item
            s = a + b
            answer = f"{a} + {b} = {s}"
            cands = [f"{a} + {b} = {v}" for v in (s + 1, s - 1, s + 2, s - 2, a * b) if v >= 0 and v != s]
            prompt = tmpl.format(a=a, b=b)
        else:
            kind, x = item
            if kind == "colour":
                c = FRUIT_COLOURS[x]
                art = _article(x)
                answer = f"{art.capitalize()} {x} is {c}."
                cands = [f"{art.capitalize()} {x} is {o}." for o in COLOURS if o != c]
                prompt = tmpl.format(art=art, x=x)
            elif kind == "capital":
                answer = f"The capital of {x} is {CAPITALS[x]}."
                cands = [f"The capital of {x} is {o}." for o in CAPITALS.values() if o != CAPITALS[x]]
                prompt = tmpl.format(x=x)
            else:
                answer = f"The opposite of {x} is {OPPOSITES[x]}."
                cands = [f"The opposite of {x} is {o}." for o in sorted(OPPOSITES) if o not in (x, OPPOSITES[x])]
                prompt = tmpl.format(x=x)
        wrong = [c for c in cands if c != answer]
        rng.shuffle(wrong)
        return dict(task=name, key=(name, item, t), prompt=prompt, answer=answer, wrong=wrong)

    @staticmethod
    def _list_answer(name, values, rng, t):
        if name == "minmax":
            nums = sorted(int(v) for v in values)
            ans = nums[-1] if t < 3 else nums[0]
            other = [nums[0] if t < 3 else nums[-1], nums[-2] if t < 3 else nums[1]]
            other.append(rng.choice([d for d in range(10) if d not in nums]))
            wrong = [str(w) for w in other if w != ans]
            rng.shuffle(wrong)
            return str(ans), wrong
        if name == "copy":
            ans = list(values)
        elif name == "reverse":
            ans = list(reversed(values))
        else:
            ans = sorted(values, key=int)
        wrong = []
        # drop one element
        j = rng.randrange(len(ans))
        wrong.append(ans[:j] + ans[j + 1:])
        # swap two adjacent elements
        j = rng.randrange(len(ans) - 1)
        w = list(ans)
        w[j], w[j + 1] = w[j + 1], w[j]
        wrong.append(w)
        if name == "copy":
            w = list(ans)
            w[rng.randrange(len(w))] = rng.choice([x for x in WORDS if x not in ans])
            wrong.append(w)
        elif name == "reverse":
            wrong.append(list(values))  # not reversed at all
        else:
            wrong.append(sorted(values, key=int, reverse=True))  # wrong direction
        wrong = [" ".join(w) for w in wrong]
        answer = " ".join(ans)
        wrong = [w for w in wrong if w != answer]
        rng.shuffle(wrong)
        return answer, wrong


# ---------------------------------------------------------------------------------------
# Dataset builders
# ---------------------------------------------------------------------------------------

def _sha(s):
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def _turn(bank, rng, split, task=None):
    inst = bank.sample(rng, split, task)
    inst["text"] = rng.choice(PREFIXES) + inst["prompt"]
    return inst


def _unique_first(bank, rng, split, seen, max_tries=500):
    """A turn whose text is not in ``seen`` (prompts are unique within a file).

    The task is drawn first and then retried, so the task mix stays as in TASK_MIX even
    when the small closed tasks get close to exhausting their distinct prompts."""
    while True:
        task = rng.choices(TASKS, TASK_WEIGHTS)[0]
        for _ in range(max_tries):
            inst = _turn(bank, rng, split, task)
            if inst["text"] not in seen:
                seen.add(inst["text"])
                return inst


def _n_turns(rng, p_multi):
    return rng.choice([2, 3]) if rng.random() < p_multi else 1


def make_ultrachat(bank, rng, split, n):
    rows, seen = [], set()
    for _ in range(n):
        first = _unique_first(bank, rng, split, seen)
        turns = [first] + [_turn(bank, rng, split) for _ in range(_n_turns(rng, 0.10) - 1)]
        messages = []
        if rng.random() < 0.02:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for t in turns:
            messages.append({"role": "user", "content": t["text"]})
            messages.append({"role": "assistant", "content": t["answer"]})
        rows.append({"prompt": first["text"], "prompt_id": _sha(first["text"]), "messages": messages})
    return rows


def make_ultrafeedback(bank, rng, split, n):
    rows, seen = [], set()
    for _ in range(n):
        inst = _unique_first(bank, rng, split, seen)
        user = {"role": "user", "content": inst["text"]}
        chosen = [user, {"role": "assistant", "content": inst["answer"]}]
        rejected = [dict(user), {"role": "assistant", "content": inst["wrong"][0]}]
        score_chosen = rng.choice([7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0])
        score_rejected = rng.choice([1.0, 2.0, 3.0, 4.0, 5.0, 5.5, 6.0, 6.5])
        rows.append({
            "prompt": inst["text"],
            "prompt_id": _sha(inst["text"]),
            "chosen": chosen,
            "rejected": rejected,
            "messages": [dict(m) for m in chosen],
            "score_chosen": score_chosen,
            "score_rejected": score_rejected,
        })
    return rows


def make_hh(bank, rng, split, n):
    rows, seen = [], set()
    for _ in range(n):
        first = _unique_first(bank, rng, split, seen)
        turns = [first] + [_turn(bank, rng, split) for _ in range(_n_turns(rng, 0.30) - 1)]
        prefix = ""
        for t in turns[:-1]:
            prefix += f"\n\nHuman: {t['text']}\n\nAssistant: {t['answer']}"
        last = turns[-1]
        prefix += f"\n\nHuman: {last['text']}\n\nAssistant:"
        rows.append({"chosen": f"{prefix} {last['answer']}", "rejected": f"{prefix} {last['wrong'][0]}"})
    return rows


SHP_DOMAINS = {"copy": "explainlikeimfive", "reverse": "explainlikeimfive", "sort": "askmath", "minmax": "askmath",
               "add": "askmath", "sequence": "askhistorians", "fact": "askscience"}
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def _b36(rng, k):
    return "".join(rng.choice(_B36) for _ in range(k))


def make_shp(bank, rng, split, n):
    rows, seen = [], set()
    while len(rows) < n:
        inst = _unique_first(bank, rng, split, seen)
        post_id = _b36(rng, 6)
        upvote_ratio = round(rng.uniform(0.6, 1.0), 2)
        post_time = 1_400_000_000 + rng.randrange(250_000_000)
        # one correct comment, one or two wrong ones; each pair = correct vs wrong
        correct_id = _b36(rng, 7)
        correct_time = post_time + rng.randrange(1000, 90_000)
        n_pairs = min(len(inst["wrong"]), 2 if rng.random() < 0.3 else 1)
        for w in inst["wrong"][:n_pairs]:
            if len(rows) >= n:
                break
            wrong_id = _b36(rng, 7)
            # SHP keeps pairs where the preferred comment was written after the other one
            wrong_time = correct_time - rng.randrange(60, 20_000)
            wrong_score = rng.randint(1, 20)
            correct_score = wrong_score * rng.randint(2, 6) + rng.randint(0, 3)
            a_is_correct = rng.random() < 0.5
            A = (correct_id, correct_time, correct_score, inst["answer"])
            B = (wrong_id, wrong_time, wrong_score, w)
            if not a_is_correct:
                A, B = B, A
            rows.append({
                "post_id": post_id,
                "domain": f"{SHP_DOMAINS[inst['task']]}_{split}",
                "upvote_ratio": upvote_ratio,
                "history": inst["text"],
                "c_root_id_A": A[0],
                "c_root_id_B": B[0],
                "created_at_utc_A": A[1],
                "created_at_utc_B": B[1],
                "score_A": A[2],
                "score_B": B[2],
                "human_ref_A": A[3],
                "human_ref_B": B[3],
                "labels": 1 if a_is_correct else 0,
                "seconds_difference": float(abs(A[1] - B[1])),
                "score_ratio": max(A[2], B[2]) / min(A[2], B[2]),
            })
    return rows


def make_orca(bank, rng, split, n):
    rows, seen = [], set()
    for _ in range(n):
        inst = _unique_first(bank, rng, split, seen)
        rows.append({"system": rng.choice(ORCA_SYSTEMS), "question": inst["text"],
                     "chosen": inst["answer"], "rejected": inst["wrong"][0]})
    return rows


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {path}: {len(rows)} rows, {os.path.getsize(path) / 1024:.0f} KiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    bank = TaskBank(args.seed)
    plan = [
        ("ultrachat_200k/train_sft.jsonl", make_ultrachat, "train", 3000),
        ("ultrachat_200k/test_sft.jsonl", make_ultrachat, "test", 200),
        ("ultrafeedback_binarized/train_prefs.jsonl", make_ultrafeedback, "train", 1700),
        ("ultrafeedback_binarized/test_prefs.jsonl", make_ultrafeedback, "test", 200),
        ("hh-rlhf/train.jsonl", make_hh, "train", 500),
        ("hh-rlhf/test.jsonl", make_hh, "test", 100),
        ("shp/train.jsonl", make_shp, "train", 500),
        ("shp/test.jsonl", make_shp, "test", 100),
        ("orca_dpo_pairs/train.jsonl", make_orca, "train", 500),
    ]
    for i, (rel, fn, split, n) in enumerate(plan):
        rng = random.Random(args.seed * 1000 + i)  # independent stream per file
        write_jsonl(os.path.join(args.out, rel), fn(bank, rng, split, n))


if __name__ == "__main__":
    main()
