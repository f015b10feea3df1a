"""Numerics that cannot go silently wrong: float32 master weights under bf16 compute in every trainer,
and no non-finite step ever reaching the weights (on_nonfinite, max_skipped_steps, float16's scaler).

NaNs are injected with `inject_nan_gradient`: from the chosen steps on, the backward of the loss
returns NaN for every gradient while the loss itself stays finite (the failure the issue measured:
a finite loss and a NaN gradient norm)."""

import glob
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import losses
import utils
from forward import ModelCall
from training import checkpoints, launch as launcher, modeling, pipeline
from utils import REPO_DIR, ConfigError, NonFiniteError

from conftest import launch_run, make_cfg, read_rows

STEPS = ["batch_size=8", "eval_batch_size=8", "n_eval_examples=8", "eval_every=1000", "do_first_eval=false",
         "warmup_steps=0", "optimizer=AdamW", "lr=1e-3", "loss=sft"]


def inject_nan_gradient(steps, value=float("nan")):
    """A batch_loss whose backward gives `value` to every gradient at the given 1-based training steps
    (one call with gradient per step and rank: gradient_accumulation_steps=1), on rank 0 only, so
    that under FSDP only one rank's gradient is bad. The returned loss stays finite."""
    original, calls = losses.batch_loss, [0]

    def batch_loss(loss, policy, reference, batch, info, call):
        out = original(loss, policy, reference, batch, info, call)
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] in steps and utils.rank() == 0:
                out.row_losses.register_hook(lambda grad: torch.full_like(grad, value))
        return out
    return batch_loss


def run(run_dir, *overrides, validate=True):
    """validate_config and run in this process (FSDPTrainer with nproc=1 too); returns metrics rows."""
    cfg = make_cfg(f"run_dir={run_dir}", *STEPS, *overrides)
    if validate:
        pipeline.validate_config(cfg)
    pipeline.launch(cfg)
    return read_rows(run_dir)


def weights_and_optimizer_states(run_dir):
    """Every tensor on disk under run_dir: weights of checkpoints and final/, optimizer state."""
    out = []
    for path in glob.glob(str(run_dir / "**" / "model.safetensors"), recursive=True):
        out += list(load_file(path).values())
    for checkpoint in checkpoints.complete_checkpoints(run_dir).values():
        state = checkpoints.read_checkpoint(checkpoint)
        out += list(state["model"].values())
        out += [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    return out


def assert_all_finite(run_dir):
    tensors = weights_and_optimizer_states(run_dir)
    assert tensors and all(torch.isfinite(t.float()).all() for t in tensors)


def optimizer_steps_taken(checkpoint):
    state = checkpoints.read_checkpoint(checkpoint)["optimizer"]["state"]
    return {int(s["step"]) for s in state.values()}


# ---------------------------------------------------------------- bf16 compute, float32 weights

@pytest.mark.distributed
def test_bf16_compute_gives_the_same_losses_in_one_process_and_fsdp_with_one_and_two_ranks(tmp_path):
    """model.policy_dtype=bfloat16 on the CPU: BasicTrainer (autocast) against FSDPTrainer
    (MixedPrecisionPolicy) on 1 rank and on 2 gloo ranks, same global batches (2 micro-batches of 4),
    IFT, 4 AdamW steps. Per-step losses agree to 5e-4 relative.

    Why 5e-4. The runs round to bf16 in different places: autocast keeps the embeddings, norms and
    the residual stream in float32 and rounds only the inputs of matrix products, FSDP2 casts every
    parameter to bf16 (so the residual stream is bf16 too), and gradients are summed over micro-batches
    in float32 (BasicTrainer, FSDP over ranks) or bf16 (FSDP's local accumulation). bf16 keeps 8
    significant bits: one rounding moves a value by up to 2^-9 = 2e-3 relative. The loss is a mean over
    about 2,000 target tokens whose rounding errors are independent, so it moves by about
    2e-3 / sqrt(2000) = 5e-5; measured, the largest difference of any pair was 8.5e-5 (bf16 against
    float32 compute: 1.5e-4). 5e-4 leaves room for other orderings of the same sums, and is still 40
    times smaller than the loss's change in one step here (2-3%), so a lost, doubled or different
    update fails. The float32 run must differ from the bf16 ones, so a run that ignored policy_dtype
    fails too; float32 runs of the two trainers agree to 1e-5 (tests/test_trainers_fsdp.py)."""
    bf16 = ["model.policy_dtype=bfloat16", "n_examples=32", "loss=ift", "gamma=0.9", "loss.min_lambda=0.3",
            "loss.max_lambda=0.3"]
    basic, _ = launch_run(tmp_path / "basic", *STEPS, *bf16, "gradient_accumulation_steps=2")
    one, _ = launch_run(tmp_path / "one", *STEPS, *bf16, "trainer=FSDPTrainer", "nproc=1", "gradient_accumulation_steps=2")
    two, weights = launch_run(tmp_path / "two", *STEPS, *bf16, "trainer=FSDPTrainer", "nproc=2")
    fp32, _ = launch_run(tmp_path / "fp32", *STEPS, *bf16[1:], "gradient_accumulation_steps=2")
    loss = lambda rows: [r["loss"] for r in rows]  # noqa: E731
    assert len(basic) == len(one) == len(two) == 4
    assert loss(one) == pytest.approx(loss(two), rel=5e-4)
    assert loss(basic) == pytest.approx(loss(one), rel=5e-4)
    assert loss(basic) == pytest.approx(loss(two), rel=5e-4)
    assert all(abs(a - b) > 1e-6 for a, b in zip(loss(basic), loss(fp32)))
    assert all(w.dtype == torch.bfloat16 for w in weights.values())


@pytest.mark.integration
def test_bf16_updates_smaller_than_bf16_resolution_still_train_every_matrix(tmp_path):
    """AdamW moves a weight by about lr per step. At lr=1e-5 that is below half a bf16 step of a
    typical weight (|w| ~ 0.014: a bf16 step is 6e-5), so bf16 parameters would round most updates
    away (the issue measured 15% of values changed). With float32 parameters the updates add up:
    after 8 steps final/ (bf16) differs from the initial weights (cast to bf16) in most values of
    every matrix; the float32 weights of the checkpoint, in all of them. The input embedding is left
    out of both: its rows of tokens absent from these 64 rows get no gradient."""
    run(tmp_path / "r", "model.policy_dtype=bfloat16", "lr=1e-5", "n_examples=72", "save_every=64")
    initial = load_file(REPO_DIR / "models" / "tiny-mistral" / "model.safetensors")
    final = load_file(tmp_path / "r" / "final" / "model.safetensors")
    master = checkpoints.read_checkpoint(tmp_path / "r" / "checkpoints" / "step-8")["model"]
    assert all(v.dtype == torch.float32 for v in master.values())
    for k, v in final.items():
        if v.dim() == 2 and k != "model.embed_tokens.weight":
            assert (v != initial[k].bfloat16()).float().mean() > 0.4, k
            assert (master[k] != initial[k]).float().mean() > 0.99, k


@pytest.mark.unit
def test_the_policy_computes_in_bf16_under_autocast_with_float32_parameters_and_loss_math():
    """BasicTrainer's policy: float32 parameters, bf16 matrix products (the logits come out bf16),
    the blended-embedding hooks of IFT inside the autocast forward, float32 log-probabilities."""
    from trainers import _autocast_forward
    cfg = make_cfg("model.policy_dtype=bfloat16")
    model = modeling.load_model(cfg, "float32")
    _autocast_forward(model, "cpu", torch.bfloat16)
    seen = {}
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.update(embed=out.dtype))
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    labels = torch.tensor([[-100, -100, 6, 7, 8, 9]])
    logps, _ = ModelCall().logps(model, ids, torch.ones_like(ids), labels, intuitive_ids=ids.flip(-1), lam=0.5)
    assert seen["embed"] == torch.float32 and logps.dtype == torch.float32
    assert model(input_ids=ids).logits.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    logps.sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------- non-finite steps

@pytest.mark.distributed
@pytest.mark.parametrize("trainer", ["BasicTrainer", "FSDPTrainer"])
def test_a_nan_gradient_stops_the_run_before_the_update_keeping_what_was_written(trainer, tmp_path, monkeypatch):
    monkeypatch.setattr(losses, "batch_loss", inject_nan_gradient({3}))
    with pytest.raises(NonFiniteError, match=r"^grad_norm is nan at step 3; the update was not applied"):
        run(tmp_path / "r", f"trainer={trainer}", "nproc=1", "n_examples=48", "save_every=8")
    rows = read_rows(tmp_path / "r")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] == pytest.approx(rows[2]["loss"])  # finite
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == ["step-1", "step-2"]
    assert not (tmp_path / "r" / "final").exists()
    assert_all_finite(tmp_path / "r")


@pytest.mark.distributed
@pytest.mark.parametrize("trainer", ["BasicTrainer", "FSDPTrainer"])
def test_on_nonfinite_skip_drops_the_update_counts_it_and_trains_on(trainer, tmp_path, monkeypatch):
    monkeypatch.setattr(losses, "batch_loss", inject_nan_gradient({2}))
    rows = run(tmp_path / "r", f"trainer={trainer}", "nproc=1", "n_examples=32", "save_every=24",
               "on_nonfinite=skip", "warmup_steps=4")
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["skipped_steps"] for r in train_rows] == [0, 1, 1, 1]
    # neither the optimizer nor the scheduler stepped at step 2: lr stays in warm-up (update k of 4 at
    # lr·(k+1)/4, lr 1e-3), so step 3 is the 2nd update again and step 4 the 3rd
    assert [r["lr"] for r in train_rows] == pytest.approx([2.5e-4, 5e-4, 5e-4, 7.5e-4])
    assert optimizer_steps_taken(tmp_path / "r" / "checkpoints" / "step-3") == {2}
    assert_all_finite(tmp_path / "r")
    assert (tmp_path / "r" / "final").exists()


@pytest.mark.integration
def test_max_skipped_steps_in_a_row_stops_a_skipping_run(tmp_path, monkeypatch):
    monkeypatch.setattr(losses, "batch_loss", inject_nan_gradient({2, 3, 4}))
    with pytest.raises(NonFiniteError, match=r"^grad_norm is nan at step 3: 2 skipped updates in a row"):
        run(tmp_path / "r", "n_examples=48", "on_nonfinite=skip", "max_skipped_steps=2")
    assert [r["skipped_steps"] for r in read_rows(tmp_path / "r")] == [0, 1, 2]
    assert not (tmp_path / "r" / "final").exists()


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_a_nonfinite_eval_loss_follows_on_nonfinite(mode, tmp_path, monkeypatch):
    original = losses.batch_loss

    def nan_in_eval(loss, policy, reference, batch, info, call):
        out = original(loss, policy, reference, batch, info, call)
        if not torch.is_grad_enabled():
            out.metrics["loss"] = torch.full_like(out.metrics["loss"], float("inf"))
        return out
    monkeypatch.setattr(losses, "batch_loss", nan_in_eval)
    args = (tmp_path / "r", "n_examples=32", "eval_every=16", "save_every=16", f"on_nonfinite={mode}")
    if mode == "error":
        with pytest.raises(NonFiniteError, match=r"^eval loss is inf at step 2"):
            run(*args)
        assert not (tmp_path / "r" / "checkpoints").exists()  # step 2's checkpoint comes after its eval
    else:
        rows = run(*args)
        assert [r["step"] for r in rows if r["split"] == "eval"] == [2, 4]
        assert (tmp_path / "r" / "final").exists()


def _nan_on_rank0(local_rank, cfg, world, port):
    losses.batch_loss = inject_nan_gradient({2})
    pipeline.run(cfg, local_rank, world, port)


@pytest.mark.distributed
def test_two_ranks_skip_together_when_one_rank_has_a_nan_gradient(tmp_path):
    """The decision uses the global gradient norm, so both ranks skip (no rank steps alone, no hang)."""
    cfg = make_cfg(f"run_dir={tmp_path / 'r'}", *STEPS, "trainer=FSDPTrainer", "nproc=2", "n_examples=32",
                   "on_nonfinite=skip")
    pipeline.validate_config(cfg)
    torch.multiprocessing.spawn(_nan_on_rank0, args=(OmegaConf.to_container(cfg, resolve=True), 2,
                                                     launcher.free_port()), nprocs=2, join=True)
    rows = [r for r in read_rows(tmp_path / "r") if r["split"] == "train"]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert_all_finite(tmp_path / "r")


@pytest.mark.distributed
def test_a_diverging_run_on_two_ranks_stops_with_one_clear_line_and_no_nan_on_disk(tmp_path):
    """The issue's run (AdamW at lr=1e6, no clipping, a checkpoint every step), from the command line,
    under FSDP2 with 2 spawned ranks: the error comes back from the ranks as one line."""
    cmd = [sys.executable, "train.py", f"run_dir={tmp_path / 'r'}", "optimizer=AdamW", "lr=1e6", "max_grad_norm=null",
           "save_every=8", "batch_size=8", "n_examples=80", "do_first_eval=false", "trainer=FSDPTrainer", "nproc=2",
           "device=cpu"]
    proc = subprocess.run(cmd, cwd=REPO_DIR, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("training stopped: ") and " is nan at step " in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "final").exists()
    assert os.listdir(tmp_path / "r" / "checkpoints")
    assert_all_finite(tmp_path / "r")


# ---------------------------------------------------------------- float16

@pytest.mark.unit
def test_float16_is_refused_on_the_cpu_before_anything_loads():
    with pytest.raises(ConfigError, match=r"^model.policy_dtype=float16 is not supported on the CPU"):
        pipeline.validate_config(make_cfg("model.policy_dtype=float16", "device=cpu"))


@pytest.mark.integration
def test_float16_scaler_skips_an_overflow_and_halves_the_scale_without_stopping(tmp_path, monkeypatch):
    """The gradient scaler's logic is device-independent, so it is tested on the CPU, skipping the
    config check that refuses float16 there (CPU float16 autocast runs, slowly). An infinite gradient
    under the scaler is an overflow: skipped and the scale halved, even with on_nonfinite=error."""
    monkeypatch.setattr(losses, "batch_loss", inject_nan_gradient({2}, value=float("inf")))
    rows = run(tmp_path / "r", "model.policy_dtype=float16", "device=cpu", "n_examples=32", validate=False)
    rows = [r for r in rows if r["split"] == "train"]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert [r["loss_scale"] for r in rows] == [65536.0, 32768.0, 32768.0, 32768.0]
    assert all(w.dtype == torch.float16 for w in load_file(tmp_path / "r" / "final" / "model.safetensors").values())
    assert_all_finite(tmp_path / "r")


@pytest.mark.integration
@pytest.mark.parametrize("lora", [[], ["lora=default", "lora.r=4"]])
def test_a_reference_model_that_changes_during_training_stops_the_run_before_final(lora, tmp_path, monkeypatch):
    """DPO's frozen reference (a loaded copy, or LoRA's adapter-disabled base) nudged by 1e-3 in one
    weight during training: the run ends with the trainer's error and writes no final/."""
    batch_loss = losses.batch_loss

    def tampering(loss, policy, reference, batch, info, call):
        if reference is not None:
            with torch.no_grad():
                next(iter(reference.parameters())).view(-1)[0] += 1e-3
        return batch_loss(loss, policy, reference, batch, info, call)

    monkeypatch.setattr(losses, "batch_loss", tampering)
    cfg = make_cfg(f"run_dir={tmp_path}", *STEPS, "n_examples=16", "loss=dpo", "datasets=[ultrafeedback_sample]",
                   *lora)
    pipeline.validate_config(cfg)
    with pytest.raises(RuntimeError, match="^the frozen reference model changed during training$"):
        pipeline.launch(cfg)
    assert not (tmp_path / "final").exists()
