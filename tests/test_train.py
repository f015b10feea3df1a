"""The command line: config composition and checks, a real training run of the tiny model, the run
directory it writes, and IFT with lambda = gamma = 0 reproducing SFT step for step."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train
from utils import REPO_DIR, ConfigError

FAST = ["n_examples=64", "batch_size=16", "eval_batch_size=16", "n_eval_examples=32", "eval_every=32",
        "warmup_steps=0"]


def make_cfg(*overrides):
    with initialize_config_dir(config_dir=str(train.CONFIG_DIR), version_base=None):
        return compose("config", overrides=train.expand_short_overrides(list(overrides)))


def launch_run(run_dir, *overrides):
    """Validate and launch a run as train.py's main would (spawning FSDP ranks if asked); returns
    (its training rows of metrics.jsonl, its final weights)."""
    from safetensors.torch import load_file
    cfg = make_cfg(f"run_dir={run_dir}", *overrides)
    train.validate_config(cfg)
    train.launch(cfg)
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r for r in rows if r["split"] == "train"], load_file(run_dir / "final" / "model.safetensors")


def run_inprocess(tmp_path, name, *overrides):
    cfg = make_cfg(f"run_dir={tmp_path / name}", *FAST, *overrides)
    train.validate_config(cfg)
    train.run(OmegaConf.to_container(cfg, resolve=True))
    return [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]


def test_short_loss_keys_mean_the_same_as_long_ones():
    assert train.expand_short_overrides(["loss=ift", "gamma=0.9", "lr=1e-4", "loss.beta=1"]) == \
        ["loss=ift", "loss.gamma=0.9", "lr=1e-4", "loss.beta=1"]
    short, long = make_cfg("gamma=0.5", "propagation_norm=L2"), make_cfg("loss.gamma=0.5", "loss.propagation_norm=L2")
    assert short == long and short.loss.gamma == 0.5


def test_defaults_are_ift_on_the_tiny_model_and_validate():
    cfg = make_cfg()
    train.validate_config(cfg)
    assert (cfg.loss.name, cfg.model.name, cfg.loss.gamma, cfg.loss.max_lambda) == ("ift", "tiny", 0.95, 0.2)


@pytest.mark.parametrize("overrides, message", [
    (["lr=-1"], r"lr=-1 is out of range: allowed \(0, inf\)"),
    (["lr=fast"], r"lr must be a number, got 'fast'"),
    (["batch_size=30", "gradient_accumulation_steps=4"], r"batch_size=30 must be divisible by gradient_accumulation_steps"),
    (["datasets=[nosuchset]"], r"unknown dataset 'nosuchset'.*ultrachat_sample"),
    (["loss.max_lambda=1.5"], r"loss.max_lambda=1.5 is out of range: allowed \[0, 1\]"),
    (["gamma=-0.1"], r"loss.gamma=-0.1 is out of range"),
    (["propagation_norm=L3"], r"loss.propagation_norm='L3' is not allowed; choose one of L1, L2, softmax, log"),
    (["propagation_side=up"], r"choose one of left, right"),
    (["propagation_type=x"], r"choose one of loss, mask, logps"),
    (["lambda_schedule=cubic"], r"choose one of None, linear, warmup"),
    (["lambda_disturb=uniform"], r"choose one of None, normal"),
    (["disturb_std=-1"], r"loss.disturb_std=-1 is out of range"),
    (["loss=dpo", "beta=0"], r"loss.beta=0 is out of range"),
    (["loss=dpo", "label_smoothing=0.5"], r"loss.label_smoothing=0.5 is out of range"),
    (["+loss.gama=0.9"], r"unknown key\(s\) loss.gama for loss=ift; its keys are: disturb_std"),
    (["optimizer=SGD"], r"optimizer='SGD' is not allowed; choose one of RMSprop, AdamW"),
    (["max_prompt_length=513"], r"max_prompt_length=513 is out of range: allowed \[1, 512\]"),
    (["model.policy_dtype=fp8"], r"choose one of float32, bfloat16, float16"),
    (["trainer=FSDPTrainer", "nproc=2", "eval_batch_size=5"], r"eval_batch_size=5 must be divisible by the 2 ranks"),
    (["model.name_or_path=/no/such/model"], r"model.name_or_path=/no/such/model is not a local directory"),
])
def test_impossible_config_values_fail_early_with_the_allowed_values(overrides, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=message):
        train.validate_config(make_cfg(*overrides))


def test_an_unknown_key_on_the_command_line_fails_before_any_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    for args, message in ((["lrr=1"], "config error: unknown config key 'lrr' (did you mean 'lr'?)"),
                          (["lr=-1"], "config error: lr=-1"),
                          ([f"datasets=[{bad}]"], f"data error: {bad}: line 1: field 'messages' must end with")):
        proc = subprocess.run([sys.executable, "train.py", f"run_dir={tmp_path / 'r'}", *args], cwd=REPO_DIR,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "r").exists()  # nothing was written


def test_the_cli_trains_the_tiny_model_and_writes_a_complete_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", f"run_dir={run_dir}", *FAST, "n_examples=160",
                           "gamma=0.9", "n_samples=2", "max_new_tokens=8"],
                          cwd=REPO_DIR, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run dir: {run_dir}" in proc.stdout and "non-padding fraction" in proc.stdout
    assert "held-out exact match" in proc.stdout and "eval loss: " in proc.stdout

    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.loss.gamma == 0.9 and saved.run_dir == str(run_dir)

    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train_rows = [r for r in rows if r["split"] == "train"]
    eval_rows = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train_rows] == list(range(1, 11))
    assert [r["examples"] for r in train_rows] == [16 * s for s in range(1, 11)]
    for r in train_rows:
        for key in ("loss", "loss_sft", "loss_further", "lambda", "lr", "grad_norm", "step_time_s", "tokens_per_s",
                    "weight_max", "weight_first"):
            assert isinstance(r[key], float) and r[key] == r[key], key
        assert r["lambda"] == 0.2 and r["tokens_per_s"] > 0
    assert [r["step"] for r in eval_rows] == [0, 2, 4, 6, 8, 10]
    assert eval_rows[-1]["loss"] < eval_rows[0]["loss"] * 0.9  # a short IFT run lowers the eval loss

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    assert type(model).__name__ == "MistralForCausalLM"
    assert (run_dir / "final" / "model.safetensors").exists()
    ids = tok.apply_chat_template([{"role": "user", "content": "Which day follows Monday?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert len(open(run_dir / "samples.jsonl").readlines()) == 2


@pytest.mark.parametrize("arg, message", [
    ("nosuchkey=1", r"unknown config key 'nosuchkey'; keys at the top level: activation_checkpointing, batch_size"),
    ("loss.gamm=0.9", r"unknown config key 'loss.gamm' \(did you mean 'gamma'\?\); keys in loss: beta"),
    ("model.dtype=bf16", r"unknown config key 'model.dtype'; keys in model: block_name"),
    ("wandb.projetc=x", r"did you mean 'project'"),
])
def test_unknown_keys_on_the_command_line_are_named_with_the_allowed_ones(arg, message):
    with pytest.raises(ConfigError, match=message):
        train.check_override_keys(train.expand_short_overrides([arg]))
    train.check_override_keys(train.expand_short_overrides(["gamma=0.9", "loss=dpo", "model.policy_dtype=bfloat16",
                                                            "+extra=1", "hydra.verbose=true", "datasets=[hh]"]))


def test_a_run_dir_that_holds_a_run_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already holds a run"):
        train.validate_config(make_cfg(f"run_dir={tmp_path}"))  # before anything starts
    with pytest.raises(ConfigError, match="already holds a run"):
        train.make_run_dir(make_cfg(f"run_dir={tmp_path}"))
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"


def test_ift_with_lambda_and_gamma_zero_is_sft_step_for_step(tmp_path):
    sft = run_inprocess(tmp_path, "sft", "loss=sft", "do_first_eval=false")
    ift = run_inprocess(tmp_path, "ift", "loss=ift", "gamma=0", "loss.min_lambda=0", "loss.max_lambda=0",
                        "do_first_eval=false")
    sft_losses = [r["loss"] for r in sft if r["split"] == "train"]
    ift_losses = [r["loss"] for r in ift if r["split"] == "train"]
    assert len(sft_losses) == 4
    assert torch.allclose(torch.tensor(ift_losses), torch.tensor(sft_losses), rtol=1e-6, atol=0)
    a = __import__("safetensors.torch").torch.load_file(tmp_path / "sft" / "final" / "model.safetensors")
    b = __import__("safetensors.torch").torch.load_file(tmp_path / "ift" / "final" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)


def test_every_recipe_in_commands_composes_and_passes_the_config_checks(tmp_path):
    """Run each commands/*.sh with `python` replaced by a shim that composes and validates the config
    (as for 8 ranks) instead of training, so a typo in a recipe fails here, not on a GPU node."""
    shim = tmp_path / "python"
    shim.write_text(f"""#!/bin/sh
shift  # train.py
exec {sys.executable} -c '
import sys, train
from hydra import compose, initialize_config_dir
args = train.expand_short_overrides(sys.argv[1:])
with initialize_config_dir(config_dir=str(train.CONFIG_DIR), version_base=None):
    cfg = compose("config", overrides=args)
train.validate_config(cfg, world=1 if "BasicTrainer" in cfg.trainer else 8)
print("checked", cfg.loss.name, cfg.model.name)
' "$@"
""")
    shim.chmod(0o755)
    scripts = sorted((REPO_DIR / "commands").glob("*.sh"))
    assert len(scripts) >= 6
    requeue = (REPO_DIR / "commands" / "run_mistral_ift.sh", ["resume_from=latest"])  # how a requeue runs it
    for script, extra in [(s, []) for s in scripts] + [requeue]:
        proc = subprocess.run(["bash", str(script), *extra], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "0",
                                   "PYTHONPATH": str(REPO_DIR)})
        assert proc.returncode == 0, (script.name, proc.stderr[-2000:])
        assert "checked" in proc.stdout, script.name


def test_wandb_without_credentials_falls_back_to_offline_and_never_prompts(tmp_path, monkeypatch):
    import types
    import trainers
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or types.SimpleNamespace(log=None, finish=None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    cfg = make_cfg("wandb.enabled=true", "wandb.mode=online")
    trainer = types.SimpleNamespace(cfg=cfg, run_dir=tmp_path, wandb=None,
                                    checkpointer=types.SimpleNamespace(wandb_run_id=None))
    trainers.BasicTrainer.start_logging(trainer)
    assert calls[-1]["mode"] == "offline" and calls[-1]["name"] == cfg.exp_name
    assert calls[-1]["config"]["loss"]["gamma"] == 0.95  # the resolved config travels with the run
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    trainers.BasicTrainer.start_logging(trainer)
    assert calls[-1]["mode"] == "online"
    trainer.cfg = make_cfg("wandb.enabled=false")
    trainers.BasicTrainer.start_logging(trainer)
    assert len(calls) == 2
