"""Data: normalisation, chat template, label masks, truncation, batching, and bad-input errors."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import preference_datasets as pd
from training import batching, sources, tokenization
from utils import REPO_DIR


@pytest.fixture(scope="module")
def tok():
    return tokenization.ensure_chat_template(AutoTokenizer.from_pretrained(str(REPO_DIR / "models/tiny-mistral")))


def _tokenize(tok, rows, pairs=False, max_length=512, max_prompt_length=256):
    return tokenization.tokenize_rows(rows, tok, max_length, max_prompt_length, pairs)


def _decode_targets(tok, batch, i, prefix=""):
    labels = batch[f"{prefix}labels"][i]
    return tok.decode(labels[labels != -100])


SINGLE = {"prompt": [{"role": "user", "content": "What is two plus three?"}], "chosen": "Two plus three is five.",
          "rejected": "Two plus three is six."}
MULTI = {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Name a fruit."},
                    {"role": "assistant", "content": "Apple."},
                    {"role": "user", "content": "Another one?"}],
         "chosen": "Banana.", "rejected": "Carrot."}


@pytest.mark.unit
@pytest.mark.parametrize("row", [SINGLE, MULTI], ids=["single-turn", "multi-turn"])
def test_labels_cover_exactly_the_final_answer_and_its_end_of_turn_token(tok, row):
    data = _tokenize(tok, [row], pairs=True)
    batch = batching.collate(data, [0], tok.pad_token_id)
    for side, answer in (("chosen_", row["chosen"]), ("rejected_", row["rejected"])):
        assert _decode_targets(tok, batch, 0, side) == answer + tok.eos_token
        ids, labels = batch[f"{side}input_ids"][0], batch[f"{side}labels"][0]
        targets = (labels != -100).nonzero().flatten()
        # the targets are one contiguous run at the end of the row, ending with eos
        length = int(batch[f"{side}attention_mask"][0].sum())
        assert targets.tolist() == list(range(int(targets[0]), length))
        assert int(ids[length - 1]) == tok.eos_token_id
        # everything before the answer is the full chat-templated prompt, earlier assistant turns included
        prompt_text = tok.decode(ids[: int(targets[0])])
        expected = tok.bos_token + tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert prompt_text == expected


@pytest.mark.unit
def test_sft_batches_use_the_chosen_answer_as_target(tok):
    data = _tokenize(tok, [MULTI, SINGLE])
    batch = batching.collate(data, [0, 1], tok.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert _decode_targets(tok, batch, 0) == "Banana." + tok.eos_token
    assert _decode_targets(tok, batch, 1) == "Two plus three is five." + tok.eos_token


@pytest.mark.unit
def test_truncation_keeps_the_end_of_the_prompt_its_bos_and_the_end_of_turn_token():
    prompt = list(range(100, 160))  # 60 prompt tokens, first one stands for bos
    answers = [list(range(1, 41)), list(range(1, 11))]
    p, (a, b), flags = tokenization.truncate(prompt, answers, max_length=48, max_prompt_length=16, min_answer_tokens=8)
    assert p == [100] + list(range(145, 160))  # bos + the last 15 tokens
    assert len(p) + max(len(a), len(b)) <= 48 and flags == tokenization.PROMPT_CUT | tokenization.ANSWER_CUT
    # both answers cut to the same room, keeping their last (end-of-turn) token; b fits whole
    assert a == list(range(1, 32)) + [40] and b == answers[1]
    # nothing to cut: unchanged
    assert tokenization.truncate([1, 2], [[3]], 10, 5, 4) == ([1, 2], [[3]], 0)


@pytest.mark.unit
def test_a_prompt_as_long_as_max_length_is_cut_so_that_the_answers_keep_min_answer_tokens():
    prompt = list(range(100, 160))
    answers = [list(range(1, 41)), list(range(1, 11))]
    # max_prompt_length == max_length (the paper's 1024 / 1024): the prompt leaves min_answer_tokens
    p, (a, b), flags = tokenization.truncate(prompt, answers, max_length=48, max_prompt_length=48, min_answer_tokens=8)
    assert p == [100] + list(range(121, 160)) and len(p) == 40  # bos + the last 39 prompt tokens
    assert a == list(range(1, 8)) + [40] and b == list(range(1, 8)) + [10]  # 8 each, end of turn kept
    assert flags == tokenization.PROMPT_CUT | tokenization.ANSWER_CUT
    # an answer shorter than min_answer_tokens only needs its own length; the reserve is at most max_length // 2
    p, (a,), _ = tokenization.truncate(prompt, [[1, 2, 3]], 48, 48, 8)
    assert len(p) == 45 and a == [1, 2, 3]
    p, (a,), _ = tokenization.truncate(prompt, [list(range(1, 41))], 48, 48, 1000)
    assert len(p) == 24 and len(a) == 24 and a[-1] == 40


@pytest.mark.unit
def test_long_rows_are_truncated_through_the_whole_pipeline_and_keep_targets(tok):
    long_prompt = " ".join(["filler words here"] * 200) + " Final question: what is one plus one?"
    row = {"prompt": [{"role": "user", "content": long_prompt}], "chosen": "Two. " * 100, "rejected": None}
    data = _tokenize(tok, [row], max_length=64, max_prompt_length=32)
    assert len(data.prompt_ids[0]) == 32 and len(data.prompt_ids[0]) + len(data.chosen_ids[0]) == 64
    assert data.prompt_ids[0][0] == tok.bos_token_id
    assert tok.decode(data.prompt_ids[0]).endswith("<|assistant|>\n")  # the end of the prompt survives
    assert len(data.chosen_ids[0]) == 32 and data.chosen_ids[0][-1] == tok.eos_token_id  # end of turn kept


@pytest.mark.unit
def test_epoch_batches_are_deterministic_for_a_seed_and_length_grouped():
    lengths = np.random.default_rng(0).integers(5, 200, size=1000)
    a = batching.epoch_batches(lengths, 32, seed=1, epoch=0)
    b = batching.epoch_batches(lengths, 32, seed=1, epoch=0)
    c = batching.epoch_batches(lengths, 32, seed=1, epoch=1)
    assert all((x == y).all() for x, y in zip(a, b)) and len(a) == 1000 // 32
    assert any((x != y).any() for x, y in zip(a, c))
    flat = np.concatenate(a)
    assert len(set(flat.tolist())) == len(flat)  # each row at most once per epoch
    # grouping: the spread of lengths inside a batch is far below the spread of the data
    assert np.mean([lengths[x].max() - lengths[x].min() for x in a]) < 0.25 * (lengths.max() - lengths.min())


@pytest.mark.unit
def test_batches_pad_only_to_their_longest_row(tok):
    rows = [dict(SINGLE, chosen="Five." * k) for k in (1, 3, 9)]
    data = _tokenize(tok, rows)
    for idx in ([0], [0, 1], [0, 1, 2]):
        batch = batching.collate(data, idx, tok.pad_token_id)
        longest = max(len(data.prompt_ids[i]) + len(data.chosen_ids[i]) for i in idx)
        assert batch["input_ids"].shape == (len(idx), longest)
        assert batch["attention_mask"].sum(1).tolist() == [len(data.prompt_ids[i]) + len(data.chosen_ids[i]) for i in idx]
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


@pytest.mark.unit
def test_preference_batches_share_one_width_for_chosen_and_rejected(tok):
    data = _tokenize(tok, [dict(SINGLE, rejected="No. " * 20), MULTI], pairs=True)
    batch = batching.collate(data, [0, 1], tok.pad_token_id)
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert batch["chosen_input_ids"].shape[1] == max(len(data.prompt_ids[i]) + max(len(data.chosen_ids[i]),
                                                     len(data.rejected_ids[i])) for i in (0, 1))


@pytest.mark.unit
def test_micro_batches_partition_the_global_batch_by_length():
    lengths = np.array([5, 50, 7, 40, 9, 30, 11, 20])
    parts = batching.micro_batches(np.arange(8), lengths, 4)
    assert [p.tolist() for p in parts] == [[1, 3], [5, 7], [6, 4], [2, 0]]


@pytest.mark.unit
def test_every_sample_dataset_loads_in_both_splits(tok):
    for name in ("ultrachat", "ultrafeedback", "hh", "shp", "orca"):
        pairs = name != "ultrachat"
        train = tokenization.load_split([name + "_sample"], "train", tok, 512, 256, pairs=pairs)
        test = tokenization.load_split([name + "_sample"], "test", tok, 512, 256, pairs=pairs)
        assert len(train) > len(test) > 0
        assert not set(map(tuple, test.prompt_ids)) <= set(map(tuple, train.prompt_ids))


@pytest.mark.unit
def test_orca_has_no_test_split_so_its_tail_is_held_out():
    train = sources.load_normalised("orca_sample", "train")
    test = sources.load_normalised("orca_sample", "test")
    rows = [row for _, row in sources._read_local_rows(REPO_DIR / "data/orca_dpo_pairs/train.jsonl")]
    assert len(train) + len(test) == len(rows) and len(test) == max(1, int(len(rows) * 0.05))
    assert test[-1]["chosen"] == rows[-1]["chosen"]


@pytest.mark.unit
def test_hh_transcripts_split_into_messages():
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 5"}
    out = pd.from_hh(row, "x")
    assert out["prompt"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                             {"role": "user", "content": "2+2?"}]
    assert (out["chosen"], out["rejected"]) == ("4", "5")


@pytest.mark.unit
def test_shp_prefers_the_labelled_comment():
    row = {"history": "Q?", "human_ref_A": "a", "human_ref_B": "b", "labels": 0}
    assert pd.from_shp(row, "x")["chosen"] == "b"
    assert pd.from_shp(dict(row, labels=1), "x")["chosen"] == "a"


@pytest.mark.unit
def test_a_preference_loss_on_data_without_rejected_answers_is_a_clear_error(tok):
    with pytest.raises(pd.DataError, match="ultrachat_sample.*no rejected answer"):
        tokenization.load_split(["ultrachat_sample"], "test", tok, 512, 256, pairs=True)


# ---------------------------------------------------------------- bad input

def _write(tmp_path, rows, name="bad.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.unit
@pytest.mark.parametrize("bad_row, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, r"line 2: field 'messages' must end with an assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     r"line 2: field 'messages' has an empty final assistant turn"),
    ({"messages": "hi"}, r"line 2: field 'messages' must be list, got str"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     r"line 2: field 'messages\[0\]' must be a"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "x"}]},
     r"line 2: field 'messages\[0\].role' is 'robot'"),
    ({"text": "hi"}, r"line 2: missing field 'messages'"),
])
def test_bad_chat_rows_name_file_row_and_field(tmp_path, bad_row, message):
    path = _write(tmp_path, [GOOD, bad_row])
    with pytest.raises(pd.DataError, match=str(path).replace(".", r"\.") + ": " + message):
        sources.load_normalised(str(path), "train")


@pytest.mark.unit
@pytest.mark.parametrize("bad_row, message", [
    ({"prompt": "q", "chosen": "a"}, None),  # rejected may be absent for SFT data: not an error
    ({"prompt": "q", "chosen": "", "rejected": "b"}, r"line 2: field 'chosen' is empty"),
    ({"prompt": "q", "chosen": 5, "rejected": "b"}, r"line 2: field 'chosen' must be str, got int"),
    ({"prompt": "q", "rejected": "b"}, r"line 2: missing field 'chosen'"),
])
def test_bad_preference_rows_name_file_row_and_field(tmp_path, bad_row, message):
    path = _write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}, bad_row])
    if message is None:
        assert sources.load_normalised(str(path), "train")[0]["chosen"] == "a"
        return
    with pytest.raises(pd.DataError, match=message):
        sources.load_normalised(str(path), "train")


@pytest.mark.unit
def test_invalid_json_names_the_file_and_line(tmp_path):
    path = _write(tmp_path, [GOOD, GOOD, '{"messages": [oops'])
    with pytest.raises(pd.DataError, match=r"bad\.jsonl: line 3: invalid JSON"):
        sources.load_normalised(str(path), "train")


@pytest.mark.unit
def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(pd.DataError, match="unknown dataset '.*nope.jsonl'"):
        sources.load_normalised(str(tmp_path / "nope.jsonl"), "train")
    with pytest.raises(pd.DataError, match="dataset_paths.ultrachat = '/no/such/dir' does not exist"):
        pd.check_dataset_name("ultrachat", {"ultrachat": "/no/such/dir"})


@pytest.mark.unit
def test_an_unreachable_hub_dataset_says_which_key_to_point_at_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(pd.DataError, match=r"dataset_paths\.ultrachat=/path/to/a/local/copy"):
        sources.load_normalised("ultrachat", "train")


@pytest.mark.unit
def test_a_hub_dataset_is_keyed_by_the_revision_the_hub_cache_resolved(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert sources.source_identity("ultrachat") == "hub:HuggingFaceH4/ultrachat_200k@unresolved"  # nothing cached
    ref = tmp_path / "datasets--HuggingFaceH4--ultrachat_200k" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("1111aaaa\n")
    assert sources.source_identity("ultrachat") == "hub:HuggingFaceH4/ultrachat_200k@1111aaaa"
    ref.write_text("2222bbbb")  # a newer snapshot downloaded: another key, so no stale tokens are reused
    assert sources.source_identity("ultrachat") == "hub:HuggingFaceH4/ultrachat_200k@2222bbbb"


@pytest.mark.unit
def test_online_a_hub_that_does_not_answer_in_time_falls_back_to_the_hub_caches_revision(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    asked = []

    def dataset_info(self, repo_id, timeout=None, **kwargs):
        asked.append((repo_id, timeout))
        raise TimeoutError("read timed out")
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    ref = tmp_path / "datasets--HuggingFaceH4--ultrachat_200k" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("3333cccc")
    assert sources.source_identity("ultrachat") == "hub:HuggingFaceH4/ultrachat_200k@3333cccc"
    assert asked == [("HuggingFaceH4/ultrachat_200k", sources.HUB_TIMEOUT_S)] and 0 < sources.HUB_TIMEOUT_S <= 30


@pytest.mark.unit
def test_dataset_paths_point_a_registry_name_at_a_local_copy(tmp_path):
    (tmp_path / "train_sft.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "test_sft.jsonl").write_text(json.dumps(GOOD) + "\n")
    rows = sources.load_normalised("ultrachat", "test", {"ultrachat": str(tmp_path)})
    assert rows == [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": None}]


@pytest.mark.unit
def test_collated_tensors_are_long_and_right_padded(tok):
    data = _tokenize(tok, [SINGLE, MULTI])
    batch = batching.collate(data, [0, 1], tok.pad_token_id)
    assert all(v.dtype == torch.long for v in batch.values())
    mask = batch["attention_mask"]
    assert (mask[:, :-1] >= mask[:, 1:]).all()  # ones then zeros: right padding


@pytest.mark.unit
def test_tokenisation_is_cached_and_the_cache_key_covers_the_settings(tok, monkeypatch, tmp_path):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    rows = [SINGLE, MULTI]
    first = _tokenize(tok, rows, pairs=True)
    monkeypatch.setattr(tokenization, "encode_row", lambda *a: (_ for _ in ()).throw(AssertionError("re-tokenised")))
    again = _tokenize(tok, rows, pairs=True)  # read from the cache: encode_row is never called
    assert list(again.prompt_ids) == list(first.prompt_ids) and list(again.rejected_ids) == list(first.rejected_ids)
    assert again.fingerprint == first.fingerprint
    with pytest.raises(AssertionError, match="re-tokenised"):
        _tokenize(tok, rows, pairs=True, max_length=100)  # another setting: another key
    with pytest.raises(AssertionError, match="re-tokenised"):
        _tokenize(tok, [SINGLE, dict(MULTI, chosen="Cherry.")], pairs=True)  # other content: another key


@pytest.mark.unit
def test_json_and_parquet_rows_are_named_by_their_index(tmp_path):
    import datasets
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([GOOD, GOOD, bad]))
    with pytest.raises(pd.DataError, match=r"bad\.json: row 2: field 'messages' has an empty final assistant turn"):
        sources.load_normalised(str(path), "train")
    parquet = tmp_path / "bad.parquet"
    datasets.Dataset.from_list([GOOD, bad]).to_parquet(str(parquet))
    with pytest.raises(pd.DataError, match=r"bad\.parquet: row 1: field 'messages' has an empty"):
        sources.load_normalised(str(parquet), "train")


@pytest.mark.unit
def test_a_bad_row_deep_in_a_streamed_file_is_named_and_leaves_no_cache(tok, tmp_path, monkeypatch):
    # load_split streams rows a batch at a time into Arrow: row 300 is in the second parquet batch and
    # line 300 far into the JSON lines; the error still names file and row, and nothing looks cached
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}
    parquet = tmp_path / "parquet" / "train.parquet"
    parquet.parent.mkdir()
    datasets.Dataset.from_list([GOOD] * 300 + [bad] + [GOOD] * 20).to_parquet(str(parquet))
    jsonl = _write(tmp_path, [GOOD] * 299 + [bad] + [GOOD] * 20)
    for path, where in ((parquet, r"train\.parquet: row 300"), (jsonl, r"bad\.jsonl: line 300")):
        with pytest.raises(pd.DataError, match=where + ": field 'messages' has an empty final assistant turn"):
            tokenization.load_split([str(path)], "train", tok, 64, 64, pairs=False)
    assert not list((tmp_path / "cache" / "ift_tokenized").iterdir())
    # the same file without the bad row: every row streamed, in order, its last 5% held out
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(321)]
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    train, test = (tokenization.load_split([str(parquet)], split, tok, 64, 64, pairs=False) for split in ("train", "test"))
    assert (len(train), len(test)) == (305, 16)  # 5% of 321
    assert list(train.questions) + list(test.questions) == [f"q{i}" for i in range(321)]


@pytest.mark.unit
def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    with pytest.raises(pd.DataError, match=r"bad\.jsonl: line 2: not valid UTF-8 \(byte 0xe9\)"):
        sources.load_normalised(str(path), "train")
    whole = tmp_path / "bad.json"
    whole.write_bytes(b'[\n' + json.dumps(GOOD).encode() + b',\n{"messages": "\xff"}\n]')
    with pytest.raises(pd.DataError, match=r"bad\.json: line 3: not valid UTF-8 \(byte 0xff\)"):
        sources.load_normalised(str(whole), "train")


@pytest.mark.unit
def test_a_corrupt_parquet_file_is_named(tmp_path):
    import datasets
    path = tmp_path / "broken.parquet"
    datasets.Dataset.from_list([GOOD] * 4).to_parquet(str(path))
    path.write_bytes(path.read_bytes()[:-20])  # cut short, as an interrupted copy would be
    with pytest.raises(pd.DataError, match=r"broken\.parquet: not a readable parquet file \(ArrowInvalid"):
        sources.load_normalised(str(path), "train")


# ---------------------------------------------------------------- the mask audit

@pytest.mark.unit
def test_the_mask_audit_shows_a_row_with_its_target_tokens_marked(tok):
    data = _tokenize(tok, [SINGLE, MULTI], pairs=True)
    audit = tokenization.mask_audit(data, tok, "</s>")
    # the counts, then the prompt as text and each target token in brackets (newlines escaped)
    n_targets = sum(map(len, list(data.chosen_ids) + list(data.rejected_ids)))
    assert audit.splitlines() == [
        f"mask audit, row 0: 20 prompt tokens (not trained), 12 target tokens in [brackets]; all 2 rows: "
        f"{n_targets} target tokens, 4 of 4 answers end with the end-of-turn token '</s>'",
        r"  prompt: <s><|user|>\nWhat is two plus three?</s>\n<|assistant|>\n",
        "  target: [T][w][o][ plus][ th][ree][ is][ f][i][ve][.][</s>]"]
    assert tok.convert_ids_to_tokens(data.chosen_ids[0]) == ["T", "w", "o", "Ġplus", "Ġth", "ree", "Ġis", "Ġf", "i",
                                                              "ve", ".", "</s>"]


@pytest.mark.unit
def test_the_mask_audit_refuses_a_row_without_target_or_an_end_of_turn_never_trained(tok):
    import datasets
    data = tokenization.load_split(["ultrachat_sample"], "test", tok, 512, 256, pairs=False)
    columns = data.table.to_dict()
    columns["chosen_ids"][3] = []
    empty = tokenization.TokenizedData(datasets.Dataset.from_dict(columns, features=data.table.features), False, data.parts,
                             "test")
    with pytest.raises(pd.DataError, match=r"dataset 'ultrachat_sample' \(test\) row 3: the row has no target token"):
        tokenization.mask_audit(empty, tok, "</s>")
    with pytest.raises(pd.DataError, match=r"dataset 'ultrachat_sample' \(test\) row 0 .*end-of-turn token "
                                           r"'<pad>' is never a target; set model.eot_token"):
        tokenization.mask_audit(data, tok, "<pad>")


@pytest.mark.unit
def test_prompts_that_fill_max_length_are_cut_and_counted_never_fatal(tok):
    lines = []
    data = tokenization.load_split(["ultrachat_sample"], "test", tok, 16, 16, pairs=False, min_answer_tokens=4, log=lines.append)
    prompts, answers = data.column_lengths("prompt_ids"), data.column_lengths("chosen_ids")
    assert (prompts + answers <= 16).all() and (answers >= 1).all()
    cut = int((prompts + answers == 16).sum())
    assert data.parts[0]["prompts_truncated"] > 0 and data.parts[0]["rows_dropped"] == 0
    assert f"{data.parts[0]['prompts_truncated']} prompts cut" in lines[0] and cut >= data.parts[0]["prompts_truncated"]
    assert all(a[-1] == tok.eos_token_id for a in data.chosen_ids)  # the end of turn is still the last target
    # an eval subset (n_eval_examples) reports the cuts of its own rows, not those of the whole split
    full = tokenization.load_split(["ultrachat_sample"], "test", tok, 4096, 4096, pairs=False)
    for n in (1, 3, len(data)):
        sub = data.first(n)
        assert sub.parts[0]["prompts_truncated"] == sum(len(data.prompt_ids[i]) < len(full.prompt_ids[i]) for i in range(n))
        assert sub.parts[0]["answers_truncated"] == sum(len(data.chosen_ids[i]) < len(full.chosen_ids[i]) for i in range(n))
    assert data.first(len(data)).parts == data.parts


@pytest.mark.unit
def test_a_template_without_the_end_of_turn_token_is_refused(tok):
    with pytest.raises(pd.DataError, match=r"emits no end-of-turn token '<pad>' after an assistant answer"):
        tokenization.encode_chat(tok, SINGLE["prompt"], "Five.", "<pad>")
    with pytest.raises(pd.DataError, match=r"model.eot_token must be a token string"):
        tokenization.end_of_turn_token(tok, 5)
    with pytest.raises(pd.DataError, match=r"^dataset 'hh_sample' \(test\) row 0: the chat template emits no "):
        tokenization.load_split(["hh_sample"], "test", tok, 512, 256, pairs=True, eot_token="<pad>")  # names the row


# ---------------------------------------------------------------- runs refused before anything is written

def _refused(tmp_path, monkeypatch, *overrides):
    """The error of a run with these overrides; checks that no model loaded and no run dir was made."""
    from training import modeling, pipeline
    from utils import ConfigError

    from conftest import make_cfg
    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = make_cfg(f"run_dir={tmp_path / 'run'}", *overrides)
    pipeline.validate_config(cfg)
    with pytest.raises((pd.DataError, ConfigError)) as error:
        pipeline.launch(cfg)
    assert not (tmp_path / "run").exists()
    return str(error.value)


@pytest.mark.unit
def test_too_few_rows_for_one_batch_or_too_few_examples_are_refused_before_models_load(tmp_path, monkeypatch):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(GOOD) + "\n" for _ in range(10)))  # 9 train rows, 1 held out
    assert _refused(tmp_path, monkeypatch, f"datasets=[{path}]", "batch_size=16") == (
        f"datasets=['{path}'] have 9 training rows, fewer than one batch (batch_size=16); lower batch_size or add rows")
    from training import pipeline
    from utils import ConfigError

    from conftest import make_cfg
    with pytest.raises(ConfigError, match=r"^n_examples=8 is smaller than batch_size=16: no optimizer step to take; "
                                          r"raise n_examples or lower batch_size$"):
        pipeline.validate_config(make_cfg(f"run_dir={tmp_path / 'run'}", "n_examples=8", "batch_size=16"))


@pytest.mark.integration
def test_non_utf8_data_ends_the_cli_with_one_line(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"messages": "café"}\n'.encode("latin-1"))
    proc = subprocess.run([sys.executable, "train.py", f"run_dir={tmp_path / 'run'}", f"datasets=[{path}]"],
                          cwd=REPO_DIR, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"data error: {path}: line 2: not valid UTF-8 (byte 0xe9); "
                                                "re-encode the file as UTF-8"]
    assert not (tmp_path / "run").exists()


@pytest.mark.unit
def test_two_builds_of_one_cache_entry_at_once_do_not_touch_each_others_files(tok, tmp_path, monkeypatch):
    # Two jobs on one node tokenise the same data at once. Here the second starts and finishes while the
    # first is half way through its rows (the second is run from inside the first's encode_row): the
    # first must still finish, and both must map the same complete entry. Before entries were built in
    # private folders, the second emptied the folder the first was writing into.
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(200)]
    path = _write(tmp_path, rows, "rows.jsonl")
    encode_row, calls, inner = tokenization.encode_row, [], []

    def first_job_halfway(*args, **kwargs):
        calls.append(1)
        if len(calls) == 100:
            monkeypatch.setattr(tokenization, "encode_row", encode_row)  # the second job tokenises normally
            inner.append(tokenization.load_split([str(path)], "train", tok, 64, 64, pairs=False, num_proc=1))
        return encode_row(*args, **kwargs)

    monkeypatch.setattr(tokenization, "encode_row", first_job_halfway)
    outer = tokenization.load_split([str(path)], "train", tok, 64, 64, pairs=False, num_proc=1)
    assert len(calls) == 100 and len(inner) == 1  # the second job ran while the first was tokenising
    expected = [encode_row(tok, [m[0]], [m[1]["content"]], tokenization.end_of_turn_token(tok, None))
                for m in (r["messages"] for r in rows[:len(outer)])]
    for data in (outer, inner[0]):
        assert len(data) == 190  # the last 5% are held out
        assert list(data.prompt_ids) == [p for p, _ in expected] and list(data.chosen_ids) == [a[0] for _, a in expected]
    entries = list((tmp_path / "cache" / "ift_tokenized").iterdir())
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()  # one entry, no private folder left


@pytest.mark.unit
def test_a_cache_folder_that_no_build_published_is_replaced(tok, tmp_path, monkeypatch):
    # e.g. left by a killed process of an older version, or a private folder of a process that no longer runs
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = _write(tmp_path, [GOOD] * 40, "rows.jsonl")
    first = tokenization.load_split([str(path)], "train", tok, 64, 64, pairs=False)
    (entry,) = (tmp_path / "cache" / "ift_tokenized").iterdir()
    (entry / "manifest.json").unlink()  # unfinished: nothing reads it
    import socket
    abandoned = entry.with_name(f"{entry.name}.building-{socket.gethostname()}-{2 ** 22 + 7}-0000")
    abandoned.mkdir()
    (abandoned / "tokens.arrow").write_bytes(b"partial")
    again = tokenization.load_split([str(path)], "train", tok, 64, 64, pairs=False)
    assert list(again.prompt_ids) == list(first.prompt_ids) and (entry / "manifest.json").is_file()
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]
