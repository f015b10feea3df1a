"""reference_logps=precompute: DPO / IPO / cDPO with the reference's log-probs computed once before
training give the losses of a live reference, step for step (in float64: to 1e-6), in one process,
with packing, on two FSDP2 ranks and across a resume; the reference model is gone while training
runs, and a second run reads the stored sums instead of computing them again."""

import copy
import gc
import weakref

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

import losses
import trainers
from forward import ModelCall
from training import launch, modeling, pipeline, reference_logps

from conftest import make_cfg, read_rows, tiny_model

# 4 optimizer steps of 8 DPO pairs, evaluation on 8 pairs at steps 0, 2 and 4; AdamW, so the
# reference sums reach the weights through every update. The precompute covers every training row, so the
# data is a seeded sample of 48 rows (the same in every run) rather than the sample's 1,700 in float64.
DPO = ["loss=dpo", "datasets=[ultrafeedback_sample]", "rows_per_dataset=48", "n_examples=32", "batch_size=8",
       "eval_batch_size=8",
       "n_eval_examples=8", "eval_every=16", "warmup_steps=0", "optimizer=AdamW", "lr=1e-3"]
COMPARED = ("loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "logps_chosen", "grad_norm")


def in_float64(patch, cache):
    """Models load and train in float64 (the trainer's .float() left out), and the stored sums go to `cache`.
    patch: a pytest MonkeyPatch."""
    load = modeling.load_model
    patch.setattr(modeling, "load_model", lambda cfg, dtype, *a, **k: load(cfg, "float64", *a, **k))
    patch.setattr(torch.nn.Module, "float", lambda self: self)
    patch.setattr(reference_logps, "cache_dir", lambda: cache)


def run(run_dir, *overrides):
    cfg = make_cfg(f"run_dir={run_dir}", *DPO, *overrides)
    pipeline.validate_config(cfg)
    pipeline.run(OmegaConf.to_container(cfg, resolve=True))
    return read_rows(run_dir)


def assert_same_losses(live, other, keys=COMPARED):
    live, other = ([r for r in rows if r["split"] in ("train", "eval")] for rows in (live, other))
    live = live[len(live) - len(other):]  # a resumed run logs only its own steps
    assert [(r["split"], r["step"]) for r in live] == [(r["split"], r["step"]) for r in other]
    for a, b in zip(live, other):
        for key in keys:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["split"], a["step"], key)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The run with a live reference model, in float64: its metrics rows."""
    with pytest.MonkeyPatch.context() as patch:
        in_float64(patch, tmp_path_factory.mktemp("unused-cache"))
        return run(tmp_path_factory.mktemp("live") / "run")


@pytest.mark.integration
def test_precomputed_sums_train_like_a_live_reference_with_no_reference_in_memory(live, tmp_path, monkeypatch):
    in_float64(monkeypatch, tmp_path / "cache")
    loaded, alive = [], []
    load, start = modeling.load_model, trainers.BasicTrainer.train

    def recording_load(*args, **kwargs):
        model = load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    def recording_train(self):
        gc.collect()
        alive.append(sum(ref() is not None for ref in loaded))
        return start(self)

    monkeypatch.setattr(modeling, "load_model", recording_load)
    monkeypatch.setattr(trainers.BasicTrainer, "train", recording_train)
    precomputed = run(tmp_path / "pre", "reference_logps=precompute", "save_every=16")
    assert len(loaded) == 2 and alive == [1]  # policy and reference loaded; only the policy left to train
    assert_same_losses(live, precomputed)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    # A second run of the same data and reference reads the stored sums: here it resumes the first run's
    # checkpoint of step 2 into a new run_dir, and continues exactly as the live run did.
    monkeypatch.setattr(reference_logps, "compute", lambda *a: pytest.fail("the stored sums were not read"))
    resumed = run(tmp_path / "resumed", "reference_logps=precompute",
                  f"resume_from={tmp_path / 'pre' / 'checkpoints' / 'step-2'}")
    assert [r["step"] for r in resumed if r["split"] == "train"] == [3, 4]
    assert_same_losses(live, resumed)


def _fsdp_worker(rank, cfg, port, cache):
    with pytest.MonkeyPatch.context() as patch:
        in_float64(patch, cache)
        pipeline.run(cfg, rank, 2, port)


@pytest.mark.distributed
def test_precomputed_packed_sums_on_two_fsdp_ranks_train_like_a_live_padded_reference_in_one_process(live, tmp_path):
    cfg = make_cfg(f"run_dir={tmp_path / 'fsdp'}", *DPO, "reference_logps=precompute", "packing=true",
                   "trainer=FSDPTrainer", "nproc=2", "device=cpu")
    pipeline.validate_config(cfg, world=2)
    mp.spawn(_fsdp_worker, args=(OmegaConf.to_container(cfg, resolve=True), launch.free_port(), tmp_path / "cache"),
             nprocs=2, join=True)
    # FSDP2 reduces the gradients in float32 (trainers.FSDPTrainer.wrap): the weights then differ from the
    # one-process run's by float32 rounding, which the loss shows below 1e-6 and a margin near 0 above it
    assert_same_losses(live, read_rows(tmp_path / "fsdp"), keys=("loss",))


@pytest.mark.unit
@pytest.mark.parametrize("loss_cfg", [{"name": "dpo"}, {"name": "dpo", "label_smoothing": 0.2},
                                      {"name": "ipo", "beta": 0.5}])
def test_every_reference_loss_reads_the_sums_from_the_batch_as_it_would_compute_them(loss_cfg):
    torch.manual_seed(0)
    policy = tiny_model()
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(4, 64, (6, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row
    labels[1, 7:] = -100
    batch = {"chosen_input_ids": ids[:3], "chosen_attention_mask": mask[:3], "chosen_labels": labels[:3],
             "rejected_input_ids": ids[3:], "rejected_attention_mask": mask[3:], "rejected_labels": labels[3:]}
    live = losses.batch_loss(losses.build(loss_cfg), policy, reference, batch, losses.ONE_STEP)
    with torch.no_grad():
        pair = ModelCall().pair_logps(reference, batch)
    stored = {**batch, "reference_chosen_logps": pair.chosen, "reference_rejected_logps": pair.rejected}
    out = losses.batch_loss(losses.build(loss_cfg), policy, None, stored, losses.ONE_STEP)
    torch.testing.assert_close(out.row_losses, live.row_losses, rtol=0, atol=0)
    for key in live.metrics:
        torch.testing.assert_close(out.metrics[key], live.metrics[key], rtol=0, atol=0)


@pytest.mark.unit
def test_the_cache_key_changes_with_the_reference_the_data_and_the_settings():
    class Data:  # what data_fingerprint reads: TokenizedData.fingerprint, a function of the rows
        def __init__(self, rows):
            self.fingerprint = repr(rows)

    cfg, model, rows, cpu = make_cfg(*DPO), tiny_model(), [[1, 2], [3]], torch.device("cpu")
    fingerprint = reference_logps.fingerprint(model)

    def key(cfg=cfg, rows=rows, fingerprint=fingerprint, world=1):
        return reference_logps.cache_key(model, fingerprint, Data(rows), Data(rows), cfg, world, cpu)

    assert key() == key()
    changed = [key(rows=[[1, 2], [4]]), key(cfg=make_cfg(*DPO, "packing=true")),
               key(cfg=make_cfg(*DPO, "model.reference_dtype=bfloat16")), key(fingerprint=fingerprint + 1e-9),
               key(world=2)]
    assert key() not in changed and len(set(changed)) == len(changed)
