"""Several nodes that do not share a disk: two torchrun agents on this machine play two nodes, each
with its own datasets cache (HF_DATASETS_CACHE on node-local disk) and one shared run_dir. Each node
tokenises once (counted in every process that could), the run trains like one process, its tflops add
up to the plan's FLOPs, and a SIGTERM on both nodes ends in a checkpoint from which both nodes resume.
One launch (two starts) proves all of it: each start costs five fresh interpreters (two agents, three
ranks), seconds of CPU each."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from training import launch as launcher
from utils import REPO_DIR

from conftest import launch_run, make_cfg, read_rows
from test_trainers_fsdp import assert_same_run

pytestmark = pytest.mark.distributed

# 4 steps of 6 rows (3 ranks), a checkpoint after each. rows_per_dataset: each node tokenises the 24 rows
# trained on, not the sample's 3,000 (seconds, and a pool of workers, per node)
RUN = ["datasets=[ultrachat_sample]", "rows_per_dataset=24", "loss=sft", "n_examples=24", "batch_size=6",
       "eval_batch_size=6", "n_eval_examples=6", "eval_every=1000", "do_first_eval=false", "warmup_steps=0",
       "max_grad_norm=1.0", "optimizer=AdamW", "lr=1e-3", "save_every=6"]

# Every process that runs this code appends each build of a tokenised cache entry to $BUILDS
COUNT_BUILDS = """import json, os
from training import tokenization
tokenise = tokenization._tokenise
def counted(source, folder, key, label, *args, **kwargs):
    with open(os.environ["BUILDS"], "a") as f:
        f.write(json.dumps([os.getpid(), label]) + "\\n")
    return tokenise(source, folder, key, label, *args, **kwargs)
tokenization._tokenise = counted
"""
# train.py as torchrun runs it, counting its builds
COUNTING = """import os, runpy, sys
sys.path.insert(0, os.getcwd())
""" + COUNT_BUILDS + """sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def start_nodes(tmp_path, run_dir, *overrides):
    """Two torchrun agents meeting at a c10d rendezvous: node 0 with one rank, node 1 with two, so a
    node whose first rank is not global rank 0 has a second rank that must wait for it."""
    script = tmp_path / "counting_train.py"
    script.write_text(COUNTING)
    port = launcher.free_port()
    procs = []
    for node in (0, 1):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "HF_DATASETS_CACHE": str(tmp_path / f"node{node}" / "cache"),
               "BUILDS": str(tmp_path / f"node{node}" / "builds.jsonl")}
        (tmp_path / f"node{node}").mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", str(node + 1),
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "nodes-test", str(script), f"run_dir={run_dir}", *RUN, "trainer=FSDPTrainer",
               "device=cpu", *overrides]
        procs.append(subprocess.Popen(cmd, cwd=REPO_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def builds(tmp_path, node):
    path = tmp_path / f"node{node}" / "builds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_two_nodes_with_their_own_datasets_cache_tokenise_once_each_train_as_one_process_resume_and_count_tflops(
        tmp_path, monkeypatch):
    """Also the ranks' tflops: Σ over steps of tflops · step_time_s · ranks · 1e12 is the plan's FLOPs
    (tflops is per device: the step's FLOPs over all ranks / time / ranks), over both starts.
    Every rank tokenising at once (node 1 builds twice), a node's second rank not waiting for its
    first, tflops not divided by the ranks (3x), a step lost or repeated across the resume, or ranks
    that train otherwise than one process: each fails here."""
    run_dir = tmp_path / "run"
    procs = start_nodes(tmp_path, run_dir)
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):  # SIGTERM on both nodes after step 2
        if (run_dir / "metrics.jsonl").exists() and len(read_rows(run_dir, "train")) >= 2:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert not (run_dir / "final").exists(), outs[0][-3000:]
    assert any((run_dir / "checkpoints").glob("step-*")), outs[0][-3000:] + outs[1][-3000:]
    procs = start_nodes(tmp_path, run_dir, "resume_from=latest")
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]

    # each node built the train and the test split once, over all its ranks and both starts (c10d
    # decides which node holds global rank 0: either way)
    for node in (0, 1):
        built = builds(tmp_path, node)
        assert sorted(label for _, label in built) == ["dataset 'ultrachat_sample' (test)",
                                                       "dataset 'ultrachat_sample' (train)"], (node, built)
    rows = read_rows(run_dir, "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # each step once: steps 3-4 continued the checkpoint
    # one process with 3 accumulation steps: the same micro-batches (and padding) as 3 ranks, as in test_trainers_fsdp
    one = launch_run(tmp_path / "one", *RUN, "save_every=null", "gradient_accumulation_steps=3")
    assert_same_run(one, (rows, load_file(run_dir / "final" / "model.safetensors")))

    # the run's plan, on node 0's entries (mapped here, not built again)
    from omegaconf import OmegaConf

    import datasets
    import losses
    from training import modeling, planning, run_data
    from training.tokenization import end_of_turn_token
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "node0" / "cache"))
    cfg = make_cfg(*RUN, "trainer=FSDPTrainer")
    OmegaConf.update(cfg, "run_dir", None)
    tokenizer = modeling.load_tokenizer(cfg)
    loss = losses.build(cfg.loss)
    train, _ = run_data.load_data(cfg, tokenizer, loss.needs_pairs, end_of_turn_token(tokenizer, cfg.model.eot_token))
    planned = planning.plan(cfg, train, loss, world=3)["flops"]
    # each row's tflops is FLOPs / dt / 3 / 1e12 in float64: 3 roundings, ~1e-16 each, so 1e-12 is ample
    assert sum(r["tflops"] * r["step_time_s"] * 3 * 1e12 for r in rows) == pytest.approx(planned, rel=1e-12)
