"""A run as a library: check (`validate_config`) -> build (data, run directory, models: `build`) ->
launch (`launch`) -> train and report (`run`). train.py is the command line around it (Hydra
composes the config); anything else that starts runs (experiments/, benchmarks/, the tests) calls
these functions with a composed config, so nothing imports the entry point.

    cfg = ...                        # composed from config/ (Hydra), as `python train.py KEY=VALUE` does
    checked = validate_config(cfg)   # raises ConfigError before anything loads; builds the loss
    status = launch(cfg, checked)    # 0, or launch.EXIT_PREEMPTED after a preemption signal

Every dataset row is checked before any model loads, so a typo never costs a 7B model load.
"""

import dataclasses
import json

import torch.distributed as dist
from omegaconf import OmegaConf

import losses
from training import checkpoints, config_schema, launch as launcher, lora, modeling, reference_logps, run_data
from utils import barrier, broadcast_object, is_main, make_run_dir, released_on_failure, set_seed

# ---------------------------------------------------------------- check and launch

@dataclasses.dataclass(frozen=True)
class Checked:
    """What validate_config decided before anything loads, handed to every rank so that nothing is
    decided twice. loss: the losses.Loss with the run's options (built once: the trainer computes
    with this object). resume: the checkpoints.ResumePlan (what the run resumes, where, whether
    weights are read); rank 0's is broadcast to the others."""
    loss: losses.Loss
    resume: checkpoints.ResumePlan


def validate_config(cfg, world=None):
    """Raise ConfigError naming the key and what is allowed, before any weights load (the model is
    checked on the meta device: modeling.check_model). world: the ranks. Sets model.name from a custom
    model.name_or_path (config_schema.name_the_model). Returns the run's Checked (its loss and its
    resume plan)."""
    loss = config_schema.check_keys(cfg)
    config_schema.name_the_model(cfg)
    config_schema.check_run(cfg, world or launcher.planned_world_size(cfg))
    model = modeling.check_model(cfg)  # directory, attention kernel, decoder blocks: on the meta device
    if model is not None:
        lora.check_targets(cfg, model)
    # run_dir, resume_from, preempt_signals, the checkpoint's fingerprint
    return Checked(loss=loss, resume=checkpoints.plan_resume(cfg))


def launch(cfg, checked=None):
    """Run in this process, or start FSDPTrainer's processes (one per GPU, or nproc) when torchrun did not.
    checked: validate_config's result (None: each rank builds the loss, rank 0 plans the resume).
    Returns the exit status: 0, or launcher.EXIT_PREEMPTED when a signal stopped the run."""
    return launcher.launch(run, OmegaConf.to_container(cfg, resolve=True), checked, cfg.preempt_signals)


# ---------------------------------------------------------------- build (one process of a run)

def build(cfg, device, checked=None):
    """This rank's trainer: tokenizer and data (checked row by row), then the run directory, then the
    models, in that order, so bad data costs no model load and leaves no run directory. checked:
    validate_config's result, or None. Returns (trainer, fresh): fresh when the run directory was
    reserved for this run (not continued in place)."""
    from trainers import TRAINERS
    from training.tokenization import end_of_turn_token

    loss = checked.loss if checked is not None else losses.build(cfg.loss)
    plan = checked.resume if checked is not None else None
    tokenizer = modeling.load_tokenizer(cfg)
    eot_token = end_of_turn_token(tokenizer, cfg.model.eot_token)
    train_data, eval_data = run_data.load_data(cfg, tokenizer, pairs=loss.needs_pairs, eot_token=eot_token)
    audit = run_data.check_data(cfg, tokenizer, eot_token, train_data, eval_data)
    plan = broadcast_object(plan if plan is not None or not is_main() else checkpoints.plan_resume(cfg))  # rank 0's
    if plan.checkpoint is not None:  # tokenised data that changed since the checkpoint: refused before any write
        data_changes = checkpoints.check_fingerprint(cfg, plan.checkpoint, train_data, saved=plan.fingerprint)
        plan = dataclasses.replace(plan, differences={**plan.differences, **data_changes})
    run_dir = make_run_dir(cfg.run_dir, cfg.exp_name, in_place=plan.in_place)
    if not plan.in_place:
        launcher.claimed(run_dir)  # spawned ranks: their launcher gives it back if the run dies before writing
    with released_on_failure(run_dir, fresh=not plan.in_place):  # e.g. a model that fails to load
        if is_main():
            checkpoints.prepare_run_dir(plan, run_dir, cfg.keep_last)  # in place: leftovers gone, metrics cut back
            OmegaConf.save(config_schema.with_resolved_paths(cfg), run_dir / "config.yaml")
            print(f"data: {len(train_data)} train / {len(eval_data)} eval rows\n{audit}")
        # float32 parameters in every trainer (policy_dtype is only the compute dtype): updates of lr x (Adam's ~1)
        # are far below bfloat16's resolution of a weight and would round away. Checkpoints hold them as trained.
        # With LoRA only the adapters train (float32, training/lora.py); the frozen base stays in policy_dtype: the memory
        # saved. A resumed run (without LoRA) reads no base weights: each rank reads its shards of the checkpoint's.
        policy = modeling.load_model(cfg, cfg.model.policy_dtype if lora.enabled(cfg) else "float32",
                                     weights=plan.reads_weights, **lora.load_kwargs(cfg))
        modeling.stop_at_end_of_turn(policy, tokenizer, eot_token)
        if lora.enabled(cfg):  # adapters on a frozen base, which is also DPO/IPO's reference (trainers.py)
            policy, reference = lora.apply(cfg, policy), None
        else:  # the original model
            reference = modeling.load_model(cfg, cfg.model.reference_dtype) if loss.needs_reference else None
        reference_sums = None
        if reference is not None and cfg.get("reference_logps", "live") == "precompute":
            reference_sums = precompute_reference(cfg, TRAINERS[cfg.trainer], reference, tokenizer, train_data,
                                                  eval_data, device)
            reference = None  # freed once build returns: the trainer holds the policy alone
        trainer = TRAINERS[cfg.trainer](cfg, policy, reference, tokenizer, train_data, eval_data, run_dir, device,
                                        plan, loss, reference_sums)
        if plan.checkpoint is not None:
            trainer.resume(plan)
    return trainer, not plan.in_place


def precompute_reference(cfg, trainer_class, reference, tokenizer, train_data, eval_data, device):
    """reference_logps=precompute: the reference's summed log-probs of every train and eval row,
    {"train": (N, 2), "eval": (M, 2)} float64 arrays, read from the cache or computed with the
    reference placed as `trainer_class` places it (on `device`, or sharded over the ranks)."""
    from forward import ModelCall

    reference.requires_grad_(False)
    reference = trainer_class.place_frozen(cfg, reference, device).eval()
    call = ModelCall(loss_chunk_tokens=cfg.loss_chunk_tokens, packing=cfg.packing)  # as the trainer calls models
    return reference_logps.load_or_compute(reference, reference_logps.fingerprint(reference), train_data, eval_data,
                                           cfg, tokenizer.pad_token_id, call, device)


# ---------------------------------------------------------------- train and report (one process of a run)

def run(cfg, local_rank=0, world=1, port=None, checked=None):
    """Everything one rank does: join the process group, build, train, report. Returns
    launcher.EXIT_PREEMPTED when a signal stopped the run (after saving a checkpoint), else 0."""
    cfg = OmegaConf.create(cfg)  # a plain dict from launch
    modeling.progress_bars_on_a_terminal_only()
    with launcher.process_group(cfg, local_rank, world, port) as device:
        set_seed(cfg.seed)
        # from before the run dir exists: a signal while the data or models load ends the run as one in
        # training does (exit status 75, resume_from=latest continues), not with a run dir that refuses a rerun
        with launcher.preemption_signals(cfg.preempt_signals):
            trainer, fresh = build(cfg, device, checked)
            with released_on_failure(trainer.run_dir, fresh):  # failing before its first metrics row: run_dir free
                trainer.train()
        if trainer.preempted:
            return launcher.EXIT_PREEMPTED
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
    samples = modeling.greedy_samples(model, trainer.tokenizer, trainer.eval_data, cfg.n_samples, cfg.max_new_tokens,
                                      device)
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
