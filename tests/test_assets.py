"""Bundled assets: the sample datasets in data/ and the tiny model in models/tiny-mistral/.

Checks the hub schemas of every sample file, that no test prompt leaks into a train split,
that the tokenizer/model load offline with the expected settings, and that the committed
files are what scripts/make_sample_data.py and scripts/make_tiny_model.py produce.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
MODEL = ROOT / "models" / "tiny-mistral"
HH_H, HH_A = "\n\nHuman:", "\n\nAssistant:"

FILES = {  # path -> (min rows, max rows)
    "ultrachat_200k/train_sft.jsonl": (2000, 4000),
    "ultrachat_200k/test_sft.jsonl": (100, 400),
    "ultrafeedback_binarized/train_prefs.jsonl": (1000, 2500),
    "ultrafeedback_binarized/test_prefs.jsonl": (100, 400),
    "hh-rlhf/train.jsonl": (300, 800),
    "hh-rlhf/test.jsonl": (50, 200),
    "shp/train.jsonl": (300, 800),
    "shp/test.jsonl": (50, 200),
    "orca_dpo_pairs/train.jsonl": (300, 800),
}


def _read(rel):
    with open(DATA / rel, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def rows():
    return {rel: _read(rel) for rel in FILES}


def _is_msg(m, roles=("user", "assistant")):
    return isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in roles \
        and isinstance(m["content"], str) and m["content"].strip() != ""


# ------------------------------------------------------------------------------ data files

@pytest.mark.unit
@pytest.mark.parametrize("rel", sorted(FILES))
def test_file_parses_and_is_small(rel):
    path = DATA / rel
    assert path.is_file(), f"missing {path}"
    assert path.stat().st_size < 1_100_000, f"{rel} is {path.stat().st_size} bytes"
    lo, hi = FILES[rel]
    assert lo <= len(_read(rel)) <= hi


@pytest.mark.unit
def test_only_expected_data_files():
    found = {str(p.relative_to(DATA)) for p in DATA.rglob("*.jsonl")}
    assert found == set(FILES)


@pytest.mark.unit
@pytest.mark.parametrize("split", ["train_sft", "test_sft"])
def test_ultrachat_schema(rows, split):
    data = rows[f"ultrachat_200k/{split}.jsonl"]
    n_multi = n_system = 0
    for i, r in enumerate(data):
        assert set(r) == {"prompt", "prompt_id", "messages"}, i
        assert isinstance(r["prompt"], str) and r["prompt"].strip(), i
        assert r["prompt_id"] == hashlib.sha256(r["prompt"].encode("utf-8")).hexdigest(), i
        msgs = r["messages"]
        assert isinstance(msgs, list) and msgs, i
        if msgs[0]["role"] == "system":
            assert _is_msg(msgs[0], ("system",)), i
            msgs = msgs[1:]
            n_system += 1
        assert all(_is_msg(m) for m in msgs), i
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2), i
        assert len(msgs) % 2 == 0 and msgs[-1]["role"] == "assistant", i
        assert msgs[0]["content"] == r["prompt"], i
        n_multi += len(msgs) > 2
    assert 0.03 < n_multi / len(data) < 0.25
    if split == "train_sft":
        assert n_system > 0


@pytest.mark.unit
@pytest.mark.parametrize("split", ["train_prefs", "test_prefs"])
def test_ultrafeedback_schema(rows, split):
    data = rows[f"ultrafeedback_binarized/{split}.jsonl"]
    keys = {"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"}
    for i, r in enumerate(data):
        assert set(r) == keys, i
        assert r["prompt_id"] == hashlib.sha256(r["prompt"].encode("utf-8")).hexdigest(), i
        for k in ("chosen", "rejected"):
            conv = r[k]
            assert isinstance(conv, list) and len(conv) == 2 and all(_is_msg(m) for m in conv), (i, k)
            assert [m["role"] for m in conv] == ["user", "assistant"], (i, k)
            assert conv[0]["content"] == r["prompt"], (i, k)
        assert r["chosen"][-1]["content"] != r["rejected"][-1]["content"], i
        assert r["messages"] == r["chosen"], i
        assert isinstance(r["score_chosen"], float) and isinstance(r["score_rejected"], float), i
        assert r["score_chosen"] > r["score_rejected"], i


def _hh_turns(text):
    assert text.startswith(HH_H + " ")
    turns = []
    for chunk in text.split(HH_H)[1:]:
        user, *assistants = chunk.split(HH_A)
        assert len(assistants) == 1, "every Human turn is followed by exactly one Assistant turn"
        turns.append((user.strip(), assistants[0].strip()))
    return turns


@pytest.mark.unit
@pytest.mark.parametrize("split", ["train", "test"])
def test_hh_schema(rows, split):
    for i, r in enumerate(rows[f"hh-rlhf/{split}.jsonl"]):
        assert set(r) == {"chosen", "rejected"}, i
        c, rj = r["chosen"], r["rejected"]
        assert isinstance(c, str) and isinstance(rj, str), i
        cut_c, cut_r = c.rfind(HH_A), rj.rfind(HH_A)
        assert cut_c > 0 and c[:cut_c] == rj[:cut_r], i  # same transcript up to the last Assistant turn
        assert c[cut_c:].strip() != rj[cut_r:].strip(), i
        tc, tr = _hh_turns(c), _hh_turns(rj)
        assert len(tc) == len(tr) and all(u and a for u, a in tc + tr), i


@pytest.mark.unit
@pytest.mark.parametrize("split", ["train", "test"])
def test_shp_schema(rows, split):
    types = {"post_id": str, "domain": str, "upvote_ratio": float, "history": str, "c_root_id_A": str,
             "c_root_id_B": str, "created_at_utc_A": int, "created_at_utc_B": int, "score_A": int,
             "score_B": int, "human_ref_A": str, "human_ref_B": str, "labels": int,
             "seconds_difference": float, "score_ratio": float}
    for i, r in enumerate(rows[f"shp/{split}.jsonl"]):
        assert set(r) == set(types), i
        for k, t in types.items():
            assert type(r[k]) is t, (i, k)
        assert r["domain"].endswith(f"_{split}"), i
        assert r["labels"] in (0, 1) and r["labels"] == int(r["score_A"] > r["score_B"]), i
        assert r["score_A"] != r["score_B"] and r["human_ref_A"] != r["human_ref_B"], i
        assert r["score_ratio"] == pytest.approx(max(r["score_A"], r["score_B"]) / min(r["score_A"], r["score_B"]))
        assert r["seconds_difference"] == abs(r["created_at_utc_A"] - r["created_at_utc_B"]), i
        assert 0.0 <= r["upvote_ratio"] <= 1.0 and r["history"].strip(), i


@pytest.mark.unit
def test_orca_schema(rows):
    for i, r in enumerate(rows["orca_dpo_pairs/train.jsonl"]):
        assert set(r) == {"system", "question", "chosen", "rejected"}, i
        assert all(isinstance(r[k], str) for k in r), i
        assert r["question"].strip() and r["chosen"].strip() and r["rejected"].strip(), i
        assert r["chosen"] != r["rejected"], i
    assert not (DATA / "orca_dpo_pairs" / "test.jsonl").exists()  # the hub has only 'train'


def _prompts(rel, r):
    """The first user message of a row (what the data code uses as the prompt)."""
    if rel.startswith("ultrachat") or rel.startswith("ultrafeedback"):
        return r["prompt"]
    if rel.startswith("hh-rlhf"):
        return _hh_turns(r["chosen"])[0][0]
    if rel.startswith("shp"):
        return r["history"]
    return r["question"]


def _user_turns(rel, r):
    if rel.startswith("ultrachat") or rel.startswith("ultrafeedback"):
        return {m["content"] for m in r["messages"] if m["role"] == "user"}
    if rel.startswith("hh-rlhf"):
        return {u for u, _ in _hh_turns(r["chosen"])}
    return {_prompts(rel, r)}


@pytest.mark.unit
def test_no_test_prompt_in_train(rows):
    for ds in ("ultrachat_200k", "ultrafeedback_binarized", "hh-rlhf", "shp"):
        tr = [rel for rel in rows if rel.startswith(ds) and "train" in rel][0]
        te = [rel for rel in rows if rel.startswith(ds) and "test" in rel][0]
        train_prompts = {_prompts(tr, r) for r in rows[tr]}
        leaked = [p for p in (_prompts(te, r) for r in rows[te]) if p in train_prompts]
        assert not leaked, f"{te}: {len(leaked)} test prompts are in {tr}, e.g. {leaked[:3]}"
    # stronger: no user turn of any test file appears anywhere in any train file
    train_turns = set().union(*(_user_turns(rel, r) for rel in rows if "train" in rel for r in rows[rel]))
    test_turns = set().union(*(_user_turns(rel, r) for rel in rows if "test" in rel for r in rows[rel]))
    assert not (train_turns & test_turns)


@pytest.mark.unit
@pytest.mark.parametrize("rel", [r for r in FILES if r.startswith(("ultrachat", "ultrafeedback"))])
def test_prompts_unique_within_file(rows, rel):
    prompts = [r["prompt"] for r in rows[rel]]
    assert len(set(prompts)) == len(prompts)


@pytest.mark.unit
def test_preference_pairs_prefer_the_right_answer(rows):
    """Spot-check the synthetic tasks: for additions the chosen sum is right and the rejected one wrong."""
    n = 0
    for r in rows["ultrafeedback_binarized/train_prefs.jsonl"]:
        c, rj = r["chosen"][-1]["content"], r["rejected"][-1]["content"]
        if " + " in c and " = " in c:
            a, b = c.split(" = ")[0].split(" + ")
            assert int(c.split(" = ")[1]) == int(a) + int(b)
            assert int(rj.split(" = ")[1]) != int(a) + int(b)
            n += 1
    assert n > 50


# ------------------------------------------------------------------------------ tokenizer & model

@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(MODEL))


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(str(MODEL))


@pytest.mark.unit
def test_tokenizer_special_tokens(tok):
    assert tok.is_fast
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "unk": tok.unk_token_id}
    assert None not in ids.values() and len(set(ids.values())) == 4, ids
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert tok.padding_side == "right"
    assert 500 <= len(tok) <= 2048


@pytest.mark.unit
def test_tokenizer_adds_no_bos_or_eos(tok):
    ids = tok("What is 3 + 4?").input_ids
    assert ids[0] != tok.bos_token_id and ids[-1] != tok.eos_token_id
    assert tok.decode(ids) == "What is 3 + 4?"


@pytest.mark.unit
def test_tokenizer_digits_are_single_tokens(tok):
    ids = tok("1234567890").input_ids
    assert [tok.decode([i]) for i in ids] == list("1234567890")
    assert len(tok(" 5 2 8").input_ids) == 3


@pytest.mark.unit
def test_special_tokens_in_text_are_recognised(tok):
    ids = tok("hi</s>").input_ids
    assert ids[-1] == tok.eos_token_id


@pytest.mark.unit
def test_chat_template(tok):
    chat = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "3 + 4 = 7"},
            {"role": "user", "content": "And 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4"}]
    assert tok.apply_chat_template(chat, tokenize=False) == (
        "<|user|>\nWhat is 3 + 4?</s>\n<|assistant|>\n3 + 4 = 7</s>\n"
        "<|user|>\nAnd 2 + 2?</s>\n<|assistant|>\n2 + 2 = 4</s>\n")
    sys_chat = [{"role": "system", "content": "Be brief."}, chat[0]]
    assert tok.apply_chat_template(sys_chat, tokenize=False, add_generation_prompt=True) == (
        "<|system|>\nBe brief.</s>\n<|user|>\nWhat is 3 + 4?</s>\n<|assistant|>\n")
    ids = tok(tok.apply_chat_template(chat[:2], tokenize=False)).input_ids
    assert ids.count(tok.eos_token_id) == 2 and tok.bos_token_id not in ids


@pytest.mark.unit
def test_sample_chats_have_small_token_lengths(tok, rows):
    lengths = []
    for r in rows["ultrachat_200k/train_sft.jsonl"]:
        n = len(tok(tok.apply_chat_template(r["messages"], tokenize=False)).input_ids)
        if len(r["messages"]) == 2:
            lengths.append(n)
        assert n <= 160
    lengths.sort()
    assert 15 <= lengths[0] and lengths[len(lengths) // 2] <= 50 and lengths[-1] <= 80


@pytest.mark.integration  # loads the tiny model (seconds)
def test_model_loads_and_is_mistral(model, tok):
    assert type(model).__name__ == "MistralForCausalLM"
    assert type(model.model.layers[0]).__name__ == "MistralDecoderLayer"
    cfg = model.config
    assert cfg.model_type == "mistral"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert cfg.tie_word_embeddings is False
    assert cfg.vocab_size == len(tok)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                      tok.pad_token_id)
    gc = model.generation_config
    assert (gc.bos_token_id, gc.eos_token_id, gc.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                   tok.pad_token_id)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < 1_250_000


@pytest.mark.integration  # loads the tiny model (seconds)
def test_model_forward_and_generate(model, tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = torch.tensor([[tok.bos_token_id] + tok(prompt).input_ids])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        assert torch.isfinite(out.loss) and 4.0 < out.loss.item() < 10.0  # ~ln(vocab) at random init
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                             do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 4) or gen[0, -1].item() == tok.eos_token_id


@pytest.mark.unit
def test_model_dir_small():
    files = list(MODEL.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= {f.name for f in files}
    assert sum(f.stat().st_size for f in files) < 5 * 2**20


# ------------------------------------------------------------------------------ reproducibility

@pytest.mark.integration
def test_sample_data_is_reproducible(tmp_path):
    subprocess.run([sys.executable, "-m", "scripts.make_sample_data", "--out", str(tmp_path)],
                   check=True, cwd=ROOT, capture_output=True)
    for rel in FILES:
        assert (tmp_path / rel).read_bytes() == (DATA / rel).read_bytes(), f"{rel} differs from the script"


@pytest.mark.integration
def test_tiny_model_is_reproducible(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "scripts.make_tiny_model", "--out", str(tmp_path / "m")],
                   check=True, cwd=ROOT, capture_output=True, env=env)
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (tmp_path / "m" / name).read_bytes() == (MODEL / name).read_bytes(), f"{name} differs"
