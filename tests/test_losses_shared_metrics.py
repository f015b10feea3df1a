"""The method-independent eval metrics (nll, margin, pref_accuracy): every loss logs them at every
evaluation, computed the same way (λ = 0, no weights), and their values match a float64 loop over the
held-out rows with the final model."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from training import modeling, pipeline
from training.tokenization import load_split

from conftest import make_cfg

FAST = ["n_examples=32", "batch_size=16", "eval_batch_size=8", "n_eval_examples=12", "eval_every=16",
        "warmup_steps=0", "datasets=[ultrafeedback_sample]", "max_length=96", "max_prompt_length=64"]


def mean_token_logp(model, prompt_ids, answer_ids):
    """Per-token mean log p(answer | prompt), one row at a time, log-softmax in float64."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits[len(prompt_ids) - 1:-1], -1)
    return float(sum(logp[i, t] for i, t in enumerate(answer_ids)) / len(answer_ids))


@pytest.mark.integration
@pytest.mark.parametrize("loss", ["sft", "ift", "dpo", "orpo", "dft", "asft", "simpo"])
def test_every_loss_logs_nll_margin_and_pref_accuracy_as_a_float64_loop_computes_them(tmp_path, loss):
    cfg = make_cfg(f"loss={loss}", f"run_dir={tmp_path / loss}", *FAST)
    pipeline.validate_config(cfg)
    pipeline.run(OmegaConf.to_container(cfg, resolve=True))
    evals = [json.loads(line) for line in open(tmp_path / loss / "metrics.jsonl")]
    evals = [r for r in evals if r["split"] == "eval"]
    assert len(evals) == 3 and all({"nll", "margin", "pref_accuracy"} <= set(r) for r in evals)

    tokenizer = modeling.load_tokenizer(cfg)
    data = load_split(["ultrafeedback_sample"], "test", tokenizer, 96, 64, pairs=True)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / loss / "final"), dtype=torch.float64).eval()
    chosen, rejected = [], []
    for i in range(12):
        chosen.append(mean_token_logp(model, data.prompt_ids[i], data.chosen_ids[i]))
        rejected.append(mean_token_logp(model, data.prompt_ids[i], data.rejected_ids[i]))
    last = evals[-1]
    assert last["nll"] == pytest.approx(-sum(chosen) / 12, rel=1e-4)
    assert last["margin"] == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / 12, rel=1e-4, abs=1e-5)
    assert last["pref_accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 12)


@pytest.mark.integration
def test_on_data_without_rejected_answers_only_nll_is_logged(tmp_path):
    cfg = make_cfg("loss=sft", f"run_dir={tmp_path / 'r'}", *FAST[:-3], "datasets=[ultrachat_sample]")
    pipeline.validate_config(cfg)
    pipeline.run(OmegaConf.to_container(cfg, resolve=True))
    evals = [r for r in map(json.loads, open(tmp_path / "r" / "metrics.jsonl")) if r["split"] == "eval"]
    assert all("nll" in r and "margin" not in r for r in evals)
    assert evals[-1]["nll"] == pytest.approx(evals[-1]["loss"], rel=1e-6)  # SFT's own loss is the same mean NLL


@pytest.mark.unit
def test_the_eval_split_keeps_rejected_answers_as_the_registry_or_the_rows_say_without_trying(tmp_path, monkeypatch):
    """run_data.eval_pairs_of decides before anything loads (one load, no error caught), and a genuinely
    missing split still raises the loader's message naming it."""
    from preference_datasets import DataError
    from training import run_data, sources

    def unread(*args, **kwargs):
        raise AssertionError("a registered dataset was read to decide")

    monkeypatch.setattr(sources, "_split_rows", unread)
    assert sources.has_rejected_answers("ultrafeedback_sample", "test") and sources.has_rejected_answers("hh", "test")
    assert not sources.has_rejected_answers("ultrachat_sample", "test")
    assert not sources.has_rejected_answers("ultrachat", "test", {"ultrachat": str(tmp_path)})  # a copy: its schema
    monkeypatch.undo()
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    own = tmp_path / "own"
    own.mkdir()
    row = {"prompt": "q", "chosen": "a", "rejected": "b"}
    (own / "test.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "rejected": None}) + "\n")
    assert not sources.has_rejected_answers(str(own), "test")  # one row without: no pairs
    (own / "test.jsonl").write_text(json.dumps(row) + "\n")
    assert sources.has_rejected_answers(str(own), "test")
    with monkeypatch.context() as m:  # asked again (the next run, another rank): answered without a row read
        m.setattr(sources, "_split_rows", lambda *a, **k: pytest.fail("the file's rows were read again"))
        assert sources.has_rejected_answers(str(own), "test")

    for names, pairs in ((["ultrachat_sample"], False), (["ultrafeedback_sample", str(own)], True),
                         (["ultrafeedback_sample", "ultrachat_sample"], False)):
        assert run_data.eval_pairs_of(names, False, None) == pairs
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"{empty}: no 'train' file"):
        run_data.eval_pairs_of([str(empty)], False, None)
