"""Your model, first time: a model directory, an architecture and its settings are checked before any
weights load (missing tokenizer or weights files, a tokenizer of another model, an attention kernel
the architecture lacks, decoder blocks FSDP2 would not find, LoRA targets that match nothing), the dry
run checks what the real run checks, and the run is named for the model it trains. The models are
tiny random ones of each architecture (tests/tiny_architectures.py)."""

import io
import sys

import pytest
from transformers.utils import logging as hf_logging

from training import config_schema, modeling, pipeline
from utils import ConfigError

from conftest import make_cfg, run_train_py
from tiny_architectures import build_model_dir

FEW = ["n_examples=16", "batch_size=8", "eval_batch_size=8", "n_eval_examples=8", "eval_every=1000",
       "do_first_eval=false", "warmup_steps=0", "datasets=[ultrachat_sample]", "max_length=128",
       "max_prompt_length=64"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """name -> model directory: Qwen2 (tied embeddings), the same without tokenizer files, Gemma-2, and a
    Qwen2 whose vocab_size (4096) is over 4x the bundled tokenizer's 930 tokens."""
    root = tmp_path_factory.mktemp("models")
    return {"qwen2": build_model_dir("Qwen2ForCausalLM", root / "qwen2", tie_word_embeddings=True),
            "no_tokenizer": build_model_dir("Qwen2ForCausalLM", root / "no_tokenizer", tokenizer=False),
            "gemma2": build_model_dir("Gemma2ForCausalLM", root / "gemma2"),
            "big_vocab": build_model_dir("Qwen2ForCausalLM", root / "big_vocab", vocab_size=4096)}


@pytest.fixture
def no_weights_load(monkeypatch):
    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: pytest.fail("weights loaded"))


def refused(*overrides):
    """The one-line ConfigError validate_config raises for these overrides."""
    with pytest.raises(ConfigError) as e:
        pipeline.validate_config(make_cfg(*overrides))
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.unit
def test_a_model_dir_without_tokenizer_files_stops_in_one_line_before_weights_load_and_makes_no_run_dir(
        dirs, tmp_path, no_weights_load):
    """Before: transformers built a tokenizer of one token and the run trained on nothing (exit 0)."""
    run_dir = tmp_path / "run"
    status, out, err = run_train_py(f"model.name_or_path={dirs['no_tokenizer']}", f"run_dir={run_dir}", *FEW)
    assert status == 1 and not run_dir.exists()
    assert err.strip().splitlines() == [
        f"config error: model.name_or_path={dirs['no_tokenizer']} has no tokenizer files (tokenizer.json, "
        "tokenizer_config.json, tokenizer.model, vocab.json, vocab.txt, spiece.model): set "
        "model.tokenizer_name_or_path to the directory or hub id of the model's tokenizer"]
    # with the tokenizer taken from elsewhere, the same directory passes the checks
    pipeline.validate_config(make_cfg(f"model.name_or_path={dirs['no_tokenizer']}",
                                      f"model.tokenizer_name_or_path={dirs['qwen2']}"))


@pytest.mark.unit
def test_a_model_dir_without_weights_stops_in_one_line(dirs, tmp_path, no_weights_load):
    directory = tmp_path / "config_only"
    directory.mkdir()
    for f in dirs["qwen2"].iterdir():
        if f.suffix != ".safetensors":
            (directory / f.name).write_bytes(f.read_bytes())
    assert refused(f"model.name_or_path={directory}").startswith(
        f"model.name_or_path={directory} has no weights files (*.safetensors, *.bin, ")
    pipeline.validate_config(make_cfg(f"model.name_or_path={directory}", "model.from_scratch=true"))  # no weights read


@pytest.mark.unit
def test_a_tokenizer_of_under_half_the_models_vocabulary_is_refused(dirs):
    cfg = make_cfg(f"model.name_or_path={dirs['big_vocab']}")
    with pytest.raises(ConfigError, match=r"^the tokenizer of model.name_or_path=.* has 930 tokens, under half the "
                                          r"model's vocab_size=4,096: not the model's tokenizer; set "
                                          r"model.tokenizer_name_or_path to it$"):
        modeling.load_tokenizer(cfg)
    assert len(modeling.load_tokenizer(make_cfg(f"model.name_or_path={dirs['qwen2']}"))) == 930
    # random weights (from_scratch): no ids have a meaning yet, a larger vocabulary only leaves rows unused
    modeling.load_tokenizer(make_cfg(f"model.name_or_path={dirs['big_vocab']}", "model.from_scratch=true"))


@pytest.mark.unit
def test_an_attention_kernel_the_architecture_lacks_is_one_line_naming_the_key(dirs, no_weights_load):
    """Gemma-2 has no sdpa path in transformers (its logit soft-capping): the default kernel is refused at
    check time, in the dry run too, not after the weights load with transformers' paragraph."""
    message = refused(f"model.name_or_path={dirs['gemma2']}")
    assert message.startswith("model.attn_implementation=sdpa is not supported by Gemma2ForCausalLM (transformers "
                              "refuses it); use model.attn_implementation=eager (it supports: eager, ")
    status, out, err = run_train_py(f"model.name_or_path={dirs['gemma2']}", "dry_run=true", *FEW)
    assert status == 1 and err.strip() == f"config error: {message}"
    pipeline.validate_config(make_cfg(f"model.name_or_path={dirs['gemma2']}", "model.attn_implementation=eager"))


@pytest.mark.unit
def test_fsdp_takes_the_block_classes_from_the_model_and_checks_a_given_one_before_weights_load(
        dirs, no_weights_load):
    """model.block_name=null: the classes transformers names in _no_split_modules; a set value that
    matches nothing is refused with the classes the model has, under FSDP2 (or compile) only."""
    cfg = make_cfg(f"model.name_or_path={dirs['qwen2']}", "trainer=FSDPTrainer")
    assert cfg.model.block_name is None
    blocks = modeling.decoder_blocks(modeling.meta_model(cfg))
    assert [type(b).__name__ for b in blocks] == ["Qwen2DecoderLayer"] * 2
    expected = ("model.block_name=MistralDecoderLayer matches no module of Qwen2ForCausalLM; its block classes: "
                "Qwen2DecoderLayer (model.block_name=null takes them from the model)")
    wrong = [f"model.name_or_path={dirs['qwen2']}", "model.block_name=MistralDecoderLayer"]
    assert refused(*wrong, "trainer=FSDPTrainer") == expected
    assert refused(*wrong, "compile=true") == expected
    pipeline.validate_config(make_cfg(*wrong))  # one process, no compile: the key is not used


@pytest.mark.unit
def test_the_dry_run_refuses_too_few_rows_as_the_real_run_does_and_prints_the_mask_audit(tmp_path):
    """Before: the real run said it in one line, the dry run ended in a traceback from the plan."""
    line = ("data error: datasets=['ultrachat_sample', 'ultrafeedback_sample'] have 20 training rows, fewer than one "
            "batch (batch_size=32); lower batch_size or add rows")
    for extra in (["dry_run=true"], [f"run_dir={tmp_path / 'run'}"]):
        status, out, err = run_train_py("rows_per_dataset=10", *extra)
        assert status == 1 and err.strip() == line, err[-2000:]
    status, out, err = run_train_py("dry_run=true", "rows_per_dataset=16", "batch_size=8")
    assert status == 0, err[-2000:]
    assert "mask audit, " in out and "answers end with the end-of-turn token '</s>'" in out and "  target: [" in out


@pytest.mark.unit
@pytest.mark.parametrize("args, message", [
    (["policy_dtype=float16"], r"^unknown config key 'policy_dtype' \(did you mean 'model.policy_dtype'\?\); keys at"),
    (["attn_implementation=eager"], r"did you mean 'model.attn_implementation'\?"),
    (["target_modules=[q_proj]"], r"did you mean 'lora.target_modules'\?"),
    (["wandb.policy_dtype=x"], r"^unknown config key 'wandb.policy_dtype'; keys in wandb"),  # only at the top level
])
def test_model_and_lora_keys_given_short_get_a_hint_toward_their_section(args, message):
    with pytest.raises(ConfigError, match=message):
        config_schema.rewrite_argv(args)


@pytest.mark.unit
@pytest.mark.parametrize("overrides", [["max_length=8"], ["max_prompt_length=600"]])
def test_max_length_below_max_prompt_length_names_both_keys(overrides):
    cfg = make_cfg(*overrides)
    assert refused(*overrides) == (f"max_length={cfg.max_length} is below max_prompt_length={cfg.max_prompt_length}; "
                                   "raise max_length or lower max_prompt_length")


@pytest.mark.unit
@pytest.mark.parametrize("path, name", [("/data/ckpts/Qwen2-0.5B", "Qwen2-0.5B"),
                                        ("Qwen/Qwen2.5-0.5B/", "Qwen2.5-0.5B"),
                                        ("runs/sft_tiny_2026/final", "sft_tiny_2026"),
                                        ("models/tiny-mistral", "tiny")])
def test_a_custom_model_path_names_the_run_unless_model_name_is_set(path, name):
    cfg = make_cfg(f"model.name_or_path={path}")
    config_schema.name_the_model(cfg)
    assert cfg.model.name == name and cfg.exp_name == f"ift_{name}"  # exp_name: the run directory's and wandb's
    cfg = make_cfg(f"model.name_or_path={path}", "model.name=mine")
    config_schema.name_the_model(cfg)
    assert cfg.model.name == "mine"
    cfg = make_cfg("model=mistral7b", f"model.name_or_path={path}")  # a chosen model file names itself
    config_schema.name_the_model(cfg)
    assert cfg.model.name == "mistral7b"


@pytest.mark.unit
def test_validate_config_names_the_run_for_its_model(dirs):
    cfg = make_cfg(f"model.name_or_path={dirs['qwen2']}")
    pipeline.validate_config(cfg)
    assert cfg.exp_name == "ift_qwen2"


@pytest.fixture
def progress_bars():
    """transformers' progress-bar switch, as it was before the test."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield
    (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


@pytest.mark.integration
def test_transformers_progress_bars_stay_off_a_log_file_and_on_a_terminal(tmp_path, progress_bars, monkeypatch):
    """run_train_py's stderr is a StringIO, as a Slurm log is a file: no "Loading weights" or "Writing
    model shards" bar (each redraw a line there). On a terminal they stay."""
    status, out, err = run_train_py(f"run_dir={tmp_path / 'run'}", *FEW, "n_examples=8")
    assert status == 0, err[-2000:]
    assert "Loading weights" not in err and "Writing model shards" not in err and "\r" not in err
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    hf_logging.enable_progress_bar()
    monkeypatch.setattr(sys, "stderr", Terminal())
    modeling.progress_bars_on_a_terminal_only()
    assert hf_logging.is_progress_bar_enabled()
