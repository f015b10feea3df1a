"""The method-independent eval metrics (nll, margin, pref_accuracy): every loss logs them at every
evaluation, computed the same way (λ = 0, no weights), and their values match a float64 loop over the
held-out rows with the final model."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

import modeling
import pipeline
from preference_datasets import load_split
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


@pytest.mark.parametrize("loss", ["sft", "ift", "dpo", "orpo", "dft", "simpo"])
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


def test_on_data_without_rejected_answers_only_nll_is_logged(tmp_path):
    cfg = make_cfg("loss=sft", f"run_dir={tmp_path / 'r'}", *FAST[:-3], "datasets=[ultrachat_sample]")
    pipeline.validate_config(cfg)
    pipeline.run(OmegaConf.to_container(cfg, resolve=True))
    evals = [r for r in map(json.loads, open(tmp_path / "r" / "metrics.jsonl")) if r["split"] == "eval"]
    assert all("nll" in r and "margin" not in r for r in evals)
    assert evals[-1]["nll"] == pytest.approx(evals[-1]["loss"], rel=1e-6)  # SFT's own loss is the same mean NLL
