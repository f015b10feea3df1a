"""Nothing stale: every input of a cache key, changed alone, makes a new entry (the tokenised rows of
load_split, the reference sums); a data file edited in place is read again; the data fingerprint sees
one rejected token; each epoch has its own seeded order; NOT_MATH holds no key that changes the math;
the schedule rounds down. Each test guards a mutation that once went unnoticed (issue 26)."""

import json
import os
import types

import datasets
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from training import batching, checkpoints, config_schema, planning, reference_logps, tokenization
from training.tokenization import TokenizedData
from utils import REPO_DIR

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok():
    return tokenization.ensure_chat_template(AutoTokenizer.from_pretrained(str(REPO_DIR / "models/tiny-mistral")))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_rows(path, n=12, answer="Fine, thanks."):
    rows = [{"prompt": f"Question {i}?", "chosen": f"{answer} {i}", "rejected": f"No. {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


BASE = dict(split="train", max_length=64, max_prompt_length=32, pairs=False, eot_token=None, rows_per_dataset=4,
            seed=0, min_answer_tokens=8)


def test_each_input_of_load_splits_key_alone_makes_a_new_entry(tok, cache, tmp_path, monkeypatch):
    """Changed one at a time from BASE (rows_per_dataset=4 of 12 rows, so the seed picks the sample),
    every setting that changes the tokens reaches the tokeniser again; the same settings do not."""
    path = write_rows(tmp_path / "rows.jsonl")
    other_template = AutoTokenizer.from_pretrained(str(REPO_DIR / "models/tiny-mistral"))
    other_template.chat_template = "{{ '#' }}" + tokenization.ZEPHYR_CHAT_TEMPLATE  # one more character

    def load(tokenizer=tok, names=(str(path),), **changes):
        kw = {**BASE, **changes}
        return tokenization.load_split(list(names), kw.pop("split"), tokenizer, **kw)

    load()
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "train.jsonl").write_text(path.read_text())
    changes = [dict(split="test"), dict(max_length=48), dict(max_prompt_length=16), dict(pairs=True),
               dict(rows_per_dataset=5), dict(seed=1), dict(min_answer_tokens=4),
               dict(tokenizer=other_template), dict(names=(str(copy / "train.jsonl"),))]
    for change in changes:
        load(**change)  # built once, so that the check below is about the key alone

    def refuse(*args, **kwargs):
        raise AssertionError("tokenised again")
    monkeypatch.setattr(tokenization, "_tokenise", refuse)
    load()
    for change in changes:
        load(**change)  # every entry is in the cache: none is built again
    monkeypatch.undo()
    # and each was its own entry: 1 + one per change
    assert len([p for p in (cache / "ift_tokenized").iterdir() if p.is_dir()]) == 1 + len(changes)


@pytest.mark.parametrize("change", ["rows_per_dataset", "seed", "min_answer_tokens", "max_length", "pairs"])
def test_a_rerun_with_another_value_tokenises_again(change, tok, cache, tmp_path, monkeypatch):
    """A second run that differs in one key reaches the tokeniser (patched to raise): it is not handed
    the first run's rows. (A seed sweep with rows_per_dataset: each seed its own sample.)"""
    path = write_rows(tmp_path / "rows.jsonl")
    tokenization.load_split([str(path)], tokenizer=tok, **BASE)

    def refuse(*args, **kwargs):
        raise RuntimeError("tokenised again")
    monkeypatch.setattr(tokenization, "_tokenise", refuse)
    other = {"rows_per_dataset": 5, "seed": 1, "min_answer_tokens": 4, "max_length": 48, "pairs": True}[change]
    with pytest.raises(RuntimeError, match="tokenised again"):
        tokenization.load_split([str(path)], tokenizer=tok, **{**BASE, change: other})


def test_a_same_size_edit_in_place_with_a_newer_mtime_is_tokenised_again(tok, cache, tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", answer="Fine, thanks.")
    first = tokenization.load_split([str(path)], tokenizer=tok, **{**BASE, "rows_per_dataset": None})
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    write_rows(path, answer="Good, thanks!")  # as many bytes: only the modification time tells
    os.utime(path, ns=(mtime + 10 ** 9, mtime + 10 ** 9))
    assert path.stat().st_size == size
    again = tokenization.load_split([str(path)], tokenizer=tok, **{**BASE, "rows_per_dataset": None})
    assert list(again.answers) == [a.replace("Fine, thanks.", "Good, thanks!") for a in first.answers]
    assert list(again.chosen_ids) != list(first.chosen_ids)


def ids_data(rejected_last):
    """TokenizedData of two pair rows whose rejected answers differ only in the last token of row 1."""
    table = datasets.Dataset.from_dict({"prompt_ids": [[1, 5], [1, 6]], "chosen_ids": [[7, 2], [8, 2]],
                                        "rejected_ids": [[9, 2], [10, rejected_last]]})
    return TokenizedData(table, True, [], "train")


def test_the_data_fingerprint_differs_in_one_rejected_token():
    """A resume and the precomputed reference sums key on it: DPO reads the rejected answers."""
    assert checkpoints.data_fingerprint(ids_data(2)) == checkpoints.data_fingerprint(ids_data(2))
    assert checkpoints.data_fingerprint(ids_data(2)) != checkpoints.data_fingerprint(ids_data(3))


def test_each_input_of_the_reference_cache_key_alone_changes_it():
    """Train and eval data are separate objects, so dropping either's fingerprint shows; each setting
    the module docstring lists is changed alone."""
    model = types.SimpleNamespace(config=types.SimpleNamespace(to_json_string=lambda use_diff: '{"layers": 2}'))
    other_model = types.SimpleNamespace(config=types.SimpleNamespace(to_json_string=lambda use_diff: '{"layers": 3}'))
    data = lambda f: types.SimpleNamespace(fingerprint=f)  # noqa: E731  what data_fingerprint reads
    base = {"model": {"reference_dtype": "float32", "attn_implementation": "sdpa"}, "packing": False,
            "loss_chunk_tokens": 1024, "eval_batch_size": 8, "lora": None}
    cfg = lambda **c: OmegaConf.create({**base, **c})  # noqa: E731

    def key(model=model, fingerprint=torch.zeros(3), train="t", evals="e", cfg=cfg(), world=1, device="cpu"):
        return reference_logps.cache_key(model, fingerprint, data(train), data(evals), cfg, world, torch.device(device))

    changed = [key(model=other_model), key(fingerprint=torch.tensor([0.0, 0.0, 1e-9])), key(train="t2"),
               key(evals="e2"), key(cfg=cfg(model={**base["model"], "reference_dtype": "bfloat16"})),
               key(cfg=cfg(model={**base["model"], "attn_implementation": "eager"})), key(cfg=cfg(packing=True)),
               key(cfg=cfg(loss_chunk_tokens=512)), key(cfg=cfg(eval_batch_size=4)), key(world=2),
               key(device="meta"), key(cfg=cfg(lora={"r": 8}))]
    assert key() == key() and key() not in changed and len(set(changed)) == len(changed)


def test_epoch_two_has_its_own_seeded_order_in_the_trainer_and_the_plan():
    """Step k of epoch 2 takes batch k of epoch_batches(seed, epoch=2), which differs from epoch 0's."""
    import trainers
    lengths = np.random.default_rng(0).integers(5, 60, size=40)
    cfg = OmegaConf.create({"batch_size": 8, "seed": 3})
    trainer = types.SimpleNamespace(cfg=cfg, train_lengths=lengths, steps_per_epoch=5, _epoch_cache={})
    for epoch in range(3):
        seeded = batching.epoch_batches(lengths, 8, 3, epoch)
        for i in range(5):
            assert np.array_equal(trainers.BasicTrainer.global_batch(trainer, epoch * 5 + i), seeded[i])
    assert any(not np.array_equal(a, b) for a, b in zip(batching.epoch_batches(lengths, 8, 3, 0),
                                                         batching.epoch_batches(lengths, 8, 3, 2)))


def test_the_plan_counts_the_tokens_of_each_epochs_own_batches(monkeypatch):
    """Rows of varied length over 3 epochs: the plan's tokens are the sum over every step's rows of
    epoch_batches(seed, epoch), summed here by a plain loop. 22 rows in batches of 4: each epoch drops
    2 rows of its own, so an epoch that reused epoch 0's order would count other tokens."""
    lengths = np.random.default_rng(1).integers(3, 50, size=22)
    data = type("Data", (), {"__len__": lambda self: 22, "lengths": lambda self: lengths})()
    monkeypatch.setattr(planning.flops, "sequence_sizes", lambda d: (lengths[:, None], None))
    monkeypatch.setattr(planning, "model_shape", lambda cfg: None)
    cfg = OmegaConf.create({"batch_size": 4, "n_epochs": 3, "n_examples": None, "warmup_ratio": None,
                            "warmup_steps": 0, "seed": 7, "gradient_accumulation_steps": 1, "trainer": "BasicTrainer",
                            "activation_checkpointing": False, "lora": None})
    loss = types.SimpleNamespace(needs_reference=False, head_recomputes=None)
    reused = sum(int(lengths[b].sum()) for epoch in range(3) for b in batching.epoch_batches(lengths, 4, 7, 0))
    expected = sum(int(lengths[b].sum()) for epoch in range(3) for b in batching.epoch_batches(lengths, 4, 7, epoch))
    assert planning.plan(cfg, data, loss, world=1)["tokens"] == expected != reused


def test_n_examples_not_a_multiple_of_the_batch_rounds_down():
    cfg = OmegaConf.create({"batch_size": 8, "n_epochs": 5, "n_examples": 20, "warmup_ratio": None, "warmup_steps": 0})
    assert planning.schedule(100, cfg) == {"steps_per_epoch": 12, "optimizer_steps": 2, "warmup_steps": 0,
                                           "examples": 16}


# Why each NOT_MATH key changes nothing that is computed (a resume may change it; report.py pools runs
# that differ only in it). A key added to NOT_MATH must be added here, with its reason.
NOT_MATH_REASONS = {
    "exp_name": "a name", "model.name": "a label", "run_dir": "where files go", "dry_run": "no training",
    "device": "where it runs (the arithmetic is checked equal across devices by tests)",
    "trainer": "FSDP is a wrapping, not a loop (test_trainers_fsdp)", "nproc": "ranks (test_trainers_fsdp)",
    "dist_timeout_minutes": "a wait", "activation_checkpointing": "a recompute, the same gradients",
    "gradient_accumulation_steps": "a split of the same global batch", "loss_chunk_tokens": "a split of one sum",
    "compile": "the same graph", "compile_backend": "the same graph", "dataset_paths": "where a copy lies "
    "(the tokenised data's fingerprint guards its content)", "model.block_name": "FSDP's unit",
    "model.attn_implementation": "kernels of one attention", "n_eval_examples": "evaluation only",
    "eval_batch_size": "evaluation only", "eval_every": "evaluation only", "do_first_eval": "evaluation only",
    "progress_every": "printing", "save_every": "checkpoints", "save_async": "checkpoints",
    "save_hf_checkpoints": "checkpoints", "keep_last": "checkpoints", "resume_from": "resume",
    "resume_force": "resume", "preempt_signals": "signals", "n_samples": "greedy samples after training",
    "max_new_tokens": "greedy samples after training", "wandb": "logging", "hydra": "hydra's own files",
    "reference_logps": "the same sums, precomputed or live (test_reference_logps)", "peak_tflops": "MFU's divisor",
}
# keys that feed the losses, the optimizer, the schedule or the data: they must count
MATH = ["seed", "lr", "optimizer", "batch_size", "n_epochs", "n_examples", "warmup_steps", "warmup_ratio",
        "lr_schedule", "max_grad_norm", "max_length", "max_prompt_length", "min_answer_tokens", "rows_per_dataset",
        "datasets", "packing", "model.name_or_path", "model.policy_dtype", "model.reference_dtype", "model.eot_token",
        "lora.r", "lora.alpha", "loss.name", "loss.gamma", "loss.beta", "loss.lambda_schedule", "loss.lambda_disturb",
        "loss.disturb_std", "loss.min_lambda", "loss.max_lambda"]


def test_not_math_holds_the_reviewed_keys_only_and_every_key_that_feeds_the_math_counts():
    from conftest import make_cfg
    cfg = make_cfg("loss=ift")
    assert set(config_schema.NOT_MATH) == set(NOT_MATH_REASONS)
    for key in NOT_MATH_REASONS:  # each names a declared key (a renamed key would otherwise count silently)
        assert key == "hydra" or OmegaConf.select(cfg, key, default="<none>") != "<none>", key
    for key in MATH:
        assert config_schema.changes_the_math(key), key
    # every declared key outside NOT_MATH counts: one rule decides both
    flat = [k for k in _keys(OmegaConf.to_container(cfg)) if not k.startswith("hydra")]
    assert all(config_schema.changes_the_math(k) != any(k == n or k.startswith(n + ".") for n in NOT_MATH_REASONS)
               for k in flat)


def _keys(tree, prefix=""):
    for k, v in tree.items():
        yield from _keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]


def test_each_dataset_draws_its_own_sample():
    """The same seed and row count, two dataset names: two samples (sample_rows seeds with the name)."""
    a, b = tokenization.sample_rows(1000, 10, 0, "a"), tokenization.sample_rows(1000, 10, 0, "b")
    assert not np.array_equal(a, b) and np.array_equal(a, tokenization.sample_rows(1000, 10, 0, "a"))


def test_a_column_iterates_over_every_row_across_its_blocks():
    """9,000 rows (three of Column's 4,096-row blocks), each row's ids [i, i]: all of them, in order."""
    n = 9000
    table = datasets.Dataset.from_dict({"prompt_ids": [[i, i] for i in range(n)],
                                        "chosen_ids": [[i] for i in range(n)]})
    data = TokenizedData(table, False, [], "train")
    assert list(data.prompt_ids) == [[i, i] for i in range(n)]


def test_load_split_keys_and_reads_by_the_identity_rank_0_decided(tok, cache, tmp_path, monkeypatch):
    """run_data broadcasts rank 0's source identities: load_split keys by them without looking the
    source up itself, and a hub identity names the commit that is read."""
    from training import sources
    path = str(write_rows(tmp_path / "rows.jsonl"))
    monkeypatch.setattr(tokenization, "source_identity", lambda *a: pytest.fail("looked up on this rank"))
    tokenization.load_split([path], tokenizer=tok, identities={path: "v1"}, **BASE)
    monkeypatch.setattr(tokenization, "_tokenise", lambda *a, **k: pytest.fail("tokenised again"))
    tokenization.load_split([path], tokenizer=tok, identities={path: "v1"}, **BASE)  # rank 0's key: in the cache
    with pytest.raises(pytest.fail.Exception, match="tokenised again"):
        tokenization.load_split([path], tokenizer=tok, identities={path: "v2"}, **BASE)
    assert sources.identity_revision("hub:HuggingFaceH4/ultrachat_200k@1111aaaa") == "1111aaaa"
    assert sources.identity_revision("hub:HuggingFaceH4/ultrachat_200k@unresolved") is None
    assert sources.identity_revision(sources.source_identity(path)) is None
