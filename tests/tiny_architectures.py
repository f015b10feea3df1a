"""Tiny random models of the architectures users bring (Qwen2, Gemma-2, Gemma-3, ...), built with
transformers' own classes and saved with the bundled tokenizer (models/tiny-mistral, 930 tokens) in a
directory `from_pretrained` loads: a stand-in for a hub checkpoint, which is out of reach here."""

import functools
import shutil

import torch
import transformers

from utils import REPO_DIR

TOKENIZER = REPO_DIR / "models" / "tiny-mistral"
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16, max_position_embeddings=1024)


@functools.cache
def tokenizer_ids():
    """vocab_size and the special token ids of the bundled tokenizer, for a config."""
    tok = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def build_model_dir(arch, directory, tokenizer=True, **config):
    """Save a random `arch` (e.g. "Qwen2ForCausalLM"; its config class is transformers' `<Prefix>Config`,
    Gemma3ForCausalLM's Gemma3TextConfig) of SHAPE, seeded with 0, in `directory`, with the bundled
    tokenizer's files unless tokenizer=False. config: more config values (tie_word_embeddings=True, ...).
    Returns the directory."""
    config_name = "Gemma3TextConfig" if arch == "Gemma3ForCausalLM" else arch.replace("ForCausalLM", "Config")
    config = getattr(transformers, config_name)(**{**SHAPE, **tokenizer_ids(), **config})
    torch.manual_seed(0)
    getattr(transformers, arch)(config).save_pretrained(directory)
    if tokenizer:
        for f in TOKENIZER.iterdir():
            if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
                shutil.copy(f, directory)
    return directory


# The model zoo (tests/test_model_zoo.py): name -> (architecture, config values beyond SHAPE, the run's
# model.* keys). Each keeps what makes its family differ from Mistral: Llama-3's rope scaling,
# Qwen2's tied embeddings, Qwen3's q/k norms, Gemma-2's logit soft-capping and sliding window (eager
# attention: transformers has no sdpa path for its soft-capping), Gemma-3's sliding and full layers with
# their own rope, Phi-3's fused qkv and gate_up projections, OLMo-2's norms after attention and MLP.
# sliding_window=16 is shorter than the sample rows (tens of tokens), so the window masks something.
ZOO = {
    "llama3": ("LlamaForCausalLM", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)), {}),
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True), {}),
    "qwen3": ("Qwen3ForCausalLM", {}, {}),
    "gemma2": ("Gemma2ForCausalLM", dict(sliding_window=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
               dict(attn_implementation="eager")),
    "gemma3": ("Gemma3ForCausalLM", dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"]), {}),
    "phi3": ("Phi3ForCausalLM", {}, {}),
    "olmo2": ("Olmo2ForCausalLM", {}, {}),
}


def build_zoo(root):
    """Every ZOO model saved under root/<name>. Returns {name: its run's model.* keys (name_or_path and the
    ZOO entry's own)}."""
    return {name: {"name_or_path": str(build_model_dir(arch, root / name, **config)), **model_keys}
            for name, (arch, config, model_keys) in ZOO.items()}
