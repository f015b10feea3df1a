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
