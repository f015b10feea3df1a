"""LoRA through peft (`lora=default`, config/lora/default.yaml): the base model is frozen and each
target Linear W (out x in) gains a trainable low-rank update, W x + (alpha / r) * B (A dropout(x)),
with A (r x in) random and B (out x r) zero at the start, so training starts from the base model.

What the rest of the repository sees:
- training/config_schema.py: the `lora` keys' declaration (`Lora`) and `check_run` before anything loads.
- train.py: `load_kwargs` (QLoRA's 4-bit loading) and `apply`.
- trainers.py: the policy is a peft model whose only trainable parameters are the adapters (and
  `lora.trainable_modules`); DPO/IPO's reference is `AdaptersDisabled(policy)`, the same weights with
  the adapters switched off, so no second copy is held; `save_final` writes final/.
"""

import warnings

import torch

from utils import ConfigError, is_main

# The default targets: every linear layer of the decoder blocks (attention and MLP projections, not
# the output head), the usual choice for instruction tuning (the QLoRA paper found all linear layers
# needed to match full fine-tuning). peft's own "all-linear" finds them in any architecture; peft's
# per-architecture table (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) holds only q_proj and v_proj.
DEFAULT_TARGETS = "all-linear"
QUANTIZE = (None, "4bit")
BITSANDBYTES = "bitsandbytes==0.50.2"


def enabled(cfg):
    """Whether this run trains LoRA adapters (`lora=default`) rather than the full model."""
    return cfg.get("lora") is not None


def check_run(cfg, cuda):
    """Raise ConfigError for LoRA settings that no single key's declaration (config_schema.Lora) can
    refuse, before any model loads. cuda: whether the run will compute on a CUDA device."""
    if not enabled(cfg):
        return
    if cfg.lora.quantize is not None:
        if not cuda:
            raise ConfigError("lora.quantize=4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit base model does not "
                              "train on the CPU; use lora.quantize=null here")
        if cfg.trainer != "BasicTrainer":
            raise ConfigError("lora.quantize=4bit runs with trainer=BasicTrainer (one GPU); "
                              "FSDP2 over a 4-bit base is not supported")
        try:
            import bitsandbytes
        except ImportError:
            raise ConfigError(f"lora.quantize=4bit needs bitsandbytes: pip install {BITSANDBYTES}") from None
        # DCP's get_state_dict resolves every state-dict key by getattr, so `...weight.absmax` needs
        # Params4bit.absmax: added by bitsandbytes' fix of its issue #1405 (PR #1866, 2026), in our pin
        if not hasattr(bitsandbytes.nn.Params4bit, "absmax"):
            raise ConfigError(f"bitsandbytes {bitsandbytes.__version__} cannot checkpoint 4-bit weights "
                              f"(torch.distributed.checkpoint fails on Params4bit.absmax): pip install {BITSANDBYTES}")


def load_kwargs(cfg):
    """Extra from_pretrained arguments for the policy: QLoRA's 4-bit NF4 base on this process's
    GPU (with double quantisation; compute in model.policy_dtype); {} otherwise."""
    if not enabled(cfg) or cfg.lora.quantize is None:
        return {}
    from transformers import BitsAndBytesConfig
    dtype = getattr(torch, cfg.model.policy_dtype)
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
            "device_map": {"": torch.cuda.current_device()}}


def target_modules(cfg):
    """lora.target_modules, or DEFAULT_TARGETS (peft's "all-linear")."""
    return list(cfg.lora.target_modules) if cfg.lora.target_modules is not None else DEFAULT_TARGETS


def check_targets(cfg, model):
    """Raise ConfigError for a name in lora.target_modules that matches no module of `model` (the
    meta-device model, before any weights load), naming the model's linear layers. A name matches as
    peft matches it: a module's full name or its last parts (`q_proj`: model.layers.0.self_attn.q_proj)."""
    if not enabled(cfg) or cfg.lora.target_modules is None:
        return
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in cfg.lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        linear = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        verb = "matches" if len(unmatched) == 1 else "match"
        raise ConfigError(f"lora.target_modules={list(cfg.lora.target_modules)}: {', '.join(unmatched)} {verb} no "
                          f"module of {type(model).__name__}; its linear layers: {', '.join(linear)} (null = all of "
                          "them but the output head)")


def apply(cfg, model):
    """The peft model around `model` (whose weights it shares): base frozen, adapters trainable
    (float32, whatever the base's dtype), lora.trainable_modules trainable as full copies."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    c = cfg.lora
    config = LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=target_modules(cfg),
                        modules_to_save=list(c.trainable_modules) if c.trainable_modules else None, bias="none",
                        task_type="CAUSAL_LM")
    if c.quantize is not None:
        # upcasts the parameters left unquantised (embeddings, head, norms) to float32 for stable training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    with warnings.catch_warnings():
        # peft reads model.is_gradient_checkpointing, which transformers deprecated in favour of
        # is_activation_checkpointing: the warning is peft's to fix, and would otherwise open every LoRA run
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = get_peft_model(model, config)
    if is_main():
        print(parameter_count(model))
    return model


def parameter_count(model):
    """One line: how many parameters train (adapters and trainable_modules) out of the model's total."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"LoRA: {trainable:,} trainable parameters of {total:,} ({trainable / total:.2%})"


def is_quantized(model):
    """Whether `model`'s base was loaded in 4 bits (it is then already on its GPU and cannot move)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False))


class AdaptersDisabled:
    """DPO/IPO's reference when training LoRA: the policy with its adapters switched off, i.e. the
    frozen base model, so no second copy of the weights is held. It runs in eval mode (no dropout)
    and restores the policy's mode afterwards. parameters() are the frozen ones, which the trainer
    fingerprints to check that the reference never changed."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, *args, **kwargs):
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.disable_adapter():
                return self.policy(*args, **kwargs)
        finally:
            self.policy.train(was_training)

    @property
    def config(self):
        # forward._chunkable reads it: a model that soft-caps its logits (Gemma-2) needs the plain head
        return self.policy.config

    def get_input_embeddings(self):
        return self.policy.get_input_embeddings()

    def get_output_embeddings(self):
        return self.policy.get_output_embeddings()

    def parameters(self):
        # Under FSDP2 the policy's root stays gathered after an eval forward (reshard_after_forward is
        # off for it): reshard first, so every rank yields its own shards, as for a plain reference.
        if hasattr(self.policy, "reshard"):
            self.policy.reshard()
        return (p for p in self.policy.parameters() if not p.requires_grad)

    def eval(self):
        return self


# ---------------------------------------------------------------- final/

_PREFIX = "base_model.model."
# What bitsandbytes' Linear4bit._save_to_state_dict (0.50.2) writes after "<module>.weight" (packed 4-bit
# codes, uint8 (numel/2, 1)): its QuantState.as_dict(packed=True), i.e. weight.absmax (per block; uint8
# with double quantisation), weight.quant_map (the 16 code values), with double quantisation
# weight.nested_absmax and weight.nested_quant_map (absmax's own 8-bit code), and the non-tensor fields
# (quant_type, blocksize, dtype, shape, nested_blocksize, nested_dtype, nested_offset) as JSON bytes in
# weight.quant_state.bitsandbytes__nf4 (or __fp4).
_QUANT_STATE = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                "quant_state.bitsandbytes__fp4")


def _quant_state_of(key):
    """(the weight's key, the component) for a bitsandbytes quant-state key, else None."""
    for part in _QUANT_STATE:
        if key.endswith(".weight." + part):
            return key[:-len(part) - 1], part
    return None


def dequantize_4bit(packed, quant):
    """The float weight of bitsandbytes' packed 4-bit format, read from the state dict alone (no
    bitsandbytes needed, so final/ can be written on any machine). packed: uint8 (numel/2, 1), two codes
    per byte, the first in the high nibble. quant: {component: tensor} of _QUANT_STATE. Each block of
    `blocksize` values is quant_map[code] * absmax[block]; with double quantisation absmax is itself
    nested_quant_map[absmax] * nested_absmax[block of nested_blocksize] + nested_offset.
    Returns the weight (shape from the quant state) in float32."""
    import json
    meta = json.loads(bytes(next(v for k, v in quant.items() if k.startswith("quant_state.")).tolist()))
    absmax = quant["absmax"]
    if "nested_absmax" in quant:
        nested = quant["nested_quant_map"].float()[absmax.long()].view(-1)
        scale = quant["nested_absmax"].float().repeat_interleave(meta["nested_blocksize"])[:nested.numel()]
        absmax = nested * scale + meta["nested_offset"]
    codes = packed.view(torch.uint8).reshape(-1)
    codes = torch.stack([codes >> 4, codes & 0xF], dim=1).view(-1).long()
    n = 1
    for d in meta["shape"]:
        n *= d
    values = quant["quant_map"].float()[codes[:n]]
    scale = absmax.float().repeat_interleave(meta["blocksize"])[:n]
    return (values * scale).view(meta["shape"])


def merged_state_dict(state, scaling, base=None):
    """The base model's state dict with every adapter merged in: W + scaling * B @ A (computed in
    float32 or better, then cast back to W's dtype), trainable_modules' trained copies in place of
    their originals, and peft's names turned back into the base model's: plain float weights only.

    state: the peft model's full state dict (base_model.model.<name>.base_layer.weight,
    ...lora_A.default.weight (r, in), ...lora_B.default.weight (out, r), ...original_module.weight,
    ...modules_to_save.default.weight, and plain base keys; QLoRA: each 4-bit weight is packed codes
    followed by bitsandbytes' quant-state keys, _QUANT_STATE). scaling: alpha / r.
    base: the base model's own state dict, to take the frozen weights from instead of `state`
    (QLoRA: the unquantised weights). Without it a 4-bit weight is dequantised (dequantize_4bit).
    """
    quant = {}  # the 4-bit weights' keys -> their quant state
    for key in state:
        found = _quant_state_of(key)
        if found is not None:
            quant.setdefault(found[0], {})[found[1]] = state[key]
    merged = {}
    for key, value in state.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if ".lora_A." in name or ".lora_B." in name or ".original_module." in name or _quant_state_of(key):
            continue
        if ".modules_to_save.default." in name:
            merged[name.replace(".modules_to_save.default.", ".")] = value
            continue
        module, _, param = name.rpartition(".base_layer.") if ".base_layer." in name else ("", "", name)
        name = f"{module}.{param}" if module else name
        if base is not None:
            value = base[name]
        elif key in quant:
            value = dequantize_4bit(value, quant[key])
        if module and param == "weight":
            a = state[f"{_PREFIX}{module}.lora_A.default.weight"]
            b = state[f"{_PREFIX}{module}.lora_B.default.weight"]
            work = torch.promote_types(value.dtype, torch.float32)
            value = (value.to(work) + scaling * (b.to(work) @ a.to(work))).to(value.dtype)
        merged[name] = value
    return merged


def save_final(policy, tokenizer, state, tmp, dtype, cfg):
    """Write final/ into the (temporary) directory `tmp` from the peft model's full state dict
    `state` (float32 or as trained): with lora.merge, the merged model as a plain Hugging Face
    directory in `dtype`; otherwise the adapter alone (adapter_config.json, adapter_model.safetensors,
    loadable with peft on top of the base model). The tokenizer goes with either."""
    c = cfg.lora
    if not c.merge:
        policy.save_pretrained(tmp, state_dict={k: v.to(dtype) for k, v in state.items()}, safe_serialization=True)
    elif c.quantize is None:
        merged = merged_state_dict(state, c.alpha / c.r)
        policy.get_base_model().save_pretrained(tmp, state_dict={k: v.to(dtype) for k, v in merged.items()},
                                                safe_serialization=True)
    else:  # QLoRA: merge into the unquantised base weights, read again on the CPU
        from training.modeling import load_model
        base = load_model(cfg, cfg.model.policy_dtype)
        merged = merged_state_dict(state, c.alpha / c.r, base=base.state_dict())
        base.save_pretrained(tmp, state_dict={k: v.to(dtype) for k, v in merged.items()}, safe_serialization=True)
    tokenizer.save_pretrained(tmp)


def trainable_float32(model):
    """Make the trainable parameters float32 (the adapters already are; trainable_modules' copies
    take the base's dtype): FSDP2 needs one dtype among a group's trainable parameters, and the
    optimizer then updates float32 weights; compute still runs in model.policy_dtype."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model
