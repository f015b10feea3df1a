"""The training loop. There is one: `BasicTrainer.train`. `FSDPTrainer` changes only how models are
wrapped (FSDP2 `fully_shard`), how gradient sync and clipping see sharded gradients, and how the
final weights are gathered for saving; batching, losses, metrics and evaluation are shared.

Semantics that do not depend on the number of ranks R or accumulation steps A:
- `batch_size` is the global batch. It is split into R·A micro-batches of consecutive rows by length;
  micro-batch j runs on rank j % R. The same global batch gives the same micro-batches for any R·A.
- The loss is a mean over the batch's sequences: each micro-batch contributes
  sum(row losses) / (rows in the global batch), so accumulated gradients equal the full-batch one.
  FSDP averages gradients over ranks, hence the extra factor R.
- Logged metrics are means over every row of the global batch (sums all-reduced, then divided).

Numerics, the same in both trainers: parameters and optimizer state are float32, model.policy_dtype
is only the compute dtype (autocast here, FSDP2's MixedPrecisionPolicy in FSDPTrainer), and an update
is applied only when the step's loss and global gradient norm are finite (`apply_update`).
"""

import contextlib
import functools
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from training import checkpoints
from training import flops
import forward
from training import lora
import losses
from training import modeling
from training import planning
from training import reference_logps
from forward import ModelCall
from training.batching import collate, epoch_batches, eval_batches, micro_batches
from utils import JsonlWriter, NonFiniteError, all_reduce_sum, atomic_directory, barrier, is_main, rank, \
    world_size


class BasicTrainer:
    """Trains `policy` on `train_data` with the configured loss, in one process.

    Args:
        cfg: the resolved run config (config/config.yaml).
        policy: a Hugging Face causal LM, trained.
        reference: a frozen copy for DPO-style losses, or None.
        tokenizer: saved with the model; its pad id pads batches.
        train_data, eval_data: preference_datasets.TokenizedData.
        run_dir: pathlib.Path, created by the caller.
        device: torch.device where this rank computes.
        plan: the run's checkpoints.ResumePlan (how the policy was built; resume() continues its checkpoint).
        loss: the run's losses.Loss, as validate_config built it (None: built here from cfg.loss).
    """

    recomputes_blocks = False  # activation checkpointing (FSDPTrainer sets it): blocks run forward twice

    def __init__(self, cfg, policy, reference, tokenizer, train_data, eval_data, run_dir, device,
                 plan=checkpoints.ResumePlan(), loss=None):
        self.cfg, self.tokenizer, self.run_dir, self.device, self.plan = cfg, tokenizer, run_dir, device, plan
        self.train_data, self.eval_data = train_data, eval_data
        self.train_lengths, self.eval_lengths = train_data.lengths(), eval_data.lengths()
        self.world, self.rank = world_size(), rank()
        self.last_step_s = 0.0  # the previous optimizer step's time: a long one gets a micro-batch progress bar
        # policy_dtype is the compute dtype; parameters and optimizer state are always float32.
        self.compute_dtype = getattr(torch, cfg.model.policy_dtype)
        # float16 needs loss scaling (its gradients underflow); bfloat16 has float32's range and does not.
        self.scaler = torch.amp.GradScaler(device.type) if self.compute_dtype == torch.float16 else None
        self.skipped_steps = self.consecutive_skips = 0  # updates not applied: non-finite loss or gradient
        self.n_micro = cfg.gradient_accumulation_steps * self.world
        schedule = planning.schedule(len(train_data), cfg)  # what dry_run=true prints
        self.steps_per_epoch, self.total_steps = schedule["steps_per_epoch"], schedule["optimizer_steps"]
        self.warmup_steps = schedule["warmup_steps"]

        self.loss = loss if loss is not None else losses.build(cfg.loss)  # the registered loss, the run's options
        # how the losses call the models (chunked output head, packing), handed to every loss call
        self.call = ModelCall(loss_chunk_tokens=cfg.loss_chunk_tokens, packing=cfg.packing)
        # the FLOPs count of each step (training/flops.py): the model's shape and each row's sequence sizes
        self.shape = flops.shape_of(policy)
        self.train_sizes = flops.sequence_sizes(train_data)
        self.peak_tflops = flops.device_peak_tflops(device, cfg.get("peak_tflops"))
        self.head_chunk = cfg.loss_chunk_tokens if forward._chunkable(policy, policy.get_output_embeddings()) else None
        self.policy = self.wrap(policy, trainable=True)
        self.reference = None
        if reference is not None:
            reference.requires_grad_(False)
            self.reference = self.wrap(reference, trainable=False).eval()
            self.reference_fingerprint = _fingerprint(self.reference)
        elif lora.enabled(cfg) and self.loss.needs_reference:
            self.reference = lora.AdaptersDisabled(self.policy)  # the frozen base itself: no second copy
            self.reference_fingerprint = _fingerprint(self.reference)
        self.reference_logps = None  # reference_logps=precompute: {"train": (N, 2), "eval": (M, 2)} sums
        if self.reference is not None and cfg.get("reference_logps", "live") == "precompute":
            self.reference_logps = reference_logps.load_or_compute(self, self.reference_fingerprint)
            self.reference = None  # freed (once pipeline.build returns): training runs with the policy alone
        self.optimizer = self.build_optimizer()
        self.scheduler = self.build_scheduler()
        self._epoch_cache = {}
        self.metrics_file = JsonlWriter(run_dir / "metrics.jsonl") if is_main() else None
        self.wandb = None
        self.checkpointer = checkpoints.Checkpointer(cfg, run_dir)
        self.preempted = False  # set when train() stopped early after a preemption signal
        self.tokens_seen = self.slots_seen = 0  # non-padding tokens / padded tokens processed (all ranks)
        self.start_step = 0
        self.wandb_run_id = None  # the wandb run a run resumed in place continues

    # ------------------------------------------------------------ what FSDPTrainer overrides

    def wrap(self, model, trainable):
        """Put a model on this process's device (FSDPTrainer: shard it). The policy's parameters are
        float32 (the optimizer's master copy) and its forward runs under autocast to policy_dtype; the
        frozen reference keeps the dtype it was loaded in (reference_dtype) and computes in it. With
        LoRA only the trainable parameters are made float32: the frozen base keeps policy_dtype."""
        if trainable and not self.plan.reads_weights:
            modeling.materialize(model, self.device)  # built without weights: the checkpoint fills them
            model.tie_weights()
        model = model if lora.is_quantized(model) else model.to(self.device)  # a 4-bit base loads on its GPU
        if trainable:
            if lora.enabled(self.cfg):
                lora.trainable_float32(model)
            else:
                model.float()
            if self.compute_dtype != torch.float32:
                _autocast_forward(model, self.device.type, self.compute_dtype)
        if self.cfg.compile:
            compile_blocks(model, self.cfg.model.block_name, self.cfg.compile_backend)
        return model

    def gradient_sync(self, enabled):
        """Whether the next backward reduces gradients across ranks (a no-op in one process)."""

    def clip_gradients(self):
        """Clip the global gradient norm to max_grad_norm (inf = only measure). Returns the norm."""
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm))

    def full_state_dict(self, dtype=None):
        """The policy's full (unsharded) state dict on rank 0, cast to `dtype` if given; None elsewhere."""
        return {k: v.detach().to("cpu", dtype) for k, v in self.policy.state_dict().items()}

    # ------------------------------------------------------------ set-up

    def build_optimizer(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.cfg.optimizer == "RMSprop":
            return torch.optim.RMSprop(params, lr=self.cfg.lr)
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def build_scheduler(self):
        import transformers
        if self.cfg.lr_schedule == "cosine":
            return transformers.get_cosine_schedule_with_warmup(self.optimizer, self.warmup_steps, self.total_steps)
        return transformers.get_constant_schedule_with_warmup(self.optimizer, self.warmup_steps)

    def global_batch(self, step):
        """Row indices of the global batch of optimizer step `step` (0-based): a function of (seed, epoch)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: epoch_batches(self.train_lengths, self.cfg.batch_size, self.cfg.seed, epoch)}
        return self._epoch_cache[epoch][i]

    def lam(self, step, disturb):
        """IFT's lambda for optimizer step `step`: scheduled, then disturbed in training (spec §1);
        None for a loss without one."""
        return self.loss.lam(step, self.total_steps, self.warmup_steps, self.cfg.seed, disturb)

    # ------------------------------------------------------------ the loop

    def step_flops(self, micro, lam):
        """Matrix-product FLOPs of one optimizer step over all ranks (training/flops.py). micro: the global
        batch's micro-batches (arrays of row indices)."""
        passes = self.loss.no_grad_passes(lam) + (self.reference is not None)  # + a live reference's forward
        return flops.step_flops(self.shape, self.train_sizes, micro, passes, lora=lora.enabled(self.cfg),
                                head_chunk=self.head_chunk, recompute_blocks=self.recomputes_blocks)

    def run_micro_batches(self, micro, n_rows, lam, train):
        """Forward (and backward when training) this rank's micro-batches of one global batch.
        micro: the global batch's micro-batches (arrays of row indices); this rank takes j % R == rank.
        n_rows: rows in the global batch, the loss's denominator (every tokenised row has a target:
            tokenize_rows drops the others, so all of them are valid rows of the spec's mean).
        Returns (sum over ranks of each row metric, tokens, padded slots)."""
        data = self.train_data if train else self.eval_data
        mine = micro[self.rank::self.world]
        sums, tokens, slots = {}, 0, 0
        # a step of more than a few seconds shows its micro-batches (this rank's), so a long step is seen to move
        slow = train and self.last_step_s > SLOW_STEP_S and len(mine) > 1 and _bars()
        for j, rows in enumerate(tqdm(mine, desc="micro-batches", leave=False, disable=not slow)):
            # A short last eval batch can leave a rank without rows; it still runs one (ignored) row,
            # because every rank of an FSDP model must take part in every forward.
            ignore = len(rows) == 0
            rows = micro[0][:1] if ignore else rows
            batch = {k: v.to(self.device) for k, v in collate(data, rows, self.tokenizer.pad_token_id).items()}
            if self.reference_logps is not None:  # the reference's precomputed sums instead of its forward
                batch.update(reference_logps.batch_columns(self.reference_logps["train" if train else "eval"], rows,
                                                           self.device))
            masks = [v for k, v in batch.items() if k.endswith("attention_mask")] if not ignore else []
            tokens += sum(int(m.sum()) for m in masks)
            slots += sum(int(m.sum()) if self.cfg.packing else m.numel() for m in masks)  # packed: no padding
            if train:
                self.gradient_sync(j == len(mine) - 1)
            with contextlib.nullcontext() if train else torch.no_grad():
                own = batch
                if not train and "chosen_input_ids" in batch and not self.loss.needs_pairs:
                    own = losses.chosen_view(batch)  # preference eval data, a loss that trains on one answer
                row_losses, valid, row_metrics = losses.batch_loss(self.loss, self.policy, self.reference, own, lam,
                                                                   self.call)
                if not train:  # the metrics every method logs the same way (nll; margin, pref_accuracy on pairs)
                    row_metrics = {**row_metrics, **losses.shared_eval_metrics(self.call, self.policy, batch)}
                loss_sum, metric_sums, _ = losses.reduce_rows(row_losses, valid & (not ignore), row_metrics)
                if train:
                    loss = loss_sum * (self.world / n_rows)
                    (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            for k, v in metric_sums.items():
                sums[k] = sums.get(k, 0.0) + v.float()
        keys = sorted(sums)
        counts = torch.tensor([float(tokens), float(slots)], device=self.device)
        packed = all_reduce_sum(torch.cat([torch.stack([sums[k] for k in keys]).to(self.device), counts])
                                if keys else counts).cpu()
        return {k: float(packed[i]) for i, k in enumerate(keys)}, int(packed[-2]), int(packed[-1])

    def train(self):
        cfg = self.cfg
        if self.checkpointer.stop_requested(self.device):  # signalled while the models loaded: nothing to save
            self.checkpointer.report_preempted(self.start_step, saved=False)
            self.preempted = True
            self.finish_logging()
            return
        self.start_logging()
        if cfg.do_first_eval and self.start_step == 0:
            self.evaluate(step=0)
        progress = Progress(self.start_step, self.total_steps, cfg.progress_every)
        for step in range(self.start_step, self.total_steps):
            t0 = time.perf_counter()
            self.policy.train()
            batch = self.global_batch(step)
            lam = self.lam(step, disturb=True)
            micro = micro_batches(batch, self.train_lengths, self.n_micro)
            sums, tokens, slots = self.run_micro_batches(micro, len(batch), lam, train=True)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip, check and log the true gradients
            grad_norm = self.clip_gradients()
            lr = self.scheduler.get_last_lr()[0]
            error = self.apply_update(step + 1, sums["loss"] / len(batch), grad_norm)
            dt = self.last_step_s = time.perf_counter() - t0
            tflops = self.step_flops(micro, lam) / dt / self.world / 1e12  # achieved, per device
            self.tokens_seen += tokens
            self.slots_seen += slots
            row = {"split": "train", "step": step + 1, "examples": (step + 1) * cfg.batch_size,
                   **{k: v / len(batch) for k, v in sums.items()}}
            if lam is not None:
                row["lambda"] = lam
            row.update(lr=lr, grad_norm=grad_norm, skipped_steps=self.skipped_steps, step_time_s=dt,
                       tokens_per_s=tokens / dt, tflops=tflops)
            if self.peak_tflops is not None:
                row["mfu"] = tflops / self.peak_tflops
            if self.scaler is not None:
                row["loss_scale"] = self.scaler.get_scale()
            self.log(row)
            progress.step(step + 1, loss=f"{row['loss']:.4f}", tok_s=f"{tokens / dt:,.0f}",
                          **({"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}))
            if error:  # after logging the step's row; nothing of this step reached the weights
                raise NonFiniteError(error)
            if _crossed(step, cfg.batch_size, cfg.eval_every) or step + 1 == self.total_steps:
                self.evaluate(step=step + 1)
            saved = cfg.save_every is not None and _crossed(step, cfg.batch_size, cfg.save_every) \
                and step + 1 < self.total_steps
            if saved:
                self.save_checkpoint(step + 1)
            if step + 1 < self.total_steps and self.checkpointer.stop_requested(self.device):
                if not saved:
                    self.save_checkpoint(step + 1)
                self.checkpointer.wait()
                self.checkpointer.report_preempted(step + 1)
                self.preempted = True
                break
        progress.close()
        self.checkpointer.wait()
        if self.preempted:
            self.finish_logging()
            return
        if self.reference is not None and not torch.equal(_fingerprint(self.reference), self.reference_fingerprint):
            raise RuntimeError("the frozen reference model changed during training")
        self.save(self.run_dir / "final")
        self.finish_logging()

    def apply_update(self, step, loss, grad_norm):
        """The optimizer and scheduler step, only if the step's loss and gradient norm are finite
        (both are global: the same on every rank, so all ranks decide alike). Otherwise the update is
        skipped and counted, and the result is an error message when the run must stop: on_nonfinite
        is `error`, or `max_skipped_steps` updates in a row were skipped. Under float16's gradient
        scaler a non-finite gradient norm is an overflow of the scaled gradients, which the scaler
        expects: it is skipped and the scale lowered, whatever on_nonfinite says. Gradients are
        zeroed in every case. Returns None or the error message (step is 1-based)."""
        bad = [(name, value) for name, value in (("loss", loss), ("grad_norm", grad_norm)) if not math.isfinite(value)]
        if not bad:
            if self.scaler is None:
                self.optimizer.step()
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.consecutive_skips = 0
            return None
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.scaler is not None:
            # The scaler's own update() reads each rank's local overflow flag, which differs between the
            # shards of one gradient; the new scale is set from the global decision instead, so every
            # rank keeps the same scale. (Unlike update(), this leaves the growth counter as it was.)
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        name, value = bad[0]
        what = f"{name} is {value} at step {step}"
        if self.cfg.on_nonfinite == "error" and not (self.scaler is not None and name == "grad_norm"):
            return (f"{what}; the update was not applied and the run stopped (on_nonfinite=error). Checkpoints "
                    f"and metrics.jsonl up to here are in {self.run_dir}; lower lr or set max_grad_norm")
        if self.consecutive_skips >= self.cfg.max_skipped_steps:
            return (f"{what}: {self.consecutive_skips} skipped updates in a row (max_skipped_steps="
                    f"{self.cfg.max_skipped_steps}); the run stopped. Checkpoints and metrics.jsonl up to here "
                    f"are in {self.run_dir}")
        if is_main():
            tqdm.write(f"{what}: update skipped ({self.consecutive_skips} in a row, {self.skipped_steps} in all)")
        return None

    @torch.no_grad()
    def evaluate(self, step):
        """Mean loss and metrics over the eval rows, with IFT's undisturbed lambda of this step."""
        self.policy.eval()
        lam = self.lam(min(step, self.total_steps - 1), disturb=False)
        totals, n = {}, 0
        batches = eval_batches(self.eval_lengths, self.cfg.eval_batch_size)
        for batch in tqdm(batches, desc=f"eval @ step {step}", leave=False, disable=not _bars()):
            sums, _, _ = self.run_micro_batches(micro_batches(batch, self.eval_lengths, self.world), len(batch),
                                                lam, train=False)
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v
            n += len(batch)
        row = {"split": "eval", "step": step, "examples": step * self.cfg.batch_size,
               **{k: v / n for k, v in totals.items()}}
        if lam is not None:
            row["lambda"] = lam
        self.log(row)
        if not math.isfinite(row["loss"]):  # the eval rows' mean is global: all ranks decide alike
            what = f"eval loss is {row['loss']} at step {step}"
            if self.cfg.on_nonfinite == "error":
                raise NonFiniteError(f"{what}; the run stopped (on_nonfinite=error). Checkpoints and "
                                     f"metrics.jsonl up to here are in {self.run_dir}")
            if is_main():
                tqdm.write(f"{what}; training goes on (on_nonfinite=skip)")
        if is_main():
            tqdm.write(f"eval @ step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                         if isinstance(v, float)))
        return row

    # ------------------------------------------------------------ output

    def start_logging(self):
        if not (is_main() and self.cfg.wandb.enabled):
            return
        import wandb
        mode = self.cfg.wandb.mode
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
            print("wandb: no credentials (WANDB_API_KEY or `wandb login`), logging offline instead")
            mode = "offline"
        from omegaconf import OmegaConf
        # a run resumed in place continues its wandb run (wandb_run_id), else a new one
        self.wandb = wandb.init(project=self.cfg.wandb.project, entity=self.cfg.wandb.entity,
                                name=self.cfg.wandb.name or self.cfg.exp_name, dir=str(self.run_dir), mode=mode,
                                config=OmegaConf.to_container(self.cfg, resolve=True),
                                id=self.wandb_run_id, resume="allow")

    def log(self, row):
        if not is_main():
            return
        self.metrics_file.write(row)
        if self.wandb is not None:
            self.wandb.log({f"{row['split']}/{k}": v for k, v in row.items() if k not in ("split", "step")},
                           step=row["step"])

    def finish_logging(self):
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()

    def save(self, directory):
        """A plain Hugging Face model directory (safetensors + config + tokenizer), written by rank 0
        into a temporary folder and renamed into place, so a crash never leaves half a model."""
        dtype = getattr(torch, self.cfg.model.policy_dtype)
        if not lora.enabled(self.cfg):
            return self._save_model(directory, dtype)
        state = self.full_state_dict()  # merged in float32 (or as trained), then cast
        if is_main():
            with atomic_directory(directory) as tmp:
                lora.save_final(self.policy, tokenizer_as_trained(self.tokenizer), state, tmp, dtype, self.cfg)
        barrier()

    def _save_model(self, directory, dtype):
        state = self.full_state_dict(dtype)
        if is_main():
            with atomic_directory(directory) as tmp:
                self.policy.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                tokenizer_as_trained(self.tokenizer).save_pretrained(tmp)
        barrier()

    def save_checkpoint(self, step):
        """checkpoints/step-<step>/: sharded model and optimizer state plus everything resume needs
        (training/checkpoints.py); every rank writes its own shards."""
        self.checkpointer.save(self, step)

    def resume(self, plan):
        """Continue exactly where plan.checkpoint stopped: the Checkpointer reads the weights, optimizer
        state and RNG states; the scheduler, counters and step come back as its TrainerState, applied here.
        Data order and lambda noise are functions of (seed, epoch) and (seed, step)."""
        state = self.checkpointer.load(self.policy, self.optimizer, plan)
        # the schedule continues from the checkpoint's step, with the config's base lr (equal unless forced)
        base_lrs = list(self.scheduler.base_lrs)
        self.scheduler.load_state_dict(state.scheduler)
        self.scheduler.base_lrs = base_lrs
        for group, base, factor in zip(self.optimizer.param_groups, base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if self.scaler is not None and state.scaler is not None:  # float16's loss scale goes on from where it was
            self.scaler.load_state_dict(state.scaler)
        self.start_step = state.step
        self.tokens_seen, self.slots_seen = state.tokens_seen, state.slots_seen
        self.skipped_steps, self.consecutive_skips = state.skipped_steps, state.consecutive_skips
        if plan.in_place:
            self.wandb_run_id = state.wandb_run_id
        if is_main():
            self.metrics_file.write({"split": "resume", "step": state.step, "checkpoint": str(plan.checkpoint),
                                     "ranks": [state.world_size, self.world], "forced": bool(plan.differences),
                                     "differences": {k: [a, b] for k, (a, b) in plan.differences.items()}})
            if plan.differences:
                print(f"resume_force=true: continuing despite differences in {', '.join(plan.differences)}")

    def padding_stats(self):
        """Fraction of the processed training tensor slots that held real tokens (not padding)."""
        return self.tokens_seen / max(1, self.slots_seen)


def tokenizer_as_trained(tokenizer):
    """The tokenizer to save with the weights, so that tools rendering its chat template (lm-eval,
    vLLM, generate) give the model the prompt it was trained on. Training prepends bos to every chat
    when the tokenizer has one and neither the template nor encoding adds it
    (preference_datasets.encode_chat); then the saved template starts with {{ bos_token }} itself (a copy;
    the training tokenizer is unchanged). Otherwise the tokenizer as it is."""
    import copy
    if tokenizer.bos_token is None or not tokenizer.chat_template:
        return tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    if tokenizer(text)["input_ids"][:1] == [tokenizer.bos_token_id]:
        return tokenizer
    saved = copy.deepcopy(tokenizer)
    saved.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    return saved


SLOW_STEP_S = 5.0  # seconds: from this optimizer step time on, a step shows its micro-batches' progress


def _bars():
    """Whether this process draws progress bars: rank 0, on a terminal (a log file gets Progress's lines)."""
    return is_main() and sys.stderr.isatty()


class Progress:
    """Rank 0's training progress: tqdm's bar on a terminal; when stderr is not one (a Slurm log, a
    pipe), where a bar's carriage returns pile up into one endless line, a plain line every `every`
    optimizer steps and at the last. Other ranks show nothing."""

    def __init__(self, start, total, every):
        self.total, self.every, self.shown = total, every, is_main()
        self.start_time, self.start = time.perf_counter(), start
        self.bar = None
        if _bars():
            self.bar = tqdm(desc="train", dynamic_ncols=True, initial=start, total=total)

    def step(self, step, **postfix):
        """Optimizer step `step` (1-based) is done; postfix: name=text pairs to show."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(postfix)
        elif self.shown and (step % self.every == 0 or step == self.total):
            elapsed = time.perf_counter() - self.start_time
            print(f"train step {step}/{self.total} ({step / self.total:.0%}), " +
                  ", ".join(f"{k}={v}" for k, v in postfix.items()) +
                  f", {elapsed / (step - self.start):.2f} s/step", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _autocast_forward(model, device_type, dtype):
    """Make `model`'s forward run under torch.autocast(device_type, dtype): matrix products compute
    in `dtype` while the parameters (and their gradients) stay float32, what FSDP2's
    MixedPrecisionPolicy does for FSDPTrainer. Only the model's forward is affected, hooks on its
    submodules included (IFT's blended embeddings: the lookup stays float32, so the blend does too);
    the loss math after it (log-softmax, Relation Propagation, reductions) runs outside autocast, in
    float32. The forward is replaced on the instance, so state dicts and save_pretrained are unchanged."""
    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    model.forward = autocast_forward


def _crossed(step, batch_size, every):
    """Whether optimizer step `step` (0-based) carries the example count past a multiple of `every`."""
    return (step + 1) * batch_size // every > step * batch_size // every


def _fingerprint(model):
    """(2 * params,) float64 sums and sums of squares of every parameter (of this rank's shards, summed
    over ranks): any change to the weights changes it."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    sums = torch.stack([t.detach().double().sum() for t in local] + [t.detach().double().square().sum() for t in local])
    return all_reduce_sum(sums)


def _netrc_has_wandb():
    path = os.path.expanduser("~/.netrc")
    return os.path.exists(path) and "api.wandb.ai" in open(path).read()


class FSDPTrainer(BasicTrainer):
    """The same loop with each decoder block and then the root sharded by FSDP2 across the ranks of
    the default process group (NCCL on GPUs, gloo on the CPU)."""

    def wrap(self, model, trainable):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtype = getattr(torch, self.cfg.model.policy_dtype if trainable else self.cfg.model.reference_dtype)
        # Parameters stay float32 (the optimizer's master copy); compute runs in the configured dtype and
        # gradients are reduced in float32 so summing over ranks loses nothing.
        mp = MixedPrecisionPolicy(param_dtype=dtype if dtype != torch.float32 else None, reduce_dtype=torch.float32)
        if trainable:  # LoRA: only the trainable parameters; the frozen base keeps its dtype
            model = lora.trainable_float32(model) if lora.enabled(self.cfg) else model.float()
        blocks = modeling.decoder_blocks(model, self.cfg.model.block_name)  # null: the model's _no_split_modules
        if trainable and self.cfg.activation_checkpointing:
            self.recomputes_blocks = True  # counted in the step's FLOPs
            # recompute each block's activations in backward instead of storing them
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if self.cfg.compile:
            compile_blocks(model, self.cfg.model.block_name, self.cfg.compile_backend)
        # Only rank 0 read the weights (modeling.load_model); the others built the model on the meta device.
        # Rank 0 keeps its full tensors until every rank has copied its shard from them.
        full = model.state_dict() if is_main() else None
        for block in blocks:
            fully_shard(block, mp_policy=mp, reshard_after_forward=True)
        # The policy's root parameters (embeddings, head) stay gathered between forward and backward;
        # the reference has no backward, so everything is resharded after its forward.
        fully_shard(model, mp_policy=mp, reshard_after_forward=not trainable)
        if trainable and not self.plan.reads_weights:
            modeling.materialize(model, self.device)  # no rank read weights: the checkpoint fills them
        elif self.world > 1:
            _broadcast_weights_from_rank0(model, full, self.device)
        return model.to(self.device)

    def gradient_sync(self, enabled):
        # Accumulation steps before the last one keep local gradients; the last reduce-scatters them all.
        self.policy.set_requires_gradient_sync(enabled)

    def clip_gradients(self):
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def full_state_dict(self, dtype=None):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.to(dtype) for k, v in state.items()} if is_main() else None


def compile_blocks(model, block_name, backend="inductor"):
    """torch.compile the forward of every decoder block (modules of class `block_name`; None: the
    model's own block classes, modeling.decoder_blocks), in place.

    Only the blocks' own forward is compiled: FSDP2's unshard/reshard hooks, activation checkpointing
    (which calls the block) and the loss's hooks on the embeddings and lm_head stay eager, around it,
    and the parameter names (state dicts, checkpoints) do not change. Identical blocks share one
    compiled graph. Returns the number of blocks compiled.
    """
    blocks = modeling.decoder_blocks(model, block_name)
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=backend)
    return len(blocks)


def _broadcast_weights_from_rank0(model, full_state, device):
    """Fill the shards of every rank from rank 0's full state dict, and copy rank 0's buffers (such
    as rotary frequencies, which are not in the state dict) to the others. Ranks whose model was built
    on the meta device get real, empty storage first."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model.to_empty(device=device)
    set_model_state_dict(model, full_state if is_main() else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


TRAINERS = {"BasicTrainer": BasicTrainer, "FSDPTrainer": FSDPTrainer}
