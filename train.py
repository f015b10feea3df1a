"""Fine-tune a causal LM with IFT, SFT, DPO, IPO, ORPO, DFT or SimPO.

    python train.py                                   # IFT on the bundled tiny model and sample data (CPU)
    python train.py loss=sft lr=1e-4 n_epochs=2       # any key of config/, Hydra syntax
    python train.py loss=ift gamma=0.9                # loss keys may be given short (== loss.gamma=0.9)
    python train.py trainer=FSDPTrainer               # FSDP2, one process per GPU (or nproc on the CPU)
    torchrun --nnodes 2 --nproc_per_node 8 train.py trainer=FSDPTrainer ...   # joins torchrun's launch

A run is compose (Hydra, `main`) -> check (config_schema.py's declarations, `validate_config`) ->
build (data, run directory, models: `build`) -> launch (`launch`) -> train and report (`run`). Every
dataset row is checked before any model loads, so a typo never costs a 7B model load.
"""

import contextlib
import json
import shutil
import sys
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

import checkpoints
import config_schema
import launch as launcher
import lora
import losses
import planning
from utils import ConfigError, barrier, broadcast_object, is_main, main_process_first, make_run_dir, resolve_path, \
    set_seed


# ---------------------------------------------------------------- compose and check

def main():
    """The command line: short loss keys and unknown keys are handled before Hydra composes."""
    try:
        sys.argv[1:] = config_schema.rewrite_argv(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    compose_and_launch()


@hydra.main(config_path="config", config_name="config", version_base=None)
def compose_and_launch(cfg: DictConfig):
    from preference_datasets import DataError
    from trainers import NonFiniteError
    try:
        validate_config(sweep_run_dir(cfg))
        if cfg.dry_run:  # the data and the plan, without a model, a run directory or wandb
            return planning.dry_run(cfg, load_tokenizer, load_data)
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
    if status:  # checkpoints.EXIT_PREEMPTED after a preemption signal (checkpoint written)
        sys.exit(status)


# ---------------------------------------------------------------- sweeps (python train.py -m ...)

def swept_keys(argv=None):
    """The keys a `-m` command line sweeps: `loss=sft,ift seed=0,1 lr=1e-3` -> ['loss', 'seed']."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(args) if o.is_sweep_override()]


def sweep_job_name():
    """hydra.sweep.subdir: this job's values of the swept keys, e.g. 'loss=sft,seed=0', so the jobs of a
    sweep are told apart by what differs between them (a '/' in a value becomes '_')."""
    from hydra.core.hydra_config import HydraConfig

    swept = set(swept_keys())
    parts = [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]
    return ",".join(parts).replace("/", "_") or f"job{HydraConfig.get().job.num}"


def sweep_dir(argv=None):
    """hydra.sweep.dir: the command's run_dir when it sets one for all jobs (they run in its sub-folders),
    else runs/sweep_<swept keys>_<date_time>. A run_dir that interpolates a swept key (run_dir=runs/lr_${lr})
    names each job's own folder instead, and the sweep folder is left out (sweep_run_dir)."""
    import datetime
    for arg in (sys.argv[1:] if argv is None else argv):
        key, eq, value = arg.lstrip("+").partition("=")
        if key == "run_dir" and eq and "${" not in value and value != "null":
            return value
    return f"runs/sweep_{'+'.join(swept_keys(argv)) or 'none'}_{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}"


def sweep_size(argv=None):
    """How many jobs a `-m` command line runs: the product of the swept keys' numbers of values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    n = 1
    for o in OverridesParser.create().parse_overrides(args):
        if o.is_sweep_override():
            n *= len(list(o.sweep_string_iterator()))
    return n


# config.yaml names a sweep directory and its jobs' folders with these (hydra.sweep.dir / subdir)
OmegaConf.register_new_resolver("sweep_dir", sweep_dir, replace=True, use_cache=True)  # one time stamp per sweep
OmegaConf.register_new_resolver("sweep_job_name", sweep_job_name, replace=True)


def sweep_run_dir(cfg):
    """Under `python train.py -m`, each job runs in its own folder of the sweep directory
    (hydra.sweep.dir / hydra.sweep.subdir, which Hydra has created; hydra.sweep.dir is run_dir when
    the command sets it), and says which job of how many it is."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        hydra = HydraConfig.get()
        job_dir, sweep = Path(hydra.runtime.output_dir), Path(hydra.sweep.dir)
        if cfg.run_dir is None or Path(cfg.run_dir).resolve() == sweep.resolve():
            cfg.run_dir = str(job_dir)
        else:  # each job names its own run_dir: Hydra's folders for it would be litter
            with contextlib.suppress(OSError):
                job_dir.rmdir()
                outside = sweep.resolve() not in Path(cfg.run_dir).resolve().parents
                if outside and {p.name for p in sweep.iterdir()} <= {"multirun.yaml"}:
                    shutil.rmtree(sweep)
                    sweep.parent.rmdir()  # runs/, when the sweep made it and nothing else is there
        print(f"job {hydra.job.num + 1}/{sweep_size()}: {sweep_job_name()} -> {cfg.run_dir}", flush=True)
    return cfg


def validate_config(cfg, world=None):
    """Raise ConfigError naming the key and what is allowed, before anything loads. world: the ranks."""
    config_schema.check_keys(cfg)
    config_schema.check_run(cfg, world or launcher.planned_world_size(cfg))


def launch(cfg):
    """Run in this process, or start FSDPTrainer's processes (one per GPU, or nproc) when torchrun did not.
    Returns the exit status: 0, or checkpoints.EXIT_PREEMPTED when a signal stopped the run."""
    return launcher.launch(run, OmegaConf.to_container(cfg, resolve=True), cfg.preempt_signals)


# ---------------------------------------------------------------- build

def load_tokenizer(cfg):
    from transformers import AutoTokenizer
    from preference_datasets import ensure_chat_template

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
        with checkpoints.parameters_on_meta():
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


def load_data(cfg, tokenizer, pairs, eot_token=None):
    from preference_datasets import load_split

    kw = dict(tokenizer=tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, pairs=pairs,
              dataset_paths=OmegaConf.to_container(cfg.dataset_paths) if cfg.dataset_paths else None,
              eot_token=eot_token, min_answer_tokens=cfg.min_answer_tokens, num_proc=cfg.num_proc,
              log=print if is_main() else None)
    with main_process_first():  # rank 0 reads and tokenises into the cache; the others then map its files
        train = load_split(cfg.datasets, "train", **kw, rows_per_dataset=cfg.rows_per_dataset, seed=cfg.seed)
        evals = load_eval_split(cfg.datasets, kw)
    if cfg.n_eval_examples is not None and len(evals) > cfg.n_eval_examples:
        evals = evals.first(cfg.n_eval_examples)
    return train, evals


def load_eval_split(datasets, kw):
    """The held-out rows, with their rejected answers whenever every row has one (whatever the loss),
    so that every method's evaluation reports the same preference metrics (margin, pref_accuracy)."""
    from preference_datasets import DataError, load_split
    if not kw["pairs"]:
        try:
            return load_split(datasets, "test", **{**kw, "pairs": True})
        except DataError:  # a dataset without rejected answers (or a bad row, which the next call names)
            pass
    return load_split(datasets, "test", **kw)


def check_data(cfg, tokenizer, eot_token, train_data, eval_data):
    """Refuse, before any model loads and before the run dir exists, a run that cannot take one
    optimizer step or whose label masks are wrong (preference_datasets.mask_audit); returns the
    mask audit of one training row, to print."""
    from preference_datasets import DataError, mask_audit

    if len(train_data) < cfg.batch_size:
        raise DataError(f"datasets={list(cfg.datasets)} have {len(train_data)} training rows, fewer than one batch "
                        f"(batch_size={cfg.batch_size}); lower batch_size or add rows")
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


def build(cfg, device):
    """This rank's trainer: tokenizer and data (checked row by row), then the run directory, then the
    models, in that order, so bad data costs no model load and leaves no run directory."""
    from preference_datasets import end_of_turn_token
    from trainers import TRAINERS

    loss = losses.build(cfg.loss)
    tokenizer = load_tokenizer(cfg)
    eot_token = end_of_turn_token(tokenizer, cfg.model.eot_token)
    train_data, eval_data = load_data(cfg, tokenizer, pairs=loss.needs_pairs, eot_token=eot_token)
    audit = check_data(cfg, tokenizer, eot_token, train_data, eval_data)
    checkpoint = broadcast_object(checkpoints.resume_checkpoint(cfg))  # rank 0's view of run_dir
    if checkpoint is not None:  # tokenised data that changed since the checkpoint: refused before any write
        checkpoints.check_fingerprint(cfg, checkpoint, train_data)
    run_dir = make_run_dir(cfg.run_dir, cfg.exp_name, in_place=checkpoints.resumes_in_place(cfg))
    if is_main():
        checkpoints.prepare_run_dir(cfg, run_dir)  # in place: leftovers removed, metrics cut to the checkpoint
        OmegaConf.save(config_schema.with_resolved_paths(cfg), run_dir / "config.yaml")
        print(f"data: {len(train_data)} train / {len(eval_data)} eval rows\n{audit}")
    # float32 parameters in every trainer (policy_dtype is only the compute dtype): updates of lr x (Adam's ~1)
    # are far below bfloat16's resolution of a weight and would round away. Checkpoints hold them as trained.
    # With LoRA only the adapters train (float32, lora.py); the frozen base stays in policy_dtype: the memory saved.
    # A resumed run (without LoRA) reads no base weights: each rank reads its shards of the checkpoint's instead.
    policy = load_model(cfg, cfg.model.policy_dtype if lora.enabled(cfg) else "float32",
                        weights=not checkpoints.builds_without_weights(cfg), **lora.load_kwargs(cfg))
    stop_at_end_of_turn(policy, tokenizer, eot_token)
    if lora.enabled(cfg):  # adapters on a frozen base, which is also DPO/IPO's reference (trainers.py)
        policy, reference = lora.apply(cfg, policy), None
    else:
        reference = load_model(cfg, cfg.model.reference_dtype) if loss.needs_reference else None  # the original model
    trainer = TRAINERS[cfg.trainer](cfg, policy, reference, tokenizer, train_data, eval_data, run_dir, device)
    if checkpoint is not None:
        trainer.resume(checkpoint)
    return trainer


# ---------------------------------------------------------------- train (one process of a run)

def run(cfg, local_rank=0, world=1, port=None):
    """Everything one rank does: join the process group, build, train, report. Returns
    checkpoints.EXIT_PREEMPTED when a signal stopped the run (after saving a checkpoint), else 0."""
    cfg = OmegaConf.create(cfg)  # a plain dict from launch
    with launcher.process_group(cfg, local_rank, world, port) as device:
        set_seed(cfg.seed)
        # from before the run dir exists: a signal while the data or models load ends the run as one in
        # training does (exit status 75, resume_from=latest continues), not with a run dir that refuses a rerun
        with checkpoints.preemption_signals(cfg.preempt_signals):
            trainer = build(cfg, device)
            trainer.train()
        if trainer.preempted:
            return checkpoints.EXIT_PREEMPTED
        if is_main():
            report(cfg, trainer, device)
        barrier()
    return 0


def report(cfg, trainer, device):
    """Print the run's summary; with n_samples, answer held-out prompts greedily into samples.jsonl."""
    print(f"run dir: {trainer.run_dir}\nnon-padding fraction of processed tokens: {trainer.padding_stats():.3f}")
    print(eval_summary(trainer.run_dir / "metrics.jsonl", cfg.loss.name))
    if cfg.n_samples == 0:
        return
    model = trainer.policy
    if dist.is_initialized():  # a sharded policy cannot generate on one rank alone: reload the saved final/
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(str(trainer.run_dir / "final")).to(device)
    samples = greedy_samples(model, trainer.tokenizer, trainer.eval_data, cfg.n_samples, cfg.max_new_tokens, device)
    with open(trainer.run_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    for s in samples[:5]:
        print(f"\nQ: {s['prompt']}\nmodel: {s['answer']}\nreference: {s['reference']}\n"
              f"{'exact match' if s['exact'] else 'different'}")
    hits = sum(s["exact"] for s in samples)
    print(f"\nheld-out exact match: {hits / len(samples):.2f} ({hits}/{len(samples)} greedy answers)")


def eval_summary(metrics_path, loss_name):
    """One line: the held-out nll (computed alike for every method) from the run's first evaluation to
    its last, and the method's own eval loss beside it. Read from metrics.jsonl, so a resumed run
    counts the evaluations of the processes before it too."""
    evals = [row for row in map(json.loads, open(metrics_path, encoding="utf-8")) if row.get("split") == "eval"]
    first, last = evals[0], evals[-1]
    span = f"step {first['step']} -> {last['step']}"
    if "nll" not in first or "nll" not in last:
        return f"eval loss ({loss_name}'s own): {first['loss']:.4f} -> {last['loss']:.4f} ({span})"
    return (f"eval nll: {first['nll']:.4f} -> {last['nll']:.4f} ({(last['nll'] - first['nll']) / first['nll']:+.0%}, "
            f"{span}); {loss_name}'s own eval loss (not comparable across methods): {first['loss']:.4f} -> "
            f"{last['loss']:.4f}")


@torch.no_grad()
def greedy_samples(model, tokenizer, data, n, max_new_tokens, device):
    """Greedy answers to the first n held-out prompts, with exact match against the reference answer
    (both stripped); generation stops at model.generation_config's eos ids (stop_at_end_of_turn).
    Returns a list of dicts (prompt, reference, answer, exact)."""
    from tqdm import tqdm

    model.eval()
    out = []
    rows = list(zip(data.questions[:n], data.prompt_ids[:n], data.answers[:n]))
    for prompt, ids, ref in tqdm(rows, desc="greedy answers", leave=False, disable=not is_main()):
        gen = model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), device=device,
                             dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True).strip()
        out.append({"prompt": prompt, "reference": ref, "answer": answer,
                    "exact": answer == ref.strip()})
    return out


if __name__ == "__main__":
    main()
