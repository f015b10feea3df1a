"""Models and tokenizers: loading them for a run (the weights on rank 0 only under FSDP, none at all
for a resumed run), building a model without weights, and what a trained model does at the end of a
run (stop at the end of its turn, answer held-out prompts greedily)."""

import contextlib
import sys

import torch
import torch.distributed as dist

from training.tokenization import ensure_chat_template
from utils import is_main, resolve_path


def load_tokenizer(cfg):
    """The run's tokenizer (model.tokenizer_name_or_path, else the model's), padding on the right, with a
    chat template (preference_datasets.ensure_chat_template)."""
    from transformers import AutoTokenizer

    name = cfg.model.tokenizer_name_or_path or cfg.model.name_or_path
    path = resolve_path(name)
    tokenizer = AutoTokenizer.from_pretrained(str(path or name), trust_remote_code=cfg.model.trust_remote_code)
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
