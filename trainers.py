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

import functools
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import forward
import losses
from forward import ModelCall
from training import checkpoints, flops, lora, modeling, planning, reference_logps
from training.batching import collate, epoch_batches, eval_batches, micro_batches, token_counts
from training.reference_logps import fingerprint as _fingerprint
from utils import JsonlWriter, NonFiniteError, all_reduce_sum, atomic_directory, barrier, is_main, rank, world_size


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
        reference_sums: reference_logps=precompute, the reference's summed log-probs that pipeline.build
            computed before the trainer: {"train": (N, 2), "eval": (M, 2)} float64 arrays (reference_logps.py);
            `reference` is then None. (With LoRA the reference is the policy's own base, precomputed here.)
    """

    recomputes_blocks = False  # activation checkpointing (FSDPTrainer sets it): blocks run forward twice

    def __init__(self, cfg, policy, reference, tokenizer, train_data, eval_data, run_dir, device,
                 plan=checkpoints.ResumePlan(), loss=None, reference_sums=None):
        self.cfg, self.tokenizer, self.run_dir, self.device, self.plan = cfg, tokenizer, run_dir, device, plan
        self.train_data, self.eval_data = train_data, eval_data
        self.train_lengths, self.eval_lengths = train_data.lengths(), eval_data.lengths()
        self.world, self.rank = world_size(), rank()
        self.last_step_s = 0.0  # the previous optimizer step's time: a long one gets a micro-batch progress bar
        # policy_dtype is the compute dtype; parameters and optimizer state are always float32.
        self.compute_dtype = getattr(torch, cfg.model.policy_dtype)
        # float16 needs loss scaling (its gradients underflow); bfloat16 has float32's range and does not.
        self.scaler = torch.amp.GradScaler(device.type) if self.compute_dtype == torch.float16 else None
        self.state = checkpoints.TrainerState()  # the counters (step, tokens, skipped updates, ...) a checkpoint keeps
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
        self.reference_logps = reference_sums  # reference_logps=precompute: {"train": (N, 2), "eval": (M, 2)} sums
        if self.reference is not None and cfg.get("reference_logps", "live") == "precompute":  # LoRA's base
            self.reference_logps = reference_logps.load_or_compute(
                self.reference, self.reference_fingerprint, train_data, eval_data, cfg, tokenizer.pad_token_id,
                self.call, device)
            self.reference = None  # training runs with the policy alone (adapters on)
        self.optimizer = self.build_optimizer()
        self.scheduler = self.build_scheduler()
        self._epoch_cache = {}
        self.metrics_file = JsonlWriter(run_dir / "metrics.jsonl") if is_main() else None
        self.wandb = None
        self.checkpointer = checkpoints.Checkpointer(cfg, run_dir, checkpoints.data_fingerprint(train_data))
        self.preempted = False  # set when train() stopped early after a preemption signal

    # ------------------------------------------------------------ what FSDPTrainer overrides

    def wrap(self, model, trainable):
        """Put a model on this process's device (FSDPTrainer: shard it). The policy's parameters are
        float32 (the optimizer's master copy) and its forward runs under autocast to policy_dtype; the
        frozen reference keeps the dtype it was loaded in (reference_dtype) and computes in it. With
        LoRA only the trainable parameters are made float32: the frozen base keeps policy_dtype."""
        if not trainable:
            return self.place_frozen(self.cfg, model, self.device)
        if not self.plan.reads_weights:
            modeling.materialize(model, self.device)  # built without weights: the checkpoint fills them
            model.tie_weights()
        model = model if lora.is_quantized(model) else model.to(self.device)  # a 4-bit base loads on its GPU
        if lora.enabled(self.cfg):
            lora.trainable_float32(model)
        else:
            model.float()
        if self.compute_dtype != torch.float32:
            _autocast_forward(model, self.device.type, self.compute_dtype)
        if self.cfg.compile:
            compile_blocks(model, self.cfg.model.block_name, self.cfg.compile_backend)
        return model

    @staticmethod
    def place_frozen(cfg, model, device):
        """A frozen model (the reference) placed where and as this trainer computes with it: on `device`,
        in the dtype it was loaded in, its blocks compiled with compile=true. A function of the config
        alone, so that pipeline.build can place a reference whose log-probs it precomputes before any
        trainer exists (reference_logps=precompute)."""
        model = model if lora.is_quantized(model) else model.to(device)
        if cfg.compile:
            compile_blocks(model, cfg.model.block_name, cfg.compile_backend)
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

    def build_scheduler(self, done=0):
        """The config's learning-rate schedule over the optimizer's lr (its param groups' `initial_lr`),
        positioned after `done` applied updates: the optimizer's lr is set to that of update done + 1
        (planning.lr_factor(done): warm-up update k of W runs at (k + 1) / W of lr, never at 0).
        A resumed run rebuilds it from the config rather than loading the checkpoint's scheduler, whose
        state_dict would bring back the checkpoint's base lr (resume_force=true may change lr)."""
        factor = functools.partial(planning.lr_factor, warmup_steps=self.warmup_steps,
                                   total_steps=self.total_steps, lr_schedule=self.cfg.lr_schedule)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor, last_epoch=done - 1)

    def global_batch(self, step):
        """Row indices of the global batch of optimizer step `step` (0-based): a function of (seed, epoch)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: epoch_batches(self.train_lengths, self.cfg.batch_size, self.cfg.seed, epoch)}
        return self._epoch_cache[epoch][i]

    def step_info(self, step, training):
        """The losses.StepInfo of optimizer step `step` (0-based): what a loss may know about it."""
        return losses.StepInfo(step, self.total_steps, self.warmup_steps, self.cfg.seed, training)

    # ------------------------------------------------------------ the loop

    def step_flops(self, micro, info):
        """Matrix-product FLOPs of one optimizer step over all ranks (training/flops.py). micro: the global
        batch's micro-batches (arrays of row indices). info: the step's losses.StepInfo."""
        passes = self.loss.no_grad_passes(info) + (self.reference is not None)  # + a live reference's forward
        return flops.step_flops(self.shape, self.train_sizes, micro, passes, lora=lora.enabled(self.cfg),
                                head_chunk=self.head_chunk, recompute_blocks=self.recomputes_blocks,
                                head_recomputes=self.loss.head_recomputes)

    def train_micro_batches(self, micro, n_rows, info):
        """Forward and backward of this rank's micro-batches of one training batch; the gradients of the
        global batch's mean loss accumulate in the policy.
        micro: the global batch's micro-batches (arrays of row indices); this rank takes j % R == rank.
        n_rows: rows in the global batch, the loss's denominator (every tokenised row has a target:
            tokenize_rows drops the others, so all of them are valid rows of the spec's mean).
        info: the step's losses.StepInfo (training).
        Returns (sum over ranks of each row metric, tokens, padded slots)."""
        mine = micro[self.rank::self.world]
        # a step of more than a few seconds shows its micro-batches (this rank's), so a long step is seen to move
        slow = self.last_step_s > SLOW_STEP_S and len(mine) > 1 and _bars()
        step = _StepSums(self.cfg.packing)
        prepared = self.prepared_micro_batches(micro, self.train_data, "train")
        for j, (batch, counted) in enumerate(tqdm(prepared, total=len(mine), desc="micro-batches", leave=False,
                                                  disable=not slow)):
            self.gradient_sync(j == len(mine) - 1)
            out = losses.batch_loss(self.loss, self.policy, self.reference, batch, info, self.call)
            loss = step.add(batch, out, counted) * (self.world / n_rows)
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        return step.all_reduced(self.device)

    @torch.no_grad()
    def eval_micro_batches(self, micro, info):
        """The loss and metrics of this rank's micro-batches of one eval batch, with the metrics every method
        logs the same way (losses.shared_eval_metrics). micro, as in train_micro_batches; info: the step's
        losses.StepInfo (evaluation). Returns the sum over ranks of each row metric."""
        step = _StepSums(self.cfg.packing)
        for batch, counted in self.prepared_micro_batches(micro, self.eval_data, "eval"):
            out = losses.batch_loss(self.loss, self.policy, self.reference, batch, info, self.call)
            step.add(batch, out.with_metrics(losses.shared_eval_metrics(self.call, self.policy, batch)), counted)
        return step.all_reduced(self.device)[0]

    def prepared_micro_batches(self, micro, data, split):
        """This rank's micro-batches of one global batch of `data` (the `split` rows), collated on the
        device, with the reference's precomputed sums (reference_logps=precompute) instead of its forward.
        Yields (batch, counted). A short last eval batch can leave a rank without rows; it still runs one
        row, not counted (counted False), because every rank of an FSDP model must take part in every forward."""
        for rows in micro[self.rank::self.world]:
            counted = len(rows) > 0
            rows = rows if counted else micro[0][:1]
            batch = {k: v.to(self.device) for k, v in collate(data, rows, self.tokenizer.pad_token_id).items()}
            if self.reference_logps is not None:
                batch.update(reference_logps.batch_columns(self.reference_logps[split], rows, self.device))
            yield batch, counted

    def train(self):
        cfg = self.cfg
        if self.checkpointer.stop_requested(self.device):  # signalled while the models loaded: nothing to save
            self.checkpointer.report_preempted(self.state.step, saved=False)
            self.preempted = True
            self.finish_logging()
            return
        self.start_logging()
        if cfg.do_first_eval and self.state.step == 0:
            self.evaluate(step=0)
        progress = Progress(self.state.step, self.total_steps, cfg.progress_every)
        for step in range(self.state.step, self.total_steps):
            t0 = synced_clock(self.device)
            self.policy.train()
            batch = self.global_batch(step)
            info = self.step_info(step, training=True)
            micro = micro_batches(batch, self.train_lengths, self.n_micro)
            sums, tokens, slots = self.train_micro_batches(micro, len(batch), info)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip, check and log the true gradients
            grad_norm = self.clip_gradients()
            lr = self.scheduler.get_last_lr()[0]
            error = self.apply_update(step + 1, sums["loss"] / len(batch), grad_norm)
            dt = self.last_step_s = synced_clock(self.device) - t0
            tflops = self.step_flops(micro, info) / dt / self.world / 1e12  # achieved, per device
            self.state.step = step + 1
            self.state.tokens_seen += tokens
            self.state.slots_seen += slots
            row = {"split": "train", "step": step + 1, "examples": (step + 1) * cfg.batch_size,
                   **{k: v / len(batch) for k, v in sums.items()}, **self.loss.scalars(info)}
            row.update(lr=lr, grad_norm=grad_norm, skipped_steps=self.state.skipped_steps, step_time_s=dt,
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
            self.state.consecutive_skips = 0
            return None
        self.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_steps += 1
        self.state.consecutive_skips += 1
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
        if self.state.consecutive_skips >= self.cfg.max_skipped_steps:
            return (f"{what}: {self.state.consecutive_skips} skipped updates in a row (max_skipped_steps="
                    f"{self.cfg.max_skipped_steps}); the run stopped. Checkpoints and metrics.jsonl up to here "
                    f"are in {self.run_dir}")
        if is_main():
            counts = self.state
            tqdm.write(f"{what}: update skipped ({counts.consecutive_skips} in a row, {counts.skipped_steps} in all)")
        return None

    @torch.no_grad()
    def evaluate(self, step):
        """Mean loss and metrics over the eval rows after `step` optimizer steps. The loss is told it evaluates
        step `step` (0-based: the next one to train; the last one after training): IFT's λ of it, undisturbed."""
        self.policy.eval()
        info = self.step_info(min(step, self.total_steps - 1), training=False)
        totals, n = {}, 0
        batches = eval_batches(self.eval_lengths, self.cfg.eval_batch_size)
        for batch in tqdm(batches, desc=f"eval @ step {step}", leave=False, disable=not _bars()):
            sums = self.eval_micro_batches(micro_batches(batch, self.eval_lengths, self.world), info)
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v
            n += len(batch)
        row = {"split": "eval", "step": step, "examples": step * self.cfg.batch_size,
               **{k: v / n for k, v in totals.items()}, **self.loss.scalars(info)}
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
                                id=self.state.wandb_run_id, resume="allow")
        self.state.wandb_run_id = self.wandb.id  # checkpoints keep it: a resume in place logs to the same run

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
        self.state.scheduler = self.scheduler.state_dict()  # the schedule's position goes with the counters
        self.checkpointer.save(step, model=self.policy, optimizer=self.optimizer, state=self.state, scaler=self.scaler,
                               export=self.save)

    def resume(self, plan):
        """Continue exactly where plan.checkpoint stopped: the Checkpointer reads the weights, optimizer
        state, float16 loss scale, RNG states and this trainer's counters (self.state); the learning-rate
        schedule is rebuilt from the config at the checkpoint's position. Data order and lambda noise
        are functions of (seed, epoch) and (seed, step)."""
        saved_world = self.checkpointer.load(plan.checkpoint, model=self.policy, optimizer=self.optimizer,
                                             state=self.state, scaler=self.scaler)
        self.scheduler = self.build_scheduler(done=self.state.scheduler["last_epoch"])
        if not plan.in_place:  # a new run dir is a new wandb run
            self.state.wandb_run_id = None
        if is_main():
            self.metrics_file.write({"split": "resume", "step": self.state.step, "checkpoint": str(plan.checkpoint),
                                     "ranks": [saved_world, self.world], "forced": bool(plan.differences),
                                     "differences": {k: [a, b] for k, (a, b) in plan.differences.items()}})
            if plan.differences:
                print(f"resume_force=true: continuing despite differences in {', '.join(plan.differences)}")

    def padding_stats(self):
        """Fraction of the processed training tensor slots that held real tokens (not padding)."""
        return self.state.tokens_seen / max(1, self.state.slots_seen)


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


class _StepSums:
    """This rank's sums over the micro-batches of one global batch (each row metric over the valid rows,
    tokens, padded slots), then their sums over all ranks. packing: whether slots count only tokens."""

    def __init__(self, packing):
        self.packing, self.sums, self.tokens, self.slots = packing, {}, 0, 0

    def add(self, batch, out, counted):
        """Add one micro-batch's losses.LossOutput `out` (none of it when not counted). Returns the sum of
        its valid rows' losses (0-dim, with gradient)."""
        if counted:
            tokens, slots = token_counts(batch, self.packing)
            self.tokens, self.slots = self.tokens + tokens, self.slots + slots
        loss_sum, metric_sums, _ = losses.reduce_rows(out.row_losses, out.valid & counted, out.metrics)
        for k, v in metric_sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.float()
        return loss_sum

    def all_reduced(self, device):
        """(metric sums dict of floats, tokens, slots), summed over the ranks in one all-reduce."""
        keys = sorted(self.sums)
        counts = torch.tensor([float(self.tokens), float(self.slots)], device=device)
        packed = all_reduce_sum(torch.cat([torch.stack([self.sums[k] for k in keys]).to(device), counts])
                                if keys else counts).cpu()
        return {k: float(packed[i]) for i, k in enumerate(keys)}, int(packed[-2]), int(packed[-1])


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


def synced_clock(device):
    """time.perf_counter() once `device` has finished the work queued on it. CUDA runs kernels
    asynchronously: read without a sync, the clock stops while optimizer.step() is still running, and
    its time lands in the next step's step_time_s, tokens_per_s, tflops and mfu."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _crossed(step, batch_size, every):
    """Whether optimizer step `step` (0-based) carries the example count past a multiple of `every`."""
    return (step + 1) * batch_size // every > step * batch_size // every


def _netrc_has_wandb():
    path = os.path.expanduser("~/.netrc")
    return os.path.exists(path) and "api.wandb.ai" in open(path).read()


class FSDPTrainer(BasicTrainer):
    """The same loop with each decoder block and then the root sharded by FSDP2 across the ranks of
    the default process group (NCCL on GPUs, gloo on the CPU)."""

    def wrap(self, model, trainable):
        if not trainable:
            return self.place_frozen(self.cfg, model, self.device)
        # Parameters stay float32 (the optimizer's master copy); LoRA: only the trainable ones, the frozen base
        # keeps its dtype
        model = lora.trainable_float32(model) if lora.enabled(self.cfg) else model.float()
        if self.cfg.activation_checkpointing:
            self.recomputes_blocks = True  # counted in the step's FLOPs
            # recompute each block's activations in backward instead of storing them
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # no rank read weights (a resume): the checkpoint fills them
        return _shard(model, self.cfg, self.device, trainable=True, materialize=not self.plan.reads_weights)

    @staticmethod
    def place_frozen(cfg, model, device):
        """A frozen model (the reference) sharded over the ranks, computing in reference_dtype (see
        BasicTrainer.place_frozen)."""
        return _shard(model, cfg, device, trainable=False, materialize=False)

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


def _shard(model, cfg, device, trainable, materialize):
    """FSDP2: each decoder block, then the root, sharded across the ranks of the default process group,
    computing in policy_dtype (trainable) or reference_dtype. materialize: no rank read weights (a
    resume fills them); otherwise rank 0's are broadcast to the others."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = getattr(torch, cfg.model.policy_dtype if trainable else cfg.model.reference_dtype)
    # Compute runs in the configured dtype and gradients are reduced in float32 so summing over ranks loses nothing.
    mp = MixedPrecisionPolicy(param_dtype=dtype if dtype != torch.float32 else None, reduce_dtype=torch.float32)
    blocks = modeling.decoder_blocks(model, cfg.model.block_name)  # null: the model's _no_split_modules
    if cfg.compile:
        compile_blocks(model, cfg.model.block_name, cfg.compile_backend)
    # Only rank 0 read the weights (modeling.load_model); the others built the model on the meta device.
    # Rank 0 keeps its full tensors until every rank has copied its shard from them.
    full = model.state_dict() if is_main() else None
    for block in blocks:
        fully_shard(block, mp_policy=mp, reshard_after_forward=True)
    # The policy's root parameters (embeddings, head) stay gathered between forward and backward;
    # the reference has no backward, so everything is resharded after its forward.
    fully_shard(model, mp_policy=mp, reshard_after_forward=not trainable)
    if materialize:
        modeling.materialize(model, device)
    elif world_size() > 1:
        _broadcast_weights_from_rank0(model, full, device)
    return model.to(device)


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
