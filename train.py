"""Fine-tune a causal LM with IFT, SFT, DPO, IPO or ORPO.

    python train.py                                   # IFT on the bundled tiny model and sample data (CPU)
    python train.py loss=sft lr=1e-4 n_epochs=2       # any key of config/, Hydra syntax
    python train.py loss=ift gamma=0.9                # loss keys may be given short (== loss.gamma=0.9)
    python train.py trainer=FSDPTrainer               # FSDP2, one process per GPU (or nproc on the CPU)
    torchrun --nnodes 2 --nproc_per_node 8 train.py trainer=FSDPTrainer ...   # joins torchrun's launch

Order of work: validate the config, check every dataset row (errors name file, row and field), and
only then load models, so a typo never costs a 7B model load.
"""

import contextlib
import datetime
import os
import socket
import sys
from pathlib import Path

# Before torch starts OpenMP: waiting threads sleep instead of spinning. On a CPU shared with other
# processes, spinning threads made single steps stall for seconds (a 100-step tiny run took 104 s
# instead of 20 s on 2 loaded cores); an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import checkpoints  # noqa: E402
from utils import REPO_DIR, ConfigError, barrier, broadcast_object, is_main, launched_by_torchrun, \
    main_process_first, resolve_path, set_seed  # noqa: E402

CONFIG_DIR = REPO_DIR / "config"
LOSS_NAMES = ("sft", "ift", "dpo", "ipo", "orpo")
DTYPES = ("float32", "bfloat16", "float16")
# The keys each loss takes, with their allowed values (None = any value passing the range check below).
LOSS_KEYS = {
    "sft": {},
    "ift": {"min_lambda": None, "max_lambda": None, "lambda_schedule": (None, "linear", "warmup"),
            "lambda_disturb": (None, "normal"), "disturb_std": None, "gamma": None,
            "propagation_type": ("loss", "mask", "logps"), "propagation_side": ("left", "right"),
            "propagation_norm": ("L1", "L2", "softmax", "log")},
    "dpo": {"beta": None, "label_smoothing": None, "reference_free": (True, False)},
    "ipo": {"beta": None, "reference_free": (True, False)},
    "orpo": {"beta": None},
}


# ---------------------------------------------------------------- command line

def expand_short_overrides(args):
    """Rewrite `gamma=0.95` as `loss.gamma=0.95` for keys that exist only in config/loss/*.yaml, so
    users can write loss hyperparameters the short way. Top-level keys and everything else pass as is."""
    top_level = set(OmegaConf.load(CONFIG_DIR / "config.yaml").keys())
    loss_keys = {k for v in LOSS_KEYS.values() for k in v}
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key in loss_keys and key not in top_level:
            arg = f"loss.{key}={value}"
        out.append(arg)
    return out


def check_override_keys(args):
    """Name an unknown key on the command line with the keys allowed there (and the closest one),
    instead of Hydra's generic 'not in struct'. Group choices (loss=..., model=...), appends (+key)
    and deletions (~key) are left to Hydra."""
    import difflib

    top = OmegaConf.load(CONFIG_DIR / "config.yaml")
    sections = {"model": OmegaConf.load(CONFIG_DIR / "model" / "tiny.yaml"), "wandb": top.wandb,
                "dataset_paths": top.dataset_paths, "loss": {k: None for v in LOSS_KEYS.values() for k in v}}
    for arg in args:
        key, eq, _ = arg.partition("=")
        if not eq or key[:1] in "+~" or key.startswith("hydra"):
            continue
        head, _, rest = key.partition(".")
        if not rest:
            allowed = [k for k in top if k not in ("defaults", "hydra")] + ["loss", "model"]
        elif head in sections and "." not in rest:
            key, allowed = rest, list(sections[head]) + (["name"] if head == "loss" else [])
        else:
            continue
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = f"in {head}" if rest else "at the top level"
            raise ConfigError(f"unknown config key '{arg.partition('=')[0]}'{hint}; keys {where}: "
                              f"{', '.join(sorted(allowed))}")


# ---------------------------------------------------------------- config checks (before anything loads)

def _number(cfg, key, low=None, high=None, low_open=False, high_open=False, integer=False, optional=False):
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(f"{key} must be {kind}, got {value!r}")
    lo_ok = low is None or (value > low if low_open else value >= low)
    hi_ok = high is None or (value < high if high_open else value <= high)
    if not (lo_ok and hi_ok):
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        raise ConfigError(f"{key}={value} is out of range: allowed {lo or '(-inf'}, {hi or 'inf)'}")


def _choice(cfg, key, allowed):
    value = OmegaConf.select(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def validate_config(cfg, world=None):
    """Raise ConfigError naming the key and the allowed values for anything impossible."""
    from preference_datasets import DataError, SOURCES, check_dataset_name

    _choice(cfg, "loss.name", LOSS_NAMES)
    name = cfg.loss.name
    unknown = set(cfg.loss.keys()) - set(LOSS_KEYS[name]) - {"name"}
    if unknown:
        allowed = ", ".join(sorted(LOSS_KEYS[name])) or "none"
        raise ConfigError(f"unknown key(s) {', '.join(sorted('loss.' + k for k in unknown))} for loss={name}; "
                          f"its keys are: {allowed}")
    for key, allowed in LOSS_KEYS[name].items():
        if allowed is not None:
            _choice(cfg, f"loss.{key}", allowed)
    if name == "ift":
        for key in ("min_lambda", "max_lambda", "gamma"):
            _number(cfg, f"loss.{key}", 0, 1)
        _number(cfg, "loss.disturb_std", 0)
    if name in ("dpo", "ipo"):
        _number(cfg, "loss.beta", 0, low_open=True)
    if name == "dpo":
        _number(cfg, "loss.label_smoothing", 0, 0.5, high_open=True)
    if name == "orpo":
        _number(cfg, "loss.beta", 0)

    _number(cfg, "lr", 0, low_open=True)
    _number(cfg, "weight_decay", 0)
    _number(cfg, "batch_size", 1, integer=True)
    _number(cfg, "eval_batch_size", 1, integer=True)
    _number(cfg, "gradient_accumulation_steps", 1, integer=True)
    _number(cfg, "n_epochs", 1, integer=True)
    _number(cfg, "n_examples", 1, integer=True, optional=True)
    _number(cfg, "warmup_steps", 0, integer=True)
    _number(cfg, "warmup_ratio", 0, 1, high_open=True, optional=True)
    _number(cfg, "max_grad_norm", 0, low_open=True, optional=True)
    _number(cfg, "max_length", 2, integer=True)
    _number(cfg, "max_prompt_length", 1, cfg.max_length if isinstance(cfg.max_length, int) else None, integer=True)
    _number(cfg, "eval_every", 1, integer=True)
    _number(cfg, "n_eval_examples", 1, integer=True, optional=True)
    _number(cfg, "n_samples", 0, integer=True)
    _number(cfg, "save_every", 1, integer=True, optional=True)
    _number(cfg, "max_new_tokens", 1, integer=True)
    _number(cfg, "seed", 0, integer=True)
    _number(cfg, "nproc", 1, integer=True, optional=True)
    _choice(cfg, "optimizer", ("RMSprop", "AdamW"))
    _choice(cfg, "lr_schedule", ("constant", "cosine"))
    _choice(cfg, "device", ("auto", "cpu", "cuda"))
    _choice(cfg, "trainer", ("BasicTrainer", "FSDPTrainer"))
    _choice(cfg, "wandb.mode", ("online", "offline", "disabled"))
    _choice(cfg, "model.policy_dtype", DTYPES)
    _choice(cfg, "model.reference_dtype", DTYPES)
    _choice(cfg, "model.trust_remote_code", (True, False))
    _choice(cfg, "on_nonfinite", ("error", "skip"))
    _number(cfg, "max_skipped_steps", 1, integer=True)
    if not _use_cuda(cfg) and cfg.model.policy_dtype == "float16":  # float16 needs a GPU's kernels and loss scaling
        raise ConfigError("model.policy_dtype=float16 is not supported on the CPU; use bfloat16 (same speed, "
                          "no loss scaling needed) or float32, or run on a GPU")
    if cfg.run_dir is not None and holds_run(Path(cfg.run_dir)) and not checkpoints.resumes_in_place(cfg):
        raise ConfigError(f"run_dir={cfg.run_dir} already holds a run; choose another run_dir, or continue it "
                          "with resume_from=latest")
    checkpoints.validate(cfg)  # checkpoint keys, and the fingerprint of the checkpoint to resume
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")

    world = world or planned_world_size(cfg)
    if cfg.trainer == "BasicTrainer" and world > 1:
        raise ConfigError(f"trainer=BasicTrainer runs in one process, but {world} were launched; "
                          "use trainer=FSDPTrainer")
    per_step = cfg.gradient_accumulation_steps * world
    if cfg.batch_size % per_step:
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by gradient_accumulation_steps × ranks "
                          f"= {cfg.gradient_accumulation_steps} × {world}")
    if cfg.eval_batch_size % world:
        raise ConfigError(f"eval_batch_size={cfg.eval_batch_size} must be divisible by the {world} ranks")

    if not OmegaConf.is_list(cfg.datasets) or len(cfg.datasets) == 0:
        raise ConfigError(f"datasets must be a non-empty list like [ultrachat_sample], got {cfg.datasets!r}")
    extra = set(cfg.dataset_paths or {}) - set(SOURCES)
    if extra:
        raise ConfigError(f"dataset_paths has unknown name(s) {sorted(extra)}; allowed: {', '.join(sorted(SOURCES))}")
    for d in cfg.datasets:
        try:
            check_dataset_name(str(d), cfg.dataset_paths)
        except DataError as e:
            raise ConfigError(str(e)) from None
    for key in ("model.name_or_path", "model.tokenizer_name_or_path"):
        value = OmegaConf.select(cfg, key)
        if value is not None and resolve_path(value) is None and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConfigError(f"{key}={value} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1); "
                              f"point {key} at a local copy")


def planned_world_size(cfg):
    """How many ranks this run will have: torchrun's WORLD_SIZE, or the processes FSDPTrainer starts."""
    if launched_by_torchrun():
        return int(os.environ["WORLD_SIZE"])
    if cfg.trainer != "FSDPTrainer":
        return 1
    if cfg.nproc is not None:
        return cfg.nproc
    return torch.cuda.device_count() if _use_cuda(cfg) else 2


def _use_cuda(cfg):
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


# ---------------------------------------------------------------- building blocks

def holds_run(path):
    """Whether a directory already holds a run's metrics or final model (which must not be overwritten)."""
    return (path / "metrics.jsonl").exists() or (path / "final").exists()


def make_run_dir(cfg):
    """The run directory, created by rank 0 and shared with the others. Refuses a directory that
    already holds a run, so nothing written earlier is overwritten."""
    path = None
    if is_main():
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        path = Path(cfg.run_dir or f"runs/{cfg.exp_name}_{stamp}").resolve()
        if holds_run(path) and not checkpoints.resumes_in_place(cfg):
            raise ConfigError(f"run_dir={path} already holds a run; choose another run_dir")
        path.mkdir(parents=True, exist_ok=True)
        checkpoints.prepare_run_dir(cfg, path)  # in place: leftovers removed, metrics cut to the checkpoint
    return Path(broadcast_object(str(path)))


def load_tokenizer(cfg):
    from transformers import AutoTokenizer
    from preference_datasets import ensure_chat_template

    name = cfg.model.tokenizer_name_or_path or cfg.model.name_or_path
    path = resolve_path(name)
    tokenizer = AutoTokenizer.from_pretrained(str(path or name), trust_remote_code=cfg.model.trust_remote_code)
    tokenizer.padding_side = "right"
    return ensure_chat_template(tokenizer)


def load_model(cfg, dtype, name_or_path=None, weights=True):
    """The model's weights from a hub id or directory. Under FSDPTrainer with several ranks only rank 0
    reads them; the others build the architecture on the meta device (no memory) and receive their
    shards from rank 0 when the trainer shards the model, so a node holds one copy in host memory.
    weights=False (a resumed run): no rank reads them; parameters stay on the meta device until the
    trainer gives them storage for the checkpoint's shards."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name = name_or_path or cfg.model.name_or_path
    name_or_path = str(resolve_path(name) or name)  # a local directory, else a hub id
    kw = dict(dtype=getattr(torch, dtype), trust_remote_code=cfg.model.trust_remote_code)
    if not weights:
        from transformers import GenerationConfig
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=cfg.model.trust_remote_code)
        with checkpoints.parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, **kw)
        with contextlib.suppress(OSError):  # as from_pretrained would: the model's own generation settings
            model.generation_config = GenerationConfig.from_pretrained(name_or_path)
        return model
    if cfg.trainer == "FSDPTrainer" and dist.is_initialized() and dist.get_world_size() > 1 and not is_main():
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=cfg.model.trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, **kw)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kw)


def load_data(cfg, tokenizer, pairs, eot_token=None):
    from preference_datasets import load_split

    kw = dict(tokenizer=tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, pairs=pairs,
              dataset_paths=OmegaConf.to_container(cfg.dataset_paths) if cfg.dataset_paths else None,
              eot_token=eot_token)
    with main_process_first():
        train = load_split(cfg.datasets, "train", **kw)
        evals = load_split(cfg.datasets, "test", **kw)
    if cfg.n_eval_examples is not None and len(evals) > cfg.n_eval_examples:
        evals = _first_rows(evals, cfg.n_eval_examples)
    return train, evals


def _first_rows(data, n):
    from dataclasses import replace
    cut = lambda xs: xs[:n] if xs is not None else None  # noqa: E731
    return replace(data, prompt_ids=cut(data.prompt_ids), chosen_ids=cut(data.chosen_ids),
                   rejected_ids=cut(data.rejected_ids), prompts=cut(data.prompts), answers=cut(data.answers),
                   origins=cut(data.origins))


def check_data(cfg, tokenizer, eot_token, train_data, eval_data):
    """Refuse, before any model loads and before the run dir exists, a run that cannot take one
    optimizer step or whose label masks are wrong (preference_datasets.mask_audit); returns the
    mask audit of one training row, to print."""
    from preference_datasets import DataError, mask_audit

    if len(train_data) < cfg.batch_size:
        raise DataError(f"datasets={list(cfg.datasets)} have {len(train_data)} training rows, fewer than one batch "
                        f"(batch_size={cfg.batch_size}); lower batch_size or add rows")
    if cfg.n_examples is not None and cfg.n_examples < cfg.batch_size:
        raise ConfigError(f"n_examples={cfg.n_examples} is smaller than batch_size={cfg.batch_size}: "
                          "no optimizer step to take; raise n_examples or lower batch_size")
    mask_audit(eval_data, tokenizer, eot_token)
    return mask_audit(train_data, tokenizer, eot_token)


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
    model.eval()
    out = []
    for prompt, ids, ref in list(zip(data.prompts, data.prompt_ids, data.answers))[:n]:
        gen = model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), device=device,
                             dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True).strip()
        out.append({"prompt": prompt[-1]["content"], "reference": ref, "answer": answer,
                    "exact": answer == ref.strip()})
    return out


# ---------------------------------------------------------------- one process of a run

def run(cfg, local_rank=0, world=1, port=None):
    """Everything one rank does: join the process group, check and load the data, make the run dir,
    load the models, train, report. Returns checkpoints.EXIT_PREEMPTED when a signal stopped the
    run (after saving a checkpoint), else 0."""
    import losses
    from preference_datasets import end_of_turn_token
    from trainers import TRAINERS

    cfg = OmegaConf.create(cfg)
    cuda = _use_cuda(cfg)
    backend = "nccl" if cuda else "gloo"
    if port is not None:  # one of the processes launch() started (no environment variables are touched)
        if cuda:
            torch.cuda.set_device(local_rank)
        elif "OMP_NUM_THREADS" not in os.environ:
            # CPU ranks share the cores: more threads than cores make OpenMP barriers stall for seconds
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=local_rank, world_size=world)
    elif launched_by_torchrun():  # torchrun set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
        local_rank = int(os.environ["LOCAL_RANK"])
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    try:
        set_seed(cfg.seed)
        tokenizer = load_tokenizer(cfg)
        eot_token = end_of_turn_token(tokenizer, cfg.model.eot_token)
        train_data, eval_data = load_data(cfg, tokenizer, pairs=losses.needs_pairs(cfg.loss), eot_token=eot_token)
        audit = check_data(cfg, tokenizer, eot_token, train_data, eval_data)
        checkpoint = broadcast_object(checkpoints.resume_checkpoint(cfg))  # rank 0's view of run_dir
        if checkpoint is not None:  # tokenised data that changed since the checkpoint: refused before any write
            checkpoints.check_fingerprint(cfg, checkpoint, train_data)
        run_dir = make_run_dir(cfg)  # only once the data is known to be good
        if is_main():
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
            print(f"data: {len(train_data)} train / {len(eval_data)} eval rows\n{audit}")
        # The policy's parameters are float32 in every trainer (policy_dtype is only the compute dtype):
        # updates of lr x (Adam's ~1) are far below bfloat16's resolution of a weight and would round away.
        # A resumed run reads no base weights: each rank reads its shards of the checkpoint's instead.
        policy = load_model(cfg, "float32", weights=checkpoint is None)
        stop_at_end_of_turn(policy, tokenizer, eot_token)
        # the reference is always the original model
        reference = load_model(cfg, cfg.model.reference_dtype) if losses.needs_reference(cfg.loss) else None
        trainer = TRAINERS[cfg.trainer](cfg, policy, reference, tokenizer, train_data, eval_data, run_dir, device)
        if checkpoint is not None:
            trainer.resume(checkpoint)
        with checkpoints.preemption_signals(cfg.preempt_signals):
            trainer.train()
        if trainer.preempted:
            return checkpoints.EXIT_PREEMPTED
        if is_main():
            print(f"run dir: {run_dir}")
            print(f"non-padding fraction of processed tokens: {trainer.padding_stats():.3f}")
            first, last = trainer.eval_losses[0], trainer.eval_losses[-1]
            print(f"eval loss: {first:.4f} -> {last:.4f} ({(last - first) / first:+.0%} over the run)")
        if cfg.n_samples > 0 and is_main():
            # a sharded policy cannot generate on one rank alone: reload the saved final/ instead
            model = load_model_dir(run_dir / "final", device) if dist.is_initialized() else trainer.policy
            report_samples(greedy_samples(model, tokenizer, eval_data, cfg.n_samples, cfg.max_new_tokens, device),
                           run_dir)
        barrier()
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def load_model_dir(path, device):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path)).to(device)


def report_samples(samples, run_dir):
    import json
    with open(run_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    for s in samples[:5]:
        print(f"\nQ: {s['prompt']}\nmodel: {s['answer']}\nreference: {s['reference']}\n"
              f"{'exact match' if s['exact'] else 'different'}")
    rate = sum(s["exact"] for s in samples) / len(samples)
    print(f"\nheld-out exact match: {rate:.2f} ({sum(s['exact'] for s in samples)}/{len(samples)} greedy answers)")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@hydra.main(config_path="config", config_name="config", version_base=None)
def main(cfg: DictConfig):
    from preference_datasets import DataError
    from trainers import NonFiniteError
    try:
        validate_config(cfg)
        if checkpoints.finished_in_place(cfg):  # e.g. a job requeued after its run completed
            print(f"run_dir={cfg.run_dir} holds a finished run (final/); nothing to resume")
            return
        status = launch(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except DataError as e:  # a bad file or row: the message names it; a traceback would only bury it
        sys.exit(f"data error: {e}")
    except NonFiniteError as e:  # names the step and the metric; what was written before it stays
        sys.exit(f"training stopped: {e}")
    sys.exit(status)  # checkpoints.EXIT_PREEMPTED after a preemption signal (checkpoint written)


def launch(cfg):
    """Run in this process, or start FSDPTrainer's processes (one per GPU, or nproc) when torchrun did not.
    Returns the exit status: 0, or checkpoints.EXIT_PREEMPTED when a signal stopped the run."""
    cfg = OmegaConf.create(cfg)
    world = planned_world_size(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if cfg.trainer != "FSDPTrainer" or launched_by_torchrun():
        return run(resolved)
    elif world == 1:  # FSDP2 needs a process group even for one rank
        return run(resolved, 0, 1, _free_port())
    import torch.multiprocessing as mp
    try:
        # the launched processes get the scheduler's signals forwarded from this one
        return checkpoints.spawn(_spawned, (resolved, world, _free_port()), world, cfg.preempt_signals)
    except mp.ProcessRaisedException as e:
        _reraise_one_line_error(e)
        raise


def _reraise_one_line_error(e):
    """A spawned rank's error arrives as its traceback text; raise the errors whose message says it all
    (a non-finite step: every rank stops at the same step) as themselves, for main's one-line exit."""
    from trainers import NonFiniteError
    last = str(e).strip().splitlines()[-1]
    for cls in (NonFiniteError,):
        prefix = f"{cls.__module__}.{cls.__qualname__}: "
        if last.startswith(prefix):
            raise cls(last[len(prefix):]) from None


def _spawned(local_rank, cfg, world, port):
    status = run(cfg, local_rank, world, port)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    sys.argv = sys.argv[:1] + expand_short_overrides(sys.argv[1:])
    try:
        check_override_keys(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    main()
