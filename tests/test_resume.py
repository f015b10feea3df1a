"""Checkpoints and exact resume: a run stopped at a checkpoint and resumed from it trains exactly like
one that never stopped (data order from (seed, epoch), lambda noise from (seed, step))."""


import pytest

import train
from conftest import launch_run, make_cfg
from utils import ConfigError

IFT_NOISY = ["loss=ift", "gamma=0.9", "loss.min_lambda=0.1", "loss.max_lambda=0.5", "lambda_schedule=linear",
             "lambda_disturb=normal", "disturb_std=0.5"]
STEPS = ["n_examples=48", "batch_size=8", "eval_batch_size=8", "n_eval_examples=8", "eval_every=1000",
         "warmup_steps=2", "lr_schedule=cosine", "optimizer=AdamW", "lr=1e-3"]


def launch(run_dir, *overrides):
    return launch_run(run_dir, *STEPS, *overrides)


def assert_continues(full, resumed, from_step):
    (rows_full, weights_full), (rows_resumed, weights_resumed) = full, resumed
    assert [r["step"] for r in rows_resumed] == [r["step"] for r in rows_full][from_step:]
    for a, b in zip(rows_full[from_step:], rows_resumed):
        for key in ("loss", "loss_sft", "loss_further", "lambda", "lr", "grad_norm", "examples"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    for k in weights_full:
        assert (weights_full[k] - weights_resumed[k]).norm() <= 1e-5 * weights_full[k].norm(), k


def test_resuming_from_a_checkpoint_continues_the_run_exactly(tmp_path):
    full = launch(tmp_path / "full", *IFT_NOISY, "save_every=24")
    checkpoint = tmp_path / "full" / "checkpoints" / "step-3"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "trainer_state.pt").exists()
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["step-3"]
    # the checkpoint is a Hugging Face model directory too
    from transformers import AutoModelForCausalLM
    assert type(AutoModelForCausalLM.from_pretrained(checkpoint)).__name__ == "MistralForCausalLM"
    assert len({r["lambda"] for r in full[0]}) == 6  # noisy lambda: a different value every step
    resumed = launch(tmp_path / "resumed", *IFT_NOISY, f"resume_from={checkpoint}")
    assert_continues(full, resumed, 3)


def test_a_checkpoint_written_by_two_fsdp_ranks_resumes_in_one(tmp_path):
    full = launch(tmp_path / "full", *IFT_NOISY, "save_every=16", "trainer=FSDPTrainer", "nproc=2")
    resumed = launch(tmp_path / "resumed", *IFT_NOISY, "trainer=FSDPTrainer", "nproc=1",
                     f"resume_from={tmp_path / 'full' / 'checkpoints' / 'step-2'}")
    assert_continues(full, resumed, 2)


def test_resume_from_needs_a_checkpoint_folder_and_the_same_schedule(tmp_path):
    with pytest.raises(ConfigError, match="is not a checkpoint folder"):
        train.validate_config(make_cfg(f"resume_from={tmp_path}"))
    launch(tmp_path / "a", "loss=sft", "save_every=16")
    with pytest.raises(ValueError, match="comes from a run of 6 steps, but this config gives 4"):
        launch(tmp_path / "b", "loss=sft", "n_examples=32", f"resume_from={tmp_path / 'a' / 'checkpoints' / 'step-2'}")
