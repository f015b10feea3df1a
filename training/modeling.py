"""Models and tokenizers: checking a model before anything loads (its directory, its architecture on
the meta device: attention kernel, decoder blocks), loading them for a run (the weights
on rank 0 only under FSDP, none at all for a resumed run), building a model without weights, and what
a trained model does at the end of a run (stop at the end of its turn, answer held-out prompts greedily)."""

import contextlib
import sys

import torch
import torch.distributed as dist

from training.tokenization import ensure_chat_template
from utils import ConfigError, is_main, resolve_path

# What a local directory must hold: any one of these files (transformers' tokenizer formats: fast,
# sentencepiece, BPE, WordPiece) and, unless model.from_scratch, the weights in any of these forms.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
WEIGHTS_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


# ---------------------------------------------------------------- before anything loads

def check_model(cfg):
    """Raise ConfigError, before any weights load, for a model the run cannot train: a local directory
    without config.json, weights or tokenizer files (check_directories); an attention kernel its
    architecture lacks; under FSDP2 or compile, model.block_name matching none of its modules. The
    architecture is built on the meta device from config.json (no weights, no memory). Returns that
    model, for further checks (LoRA's targets), or None for a hub id whose config.json cannot be fetched
    (offline): the load itself reports that."""
    check_directories(cfg)
    model = meta_model(cfg)
    if model is not None and (cfg.trainer == "FSDPTrainer" or cfg.compile):
        decoder_blocks(model, cfg.model.block_name)
    return model


def check_directories(cfg):
    """model.name_or_path and the tokenizer's source, when they are local directories: config.json and
    weights files (none needed with from_scratch) in the first, tokenizer files in the second. Without
    tokenizer files transformers would build a tokenizer of one token and train on nothing."""
    name = cfg.model.name_or_path
    model_dir = resolve_path(name)
    if model_dir is not None and model_dir.is_dir():
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"model.name_or_path={name} has no config.json: point it at a Hugging Face model "
                              "directory")
        if not cfg.model.from_scratch and not any(any(model_dir.glob(g)) for g in WEIGHTS_FILES):
            raise ConfigError(f"model.name_or_path={name} has no weights files ({', '.join(WEIGHTS_FILES)}): "
                              "point it at a model directory, or set model.from_scratch=true for random weights "
                              "from its config.json")
    key = "model.tokenizer_name_or_path" if cfg.model.tokenizer_name_or_path else "model.name_or_path"
    source = cfg.model.tokenizer_name_or_path or name
    tokenizer_dir = resolve_path(source)
    if tokenizer_dir is not None and tokenizer_dir.is_dir() and not any(
            (tokenizer_dir / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{key}={source} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): set "
                          "model.tokenizer_name_or_path to the directory or hub id of the model's tokenizer")


def model_config(cfg):
    """The policy's transformers config (its config.json), or None when it cannot be read: a hub id
    while the hub is unreachable (the load reports it then)."""
    from transformers import AutoConfig

    name = cfg.model.name_or_path
    try:
        return AutoConfig.from_pretrained(str(resolve_path(name) or name),
                                          trust_remote_code=cfg.model.trust_remote_code)
    except OSError:
        if resolve_path(name) is not None:
            raise ConfigError(f"model.name_or_path={name}: its config.json cannot be read") from None
        return None


def meta_model(cfg):
    """The policy's architecture on the meta device (from config.json: no weights, no memory), built as
    the run builds it (model.attn_implementation), or None when config.json cannot be read (model_config).
    Raises ConfigError naming model.attn_implementation when the architecture does not support it."""
    from transformers import AutoModelForCausalLM

    config = model_config(cfg)
    if config is None:
        return None
    kernel = cfg.model.attn_implementation
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, attn_implementation=kernel,
                                                    trust_remote_code=cfg.model.trust_remote_code)
    except ValueError as e:
        if "attention" not in str(e).lower():
            raise
        arch = (config.architectures or [config.model_type])[0]
        raise ConfigError(f"model.attn_implementation={kernel} is not supported by {arch} (transformers refuses it); "
                          f"use model.attn_implementation=eager (it supports: {', '.join(_kernels(arch))})") from None


def _kernels(arch):
    """The attention kernels the architecture supports: eager (plain PyTorch) always, the others as
    transformers' _supports_* flags of its class say."""
    import transformers

    cls = getattr(transformers, arch, None)
    flags = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
             "flex_attention": "_supports_flex_attn"}
    return ["eager"] + [k for k, flag in flags.items() if getattr(cls, flag, False)]


def decoder_blocks(model, block_name=None):
    """The modules FSDP2 shards one by one (and compile compiles): those of class `block_name`, or with
    None the classes the model names in `_no_split_modules` (transformers' own list of the blocks that
    must stay whole: its decoder layers). model: a transformers model, peft's wrapper around one, or its
    meta-device build. Raises ConfigError naming the block classes the model has."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    named = set(getattr(base, "_no_split_modules", None) or ())
    wanted = {block_name} if block_name else named
    blocks = [m for m in model.modules() if type(m).__name__ in wanted]
    if blocks:
        return blocks
    repeated = sorted({type(layer).__name__ for m in base.modules() if isinstance(m, torch.nn.ModuleList)
                       for layer in m})  # the classes of the model's layer stacks
    have = f"its block classes: {', '.join(sorted(named & {type(m).__name__ for m in base.modules()}) or repeated)}"
    if block_name:
        raise ConfigError(f"model.block_name={block_name} matches no module of {type(base).__name__}; {have} "
                          "(model.block_name=null takes them from the model)")
    raise ConfigError(f"{type(base).__name__} names no block classes (_no_split_modules); set model.block_name to "
                      f"its decoder layer class ({', '.join(repeated) or 'none found'})")


# ---------------------------------------------------------------- loading

def progress_bars_on_a_terminal_only():
    """Turn off transformers' (and the hub's) progress bars, "Loading weights" and "Writing model
    shards", unless stderr, where they draw, is a terminal: in a log file every redraw is another line."""
    if not sys.stderr.isatty():
        from transformers.utils import logging
        logging.disable_progress_bar()


def load_tokenizer(cfg):
    """The run's tokenizer (model.tokenizer_name_or_path, else the model's), padding on the right, with a
    chat template (preference_datasets.ensure_chat_template). Raises ConfigError when it has fewer than
    half the tokens of the model's vocab_size: the tokenizer of another model, whose ids mean other
    words to the weights (with from_scratch no weights give ids a meaning: a larger vocabulary only
    leaves rows unused)."""
    from transformers import AutoTokenizer

    name = cfg.model.tokenizer_name_or_path or cfg.model.name_or_path
    path = resolve_path(name)
    tokenizer = AutoTokenizer.from_pretrained(str(path or name), trust_remote_code=cfg.model.trust_remote_code)
    config = None if cfg.model.get("from_scratch", False) else model_config(cfg)  # run configs from before the key
    vocab = getattr(config.get_text_config(), "vocab_size", None) if config is not None else None
    if vocab and len(tokenizer) < vocab / 2:  # a model's vocab_size is often padded above its tokenizer's size, not 2x
        key = "model.tokenizer_name_or_path" if cfg.model.tokenizer_name_or_path else "model.name_or_path"
        raise ConfigError(f"the tokenizer of {key}={name} has {len(tokenizer):,} tokens, under half the model's "
                          f"vocab_size={vocab:,}: not the model's tokenizer; set model.tokenizer_name_or_path to it")
    tokenizer.padding_side = "right"
    return ensure_chat_template(tokenizer)


def load_model(cfg, dtype, name_or_path=None, weights=True, **extra):
    """The model's weights from a hub id or directory. Under FSDPTrainer with several ranks only rank 0
    reads them; the others build the architecture on the meta device (no memory) and receive their
    shards from rank 0 when the trainer shards the model, so a node holds one copy in host memory.
    weights=False (a resumed run): no rank reads them; parameters stay on the meta device until the
    trainer gives them storage for the checkpoint's shards. extra: more from_pretrained arguments
    (QLoRA's quantization_config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    scratch = name_or_path is None and cfg.model.get("from_scratch", False)
    name = name_or_path or cfg.model.name_or_path
    name_or_path = str(resolve_path(name) or name)  # a local directory, else a hub id
    kw = dict(dtype=getattr(torch, dtype), trust_remote_code=cfg.model.trust_remote_code,
              attn_implementation=cfg.model.attn_implementation)
    if not weights:
        from transformers import GenerationConfig
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=cfg.model.trust_remote_code)
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, **kw)
        with contextlib.suppress(OSError):  # as from_pretrained would: the model's own generation settings
            model.generation_config = GenerationConfig.from_pretrained(name_or_path)
        return model
    if cfg.trainer == "FSDPTrainer" and dist.is_initialized() and dist.get_world_size() > 1 and not is_main():
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=cfg.model.trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, **kw)
    if scratch:
        # Random weights from config.json, seeded by `seed` alone: each seed is its own initialisation,
        # and the policy and a reference model (two calls) start from the same weights.
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=cfg.model.trust_remote_code)
        torch.manual_seed(cfg.seed)
        return AutoModelForCausalLM.from_config(config, **kw)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kw, **extra)


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no initialisation) and
    real buffers: buffers such as rotary frequencies are computed in __init__ and are in no checkpoint."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:  # an already-meta parameter is a tied one: keep it shared
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def materialize(model, device):
    """Uninitialised storage on `device` for a model built by parameters_on_meta (sharded or not),
    keeping its buffers' values. Its parameters must then be loaded from a checkpoint."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


def stop_at_end_of_turn(model, tokenizer, eot_token):
    """Make generation stop at the end-of-turn token as well as at eos: generate() (greedy_samples)
    reads model.generation_config, and save_pretrained writes it to generation_config.json, where
    lm-eval-harness, vLLM and generate() find it."""
    stop = [tokenizer.convert_tokens_to_ids(eot_token)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop:
        stop.append(tokenizer.eos_token_id)
    model.generation_config.eos_token_id = stop
    model.generation_config.pad_token_id = tokenizer.pad_token_id


@torch.no_grad()
def greedy_samples(model, tokenizer, data, n, max_new_tokens, device):
    """Greedy answers to the first n held-out prompts, with exact match against the reference answer
    (both stripped); generation stops at model.generation_config's eos ids (stop_at_end_of_turn).
    Returns a list of dicts (prompt, reference, answer, exact)."""
    from tqdm import tqdm

    model.eval()
    out = []
    rows = list(zip(data.questions[:n], data.prompt_ids[:n], data.answers[:n]))
    bar = is_main() and sys.stderr.isatty()  # a log file (not a terminal) gets no carriage-return stream
    for prompt, ids, ref in tqdm(rows, desc="greedy answers", leave=False, disable=not bar):
        gen = model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), device=device,
                             dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True).strip()
        out.append({"prompt": prompt, "reference": ref, "answer": answer,
                    "exact": answer == ref.strip()})
    return out
