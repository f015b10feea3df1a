#!/usr/bin/env python
"""Write stand-ins for every registered dataset: the hub repository's file layout and columns, at any
row count, with text of the real datasets' length shapes (the words are random; only sizes matter).

    python -m scripts.make_standins OUT --rows 61136                 # all five datasets
    python -m scripts.make_standins OUT --rows 200000 --datasets ultrachat

Each dataset goes to OUT/<folder>/ laid out as a downloaded copy of its hub repository, so that
`dataset_paths.<name>=OUT/<folder>` loads it exactly as it would load the real download:

  ultrachat      OUT/ultrachat_200k/data/{train_sft,test_sft}-0000i-of-0000n.parquet   (HuggingFaceH4/ultrachat_200k)
  ultrafeedback  OUT/ultrafeedback_binarized/data/{train_prefs,test_prefs}-*.parquet   (HuggingFaceH4/ultrafeedback_binarized)
  hh             OUT/hh-rlhf/<subset>/{train,test}.jsonl.gz, four subsets               (Anthropic/hh-rlhf)
  shp            OUT/shp/<domain>/{train,validation,test}.json, JSON lines, 18 domains  (stanfordnlp/SHP)
  orca           OUT/orca_dpo_pairs/data/train-00000-of-00001.parquet                  (Intel/orca_dpo_pairs)

Lengths are in tokens of a Llama/Mistral-style tokenizer, drawn log-normal around the means below and
written as words at 0.75 words per token (the usual rule of thumb for English BPE text). Where the
figures come from (none of the texts is real):
  UltraChat: 3.85 rounds per conversation and 1,467.4 tokens per conversation on average (Ding et al.,
    "Enhancing Chat Language Models by Scaling High-quality Instructional Conversations", arXiv
    2305.14233, the dataset statistics table). Rounds are 1 + Poisson(2.85) (mean 3.85); a round's
    1467.4 / 3.85 = 381 tokens are split 1:3 between user and assistant (our assumption: the
    paper gives no split). The log-normal tail (sigma 0.6 per turn) puts a few percent of multi-turn
    prompts past 1,024 tokens, as the real data has.
  UltraFeedback, hh-rlhf, SHP, orca: no published length table we could cite; the means below are our
    assumptions, chosen so that each set has long prompts and long answers (SHP's Reddit posts and
    comments are the longest; hh-rlhf's transcripts are multi-turn with short turns). Row counts of the
    real repositories, for reference: ultrachat_200k train_sft 207,865 / test_sft 23,110;
    ultrafeedback_binarized train_prefs 61,135 / test_prefs 2,000; hh-rlhf 160,800 / 8,552;
    SHP 348,718 / 18,409; orca_dpo_pairs 12,859 (their dataset cards).
The test splits get --test-rows rows (default: 2% of --rows, at least 8).
"""

import argparse
import gzip
import json
import math
from pathlib import Path

import numpy as np

WORDS_PER_TOKEN = 0.75
# ~300 common English words: text the tiny BPE tokenizer splits into several tokens per word, as a real one would
VOCAB = ("the of and to in is that for it as with was on be by this are or from at an not have which but "
         "they you all can more has one their there what if about when would been other so into some time "
         "these than only also its may most could new like use such after first two any over then way many "
         "make them made well where should because through each between both under very those while same "
         "system data model answer question people during number however example water process different "
         "important information research energy government students history support development community "
         "approach children problem health business analysis language experience environment technology "
         "writing story character society economic culture design quality response function structure "
         "software network security learning training evidence measure result effect change growth market "
         "policy service product value method theory context review source author reader paragraph letter "
         "recipe ingredient temperature minutes chapter scene dialogue poem summary essay argument describe "
         "explain consider provide include improve create develop maintain require increase reduce ensure "
         "significant particular specific additional potential various several certain available possible "
         "strategy resource project teacher customer employee manager patient doctor engineer scientist "
         "city country region building road river mountain ocean forest garden animal plant weather season "
         "morning evening yesterday tomorrow hundred thousand million percent approximately especially "
         "finally therefore although whether without within across around toward against among beyond").split()
PUNCT = np.array(["", "", "", "", "", "", ",", ",", ".", "."])


class Text:
    """Random English-like text of a given token length (seeded)."""

    def __init__(self, rng):
        self.rng = rng

    def tokens(self, mean, sigma, lo=2, hi=None):
        """A length in tokens, log-normal with this mean (sigma of the log)."""
        n = self.rng.lognormal(math.log(mean) - sigma ** 2 / 2, sigma)
        return int(min(max(lo, n), hi or 10 * mean))

    def words(self, n_tokens):
        n = max(1, round(n_tokens * WORDS_PER_TOKEN))
        words = np.array(VOCAB)[self.rng.integers(0, len(VOCAB), n)]
        punct = PUNCT[self.rng.integers(0, len(PUNCT), n)]
        text = " ".join(w + p for w, p in zip(words.tolist(), punct.tolist()))
        return text[0].upper() + text[1:] + "."

    def say(self, mean, sigma=0.6):
        return self.words(self.tokens(mean, sigma))


# ---------------------------------------------------------------- one row per dataset, in its hub schema

def ultrachat_row(t, i):
    rounds = 1 + int(t.rng.poisson(2.85))
    messages = []
    for _ in range(rounds):
        messages += [{"content": t.say(95), "role": "user"}, {"content": t.say(286), "role": "assistant"}]
    return {"prompt": messages[0]["content"], "prompt_id": f"{i:064x}", "messages": messages}


def ultrafeedback_row(t, i):
    prompt = t.say(180, 0.9)
    chosen = [{"content": prompt, "role": "user"}, {"content": t.say(300, 0.7), "role": "assistant"}]
    rejected = [{"content": prompt, "role": "user"}, {"content": t.say(250, 0.8), "role": "assistant"}]
    return {"prompt": prompt, "prompt_id": f"{i:064x}", "chosen": chosen, "rejected": rejected,
            "messages": chosen, "score_chosen": float(t.rng.integers(6, 11)), "score_rejected": float(t.rng.integers(1, 6))}


def hh_row(t, i):
    turns = 1 + int(t.rng.poisson(1.3))
    text = "".join(f"\n\nHuman: {t.say(25, 0.8)}\n\nAssistant: {t.say(60, 0.8)}" for _ in range(turns - 1))
    text += f"\n\nHuman: {t.say(25, 0.8)}\n\nAssistant:"
    return {"chosen": f"{text} {t.say(70, 0.8)}", "rejected": f"{text} {t.say(60, 0.8)}"}


SHP_DOMAINS = ["askacademia", "askanthropology", "askbaking", "askcarguys", "askculinary", "askdocs",
               "askengineers", "askhistorians", "askhr", "askphilosophy", "askphysics", "askscience",
               "asksciencefiction", "asksocialscience", "askvet", "changemyview", "explainlikeimfive", "legaladvice"]


def shp_row(t, i, domain, split):
    score_a, score_b = (int(x) for x in t.rng.integers(1, 500, 2))
    return {"post_id": f"p{i:07d}", "domain": f"{domain}_{split}", "upvote_ratio": 0.9, "history": t.say(250, 1.0),
            "c_root_id_A": f"a{i:07d}", "c_root_id_B": f"b{i:07d}", "created_at_utc_A": 1600000000 + i,
            "created_at_utc_B": 1600000100 + i, "score_A": score_a, "score_B": score_b,
            "human_ref_A": t.say(200, 1.0), "human_ref_B": t.say(200, 1.0), "labels": int(score_a > score_b),
            "seconds_difference": 100.0, "score_ratio": max(score_a, score_b) / min(score_a, score_b)}


def orca_row(t, i):
    system = "" if t.rng.random() < 0.3 else t.say(20, 0.5)
    return {"system": system, "question": t.say(250, 1.0), "chosen": t.say(200, 0.9), "rejected": t.say(120, 0.9)}


# ---------------------------------------------------------------- writers

def write_parquet(rows_fn, n, path_of, shard_rows=50_000):
    """n rows into ceil(n / shard_rows) parquet shards named by path_of(i, n_shards)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    n_shards = max(1, math.ceil(n / shard_rows))
    for s in range(n_shards):
        start, stop = s * n // n_shards, (s + 1) * n // n_shards
        path = path_of(s, n_shards)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([rows_fn(i) for i in range(start, stop)]), path)


def write_jsonl(rows, path, compress=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open(path, "wt", encoding="utf-8") if compress else open(path, "w", encoding="utf-8")) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def split_counts(total, n_parts):
    return [total * (k + 1) // n_parts - total * k // n_parts for k in range(n_parts)]


def make(name, out, n_train, n_test, seed):
    t = Text(np.random.default_rng([seed, sum(map(ord, name))]))
    if name in ("ultrachat", "ultrafeedback"):
        folder, splits, fn = {"ultrachat": ("ultrachat_200k", ("train_sft", "test_sft"), ultrachat_row),
                              "ultrafeedback": ("ultrafeedback_binarized", ("train_prefs", "test_prefs"),
                                                ultrafeedback_row)}[name]
        for split, n in zip(splits, (n_train, n_test)):
            write_parquet(lambda i: fn(t, i), n,
                          lambda s, k: out / folder / "data" / f"{split}-{s:05d}-of-{k:05d}.parquet")
        return out / folder
    if name == "orca":  # train only, as on the hub (the loader holds out the last rows for evaluation)
        write_parquet(lambda i: orca_row(t, i), n_train + n_test,
                      lambda s, k: out / "orca_dpo_pairs" / "data" / f"train-{s:05d}-of-{k:05d}.parquet")
        return out / "orca_dpo_pairs"
    if name == "hh":
        subsets = ["harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"]
        for split, n in (("train", n_train), ("test", n_test)):
            for subset, k in zip(subsets, split_counts(n, len(subsets))):
                write_jsonl((hh_row(t, i) for i in range(k)), out / "hh-rlhf" / subset / f"{split}.jsonl.gz", True)
        return out / "hh-rlhf"
    if name == "shp":
        for split, n in (("train", n_train), ("validation", n_test), ("test", n_test)):
            for domain, k in zip(SHP_DOMAINS, split_counts(n, len(SHP_DOMAINS))):
                write_jsonl((shp_row(t, i, domain, split) for i in range(k)), out / "shp" / domain / f"{split}.json")
        return out / "shp"
    raise SystemExit(f"unknown dataset {name!r}; choose from ultrachat, ultrafeedback, hh, shp, orca")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--rows", type=int, default=500, help="training rows per dataset")
    p.add_argument("--test-rows", type=int, default=None, help="test rows per dataset (default 2%% of --rows, >= 8)")
    p.add_argument("--datasets", default="ultrachat,ultrafeedback,hh,shp,orca")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n_test = args.test_rows if args.test_rows is not None else max(8, args.rows // 50)
    for name in args.datasets.split(","):
        print(f"{name}: {make(name, args.out, args.rows, n_test, args.seed)} ({args.rows} train, {n_test} test rows)")


if __name__ == "__main__":
    main()
