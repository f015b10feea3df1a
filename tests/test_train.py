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

from training import checkpoints, config_schema, modeling, pipeline
from utils import REPO_DIR, ConfigError, make_run_dir

from conftest import FAST, make_cfg, read_rows, run_inprocess, run_train_py


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO_DIR, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


@pytest.mark.unit
def test_short_loss_keys_mean_the_same_as_long_ones():
    assert config_schema.expand_short_overrides(["loss=ift", "gamma=0.9", "lr=1e-4", "loss.beta=1", "+gamma=1"]) == \
        ["loss=ift", "loss.gamma=0.9", "lr=1e-4", "loss.beta=1", "+loss.gamma=1"]
    short, long = make_cfg("gamma=0.5", "propagation_norm=L2"), make_cfg("loss.gamma=0.5", "loss.propagation_norm=L2")
    assert short == long and short.loss.gamma == 0.5


@pytest.mark.unit
def test_the_yaml_files_are_written_from_the_declarations():
    """config.yaml, loss/*.yaml and the keys and comments of model/*.yaml are what `python -m training.config_schema`
    writes (it also checks each model file's keys and values against the declaration)."""
    files = config_schema.yaml_files()
    assert set((config_schema.CONFIG_DIR / "loss").glob("*.yaml")) == {p for p in files if p.parent.name == "loss"}
    for path, text in files.items():
        assert path.read_text(encoding="utf-8") == text, f"{path} differs from its declaration: run training/config_schema.py"


@pytest.mark.unit
def test_a_model_file_with_an_undeclared_key_or_value_is_refused(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "x.yaml").write_text((config_schema.CONFIG_DIR / "model" / "tiny.yaml").read_text()
                                               + "dtype: bf16\n")
    monkeypatch.setattr(config_schema, "CONFIG_DIR", tmp_path)
    (tmp_path / "loss").mkdir()
    with pytest.raises(ConfigError, match=r"unknown config key 'model.dtype'; keys in config/model/x.yaml: attn_implementation, block_name"):
        config_schema.yaml_files()


@pytest.mark.unit
def test_defaults_are_ift_on_the_tiny_model_and_validate():
    cfg = make_cfg()
    pipeline.validate_config(cfg)
    assert (cfg.loss.name, cfg.model.name, cfg.loss.gamma, cfg.loss.max_lambda) == ("ift", "tiny", 0.95, 0.2)


@pytest.mark.unit
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
    (["+loss.gama=0.9"], r"unknown config key 'loss.gama' \(did you mean 'gamma'\?\); keys of loss=ift: disturb_std"),
    (["loss.gamma=null"], r"loss.gamma must be a number, got None"),  # never silently the default
    (["reference_free=yes", "loss=dpo"], r"loss.reference_free='yes' is not allowed; choose one of True, False"),
    (["batch_size=1.5"], r"batch_size must be an integer, got 1.5"),
    (["datasets=[]"], r"datasets must be a non-empty list"),
    (["wandb.mode=loud"], r"wandb.mode='loud' is not allowed; choose one of online, offline, disabled"),
    (["+model.dtype=bf16"], r"unknown config key 'model.dtype'; keys in model: attn_implementation, block_name"),
    (["optimizer=SGD"], r"optimizer='SGD' is not allowed; choose one of RMSprop, AdamW"),
    (["max_prompt_length=513"], r"max_length=512 is below max_prompt_length=513; raise max_length or lower"),
    (["model.policy_dtype=fp8"], r"choose one of float32, bfloat16, float16"),
    (["trainer=FSDPTrainer", "nproc=2", "eval_batch_size=5"], r"eval_batch_size=5 must be divisible by the 2 ranks"),
    (["model.name_or_path=/no/such/model"], r"model.name_or_path=/no/such/model is not a local directory"),
])
def test_impossible_config_values_fail_early_with_the_allowed_values(overrides, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=message):
        pipeline.validate_config(make_cfg(*overrides))


@pytest.mark.integration
def test_an_unknown_key_on_the_command_line_fails_before_any_model_loads(tmp_path):
    """Each bad command line ends train.py with its one-line message and writes nothing. The first runs
    as a real process (its exit status and stderr as a shell sees them); the others run train.py in
    this process, where the same message reaches the same exit."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    cases = ((["+lrr=1"], "config error: unknown config key 'lrr' (did you mean 'lr'?)"),
             (["loss=sft", "gamma=0.9"], "config error: loss=sft has no key 'gamma'; it belongs to "),
             (["lr=-1"], "config error: lr=-1"),
             ([f"datasets=[{bad}]"], f"data error: {bad}: line 1: field 'messages' must end with"))
    for i, (args, message) in enumerate(cases):
        if i == 0:
            proc = run_cli(f"run_dir={tmp_path / 'r'}", *args, timeout=120)
            status, stderr = proc.returncode, proc.stderr
        else:
            status, _, stderr = run_train_py(f"run_dir={tmp_path / 'r'}", *args)
        assert status != 0 and message in stderr, stderr[-2000:]
        assert "Traceback" not in stderr
        assert not (tmp_path / "r").exists()  # nothing was written


@pytest.mark.integration
def test_hydra_flags_work_in_every_documented_form(tmp_path):
    """-cn/--config-name and -cd/--config-dir with `=` or as two words, --cfg, and a --multirun sweep
    whose jobs each write their own run_dir (train.py run in this process: see conftest.run_train_py)."""
    for flags in (["-cn=config", f"--config-dir={REPO_DIR / 'config'}"], ["--config-name", "config", "-cd", "config"]):
        status, stdout, stderr = run_train_py(*flags, "gamma=0.5", "hydra.verbose=false", "--cfg", "job")
        assert status == 0, stderr[-2000:]
        assert OmegaConf.create(stdout).loss.gamma == 0.5
    sweep = tmp_path / "sweep"
    status, _, stderr = run_train_py("-m", "loss=sft", "lr=1e-3,2e-3", f"run_dir={sweep}/lr_${{lr}}",
                                     f"hydra.sweep.dir={sweep}", "n_examples=16", "batch_size=8", "eval_batch_size=8",
                                     "n_eval_examples=8", "do_first_eval=false")
    assert status == 0, stderr[-3000:]
    for lr in (1e-3, 2e-3):
        assert OmegaConf.load(sweep / f"lr_{lr}" / "config.yaml").lr == lr
        assert [r["step"] for r in read_rows(sweep / f"lr_{lr}", "train")] == [1, 2]
    assert sorted(p.name for p in sweep.iterdir()) == ["lr_0.001", "lr_0.002", "multirun.yaml"]  # nothing else


@pytest.mark.integration
def test_the_cli_trains_the_tiny_model_and_writes_a_complete_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    warmup = ["loss.lambda_schedule=warmup", "loss.min_lambda=0.0", "loss.max_lambda=0.4", "warmup_steps=4"]
    proc = run_cli(f"run_dir={run_dir}", *FAST, "n_examples=160", "gamma=0.9", *warmup, "n_samples=2",
                   "max_new_tokens=8", "progress_every=4", "peak_tflops=0.001", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stderr is a pipe here, as in a Slurm log: progress lines every 4 steps and at the end, no progress bar
    progress = [line.split(",")[0] for line in proc.stderr.splitlines() if line.startswith("train step ")]
    assert progress == ["train step 4/10 (40%)", "train step 8/10 (80%)", "train step 10/10 (100%)"]
    assert "\r" not in proc.stderr
    assert f"run dir: {run_dir}" in proc.stdout and "non-padding fraction" in proc.stdout
    assert "held-out exact match" in proc.stdout and "eval nll: " in proc.stdout
    assert "eval @ step 0: " in proc.stdout  # each evaluation's line; the eval and sampling bars are a terminal's

    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.loss.gamma == 0.9 and saved.run_dir == str(run_dir)

    train_rows, eval_rows = read_rows(run_dir, "train"), read_rows(run_dir, "eval")
    assert [r["step"] for r in train_rows] == list(range(1, 11))
    assert [r["examples"] for r in train_rows] == [16 * s for s in range(1, 11)]
    for r in train_rows:
        for key in ("loss", "loss_sft", "loss_further", "lambda", "lr", "grad_norm", "step_time_s", "tokens_per_s",
                    "weight_max", "weight_first"):
            assert isinstance(r[key], float) and r[key] == r[key], key
        assert r["tokens_per_s"] > 0
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.001)  # peak_tflops given: mfu on the CPU too
        # FLOPs per real token of an IFT step (training/flops.py): 2·N per forward's worth, 4 of them with the intuition
        # pass (lambda > 0), 3 without; N = 4 blocks x (q, o 128², k, v 128·64, MLP 3·128·344); at most as much
        # again for the head (930·128) and attention (4 layers x 4·128·(n+1)/2, n <= 512) per forward's worth
        per_token = r["tflops"] * 1e12 / r["tokens_per_s"]
        body = 4 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 344)
        passes = 4 if r["lambda"] > 0 else 3
        assert 2 * passes * body <= per_token <= 2 * passes * (body + 930 * 128) + passes * 4 * 4 * 128 * 513 / 2
    # spec §1's warmup schedule: min_lambda -> max_lambda over the lr's warm-up steps (0-based step s - 1),
    # then max_lambda; evaluation takes the same scheduled value (no disturbance here)
    warm = lambda step: 0.4 * min(1.0, step / 4)  # noqa: E731
    assert [r["lambda"] for r in train_rows] == pytest.approx([warm(s) for s in range(10)], abs=1e-12)
    assert [r["lambda"] for r in eval_rows] == pytest.approx([warm(min(s, 9)) for s in (0, 2, 4, 6, 8, 10)], abs=1e-12)
    assert [r["step"] for r in eval_rows] == [0, 2, 4, 6, 8, 10]
    assert eval_rows[-1]["loss"] < eval_rows[0]["loss"] * 0.9  # a short IFT run lowers the eval loss

    from transformers import AutoModelForCausalLM
    assert type(AutoModelForCausalLM.from_pretrained(run_dir / "final")).__name__ == "MistralForCausalLM"
    samples = [json.loads(line) for line in open(run_dir / "samples.jsonl")]
    assert len(samples) == 2 and all(set(s) == {"prompt", "reference", "answer", "exact"} for s in samples)


MEMORISE = [("Which day follows Monday?", "Tuesday follows Monday."),
            ("What is the opposite of dark?", "The opposite of dark is light."),
            ("Name a primary colour.", "Red is a primary colour."),
            ("How many legs does a cat have?", "A cat has four legs.")]


@pytest.mark.integration
def test_one_step_of_warm_up_already_moves_the_weights(tmp_path):
    """n_examples=batch_size is one optimizer step; warm-up is clipped to the run's length (W = 1), and
    update k of W runs at lr·(k+1)/W: the one update runs at lr, not at 0 (transformers' k/W), so final/
    differs from the weights it started from."""
    from safetensors.torch import load_file
    rows = run_inprocess(tmp_path / "r", "n_examples=16", "batch_size=16", "warmup_steps=10", "lr=5e-4",
                         "do_first_eval=false", "n_eval_examples=16", "eval_batch_size=16", "n_samples=0")
    assert [r["lr"] for r in rows if r["split"] == "train"] == [5e-4]
    before = load_file(REPO_DIR / "models" / "tiny-mistral" / "model.safetensors")
    after = load_file(tmp_path / "r" / "final" / "model.safetensors")
    assert any(not torch.equal(after[name], before[name]) for name in before)


@pytest.mark.integration
def test_generation_after_training_reproduces_the_memorised_answers(tmp_path):
    """Trained on four fixed pairs until it has memorised them, the saved model answers each of their
    prompts greedily with exactly the trained answer (and n_samples reports it as an exact match)."""
    data = tmp_path / "pairs"
    data.mkdir()
    rows = "".join(json.dumps({"prompt": q, "chosen": a}) + "\n" for q, a in MEMORISE)
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text(rows)
    run_dir = tmp_path / "run"
    run_inprocess(run_dir, "loss=sft", f"datasets=[{data}]", "optimizer=AdamW", "lr=3e-3", "warmup_steps=0",
                  "batch_size=4", "eval_batch_size=4", "n_epochs=100", "eval_every=100000", "do_first_eval=false",
                  "n_samples=4", "max_new_tokens=16")
    samples = [json.loads(line) for line in open(run_dir / "samples.jsonl")]
    assert sorted((s["prompt"], s["answer"]) for s in samples) == sorted(MEMORISE)
    assert all(s["exact"] for s in samples)

    from transformers import AutoModelForCausalLM, AutoTokenizer  # the saved model, by itself
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    ids = tok.apply_chat_template([{"role": "user", "content": MEMORISE[0][0]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == MEMORISE[0][1]


@pytest.mark.unit
@pytest.mark.parametrize("args, message", [
    (["nosuchkey=1"], r"unknown config key 'nosuchkey'; keys at the top level: activation_checkpointing, batch_size"),
    (["+nosuchkey=1"], r"unknown config key 'nosuchkey'; keys at the top level"),  # a + does not let a typo in
    (["++lrr=1"], r"unknown config key 'lrr' \(did you mean 'lr'\?\)"),
    (["learning_rate=1e-4"], r"^unknown config key 'learning_rate' \(did you mean 'lr'\?\); keys at the top level"),
    (["lr_rate=1e-4"], r"did you mean 'lr'\?"),
    (["loss=foo"], r"^loss=foo is not one of: asft, dft, dpo, ift, ipo, orpo, sft, simpo \(config/loss/\*.yaml\)$"),
    (["-m", "loss=sft,foo"], r"^loss=foo is not one of: asft, dft"),
    (["model=foo"], r"^model=foo is not one of: .*tiny.*; or add config/model/<name>.yaml"),
    (["num_train_epochs=3"], r"did you mean 'n_epochs'\?"),
    (["per_device_train_batch_size=8"], r"did you mean 'batch_size \(the GLOBAL batch"),
    (["max_steps=100"], r"did you mean 'n_examples \(training examples: steps × batch_size\)'\?"),
    (["loss.gamm=0.9"], r"unknown config key 'loss.gamm' \(did you mean 'gamma'\?\); keys of loss=ift: disturb_std"),
    (["+loss.gama=0.9"], r"did you mean 'gamma'"),
    (["model.dtype=bf16"], r"unknown config key 'model.dtype'; keys in model: attn_implementation, block_name"),
    (["wandb.projetc=x"], r"unknown config key 'wandb.projetc' \(did you mean 'project'\?\); keys in wandb"),
    (["lr.x=1"], r"unknown config key 'lr.x'"),
    (["loss=sft", "gamma=0.9"], r"loss=sft has no key 'gamma'; it belongs to loss=ift \(the keys of loss=sft: name\)"),
    (["loss=dpo", "loss.propagation_norm=L2"], r"loss=dpo has no key 'propagation_norm'; it belongs to loss=ift"),
    (["beta=0.2"], r"loss=ift has no key 'beta'; it belongs to loss=dpo, loss=ipo, loss=orpo"),
    (["-m", "loss=ift,dpo", "gamma=0.9"], r"loss=dpo has no key 'gamma'"),  # every loss of a sweep
])
def test_unknown_keys_on_the_command_line_are_named_with_the_allowed_ones(args, message):
    with pytest.raises(ConfigError, match=message):
        config_schema.rewrite_argv(args)


@pytest.mark.unit
def test_the_command_line_keeps_hydras_flags_and_writes_short_loss_keys_long():
    args = ["--config-name=config", "-cn", "config", "-cd=config", "--config-dir", "config", "--multirun", "-m",
            "gamma=0.9", "+propagation_norm=L2", "loss=ift", "model.policy_dtype=bfloat16", "hydra.verbose=true",
            "datasets=[hh]", "~wandb.entity", "--cfg", "job", "--info", "config"]
    assert config_schema.rewrite_argv(args) == [a.replace("gamma", "loss.gamma").replace("+prop", "+loss.prop")
                                                for a in args]


@pytest.mark.unit
def test_a_run_dir_that_holds_a_run_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already holds a run"):
        pipeline.validate_config(make_cfg(f"run_dir={tmp_path}"))  # before anything starts
    with pytest.raises(ConfigError, match="already holds a run"):
        make_run_dir(str(tmp_path), "x")
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"
    (tmp_path / "metrics.jsonl").write_text("")  # a claim whose run wrote nothing (killed, or still starting)
    stale = f"has written nothing yet .*if no run is using it, delete {tmp_path / 'metrics.jsonl'} and start again"
    for refuse in (lambda: pipeline.validate_config(make_cfg(f"run_dir={tmp_path}")),
                   lambda: make_run_dir(str(tmp_path), "x")):
        with pytest.raises(ConfigError, match=stale):
            refuse()
    assert (tmp_path / "metrics.jsonl").exists()  # the user decides: it may be a run still loading


@pytest.mark.integration
def test_a_run_that_fails_before_its_first_metrics_row_leaves_its_run_dir_free(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise OSError("the weights are unreadable")

    monkeypatch.setattr(modeling, "load_model", no_model)
    with pytest.raises(OSError, match="unreadable"):
        run_inprocess(tmp_path / "run", *FAST)
    assert not (tmp_path / "run").exists()  # the empty metrics.jsonl that reserved it is gone
    monkeypatch.undo()
    with pytest.raises(ZeroDivisionError):  # now it fails in the first step, before any metrics row
        monkeypatch.setattr(pipeline.losses.LOSSES["ift"], "rows", lambda *a: 1 / 0)
        run_inprocess(tmp_path / "run", *FAST, "do_first_eval=false")
    assert not (tmp_path / "run").exists()
    assert make_run_dir(str(tmp_path / "run"), "x") == tmp_path / "run"  # the same run_dir is taken


@pytest.mark.integration
def test_the_loss_is_built_once_and_is_the_object_the_trainer_computes_with(tmp_path, monkeypatch):
    """validate_config builds it (checking its keys); launch hands it to the run, the trainer uses it."""
    import losses
    ift, built, used = losses.LOSSES["ift"], [], []
    init, rows = ift.__init__, ift.rows

    def counting_init(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    def recording_rows(self, *args, **kwargs):
        used.append(self)
        return rows(self, *args, **kwargs)

    monkeypatch.setattr(ift, "__init__", counting_init)
    monkeypatch.setattr(ift, "rows", recording_rows)
    cfg = make_cfg(f"run_dir={tmp_path / 'run'}", "loss=ift", "n_examples=16", "batch_size=16", "eval_batch_size=16",
                   "n_eval_examples=16", "do_first_eval=false")
    assert pipeline.launch(cfg, pipeline.validate_config(cfg)) == 0
    assert len(built) == 1 and used and all(loss is built[0] for loss in used)


def _data_error_on_rank_1(cfg, local_rank, world, port, checked):
    from preference_datasets import DataError
    if local_rank == 1:
        raise DataError("data/x.jsonl: line 3: 'messages' is missing")


@pytest.mark.distributed
def test_a_data_or_config_error_in_a_spawned_rank_comes_back_as_itself():
    """train.main turns these into one line (`data error: ...`); from a spawned rank they arrive as a
    traceback's text, which launch turns back into the error."""
    from preference_datasets import DataError
    with pytest.raises(DataError, match=r"^data/x.jsonl: line 3: 'messages' is missing$"):
        pipeline.launcher.launch(_data_error_on_rank_1, {"trainer": "FSDPTrainer", "nproc": 2, "device": "cpu"})


@pytest.mark.integration
def test_ift_with_lambda_and_gamma_zero_is_sft_step_for_step(tmp_path, monkeypatch, capfd):
    import trainers
    monkeypatch.setattr(trainers, "SLOW_STEP_S", 0.0)  # every step counts as long: it shows its micro-batches
    monkeypatch.setattr(trainers, "_bars", lambda: True)  # as on a terminal (a log file gets no bars)
    sft = run_inprocess(tmp_path / "sft", *FAST, "loss=sft", "do_first_eval=false", "gradient_accumulation_steps=2")
    assert "micro-batches: " in capfd.readouterr().err
    ift = run_inprocess(tmp_path / "ift", *FAST, "loss=ift", "gamma=0", "loss.min_lambda=0", "loss.max_lambda=0",
                        "do_first_eval=false", "gradient_accumulation_steps=2")
    sft_losses = [r["loss"] for r in sft if r["split"] == "train"]
    ift_losses = [r["loss"] for r in ift if r["split"] == "train"]
    assert len(sft_losses) == 4
    assert torch.allclose(torch.tensor(ift_losses), torch.tensor(sft_losses), rtol=1e-6, atol=0)
    a = __import__("safetensors.torch").torch.load_file(tmp_path / "sft" / "final" / "model.safetensors")
    b = __import__("safetensors.torch").torch.load_file(tmp_path / "ift" / "final" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)


@pytest.mark.integration
def test_every_recipe_in_commands_composes_and_passes_the_config_checks(tmp_path, monkeypatch):
    """Run each commands/*.sh with `python` replaced by a shim that records its arguments instead of
    training, then compose and validate each recorded command line here as train.py would (as for 8
    ranks), so a typo in a recipe fails here, not on a GPU node."""
    calls = tmp_path / "calls"
    shim = tmp_path / "python"
    shim.write_text(f"""#!/bin/sh
case $1 in *train.py) ;; *) echo "expected python train.py, got python $1" >&2; exit 3 ;; esac
shift
printf '%s\\037' "$@" >> {calls}
echo >> {calls}
""")
    shim.chmod(0o755)
    # The Frozen Lake pipelines run experiments/ modules (data, games, tuning) that call train.py themselves:
    # tests/test_frozen_lake.py and tests/test_frozen_lake_paper.py run the first two end to end.
    pipelines = {"run_frozen_lake.sh", "run_frozen_lake_paper.sh", "run_frozen_lake_protocol.sh"}
    scripts = sorted(s for s in (REPO_DIR / "commands").glob("run_*.sh") if s.name not in pipelines)  # python.sh: a helper
    assert len(scripts) >= 6
    requeue = (REPO_DIR / "commands" / "run_mistral_ift.sh", ["resume_from=latest"])  # how a requeue runs it
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the recipes name hub models, which a GPU node downloads
    checked = []
    dry = [(s, ["dry_run=true"]) for s in scripts]  # every recipe passes dry_run=true to each of its runs
    for script, extra in [(s, []) for s in scripts] + [requeue] + dry:
        calls.write_text("")
        proc = subprocess.run(["bash", str(script), *extra], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": str(shim)})
        assert proc.returncode == 0, (script.name, proc.stderr[-2000:])
        lines = calls.read_text().splitlines()
        assert lines, f"{script.name} never ran python train.py"
        for line in lines:
            args = config_schema.rewrite_argv(line.split("\037")[:-1])
            with initialize_config_dir(config_dir=str(config_schema.CONFIG_DIR), version_base=None):
                cfg = compose("config", overrides=args)
            pipeline.validate_config(cfg, world=1 if "BasicTrainer" in cfg.trainer else 8)
            checked.append((script.name, cfg.loss.name, cfg.model.name))
            if extra == ["dry_run=true"]:  # no run may train, nor read a model that an earlier run would write
                assert cfg.dry_run and "/final" not in cfg.model.name_or_path, (script.name, line)
    assert {"ift", "sft", "dpo", "orpo"} <= {loss for _, loss, _ in checked}, checked


@pytest.mark.integration
def test_a_recipe_runs_with_the_repositorys_venv_without_activating_it(tmp_path):
    """After `make demo` (which leaves .venv/) the README's `bash commands/run_mistral_ift.sh ... dry_run=true`
    must work as written, with no venv on PATH: commands/python.sh picks .venv/bin/python. Here the
    repository is a tree of links to this one with a .venv/bin/python of its own (this interpreter), and
    the `python` on PATH is one that lacks the packages (it exits 3), as a system Python does."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for entry in REPO_DIR.iterdir():
        if entry.name not in (".venv", "runs", ".git"):
            (repo / entry.name).symlink_to(entry)
    (repo / ".venv" / "bin").mkdir(parents=True)
    bare = tmp_path / "bare"
    bare.mkdir()
    for path, body in ((repo / ".venv" / "bin" / "python", f'exec {sys.executable} "$@"'),
                       (bare / "python", "echo 'No module named hydra' >&2; exit 3")):
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    args = ["model=tiny", "datasets=[ultrachat_sample]", "trainer=BasicTrainer", "device=cpu", "rows_per_dataset=32",
            "batch_size=16", "gradient_accumulation_steps=1", "eval_batch_size=16", "max_length=256",
            "max_prompt_length=128", "wandb.enabled=false", "dry_run=true"]
    proc = subprocess.run(["bash", "commands/run_mistral_ift.sh", *args], cwd=repo, capture_output=True, text=True,
                          timeout=600, env={**env, "PATH": f"{bare}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count('"optimizer_steps"') == 2, proc.stdout[-2000:]  # both runs' plans
    assert not (repo / "runs").exists()  # a dry run creates nothing


@pytest.mark.unit
def test_wandb_without_credentials_falls_back_to_offline_and_never_prompts(tmp_path, monkeypatch):
    import types

    import trainers
    calls = []
    run = types.SimpleNamespace(id="run-id", log=None, finish=None)
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    cfg = make_cfg("wandb.enabled=true", "wandb.mode=online")
    trainer = types.SimpleNamespace(cfg=cfg, run_dir=tmp_path, wandb=None, state=checkpoints.TrainerState())
    trainers.BasicTrainer.start_logging(trainer)
    assert calls[-1]["mode"] == "offline" and calls[-1]["name"] == cfg.exp_name
    assert calls[-1]["config"]["loss"]["gamma"] == 0.95  # the resolved config travels with the run
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    trainers.BasicTrainer.start_logging(trainer)
    assert calls[-1]["mode"] == "online"
    trainer.cfg = make_cfg("wandb.enabled=false")
    trainers.BasicTrainer.start_logging(trainer)
    assert len(calls) == 2


@pytest.mark.unit
def test_from_scratch_initialises_from_config_json_seeded_by_seed():
    """model.from_scratch=true: random weights (not the bundled ones), a function of the seed, so a DPO
    reference built by a second call starts equal to the policy."""
    state = lambda cfg: modeling.load_model(cfg, "float32").state_dict()  # noqa: E731
    a, b = state(make_cfg("model.from_scratch=true", "seed=1")), state(make_cfg("model.from_scratch=true", "seed=1"))
    other_seed, pretrained = state(make_cfg("model.from_scratch=true", "seed=2")), state(make_cfg("seed=1"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[name], other_seed[name]) and not torch.equal(a[name], pretrained[name])
    with pytest.raises(ConfigError, match="model.from_scratch='yes' is not allowed"):
        pipeline.validate_config(make_cfg("model.from_scratch=yes"))


@pytest.mark.unit
def test_the_end_of_run_summary_reads_every_evaluation_of_a_resumed_run_and_compares_by_nll(tmp_path, capsys):
    """After a resume, the evaluations of the process before it count too (metrics.jsonl), and the
    change is measured in the shared nll: DFT's own loss may rise while the nll falls."""
    import types
    rows = [{"split": "eval", "step": 0, "loss": 2.0, "nll": 6.83}, {"split": "train", "step": 1, "loss": 3.0},
            {"split": "resume", "step": 4}, {"split": "eval", "step": 4, "loss": 4.8114, "nll": 4.9},
            {"split": "eval", "step": 6, "loss": 5.12, "nll": 4.13}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = types.SimpleNamespace(run_dir=tmp_path, padding_stats=lambda: 0.9, eval_losses=[4.8114, 5.12])
    pipeline.report(make_cfg("loss=dft"), trainer, torch.device("cpu"))
    out = capsys.readouterr().out
    assert f"eval nll: 6.8300 -> 4.1300 ({(4.13 - 6.83) / 6.83:+.0%}, step 0 -> 6)" in out and "-40%" in out
    assert "dft's own eval loss (not comparable across methods): 2.0000 -> 5.1200" in out


def _rank_fails_before_its_first_row(cfg, local_rank, world, port, checked):
    """pipeline.run on two ranks, one of which dies in train() before any metrics row: killed (rank
    0, which holds the claim, so it cannot release it), or raising (rank 1 only)."""
    import trainers
    if local_rank == 0 and cfg["exp_name"] == "killed":
        trainers.BasicTrainer.train = lambda self: os.kill(os.getpid(), __import__("signal").SIGKILL)
    if local_rank == 1 and cfg["exp_name"] == "raises":
        trainers.BasicTrainer.train = lambda self: 1 / 0
    return pipeline.run(cfg, local_rank, world, port, checked)


@pytest.mark.distributed
@pytest.mark.parametrize("how", ["killed", "raises"])
def test_a_spawned_run_that_dies_before_its_first_row_leaves_its_run_dir_free(tmp_path, how):
    """The launcher gives back the run_dir that rank 0 reserved: the empty metrics.jsonl would refuse it."""
    import torch.multiprocessing as mp

    from training import launch
    run_dir = tmp_path / "run"
    # preempt_signals=null: the launcher's clean-up (SIGTERM) then ends the surviving rank at once
    cfg = make_cfg(f"run_dir={run_dir}", *FAST, "trainer=FSDPTrainer", "nproc=2", "device=cpu", f"exp_name={how}",
                   "preempt_signals=null")
    checked = pipeline.validate_config(cfg)
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
        launch.launch(_rank_fails_before_its_first_row, OmegaConf.to_container(cfg, resolve=True), checked)
    assert not run_dir.exists()
    pipeline.validate_config(cfg)  # the same run_dir is accepted again
