"""Data of real length and real layout (scripts/make_standins.py): every registered dataset written in
its hub repository's layout loads through dataset_paths.<name>; a few hundred long, multi-turn rows go
through every tokenizer family with max_length == max_prompt_length (the paper's 1024 / 1024 setting,
scaled down) keeping the invariants of encode_chat and truncate; rows_per_dataset samples the same rows
every time; dry_run=true plans without a model or a run directory; and a tiny model trains on such
rows to the end."""

import json
import subprocess
import sys

import numpy as np
import pytest

import losses
from training import batching, sources, tokenization
from utils import REPO_DIR

from conftest import make_cfg, read_rows, run_inprocess, run_train_py
from tokenizer_families import FAMILIES, build_tokenizer

ROWS = 100  # training rows per dataset; the test splits get 8
FOLDERS = {"ultrachat": "ultrachat_200k", "ultrafeedback": "ultrafeedback_binarized", "hh": "hh-rlhf", "shp": "shp",
           "orca": "orca_dpo_pairs"}


def closed_form_plan(cfg, data, no_grad_passes):
    """(tokens, FLOPs) of the run's steps, by hand: the tiny model's weight matrices from its config.json;
    per sequence of n tokens, m of them targets, a forward is 2·N_body·n + 2·N_head·m (the head at the
    targets only) + 4·L·(heads·head_dim)·n(n+1)/2 (causal attention); a step is 3 forwards (forward and
    backward) plus no_grad_passes, plus the head once more when its targets exceed loss_chunk_tokens
    (the chunked head's backward recomputes the logits). One process, one micro-batch per step."""
    c = json.loads((REPO_DIR / "models" / "tiny-mistral" / "config.json").read_text())
    h, d = c["hidden_size"], c["num_attention_heads"] * c["head_dim"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    body = c["num_hidden_layers"] * (h * d + 2 * h * kv + d * h + 3 * h * c["intermediate_size"])
    head = c["vocab_size"] * h
    assert c["sliding_window"] is None and not c["tie_word_embeddings"]  # what the formula assumes
    prompt, answers = data.column_lengths("prompt_ids"), [data.column_lengths("chosen_ids")]
    if data.pairs:
        answers.append(data.column_lengths("rejected_ids"))
    steps_per_epoch = len(data) // cfg.batch_size
    steps = min(cfg.n_epochs * steps_per_epoch, (cfg.n_examples or 10 ** 9) // cfg.batch_size)
    tokens = total = 0
    for step in range(steps):
        epoch, i = divmod(step, steps_per_epoch)
        rows = batching.epoch_batches(data.lengths(), cfg.batch_size, cfg.seed, epoch)[i]
        n = np.concatenate([prompt[rows] + a[rows] for a in answers]).astype(np.int64)
        m = np.concatenate([a[rows] for a in answers]).astype(np.int64)
        forward = (2 * body * n.sum() + 2 * head * m.sum()
                   + 4 * c["num_hidden_layers"] * d * (n * (n + 1) // 2).sum())
        total += (3 + no_grad_passes) * forward + (2 * head * m.sum() if m.sum() > cfg.loss_chunk_tokens else 0)
        tokens += int(n.sum())
    return tokens, float(total)


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """{name: folder} of stand-ins for the five datasets, ROWS training rows each."""
    out = tmp_path_factory.mktemp("standins")
    subprocess.run([sys.executable, "-m", "scripts.make_standins", str(out), "--rows", str(ROWS),
                    "--test-rows", "8"], check=True, capture_output=True, cwd=REPO_DIR)
    return {name: str(out / folder) for name, folder in FOLDERS.items()}


@pytest.mark.integration
def test_every_hub_layout_is_written_and_loads_as_a_downloaded_copy(standins):
    files = {name: sorted(str(p.relative_to(folder)) for p in __import__("pathlib").Path(folder).rglob("*")
                          if p.is_file()) for name, folder in standins.items()}
    assert files["ultrachat"] == ["data/test_sft-00000-of-00001.parquet", "data/train_sft-00000-of-00001.parquet"]
    assert "data/train_prefs-00000-of-00001.parquet" in files["ultrafeedback"]
    assert "helpful-base/train.jsonl.gz" in files["hh"] and len(files["hh"]) == 8  # 4 subsets x 2 splits
    assert "askscience/validation.json" in files["shp"] and len(files["shp"]) == 18 * 3
    assert files["orca"] == ["data/train-00000-of-00001.parquet"]
    # the test rows come from the test files; orca has none, so its last 5% are held out
    expected = {"ultrachat": (ROWS, 8), "ultrafeedback": (ROWS, 8), "hh": (ROWS, 8), "shp": (ROWS, 8),
                "orca": (ROWS + 8 - 5, 5)}
    for name, (n_train, n_test) in expected.items():
        train = sources.load_normalised(name, "train", standins)
        test = sources.load_normalised(name, "test", standins)
        assert (len(train), len(test)) == (n_train, n_test), name
        assert all(r["rejected"] is not None for r in train) == (name != "ultrachat")
    # ultrachat's conversations are multi-turn, 3.85 rounds on average (1 + Poisson(2.85))
    rounds = [(len(r["prompt"]) + 1) / 2 for r in sources.load_normalised("ultrachat", "train", standins)]
    assert 3.2 < np.mean(rounds) < 4.5 and max(rounds) >= 6


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_long_multi_turn_rows_keep_the_invariants_through_every_tokenizer_family(standins, family):
    tok = tokenization.ensure_chat_template(build_tokenizer(family))
    eot = tokenization.end_of_turn_token(tok)
    eot_id = tok.convert_tokens_to_ids(eot)
    max_length = 512
    for name in FOLDERS:
        pairs = name != "ultrachat"
        full = tokenization.load_split([name], "train", tok, 10 ** 7, 10 ** 7, pairs, standins)
        cut = tokenization.load_split([name], "train", tok, max_length, max_length, pairs, standins, min_answer_tokens=64)
        rows = sources.load_normalised(name, "train", standins)
        assert len(cut) == len(full) == len(rows)
        n_cut = 0
        for i, row in enumerate(rows[:40]):  # against the tokenizer's own call on the whole chat
            chat = tok.apply_chat_template(row["prompt"] + [{"role": "assistant", "content": row["chosen"]}],
                                           tokenize=False)
            ids = tok(chat, add_special_tokens=False)["input_ids"]
            if tok.bos_token_id is not None and ids[0] != tok.bos_token_id:
                ids = [tok.bos_token_id] + ids
            whole = full.prompt_ids[i] + full.chosen_ids[i]
            assert whole == ids[:len(whole)] and whole[-1] == eot_id
        for side in ("chosen_ids", "rejected_ids") if pairs else ("chosen_ids",):
            for i in range(len(rows)):
                p, a, fp, fa = cut.prompt_ids[i], getattr(cut, side)[i], full.prompt_ids[i], getattr(full, side)[i]
                assert len(p) + len(a) <= max_length and a[-1] == eot_id
                assert len(a) >= min(len(fa), 64)  # min_answer_tokens, although max_prompt_length == max_length
                assert p[:1] == fp[:1] and fp[len(fp) - len(p) + 1:] == p[1:]  # bos + the end of the prompt
                assert a[:-1] == fa[:len(a) - 1]  # the start of the answer, then the end of turn
                n_cut += side == "chosen_ids" and len(p) < len(fp)
        assert cut.parts[0]["prompts_truncated"] == n_cut > 0, name
        assert cut.parts[0]["rows_dropped"] == 0


@pytest.mark.integration
def test_rows_per_dataset_draws_the_same_random_sample_every_time(standins):
    a, b = tokenization.sample_rows(1000, 61, 0, "ultrachat"), tokenization.sample_rows(1000, 61, 0, "ultrachat")
    assert (a == b).all() and len(set(a.tolist())) == 61 and (np.diff(a) > 0).all()
    assert not (a == tokenization.sample_rows(1000, 61, 1, "ultrachat")).all()  # another seed, another sample
    assert not (a == np.arange(61)).all()  # random, not the first rows
    assert (tokenization.sample_rows(50, 61, 0, "x") == np.arange(50)).all()  # fewer rows than asked: all of them


@pytest.mark.integration
def test_dry_run_prints_the_plan_and_creates_nothing(standins, tmp_path, monkeypatch):
    import datasets
    run_dir = tmp_path / "run"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # a cold token cache
    args = ["datasets=[ultrachat,ultrafeedback]", f"dataset_paths.ultrachat={standins['ultrachat']}",
            f"dataset_paths.ultrafeedback={standins['ultrafeedback']}", "loss=ift", "rows_per_dataset=60", "n_epochs=3",
            "batch_size=16", "warmup_ratio=0.15", "max_length=256", "max_prompt_length=256", f"run_dir={run_dir}",
            "wandb.enabled=true"]
    status, stdout, stderr = run_train_py("dry_run=true", *args)  # train.py's __main__, in this process
    assert status == 0, stderr[-2000:]
    plan = json.loads(stdout.strip().splitlines()[-1])
    assert plan["rows"] == 120 and plan["rows_per_dataset"] == {"ultrachat": 60, "ultrafeedback": 60}
    assert (plan["steps_per_epoch"], plan["optimizer_steps"], plan["warmup_steps"]) == (7, 21, 3)  # 120 // 16 = 7
    assert plan["examples"] == 21 * 16 and plan["prompts_truncated"]["ultrachat"] > 0
    assert plan["rows_dropped"] == {"ultrachat": 0, "ultrafeedback": 0}
    # tokens: every row of each epoch's 7 batches, exactly (prompt + chosen answer for IFT); FLOPs: those
    # sequences by hand, 3 forwards' worth trained + IFT's no-grad forward (lambda = 0.2 at every step)
    from training import modeling, run_data
    cfg = make_cfg(*args)
    data, _ = run_data.load_data(cfg, modeling.load_tokenizer(cfg), pairs=False)
    tokens, total = closed_form_plan(cfg, data, no_grad_passes=1)
    assert plan["tokens"] == tokens > 0 and plan["flops"] == pytest.approx(total, rel=1e-12)
    assert "prompts cut" in stdout and "random sample of 60 of its 100 rows" in stdout
    assert not run_dir.exists() and "wandb" not in stdout.lower()
    assert list((tmp_path / "cache").glob("ift_tokenized/*"))  # it tokenised into the cold cache


@pytest.mark.integration
def test_a_tiny_model_trains_to_the_end_on_long_multi_turn_rows_with_the_prompt_as_long_as_the_row(standins, tmp_path):
    from training import modeling, planning, run_data
    args = ["loss=ift", "datasets=[ultrachat]", f"dataset_paths.ultrachat={standins['ultrachat']}", "max_length=192",
            "max_prompt_length=192", "min_answer_tokens=32", "batch_size=8", "eval_batch_size=8", "n_examples=32",
            "n_eval_examples=8", "eval_every=16", "warmup_steps=0", "n_samples=2", "max_new_tokens=4"]
    rows = run_inprocess(tmp_path / "run", *args)
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 4 and all(np.isfinite(r["loss"]) for r in train)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert len(read_rows(tmp_path / "run", "eval")) >= 2
    # the plan (dry_run's) counts the FLOPs the trainer counted, step by step: tflops = FLOPs / step time
    cfg = make_cfg(*args)
    data, _ = run_data.load_data(cfg, modeling.load_tokenizer(cfg), pairs=False)
    trained = sum(r["tflops"] * r["step_time_s"] * 1e12 for r in train)
    assert planning.plan(cfg, data, losses.build(cfg.loss))["flops"] == pytest.approx(trained, rel=1e-9)


@pytest.mark.unit
@pytest.mark.parametrize("reference_logps", ["live", "precompute"])
def test_the_plan_counts_a_live_reference_forward_and_none_with_precompute(reference_logps):
    from training import modeling, planning, run_data
    cfg = make_cfg("loss=dpo", "datasets=[ultrafeedback_sample]", "n_examples=64", "batch_size=16",
                   f"reference_logps={reference_logps}")
    data, _ = run_data.load_data(cfg, modeling.load_tokenizer(cfg), pairs=True)
    tokens, total = closed_form_plan(cfg, data, no_grad_passes=int(reference_logps == "live"))
    p = planning.plan(cfg, data, losses.build(cfg.loss))
    assert p["tokens"] == tokens and p["flops"] == pytest.approx(total, rel=1e-12)
    assert ("reference model's forward" in p["flops_counted"]) == (reference_logps == "live")


@pytest.mark.integration
def test_a_second_rank_maps_the_first_ranks_tokens_without_reading_a_row(standins, monkeypatch, tmp_path):
    import datasets
    from transformers import AutoTokenizer
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    tok = tokenization.ensure_chat_template(AutoTokenizer.from_pretrained(str(REPO_DIR / "models" / "tiny-mistral")))
    kw = dict(dataset_paths=standins, rows_per_dataset=50, seed=3, num_proc=2)
    first = tokenization.load_split(["ultrachat", "ultrafeedback"], "train", tok, 512, 512, False, **kw)  # "rank 0"
    monkeypatch.setattr(sources, "_split_rows", lambda *a: (_ for _ in ()).throw(AssertionError("read the rows")))
    again = tokenization.load_split(["ultrachat", "ultrafeedback"], "train", tok, 512, 512, False, **kw)  # "rank 1"
    assert again.fingerprint == first.fingerprint and len(again) == 100
    assert again.parts == first.parts and again.table.cache_files  # memory-mapped from the cache, not in memory
    rows = [again.origins[i] for i in (0, 99)]
    assert rows[0].startswith("dataset 'ultrachat' (train) row ") and rows[1].startswith("dataset 'ultrafeedback'")
