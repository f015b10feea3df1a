"""The model zoo: tiny random Llama-3, Qwen2 (tied embeddings), Qwen3, Gemma-2 (logit soft-capping, sliding
window, eager attention), Gemma-3, Phi-3 and OLMo-2 (tests/tiny_architectures.py ZOO), built with
transformers' own classes and the bundled tokenizer, each trained with SFT, IFT and DPO for STEPS AdamW
steps on fixed batches of the sample data, five ways: the plain path (one head call, padded rows), the
chunked head, packing, FSDP2 on 2 gloo ranks with model.block_name left null, and LoRA (lora=default).
Each way's per-step losses must equal the plain path's.

What runs is what the trainer runs for each micro-batch (modeling.load_model, lora.apply, FSDPTrainer's
sharding, losses.batch_loss with a forward.ModelCall); the loop around it is a few lines here (`train_steps`),
not the trainer's, whose rank- and accumulation-invariance tests/test_trainers_fsdp.py checks on full runs.
Short on purpose: every architecture x loss x way in one process, and one 2-rank job for all of FSDP2.
"""

import copy
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

import losses
import trainers
from forward import ModelCall
from training import launch as launcher, lora, modeling, run_data
from training.batching import collate, micro_batches
from training.tokenization import end_of_turn_token

from conftest import make_cfg
from tiny_architectures import ZOO, build_zoo

# rows of tens of tokens: longer than Gemma's window of 16
DATA = {kind: [f"datasets=[{name}]", "max_length=128", "max_prompt_length=64"]
        for kind, name in (("single", "ultrachat_sample"), ("pairs", "ultrafeedback_sample"))}
LOSSES = {"sft": (["loss=sft"], "single"),
          "ift": (["loss=ift", "gamma=0.9", "loss.min_lambda=0.3", "loss.max_lambda=0.3"], "single"),
          "dpo": (["loss=dpo"], "pairs")}
ROWS, STEPS, RANKS, LR = 4, 2, 2, 1e-2  # lr: one step moves each loss by 1e-3 to 3e-2 of itself (see REL)
PLAIN = ModelCall(loss_chunk_tokens=None, packing=False)
WAYS = {"chunked": ModelCall(loss_chunk_tokens=16, packing=False),  # several chunks per micro-batch
        "packed": ModelCall(loss_chunk_tokens=None, packing=True)}
FSDP_CALL = WAYS["chunked"]  # the trainer's default path (a chunked head), inside FSDP2's root forward
# Every way computes the same float32 sums in another order (chunk shapes, packed kernels, the ranks'
# gradient reduction), so step 1 differs by rounding: a few ulps of SFT's and IFT's per-token means (~7, ulp
# 5e-7), and of DPO's summed log-probs (|sum| ~ 500, ulp 3e-5) times beta=0.1 and the loss's slope 1/2
# (~2e-6 per ulp). Step 2 adds AdamW's first update, lr * g / |g| per weight, the same whatever the order for
# every weight whose gradient is far above rounding; one whose exact gradient is 0 (Qwen2's k_proj bias:
# softmax ignores it) gets +-lr from rounding noise either way, which moves the loss only at second order.
# Measured here: at most 3e-7 relative (SFT, IFT) and 3.2e-6 absolute (DPO, OLMo-2 under FSDP2). The bounds
# are ~10-50x that, and ~30x below the smallest change one step makes (6.7e-4: DPO, whose step 1 is log 2).
REL, ABS = 2e-5, 2e-5


def cases():
    return [(name, loss) for name in ZOO for loss in LOSSES]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """name -> the model.* keys of its directory (built once for the module)."""
    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def steps():
    """kind ("single" or "pairs") -> STEPS global batches of ROWS consecutive sample rows, each (rows, the
    whole batch collated, its RANKS micro-batches collated as the trainer splits it). Every ZOO model
    carries the bundled tokenizer, so the token ids are the same for all of them."""
    out = {}
    for kind, datasets in DATA.items():
        cfg = make_cfg(*datasets)
        tokenizer = modeling.load_tokenizer(cfg)
        train, _ = run_data.load_data(cfg, tokenizer, pairs=kind == "pairs",
                                      eot_token=end_of_turn_token(tokenizer, cfg.model.eot_token))
        pad, lengths = tokenizer.pad_token_id, train.lengths()
        out[kind] = []
        for step in range(STEPS):
            rows = np.arange(step * ROWS, (step + 1) * ROWS)
            micro = [collate(train, m, pad) for m in micro_batches(rows, lengths, RANKS)]
            out[kind].append((ROWS, collate(train, rows, pad), micro))
    return out


def train_steps(policy, reference, loss, batches, call, world=1):
    """The mean loss of each AdamW step over `batches`, as the trainer computes and logs it.

    batches: per optimizer step, (rows in the global batch, this rank's micro-batch as collated).
    Each rank backpropagates sum(its row losses) * world / rows (FSDP2 averages the ranks' gradients);
    the logged loss is the sum over the ranks / rows. Returns [STEPS floats]."""
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=LR)
    policy.train()
    logged = []
    for step, (n_rows, batch) in enumerate(batches):
        info = losses.StepInfo(step, len(batches), 0, 0, True)
        total = losses.batch_loss(loss, policy, reference, batch, info, call).row_losses.sum()  # invalid rows: 0
        (total * world / n_rows).backward()
        optimizer.step()
        optimizer.zero_grad()
        total = total.detach()
        if world > 1:
            dist.all_reduce(total)
        logged.append(float(total) / n_rows)
    return logged


_composed, _loaded = {}, {}  # per process: what Hydra composed (~0.3 s a config), what from_pretrained read


def config(model_keys, loss_name, *extra):
    """The run config of a loss (and `extra` overrides) with a ZOO model's model.* keys, as train.py would
    compose it with model.KEY=VALUE overrides: Hydra composes each (loss, extra) once per process, and the
    model keys are set on a copy."""
    if (loss_name, extra) not in _composed:
        _composed[loss_name, extra] = make_cfg(*LOSSES[loss_name][0], *extra)
    cfg = copy.deepcopy(_composed[loss_name, extra])
    for key, value in model_keys.items():
        cfg.model[key] = value
    return cfg


def load(cfg, dtype):
    """A fresh copy of modeling.load_model(cfg, dtype), read once per process (its result depends on the
    model keys, the dtype and, under FSDP2 with several ranks, the rank: meta tensors off rank 0)."""
    key = (tuple(cfg.model.items()), dtype, cfg.trainer)
    if key not in _loaded:
        _loaded[key] = modeling.load_model(cfg, dtype)
    return copy.deepcopy(_loaded[key])


def one_process(model_keys, loss_name, steps, call, *extra):
    """(losses of train_steps in this process, the policy after them) for a ZOO model and a loss."""
    cfg = config(model_keys, loss_name, *extra)
    loss = losses.build(cfg.loss)
    if lora.enabled(cfg):  # as pipeline.build and the trainer: adapters on a frozen base, which is DPO's reference
        torch.manual_seed(0)
        policy = lora.trainable_float32(lora.apply(cfg, load(cfg, cfg.model.policy_dtype)))
        reference = lora.AdaptersDisabled(policy) if loss.needs_reference else None
    else:
        policy = load(cfg, "float32")
        reference = load(cfg, cfg.model.reference_dtype) if loss.needs_reference else None
    batches = [(n, whole) for n, whole, _ in steps[LOSSES[loss_name][1]]]
    return train_steps(policy, reference, loss, batches, call), policy


@pytest.fixture(scope="module")
def trained(zoo, steps):
    """(name, loss, way) -> the per-step losses of a ZOO model trained the way named ("plain" or a WAYS key),
    computed once each."""
    cache = {}

    def get(name, loss_name, way):
        if (name, loss_name, way) not in cache:
            cache[name, loss_name, way] = one_process(zoo[name], loss_name, steps, {"plain": PLAIN, **WAYS}[way])[0]
        return cache[name, loss_name, way]

    return get


@pytest.mark.integration
@pytest.mark.parametrize("way", sorted(WAYS))
@pytest.mark.parametrize("name, loss_name", cases())
def test_chunked_head_and_packing_take_the_plain_paths_steps(name, loss_name, way, trained):
    """Gemma-2 soft-caps its logits after lm_head: its "chunked" run falls back to the plain head
    (forward._chunkable) and must still train. Packing puts each row's tokens in one sequence with position
    ids that restart per row; the model must keep attention (and Gemma's sliding window) within a row."""
    assert trained(name, loss_name, way) == pytest.approx(trained(name, loss_name, "plain"), rel=REL, abs=ABS)


@pytest.mark.integration
@pytest.mark.parametrize("name, loss_name", cases())
def test_lora_starts_at_the_full_models_loss_and_trains_only_its_adapters(name, loss_name, zoo, steps, trained):
    """lora=default targets peft's all-linear on every architecture. B = 0 at the start, so step 1 adds
    exactly 0 to every targeted layer's output: the same loss as the full model's, to the last bit, on the
    same head (DPO's reference: the adapter-free base here, a second copy of the weights there). Later steps
    differ by design (only the adapters move); what is checked is that they moved and the base did not.
    Gemma-2's DPO reference (lora.AdaptersDisabled) must show the model's soft-capping to the head choice."""
    got, policy = one_process(zoo[name], loss_name, steps, WAYS["chunked"], "lora=default")
    assert got[0] == trained(name, loss_name, "chunked")[0]
    adapters = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_" in n for n in adapters)
    assert all(p.abs().max() > 0 for n, p in adapters.items() if ".lora_B." in n)  # every B trained away from 0
    base = load(config(zoo[name], loss_name), "float32").state_dict()
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
              for n, p in policy.named_parameters() if ".lora_" not in n}
    assert frozen.keys() <= base.keys() and all(torch.equal(p, base[n]) for n, p in frozen.items())  # bit for bit


def fsdp_rank(rank, zoo, steps, port, out_path):
    """One of RANKS gloo ranks: every ZOO model x loss, sharded as FSDPTrainer shards it (model.block_name
    null: the blocks transformers names in _no_split_modules; only rank 0 reads the weights), trained on
    this rank's micro-batch of each step. Rank 0 writes {"name-loss": [losses]} to out_path."""
    torch.set_num_threads(1)  # RANKS processes on the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    try:
        device, results = torch.device("cpu"), {}
        for name, loss_name in cases():
            cfg = config(zoo[name], loss_name, "trainer=FSDPTrainer", f"nproc={RANKS}")
            assert cfg.model.block_name is None
            loss = losses.build(cfg.loss)
            # FSDPTrainer.wrap: float32 parameters, then each decoder block and the root sharded, rank 0's weights
            # broadcast to the others (built on the meta device)
            policy = trainers._shard(load(cfg, "float32").float(), cfg, device, trainable=True, materialize=False)
            reference = None
            if loss.needs_reference:
                reference = trainers.FSDPTrainer.place_frozen(cfg, load(cfg, cfg.model.reference_dtype), device).eval()
            batches = [(n, micro[rank]) for n, _, micro in steps[LOSSES[loss_name][1]]]
            results[f"{name}-{loss_name}"] = train_steps(policy, reference, loss, batches, FSDP_CALL, RANKS)
        if rank == 0:
            out_path.write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp2_on_two_ranks_takes_the_plain_paths_steps_on_every_architecture(zoo, steps, trained, tmp_path):
    """One 2-rank job for all of them (starting ranks costs seconds; the models, milliseconds)."""
    out = tmp_path / "fsdp.json"
    torch.multiprocessing.start_processes(fsdp_rank, args=(zoo, steps, launcher.free_port(), out), nprocs=RANKS,
                                          join=True, start_method="spawn")
    got = json.loads(out.read_text())
    assert sorted(got) == sorted(f"{name}-{loss}" for name, loss in cases())
    plain = {case: trained(*case.split("-"), "plain") for case in got}
    wrong = {case: (got[case], plain[case]) for case in got
             if got[case] != pytest.approx(plain[case], rel=REL, abs=ABS)}
    assert not wrong, wrong
