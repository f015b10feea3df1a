"""The config, declared once: every top-level, model and lora key here, every loss key beside its loss
in losses.py. From these declarations come the checks (`check_keys`, `check_overrides`, `check_run`)
and the YAML files users read and edit: `python -m training.config_schema` rewrites config/config.yaml,
config/loss/*.yaml, config/lora/default.yaml, the keys' comments of config/model/*.yaml and the key tables
of docs/configuration.md from them (the tests fail while a file differs); a model file's values and
header comment are its own.

Adding a key: one `option(...)` line in the right dataclass, then `python -m training.config_schema`.
"""

import dataclasses
import os
import sys
import typing
from dataclasses import dataclass
from typing import Optional

from hydra._internal.utils import get_args_parser
from omegaconf import OmegaConf

import forward
import losses
from training import lora
from training.launch import use_cuda
from training.options import _kind, check, default_of, option, unknown_key
from utils import REPO_DIR, ConfigError, resolve_path

CONFIG_DIR = REPO_DIR / "config"
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "flex_attention", "eager")
PATH_COMMENT = "hub id or local directory (relative paths: to the working dir, then the repo)"


@dataclass
class Model:
    """The keys of every config/model/*.yaml (values differ per model; these defaults are tiny.yaml's)."""
    name: str = option("tiny", "")
    name_or_path: str = option("models/tiny-mistral", PATH_COMMENT)
    tokenizer_name_or_path: Optional[str] = option(None, "null = name_or_path; set it when name_or_path has no "
                                                         "tokenizer files (a training\ncheckpoint, say)")
    from_scratch: bool = option(False, "true: random weights from name_or_path's config.json (seeded by `seed`), "
                                       "not its weights")
    policy_dtype: str = option("float32", "float32 | bfloat16 | float16 (GPU only): compute dtype; weights train in "
                                          "float32, final/ is saved in this", choices=DTYPES)
    reference_dtype: str = option("float32", "the frozen reference model's dtype, loaded and computed in (DPO/IPO "
                                             "only)", choices=DTYPES)
    block_name: Optional[str] = option(None, "decoder block class that FSDP2 shards (and compile compiles) one by "
                                             "one; null = the\nmodel's own (transformers' _no_split_modules)")
    attn_implementation: str = option("sdpa", "sdpa | flash_attention_2 | flex_attention | eager: the attention "
                                              "kernel (from_pretrained)", choices=ATTN_IMPLEMENTATIONS)
    eot_token: Optional[str] = option(None, "the token that ends an assistant turn (always a target; generation "
                                            "stops\nat it); null = what the chat template emits after an assistant "
                                            "message")
    trust_remote_code: bool = option(False, "never run code from a model repo unless you turn this on")


@dataclass
class Lora:
    """LoRA through peft: `lora=default` (off unless chosen). The base model's weights are frozen and
    only the low-rank adapters train (plus trainable_modules). See training/lora.py and docs/lora.md."""
    r: int = option(16, "rank of each adapter (B @ A, A: r x in, B: out x r)", low=1)
    alpha: float = option(32, "the update is scaled by alpha / r", low=0, low_open=True)
    dropout: float = option(0.05, "dropout on the adapters' input (training only)", low=0, high=1, high_open=True)
    target_modules: Optional[list] = option(None, "null = every linear layer of the blocks (attention and MLP "
                                                  "projections; peft's\nall-linear), or a list of module names such "
                                                  "as [q_proj, v_proj]")
    trainable_modules: Optional[list] = option(None, "base modules that train fully as well, e.g. [embed_tokens, "
                                                     "lm_head]; the embedding\ntable (and with it IFT's blended "
                                                     "embeddings' table) stays frozen unless listed here")
    merge: bool = option(True, "final/: the merged model, a plain Hugging Face directory; false = the adapter alone")
    quantize: Optional[str] = option(None, "null | 4bit: QLoRA, the frozen base in 4-bit NF4 through bitsandbytes "
                                           "(CUDA GPUs only)", choices=lora.QUANTIZE)


@dataclass
class DatasetPaths:
    ultrachat: Optional[str] = option(None, "  folder with train_sft / test_sft files (.jsonl, .json, .parquet or "
                                            "the hub's parquet layout)")
    ultrafeedback: Optional[str] = option(None, "  folder with train_prefs / test_prefs files")
    hh: Optional[str] = option(None, "  folder with train / test files")
    shp: Optional[str] = option(None, "  folder with train / test files")
    orca: Optional[str] = option(None, "  folder with a train file (the last 5% is held out for evaluation)")


@dataclass
class Wandb:
    enabled: bool = option(False, "log to Weights & Biases too (metrics.jsonl is always written)")
    mode: str = option("offline", "online | offline | disabled; online without credentials falls back to offline",
                       choices=("online", "offline", "disabled"))
    project: str = option("ift", "wandb project")
    entity: Optional[str] = option(None, "wandb team or user; null = your default entity")
    name: Optional[str] = option(None, "null = exp_name")


@dataclass
class Run:
    """The top-level keys of config/config.yaml (the `loss` and `model` groups are declared apart)."""
    seed: int = option(0, "data order comes from (seed, epoch), IFT's lambda noise from (seed, step)", low=0)
    exp_name: str = option("${loss.name}_${model.name}", "a label for the run (wandb name, default run_dir)")
    run_dir: Optional[str] = option(None, "where the run writes; null = runs/<exp_name>_<date_time>. Must not "
                                          "already hold a run.")

    device: str = option("auto", "auto (cuda if present, else cpu) | cpu | cuda", choices=("auto", "cpu", "cuda"),
                         before="\n---- where it runs")
    trainer: str = option("BasicTrainer", "BasicTrainer (one process) | FSDPTrainer (FSDP2, one process per "
                                          "device; joins torchrun)", choices=("BasicTrainer", "FSDPTrainer"))
    nproc: Optional[int] = option(None, "FSDPTrainer outside torchrun: processes to start; null = one per GPU "
                                        "(2 on the CPU)", low=1)
    dist_timeout_minutes: float = option(60, "how long a rank waits in a collective before the process group "
                                              "aborts the run (NCCL's\nown default is 10 minutes): rank 0 downloads, "
                                              "tokenises and loads models alone while the\nothers wait at a barrier, "
                                              "longer than that on a cold hub cache", low=0, low_open=True)
    activation_checkpointing: bool = option(False, "FSDPTrainer: recompute each decoder block in backward (less "
                                                   "memory, more compute)")
    loss_chunk_tokens: Optional[int] = option(
        forward.DEFAULT_LOSS_CHUNK_TOKENS, "the output head runs on this many answer tokens at a time, forward and "
        "backward, so only\none chunk's logits are in memory (null = all at once); values and gradients are "
        "unchanged", low=1)
    packing: bool = option(False, "concatenate each micro-batch's rows into one sequence without padding (position "
                                  "ids restart\nper row, attention stays within a row); on GPUs use "
                                  "model.attn_implementation=flash_attention_2")
    compile: bool = option(False, "torch.compile each decoder block (model.block_name)")
    compile_backend: str = option("inductor", "inductor | aot_eager | eager: the torch.compile backend (aot_eager: "
                                              "for debugging)", choices=("inductor", "aot_eager", "eager"))
    reference_logps: str = option("live", "live | precompute: DPO/IPO/cDPO run the reference once over the train and "
                                          "eval rows before\ntraining (cached beside the tokenised data), free it and "
                                          "train with the policy alone; same losses", choices=("live", "precompute"))
    peak_tflops: Optional[float] = option(None, "peak dense TFLOP/s of one device, the denominator of the logged "
                                                "mfu; null = the card's bf16/fp16\nfigure from flops.PEAK_TFLOPS "
                                                "(CUDA; no mfu on the CPU or an unlisted card)", low=0, low_open=True)

    datasets: list = option(["ultrachat_sample", "ultrafeedback_sample"],
                            "registry names (ultrachat, ultrafeedback, hh, shp, orca),\ntheir bundled samples "
                            "(<name>_sample), or paths to local .jsonl/.json/.parquet files or folders",
                            before="\n---- data")
    dataset_paths: DatasetPaths = option(DatasetPaths(), "a local copy that replaces a registry name's hub "
                                                         "download (offline use); null = the hub")
    max_length: int = option(512, "longest prompt + answer in tokens", low=2)
    max_prompt_length: int = option(256, "when prompt + answer exceed max_length, a longer prompt is cut to this "
                                         "(keeping its end),\nthen the answer to what is left (keeping its "
                                         "end-of-turn token); counted per dataset", low=1, high="max_length")
    min_answer_tokens: int = option(128, "a prompt is cut further than max_prompt_length when needed so that every "
                                         "answer keeps at least\nmin(its length, this, max_length // 2) tokens: no "
                                         "row is ever dropped (docs/data.md, \"Truncation\")", low=1)
    rows_per_dataset: Optional[int] = option(None, "training rows each dataset contributes: a random sample drawn "
                                                   "from (seed, dataset name)\nbefore tokenisation, the same on every "
                                                   "rank and resume; null = all rows", low=1)
    num_proc: Optional[int] = option(None, "worker processes that tokenise (rank 0 only; the other ranks map its "
                                           "result);\nnull = one per CPU, at most 8 (1 under 2,000 rows)", low=1)
    dry_run: bool = option(False, "compose, check, load the tokenizer and every dataset, tokenise, print the data "
                                  "and the\nplan (steps, tokens, FLOPs; last line JSON), exit: no model, no run "
                                  "directory, no wandb")
    n_eval_examples: Optional[int] = option(256, "eval rows used (null = the whole test split)", low=1)

    batch_size: int = option(32, "GLOBAL examples per optimizer step, over all ranks and accumulation steps", low=1,
                             before="\n---- optimisation")
    gradient_accumulation_steps: int = option(1, "micro-batches per rank per step; batch_size must divide by this "
                                                 "× ranks", low=1)
    eval_batch_size: int = option(32, "global examples per evaluation forward", low=1)
    n_epochs: int = option(1, "passes over the training data; training stops at n_epochs or n_examples, whichever "
                              "is first", low=1)
    n_examples: Optional[int] = option(None, "stop after this many training examples; null = no limit", low=1)
    optimizer: str = option("RMSprop", "RMSprop (the reference's) | AdamW", choices=("RMSprop", "AdamW"))
    lr: float = option(5.0e-4, "peak learning rate (suits the tiny model); the paper's Mistral-7B runs use 5e-7 "
                               "(see commands/).\nWarm-up update k (0-based) of W runs at lr·(k+1)/W (never 0; "
                               "the peak at the last)", low=0, low_open=True)
    weight_decay: float = option(0.0, "AdamW only", low=0)
    lr_schedule: str = option("constant", "constant | cosine; both after a linear warm-up",
                              choices=("constant", "cosine"))
    warmup_steps: int = option(10, "optimizer steps of linear warm-up (ignored when warmup_ratio is set)", low=0)
    warmup_ratio: Optional[float] = option(None, "warm-up as a fraction of all optimizer steps, e.g. 0.15", low=0,
                                           high=1, high_open=True)
    max_grad_norm: Optional[float] = option(10.0, "clip the global gradient norm to this; null = no clipping (the "
                                                  "norm is still logged)", low=0, low_open=True)
    on_nonfinite: str = option("error", "a step whose loss or gradient norm is NaN/inf is never applied to the weights."
                                        "\nerror: stop the run naming the step and metric (checkpoints and "
                                        "metrics.jsonl so far stay,\nno final/) | skip: drop that update, log it "
                                        "(skipped_steps) and go on. A non-finite eval\nloss: error stops, skip logs "
                                        "it and goes on", choices=("error", "skip"))
    max_skipped_steps: int = option(10, "stop anyway after this many skipped updates in a row (float16's "
                                        "gradient-scaler\noverflows count too: they are skipped whatever "
                                        "on_nonfinite says)", low=1)

    eval_every: int = option(640, "evaluate every this many training examples (and always at the end)", low=1,
                             before="\n---- evaluation and logging")
    do_first_eval: bool = option(True, "evaluate before the first step too")
    progress_every: int = option(10, "when stderr is not a terminal (a Slurm log): a progress line every this many "
                                     "steps,\ninstead of a progress bar", low=1)
    save_every: Optional[int] = option(None, "also write checkpoints/step-N/ every this many training examples; "
                                             "null = only final/\n(and a checkpoint when a preemption signal "
                                             "arrives)", low=1,
                                       before="\n---- checkpoints and resume (training/checkpoints.py; docs/distributed.md)")
    keep_last: Optional[int] = option(None, "keep only the newest K checkpoints (older ones go once a newer one is "
                                            "complete); null = all", low=1)
    save_async: bool = option(False, "write checkpoint shards in a background thread while training goes on "
                                     "(meant for GPUs)")
    save_hf_checkpoints: bool = option(False, "also put a Hugging Face copy of the weights (policy_dtype) in each "
                                              "checkpoint")
    resume_from: Optional[str] = option(None, "latest: continue the newest checkpoint of run_dir in place (starts "
                                              "afresh if there is\nnone yet); or a checkpoints/step-N folder (of "
                                              "another run: continue into a new run_dir)")
    resume_force: bool = option(False, "resume even if the checkpoint's lr, seed, loss, data, ... differ (recorded "
                                       "in metrics.jsonl)")
    preempt_signals: Optional[list] = option(["SIGTERM", "SIGINT", "SIGUSR1"], "finish the step, checkpoint, exit "
                                             "with status 75;\nalso SIGUSR2, SIGHUP; null = none")
    n_samples: int = option(0, "at the end, answer this many held-out prompts greedily and report exact match", low=0,
                            before="\n---- at the end")
    max_new_tokens: int = option(64, "longest greedy answer", low=1)
    wandb: Wandb = option(Wandb(), "Weights & Biases")


# The keys that do not change what a run computes: its labels, where it writes and runs, whether it
# only plans (dry_run: a requeue command can be dry-run), how its work is split over ranks, micro-batches
# and kernels (the trainer makes these give the same numbers), how often it evaluates, saves and logs,
# and how it resumes. The one declaration both resume (training/checkpoints.py's fingerprint: a resume
# may change these) and report.py (runs that differ only in these are one group) read. A dotted prefix
# covers its whole section. Every other key, including keys added later, counts.
NOT_MATH = ("exp_name", "model.name", "run_dir", "dry_run", "device", "trainer", "nproc", "dist_timeout_minutes",
            "activation_checkpointing", "gradient_accumulation_steps", "loss_chunk_tokens", "compile",
            "compile_backend", "dataset_paths", "model.block_name", "model.attn_implementation", "n_eval_examples", "eval_batch_size", "eval_every",
            "do_first_eval", "progress_every", "save_every", "save_async", "save_hf_checkpoints", "keep_last",
            "resume_from", "resume_force", "preempt_signals", "n_samples", "max_new_tokens", "wandb", "hydra",
            "reference_logps", "peak_tflops")


def changes_the_math(key):
    """Whether the dotted config key (e.g. `lr`, `wandb.name`) is one that changes what is computed."""
    parts = key.split(".")
    return not any(".".join(parts[:i]) in NOT_MATH for i in range(1, len(parts) + 1))


def with_resolved_paths(cfg):
    """A copy of the resolved config for the run's config.yaml, with every local path the run read
    (datasets, dataset_paths, model and tokenizer) made absolute as train.py found it, so the file means
    the same from any working directory (report.py reads the data and models back). Registry names and
    hub ids are kept as written."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))

    def absolute(value):
        path = resolve_path(value) if isinstance(value, str) else None
        return str(path) if path is not None else value

    out.datasets = [absolute(name) for name in out.datasets]
    for name, value in (out.dataset_paths or {}).items():
        out.dataset_paths[name] = absolute(value)
    for key in ("name_or_path", "tokenizer_name_or_path"):
        out.model[key] = absolute(out.model[key])
    return out


DEFAULTS = {"loss": "ift", "model": "tiny"}  # the groups' default choices (config.yaml's defaults list)
GROUPS = {"loss": None, "model": Model, "lora": Lora}  # loss sections are declared by the registered losses


# ---------------------------------------------------------------- the command line

def rewrite_argv(argv):
    """argv (without the program name) with short loss keys written long (`gamma=0.9` ->
    `loss.gamma=0.9`, also with + or ++), after checking that every key it sets is declared.
    Hydra's own flags (-cn/--config-name, -cd, -m, --cfg, ... in their `=` and two-word forms) and
    hydra.* overrides pass untouched. Raises ConfigError naming an unknown key and the allowed ones."""
    takes_value = {s for a in get_args_parser()._actions if a.option_strings and a.nargs != 0 for s in a.option_strings}
    positions, flag_value = [], False  # where the overrides are; flag_value: this word is the flag's (`-cn config`)
    for i, arg in enumerate(argv):
        if not flag_value and not arg.startswith("-"):
            positions.append(i)
        flag_value = arg in takes_value
    overrides = expand_short_overrides([argv[i] for i in positions])
    check_overrides(overrides)
    out = list(argv)
    for i, arg in zip(positions, overrides):
        out[i] = arg
    return out


def expand_short_overrides(args):
    """Rewrite `gamma=0.95` as `loss.gamma=0.95` (keeping a + or ++) for keys that only losses
    declare, so users can write loss options the short way. Everything else passes as is."""
    top = {f.name for f in dataclasses.fields(Run)} | set(GROUPS)
    loss_keys = {f.name for cls in losses.LOSSES.values() for f in dataclasses.fields(cls)}
    out = []
    for arg in args:
        plus = arg[:len(arg) - len(arg.lstrip("+"))]
        key, eq, value = arg[len(plus):].partition("=")
        out.append(f"{plus}loss.{key}={value}" if eq and key in loss_keys and key not in top else arg)
    return out


def chosen_losses(args):
    """The loss names the overrides select (several in a --multirun sweep `loss=sft,ift`)."""
    names = [DEFAULTS["loss"]]
    for arg in args:
        key, eq, value = arg.lstrip("+").partition("=")
        if eq and key == "loss":
            value = value.removeprefix("choice(").removesuffix(")")
            names = [v.strip() for v in value.split(",")]
    return [n for n in names if n in losses.LOSSES]


def check_overrides(args):
    """Refuse an override (with or without +) of a key no declaration has, naming the allowed keys
    and the closest one, and a loss key for a loss that lacks it, naming the losses that have it.
    Group choices (loss=..., model=...), deletions (~key) and hydra.* are left to Hydra."""
    if any(a.lstrip("+").startswith("lora.") for a in args) and not any(a.startswith("lora=") for a in args):
        raise ConfigError("lora.* keys need lora=default on the command line too (LoRA is off by default)")
    for arg in args:
        key, eq, value = arg.lstrip("+").partition("=")
        if not eq or key.startswith("~") or key.split(".")[0] == "hydra":
            continue
        if key in GROUPS:
            _check_group_choice(key, value)
        elif key.startswith("loss."):
            _check_loss_key(key, key.removeprefix("loss."), chosen_losses(args))
        else:
            _check_declared(key)


def _check_group_choice(group, value):
    """loss=NAME, model=NAME, lora=NAME (or a sweep's NAME,NAME) against config/<group>/*.yaml: one line
    naming the choices, before Hydra's longer error."""
    names = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    for choice in value.removeprefix("choice(").removesuffix(")").split(","):
        choice = choice.strip()
        if choice not in names and not (group == "lora" and choice == "null"):
            extra = {"model": "; or add config/model/<name>.yaml (a copy of tiny.yaml), or set model.name_or_path",
                     "lora": "; null = full fine-tuning"}.get(group, "")
            raise ConfigError(f"{group}={choice} is not one of: {', '.join(names)} (config/{group}/*.yaml){extra}")


def _check_declared(key):
    """A dotted top-level or model key against Run / Model and their nested sections."""
    parts, declaration, prefix = key.split("."), Run, ""
    if parts[0] in ("model", "lora") and len(parts) > 1:
        parts, declaration, prefix = parts[1:], GROUPS[parts[0]], parts[0] + "."
    for part in parts:
        fields = {f.name: f.type for f in dataclasses.fields(declaration)} if declaration else {}
        if declaration is Run:
            fields.update(dict.fromkeys(GROUPS))  # loss=..., model=...: group choices
        if part not in fields:
            short = declaration is Run and len(parts) == 1  # `policy_dtype=...`: did you mean model.policy_dtype?
            sections = {f.name: f"{g}.{f.name}" for g in ("lora", "model") for f in dataclasses.fields(GROUPS[g])}
            raise unknown_key(key, fields, f"in {prefix[:-1]}" if prefix else "at the top level",
                              sections if short else None)
        declaration = fields[part] if dataclasses.is_dataclass(fields[part]) else None
        prefix += part + "."


def _check_loss_key(key, option_name, names):
    for name in names:
        allowed = [f.name for f in dataclasses.fields(losses.LOSSES[name])] + ["name"]
        if option_name in allowed:
            continue
        having = [n for n, cls in losses.LOSSES.items() if option_name in {f.name for f in dataclasses.fields(cls)}]
        if having:
            raise ConfigError(f"loss={name} has no key '{option_name}'; it belongs to loss="
                              f"{', loss='.join(having)} (the keys of loss={name}: {', '.join(sorted(allowed))})")
        raise unknown_key(key, allowed, f"of loss={name}")


# ---------------------------------------------------------------- the composed config

def check_keys(cfg):
    """Every key of a composed config against its declaration: unknown or missing keys, impossible
    values (type, allowed values, range). Raises ConfigError naming the key and what is allowed.
    Returns the run's losses.Loss (its keys are checked by building it)."""
    top = {k: v for k, v in cfg.items() if k not in GROUPS}
    check(top, Run, ignore=GROUPS)
    check(cfg.model, Model, "model.")
    if cfg.get("lora") is not None:  # chosen with lora=default
        check(cfg.lora, Lora, "lora.")
    return losses.build(cfg.loss)


def name_the_model(cfg):
    """Set model.name from a custom model.name_or_path while model.name is still the default model's
    (`tiny`), so that the run directory (exp_name) and labels say which model trained: the path's or hub
    id's last part (`Qwen/Qwen2-0.5B` -> Qwen2-0.5B; a run's `.../RUN/final` -> RUN). Changes cfg in place."""
    defaults = {f.name: f.default for f in dataclasses.fields(Model)}  # tiny.yaml's
    path, default = cfg.model.name_or_path, defaults["name_or_path"]
    if cfg.model.name != defaults["name"] or path == default or resolve_path(path) == resolve_path(default):
        return
    parts = [p for p in str(path).split("/") if p]
    cfg.model.name = parts[-2] if parts[-1] == "final" and len(parts) > 1 else parts[-1]


def check_run(cfg, world):
    """What no single key's declaration can say: combinations, the file system, the devices.
    world: the number of ranks the run will have. (What concerns resuming: checkpoints.plan_resume.)"""
    import torch

    from preference_datasets import DataError, check_dataset_names

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    if not use_cuda(cfg) and cfg.model.policy_dtype == "float16":  # float16 needs a GPU's kernels and loss scaling
        raise ConfigError("model.policy_dtype=float16 is not supported on the CPU; use bfloat16 (same speed, "
                          "no loss scaling needed) or float32, or run on a GPU")
    if cfg.get("reference_logps", "live") == "precompute" and not losses.build(cfg.loss).reference_precomputable:
        raise ConfigError(f"reference_logps=precompute keeps only the reference's summed log-probs per row; "
                          f"loss={cfg.loss.name} needs its whole distribution at every answer token: use "
                          f"reference_logps=live")
    if cfg.model.attn_implementation == "flash_attention_2":
        import importlib.util
        # flash-attn's kernels take float16/bfloat16 only; a float32 forward fails at its first call
        if cfg.model.policy_dtype == "float32":
            raise ConfigError("model.attn_implementation=flash_attention_2 needs model.policy_dtype=bfloat16 or "
                              "float16 (flash-attn has no float32 kernels); or use sdpa")
        if (cfg.model.reference_dtype == "float32" and losses.build(cfg.loss).needs_reference
                and not lora.enabled(cfg)):  # LoRA's reference is the policy itself
            raise ConfigError(f"model.attn_implementation=flash_attention_2 needs model.reference_dtype=bfloat16 "
                              f"or float16 for loss={cfg.loss.name}'s reference (flash-attn has no float32 "
                              f"kernels); or use sdpa")
        if not use_cuda(cfg):
            raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA device; use sdpa on the CPU")
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package "
                              "(pip install flash-attn --no-build-isolation); or use sdpa")
    if cfg.trainer == "BasicTrainer" and world > 1:
        raise ConfigError(f"trainer=BasicTrainer runs in one process, but {world} were launched; "
                          "use trainer=FSDPTrainer")
    if cfg.n_examples is not None and cfg.n_examples < cfg.batch_size:
        raise ConfigError(f"n_examples={cfg.n_examples} is smaller than batch_size={cfg.batch_size}: "
                          "no optimizer step to take; raise n_examples or lower batch_size")
    if cfg.batch_size % (cfg.gradient_accumulation_steps * world):
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by gradient_accumulation_steps × ranks "
                          f"= {cfg.gradient_accumulation_steps} × {world}")
    if cfg.eval_batch_size % world:
        raise ConfigError(f"eval_batch_size={cfg.eval_batch_size} must be divisible by the {world} ranks")
    lora.check_run(cfg, cuda=use_cuda(cfg))
    try:
        check_dataset_names(cfg.datasets, cfg.dataset_paths)
    except DataError as e:
        raise ConfigError(str(e)) from None
    for key in ("model.name_or_path", "model.tokenizer_name_or_path"):
        value = cfg.model[key.partition(".")[2]]
        if value is not None and resolve_path(value) is None and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConfigError(f"{key}={value} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1); "
                              f"point {key} at a local copy")


# ---------------------------------------------------------------- the YAML files, written from the declarations

CONFIG_HEADER = f"""\
# Every key of a run. Override any of them on the command line: `python train.py lr=1e-4 loss=sft`.
# Loss hyperparameters may be given short (`gamma=0.9`) or long (`loss.gamma=0.9`).
# The defaults train IFT on the bundled tiny model and sample data on the CPU; the commands/ scripts
# hold the paper's Mistral-7B recipes.
# The keys, defaults and comments are declared in training/config_schema.py (loss keys: in losses.py), and
# `python -m training.config_schema` writes this file, config/loss/*.yaml and config/lora/default.yaml from them.
defaults:
  - _self_
  - loss: {DEFAULTS['loss']}          # {' | '.join(losses.LOSSES)}   (config/loss/*.yaml)
  - model: {DEFAULTS['model']}        # tiny | mistral7b | zephyr7b-sft | llama7b | qwen2-0_5b | qwen2_5-0_5b-instruct | llama3_1-8b
  - lora: null         # null = full fine-tuning | default = LoRA through peft   (config/lora/default.yaml)
  - override hydra/job_logging: none
  - override hydra/hydra_logging: none
"""
HYDRA_BLOCK = """
hydra:
  run:
    dir: .             # hydra writes nothing of its own; the run dir is ours (run_dir)
  sweep:                # python train.py -m loss=sft,ift seed=0,1: one sweep folder, one run folder per job
    dir: ${sweep_dir:}  # run_dir=... (one for all jobs), else e.g. runs/sweep_loss+seed_2026-01-01_12-00-00
    subdir: ${sweep_job_name:}                              # e.g. loss=sft,seed=0 (the swept values)
  output_subdir: null
  job:
    chdir: false
"""
COMMENT_COLUMN = 23  # where comments start (model files: 36, their longer values)


def _yaml_value(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value != 0 and abs(value) < 1e-3:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_yaml_value, value)) + "]"
    return str(value)


def yaml_lines(declaration, values=None, indent="", column=COMMENT_COLUMN):
    """The YAML lines of a declaration: `key: value  # comment`, the values from `values` (a mapping)
    or else the declared defaults, the comments from the declaration, starting at `column`."""
    lines = []
    for field in dataclasses.fields(declaration):
        meta = field.metadata
        value = values[field.name] if values is not None else default_of(field)
        for line in (meta["before"] or "").split("\n") if meta["before"] else ():
            lines.append(f"{indent}# {line}" if line else "")
        nested = dataclasses.is_dataclass(field.type)
        text = f"{indent}{field.name}:" + ("" if nested else f" {_yaml_value(value)}")
        comment, *more = meta["comment"].split("\n")
        if comment:
            text = (text.ljust(column) if len(text) < column else text + "  ") + f"# {comment}"
        lines.append(text)
        lines += [" " * column + f"# {line}" for line in more]
        if nested:
            lines += yaml_lines(field.type, None if values is None else value, indent + "  ", column)
    return lines


def yaml_files():
    """{path: text} of every YAML file written from the declarations. A model file keeps its header
    comment and its values; its keys and their comments come from `Model`."""
    files = {CONFIG_DIR / "config.yaml": CONFIG_HEADER + "\n" + "\n".join(yaml_lines(Run)) + "\n" + HYDRA_BLOCK}
    for name, cls in losses.LOSSES.items():
        header = "".join(f"# {line.strip()}\n" for line in cls.__doc__.strip().split("\n"))
        files[CONFIG_DIR / "loss" / f"{name}.yaml"] = header + f"name: {name}\n" + "".join(
            line + "\n" for line in yaml_lines(cls))
    files[CONFIG_DIR / "lora" / "default.yaml"] = "".join(
        f"# {line.strip()}\n" for line in Lora.__doc__.strip().split("\n")) + "".join(
        line + "\n" for line in yaml_lines(Lora))
    for path in sorted((CONFIG_DIR / "model").glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))  # the leading comment
        values = OmegaConf.load(path)
        check(values, Model, "model.", where=f"in config/model/{path.name}")
        files[path] = header + "".join(line + "\n" for line in yaml_lines(Model, values, column=36))
    return files


# ---------------------------------------------------------------- docs/configuration.md, from the same declarations

CONFIGURATION_PAGE = REPO_DIR / "docs" / "configuration.md"
CONFIGURATION_PREAMBLE = """\
# Configuration

<!-- Written by `python -m training.config_schema` from the declarations; edit those, not this page. -->

Everything lives in `config/`: `config.yaml` (run, data, optimisation, logging), `loss/*.yaml` (one per
loss), `model/*.yaml` (one per model) and `lora/default.yaml`. Every key is commented there. Override
any key on the command line (`lr=1e-4`, `model=mistral7b`, `loss.gamma=0.9`); loss keys also work in
the short form (`gamma=0.9`).

**What is refused, before anything loads.** Unknown keys (named with the allowed ones and the closest
match, with or without a `+`), a loss key given to a loss that lacks it (`loss=sft gamma=0.9` names
`loss=ift`, which has it) and impossible values (a negative lr, a λ outside [0, 1], a batch size that
does not divide, an unknown dataset) stop the run with the allowed values in the message. Names from
other trainers get the key to use here (`learning_rate`, `lr_rate` -> `lr`; `num_train_epochs` ->
`n_epochs`; `per_device_train_batch_size` -> `batch_size`, which is the global batch; `max_steps` ->
`n_examples`; `output_dir` -> `run_dir`; ... `ALIASES` in `training/options.py`), and an unknown group
choice (`loss=foo`, `model=foo`) is one line naming the files of `config/loss/` or `config/model/`.

**Hydra's own flags** work as Hydra documents them: `-cn`/`--config-name`, `-cd`/`--config-dir`,
`--cfg job`, `-m`/`--multirun` (e.g. `-m lr=1e-4,1e-3 'run_dir=runs/lr_${lr}'`) and `hydra.*` overrides.

**Declared once.** Each key is a dataclass field with its default, allowed values or range and its
comment: top-level, model and lora keys in `training/config_schema.py`, each loss's keys on its class in
`losses.py`. The checks come from those declarations, and `python -m training.config_schema` writes
`config/config.yaml`, `config/loss/*.yaml`, `config/lora/default.yaml`, the keys and comments of
`config/model/*.yaml`, and this page from them (a test fails while a file differs). So a new option is
one `option(...)` line plus its test; a new model is a new `config/model/*.yaml` file.

The tables below are those declarations. The longer explanations are on each subject's page:
[data](data.md), [training runs and precision](training.md), [multi-GPU, checkpoints and
resume](distributed.md), [LoRA](lora.md), [memory and speed](performance.md), [the losses](losses.md)
and, for IFT's keys, [the IFT contract](ift_spec.md).
"""


def _md(text):
    """Text for a Markdown table cell: what a table or emphasis would take is escaped."""
    return text.replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;").replace(">", "&gt;")


def _allowed(field, annotation):
    """A field's allowed values in words: its choices, or its kind and range, and whether null is allowed."""
    meta = field.metadata
    base, optional = _kind(annotation)
    if meta["choices"] is not None:
        return ", ".join(_yaml_value(c) for c in meta["choices"])
    if base is bool:
        return "true, false"
    word = {int: "integer", float: "number", str: "text", list: "list"}.get(base, "")
    low, high = meta["low"], meta["high"]
    if low is not None and high is not None:
        word += f" in {'(' if meta['low_open'] else '['}{low}, {high}{')' if meta['high_open'] else ']'}"
    elif low is not None:
        word += f" {'>' if meta['low_open'] else '≥'} {low}"
    elif high is not None:
        word += f" {'<' if meta['high_open'] else '≤'} {high}"
    return word + (", or null" if optional else "")


def markdown_tables(declaration, prefix=""):
    """Markdown lines of a declaration's keys: tables of key, default, allowed values and comment. A key's
    `before` comment starts a new table under it (`---- title` as a heading, other text as a paragraph); a
    nested declaration's keys follow their section's row."""
    hints = typing.get_type_hints(declaration)
    lines, header = [], ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(declaration):
        meta = field.metadata
        if meta["before"] or not lines:
            before = (meta["before"] or "").strip()
            title = f"### {before.lstrip('- ')[:1].upper()}{before.lstrip('- ')[1:]}" if before.startswith("--") \
                else _md(before)
            lines += ([""] if lines else []) + ([title, ""] if title else []) + header
        comment = _md(" ".join(part.strip() for part in meta["comment"].split("\n"))) or "—"
        if dataclasses.is_dataclass(field.type):
            lines.append(f"| `{prefix}{field.name}` | | the keys below | {comment} |")
            lines += markdown_tables(field.type, f"{prefix}{field.name}.")[2:]  # its rows, under this header
            continue
        default = _md(_yaml_value(default_of(field)))
        lines.append(f"| `{prefix}{field.name}` | `{default}` | {_md(_allowed(field, hints[field.name]))} | {comment} |")
    return lines


def configuration_markdown():
    """The text of docs/configuration.md: the preamble, then every declared key in tables (config.yaml's top
    level, the model files and their keys, LoRA, each loss), written as `python -m training.config_schema`
    writes the YAML files."""
    out = [CONFIGURATION_PREAMBLE, "## `config/config.yaml`", "",
           "The top-level keys; the `loss`, `model` and `lora` groups are chosen on the command line "
           f"(`loss={DEFAULTS['loss']}`, `model={DEFAULTS['model']}` and no LoRA by default) and have their "
           "own keys below.", ""]
    out += markdown_tables(Run)
    out += ["", "## `config/model/*.yaml`", "",
            "One file per model (`model=NAME`); a new model is a new file, or set `model.name_or_path`. "
            "The files:", "", "| `model=` | `name_or_path` | `policy_dtype` | `block_name` | about it |",
            "|---|---|---|---|---|"]
    for path in sorted((CONFIG_DIR / "model").glob("*.yaml")):
        values = OmegaConf.load(path)
        about = " ".join(line.lstrip("#").strip() for line in path.read_text(encoding="utf-8").splitlines()
                         if line.startswith("#"))
        out.append(f"| `{path.stem}` | `{values.name_or_path}` | {values.policy_dtype} | {values.block_name} | "
                   f"{_md(about)} |")
    out += ["", "Their keys (the defaults are `tiny.yaml`'s):", ""] + markdown_tables(Model, "model.")
    out += ["", "## `config/lora/default.yaml`", "", _md(" ".join(Lora.__doc__.split())),
            "Its keys exist when `lora=default` is on the command line; `lora` is null (full fine-tuning) "
            "otherwise.", ""] + markdown_tables(Lora, "lora.")
    out += ["", "## `config/loss/*.yaml`", "", f"One file per loss (`loss=NAME`): {', '.join(losses.LOSSES)}.",
            "`name` is the loss's own; the other keys are its options."]
    for name, cls in losses.LOSSES.items():
        out += ["", f"### `loss={name}`", "", _md(" ".join(cls.__doc__.split())), ""]
        out += markdown_tables(cls, "loss.") if dataclasses.fields(cls) else ["No keys."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    for path, text in yaml_files().items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(REPO_DIR)}", file=sys.stderr)
    if not CONFIGURATION_PAGE.exists() or CONFIGURATION_PAGE.read_text(encoding="utf-8") != configuration_markdown():
        CONFIGURATION_PAGE.write_text(configuration_markdown(), encoding="utf-8")
        print(f"wrote {CONFIGURATION_PAGE.relative_to(REPO_DIR)}", file=sys.stderr)
