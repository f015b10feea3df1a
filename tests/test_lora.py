"""LoRA through peft: the trainable parameter count against the model's shapes, training that moves
only the adapters, final/ merged = base + (alpha / r) B A computed in float64, DPO's adapter-disabled
reference against an explicit frozen copy, FSDP2 over 1 and 2 ranks, exact resume after SIGTERM, and
the CPU refusal of QLoRA."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import losses
from training import checkpoints, config_schema, lora, modeling, pipeline, run_data
from utils import REPO_DIR, ConfigError

from conftest import launch_run, make_cfg, run_train_py
from tiny_architectures import build_model_dir

BASE = REPO_DIR / "models" / "tiny-mistral"
STEPS = ["n_examples=32", "batch_size=8", "eval_batch_size=8", "n_eval_examples=8", "eval_every=1000",
         "do_first_eval=false", "warmup_steps=0", "optimizer=AdamW", "lr=1e-2"]
LORA = ["lora=default", "lora.r=4", "lora.alpha=8"]
# every linear layer of a Llama-style block: what lora.target_modules=null (peft's all-linear) targets
BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_peft(*overrides):
    from transformers import AutoModelForCausalLM
    cfg = make_cfg(*LORA, *overrides)
    torch.manual_seed(0)
    return cfg, lora.apply(cfg, AutoModelForCausalLM.from_pretrained(BASE))


def adapter_count(config, r, targets):
    """r * (in + out) per targeted projection of every layer, from the model's dimensions alone."""
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    shapes = {"q_proj": (h, config.num_attention_heads * config.head_dim), "k_proj": (h, kv), "v_proj": (h, kv),
              "o_proj": (config.num_attention_heads * config.head_dim, h), "gate_proj": (h, config.intermediate_size),
              "up_proj": (h, config.intermediate_size), "down_proj": (config.intermediate_size, h)}
    return config.num_hidden_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


@pytest.mark.unit
@pytest.mark.parametrize("overrides, targets, extra", [
    ([], BLOCK_LINEARS, 0),
    (["lora.target_modules=[q_proj,v_proj]", "lora.trainable_modules=[embed_tokens]"], ["q_proj", "v_proj"], 930 * 128),
])
def test_only_the_adapters_and_the_listed_modules_are_trainable(overrides, targets, extra, capsys):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning opens a LoRA run
        cfg, model = tiny_peft(*overrides)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == adapter_count(model.config, 4, targets) + extra
    expected = adapter_count(model.config, 4, targets) + extra  # the count is printed as the run starts
    assert f"LoRA: {expected:,} trainable parameters of " in capsys.readouterr().out
    assert all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    base_total = sum(t.numel() for t in load_file(BASE / "model.safetensors").values())
    assert frozen == base_total  # every base weight is there, frozen (trainable copies are extra)


@pytest.mark.integration
def test_a_lora_ift_run_trains_the_adapters_and_final_is_base_plus_their_deltas(tmp_path):
    """Two identical IFT runs, one saving the adapter alone, one the merged model: the merged weights
    are the base's plus (alpha / r) B A of the saved adapter, computed here in float64; everything
    not targeted (embeddings, norms, head) is the base's bit for bit, so the embedding table stayed
    frozen under IFT's blended embeddings."""
    ift = ["loss=ift", "loss.min_lambda=0.3", "loss.max_lambda=0.3", "datasets=[ultrachat_sample]"]
    cfg = make_cfg(f"run_dir={tmp_path / 'adapter'}", *STEPS, *ift, *LORA, "lora.merge=false")
    pipeline.validate_config(cfg)
    pipeline.launch(cfg)
    assert not (tmp_path / "adapter" / "final" / "model.safetensors").exists()  # the adapter alone
    _, merged = launch_run(tmp_path / "merged", *STEPS, *ift, *LORA)

    adapter = load_file(tmp_path / "adapter" / "final" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter" / "final" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(BLOCK_LINEARS)
    base = load_file(BASE / "model.safetensors")
    assert merged.keys() == base.keys()
    deltas = 0
    for name, w in base.items():
        module = name.removesuffix(".weight")
        a = adapter.get(f"base_model.model.{module}.lora_A.weight")
        if a is None:
            assert torch.equal(merged[name], w), name
            continue
        b = adapter[f"base_model.model.{module}.lora_B.weight"]
        assert b.abs().max() > 0, name  # B starts at zero: it trained
        expected = w.double() + (8 / 4) * b.double() @ a.double()
        torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=1e-6)
        deltas += 1
    assert deltas == 4 * 7

    # run_eval.py reads the adapter-only final/ on top of its base: the same answers as peft's model
    from peft import PeftModel
    from test_run_eval import our_greedy_answer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import run_eval
    run_eval.main([str(tmp_path / "adapter"), "--suite", "quick", "--limit", "3", "--batch-size", "1",
                   "--device", "cpu", "--log-samples"])
    samples = [json.loads(line) for line in open(tmp_path / "adapter" / "eval" / "samples_ift_quick.jsonl")]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), tmp_path / "adapter" / "final")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapter" / "final")
    with torch.no_grad():
        ours = [our_greedy_answer(model.eval(), tokenizer, s["doc"]["question"], 24) for s in samples]
    assert [s["response"].strip() for s in samples] == [a.strip() for a in ours]
    with torch.no_grad(), model.disable_adapter():  # and not the base model's answers
        assert ours != [our_greedy_answer(model, tokenizer, s["doc"]["question"], 24) for s in samples]


@pytest.mark.integration
@pytest.mark.parametrize("loss", ["sft", "dpo", "ipo", "orpo", "dft", "asft", "simpo"])
def test_every_loss_trains_lora_adapters_and_leaves_the_rest_of_the_base_alone(loss, tmp_path):
    """(IFT: the test above.) DPO and IPO run against the adapter-disabled base, which the trainer
    fingerprints and checks unchanged at the end."""
    data = ["datasets=[ultrachat_sample]"] if loss in ("sft", "dft", "asft") else ["datasets=[ultrafeedback_sample]"]
    _, final = launch_run(tmp_path / loss, *STEPS, "n_examples=16", f"loss={loss}", *data, *LORA)
    base = load_file(BASE / "model.safetensors")
    changed = {k for k in base if not torch.equal(final[k], base[k])}
    assert changed == {f"model.layers.{i}.{part}.{t}.weight" for i in range(4) for part, targets in
                       (("self_attn", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                        ("mlp", ["gate_proj", "up_proj", "down_proj"])) for t in targets}


@pytest.mark.unit
def test_dpo_with_the_adapter_disabled_reference_equals_dpo_with_a_frozen_copy():
    cfg, policy = tiny_peft("loss=dpo", "lora.dropout=0.0")
    frozen = copy.deepcopy(policy.get_base_model())  # the base weights, before the adapters move
    with torch.no_grad():  # adapters away from zero, so the policy differs from its reference
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    frozen = _without_adapters(frozen)
    batch = _dpo_batch()
    policy.train()

    results = []
    for reference in (lora.AdaptersDisabled(policy), frozen.eval().requires_grad_(False)):
        policy.zero_grad()
        out = losses.batch_loss(losses.build(cfg.loss), policy, reference, batch, losses.ONE_STEP)
        rows, metrics = out.row_losses, out.metrics
        rows.sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
        results.append((rows.detach(), metrics, grads))
        assert policy.training  # the reference call restored the policy's mode
    (rows_a, metrics_a, grads_a), (rows_b, metrics_b, grads_b) = results
    assert metrics_a["rewards_margin"].abs().max() > 1e-3  # the adapters made a difference
    torch.testing.assert_close(rows_a, rows_b, rtol=0, atol=1e-6)
    for k in metrics_a:
        torch.testing.assert_close(metrics_a[k], metrics_b[k], rtol=0, atol=1e-6)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=0, atol=1e-6)


def _without_adapters(model):
    """A deep copy of the peft-injected base with every LoRA layer replaced by its base Linear."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "base_layer"):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base_layer)
    assert not any("lora" in n for n, _ in model.named_parameters())
    return model


def _dpo_batch():
    from training.batching import collate
    cfg = make_cfg("loss=dpo", "datasets=[ultrafeedback_sample]")
    tokenizer = modeling.load_tokenizer(cfg)
    data, _ = run_data.load_data(cfg, tokenizer, pairs=True)
    return collate(data, list(range(4)), tokenizer.pad_token_id)


FSDP_LOSSES = {
    "ift": ["loss=ift", "gamma=0.9", "loss.min_lambda=0.3", "loss.max_lambda=0.3", "lora.trainable_modules=[embed_tokens]"],
    "dpo": ["loss=dpo", "datasets=[ultrafeedback_sample]"],  # the reference: the sharded base, adapters off
    "asft": ["loss=asft", "loss.kl_weight=0.5"],  # its head reads the sharded base's head weight, adapters off
}


@pytest.mark.distributed
@pytest.mark.parametrize("loss", sorted(FSDP_LOSSES))
def test_fsdp2_two_ranks_train_lora_like_one_process(loss, tmp_path):
    from test_trainers_fsdp import assert_same_run
    run = [*STEPS, "lr=1e-3", "max_grad_norm=1.0", *LORA, "lora.dropout=0.0", *FSDP_LOSSES[loss]]
    one = launch_run(tmp_path / "one", *run, "trainer=FSDPTrainer", "nproc=1", "gradient_accumulation_steps=2")
    two = launch_run(tmp_path / "two", *run, "trainer=FSDPTrainer", "nproc=2")
    assert_same_run(one, two)
    base = load_file(BASE / "model.safetensors")
    embed = "model.embed_tokens.weight"
    assert torch.equal(two[1][embed], base[embed]) == (loss != "ift")  # trained only where listed
    assert torch.equal(two[1]["lm_head.weight"], base["lm_head.weight"])  # never listed: frozen


@pytest.mark.unit
def test_merging_takes_the_frozen_weights_from_the_base_when_given():
    """QLoRA's path: the base weights come from an unquantised copy, the adapters from training."""
    state = {"base_model.model.l.q.base_layer.weight": torch.zeros(3, 2, dtype=torch.uint8),
             "base_model.model.l.q.lora_A.default.weight": torch.tensor([[1.0, 2.0]]),
             "base_model.model.l.q.lora_B.default.weight": torch.tensor([[1.0], [0.0], [-1.0]]),
             "base_model.model.norm.weight": torch.zeros(2, dtype=torch.uint8)}
    base = {"l.q.weight": torch.ones(3, 2), "norm.weight": torch.full((2,), 7.0)}
    merged = lora.merged_state_dict(state, 0.5, base=base)
    assert merged.keys() == {"l.q.weight", "norm.weight"}
    torch.testing.assert_close(merged["l.q.weight"], torch.tensor([[1.5, 2.0], [1.0, 1.0], [0.5, 0.0]]))
    torch.testing.assert_close(merged["norm.weight"], base["norm.weight"])


# NF4's 16 code values (bitsandbytes' get_4bit_type("nf4"), the QLoRA paper's normal-float quantiles)
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def bnb_4bit_state(prefix, weight, blocksize=8, nested_blocksize=4):
    """(the state dict keys bitsandbytes 0.50.2's Linear4bit writes for `weight` (NF4, double
    quantisation), the float64 weight they stand for), built by float64 loops: each block's values
    divided by its absmax, rounded to the nearest NF4 code, two codes a byte (first in the high
    nibble); absmax less its mean, rounded blockwise to a 256-value code. The key names, dtypes and
    shapes are those of a real Linear4bit(96, 40).state_dict() (printed with bitsandbytes 0.50.2):
    weight uint8 (n/2, 1), weight.absmax uint8, weight.quant_map float32 (16,), weight.nested_absmax
    float32, weight.nested_quant_map float32 (256,), weight.quant_state.bitsandbytes__nf4 uint8 (JSON)."""
    import json
    flat = [float(x) for x in weight.double().reshape(-1)]
    blocks = [flat[i:i + blocksize] for i in range(0, len(flat), blocksize)]
    absmax = [max(abs(x) for x in b) for b in blocks]
    codes = [min(range(16), key=lambda c: abs(NF4[c] - x / m)) for b, m in zip(blocks, absmax) for x in b]
    offset = sum(absmax) / len(absmax)
    code8 = [-1 + 2 * i / 255 for i in range(256)]
    centred = [m - offset for m in absmax]
    groups = [centred[i:i + nested_blocksize] for i in range(0, len(centred), nested_blocksize)]
    nested_absmax = [max(abs(x) for x in g) for g in groups]
    absmax8 = [min(range(256), key=lambda c: abs(code8[c] - x / s)) for g, s in zip(groups, nested_absmax) for x in g]
    # what the stored numbers mean: code * (dequantised absmax), in float64
    absmax_back = [code8[q] * nested_absmax[i // nested_blocksize] + offset for i, q in enumerate(absmax8)]
    value = torch.tensor([NF4[c] * absmax_back[i // blocksize] for i, c in enumerate(codes)],
                         dtype=torch.float64).view(weight.shape)
    meta = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "bfloat16", "shape": list(weight.shape),
            "nested_blocksize": nested_blocksize, "nested_dtype": "float32", "nested_offset": offset}
    state = {f"{prefix}weight": torch.tensor([c0 << 4 | c1 for c0, c1 in zip(codes[::2], codes[1::2])],
                                             dtype=torch.uint8).view(-1, 1),
             f"{prefix}weight.absmax": torch.tensor(absmax8, dtype=torch.uint8),
             f"{prefix}weight.quant_map": torch.tensor(NF4, dtype=torch.float32),
             f"{prefix}weight.nested_absmax": torch.tensor(nested_absmax, dtype=torch.float32),
             f"{prefix}weight.nested_quant_map": torch.tensor(code8, dtype=torch.float32),
             f"{prefix}weight.quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(meta).encode()),
                                                                           dtype=torch.uint8)}
    return state, value


def qlora_state():
    """A QLoRA peft state dict: q targeted (base_layer + adapters), k a 4-bit layer left untargeted,
    the norm unquantised. Returns (state, {name: float64 frozen weight})."""
    torch.manual_seed(0)
    q, q_value = bnb_4bit_state("base_model.model.l.q.base_layer.", torch.randn(3, 16))
    k, k_value = bnb_4bit_state("base_model.model.l.k.", torch.randn(2, 16))
    state = {**q, **k, "base_model.model.l.q.lora_A.default.weight": torch.randn(1, 16),
             "base_model.model.l.q.lora_B.default.weight": torch.tensor([[1.0], [0.0], [-1.0]]),
             "base_model.model.norm.weight": torch.full((16,), 7.0)}
    return state, {"l.q.weight": q_value, "l.k.weight": k_value, "norm.weight": state["base_model.model.norm.weight"]}


@pytest.mark.unit
def test_qlora_merges_bitsandbytes_state_dict_into_the_unquantised_base():
    """QLoRA's final/ (and save_hf_checkpoints): the quant-state keys bitsandbytes adds are no weights
    of the base model; the frozen weights come from the unquantised copy, the adapters from training."""
    state, _ = qlora_state()
    base = {"l.q.weight": torch.ones(3, 16), "l.k.weight": torch.full((2, 16), 2.0), "norm.weight": torch.ones(16)}
    merged = lora.merged_state_dict(state, 0.5, base=base)
    assert merged.keys() == base.keys()
    a, b = state["base_model.model.l.q.lora_A.default.weight"], state["base_model.model.l.q.lora_B.default.weight"]
    torch.testing.assert_close(merged["l.q.weight"], (1 + 0.5 * b.double() @ a.double()).float())
    assert torch.equal(merged["l.k.weight"], base["l.k.weight"])


@pytest.mark.unit
def test_qlora_without_a_base_dequantises_the_4bit_weights_before_merging():
    """Without the unquantised base, each 4-bit weight is read back to float from its quant state
    (against the float64 loops of bnb_4bit_state): final/ holds plain float weights only."""
    state, frozen = qlora_state()
    merged = lora.merged_state_dict(state, 0.5)
    assert merged.keys() == frozen.keys()
    assert all(v.is_floating_point() for v in merged.values())
    a, b = state["base_model.model.l.q.lora_A.default.weight"], state["base_model.model.l.q.lora_B.default.weight"]
    # float32 arithmetic on values of magnitude <= ~3: a few ulps of float32 (1.2e-7 relative)
    torch.testing.assert_close(merged["l.q.weight"].double(), frozen["l.q.weight"] + 0.5 * b.double() @ a.double(),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged["l.k.weight"].double(), frozen["l.k.weight"], rtol=1e-6, atol=1e-6)


@pytest.mark.unit
def test_dequantisation_equals_bitsandbytes_own():
    """Where bitsandbytes installs (its CPU backend suffices): a real Linear4bit's state dict, read back
    by dequantize_4bit, equals bitsandbytes.functional.dequantize_4bit bit for bit."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(96, 40, bias=False, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(40, 96), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")._quantize("cpu")
    state = layer.state_dict()
    quant = {k.removeprefix("weight."): v for k, v in state.items() if k != "weight"}
    expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert torch.equal(lora.dequantize_4bit(state["weight"], quant), expected)


@pytest.mark.unit
def test_qlora_refuses_a_bitsandbytes_whose_4bit_weights_dcp_cannot_save(monkeypatch):
    """DCP's get_state_dict resolves each state-dict key by getattr, e.g. Params4bit.absmax; bitsandbytes
    before its fix of issue #1405 (PR #1866) has no such attribute and the first checkpoint fails."""
    import sys
    import types

    class OldParams4bit(torch.nn.Parameter):
        pass

    fake = types.ModuleType("bitsandbytes")
    fake.__version__ = "0.45.0"
    fake.nn = types.SimpleNamespace(Params4bit=OldParams4bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    cfg = make_cfg("lora=default", "lora.quantize=4bit")
    with pytest.raises(ConfigError, match=r"^bitsandbytes 0.45.0 cannot checkpoint 4-bit weights"):
        lora.check_run(cfg, cuda=True)
    OldParams4bit.absmax = property(lambda self: None)  # what the fixed versions have
    lora.check_run(cfg, cuda=True)


@pytest.mark.unit
@pytest.mark.parametrize("overrides, message", [
    (["lora.quantize=4bit", "device=cpu"], "lora.quantize=4bit (QLoRA) needs a CUDA GPU"),
    (["lora.r=0"], "lora.r=0 is out of range: allowed [1, inf)"),
    (["lora.dropout=1.0"], "lora.dropout=1.0 is out of range: allowed [0, 1)"),
    (["lora.quantize=8bit"], "lora.quantize='8bit' is not allowed; choose one of None, 4bit"),
    (["lora.target_modules=[]"], "lora.target_modules must be a non-empty list"),
    (["lora.target_modules=[q_proj,qproj]"], "lora.target_modules=['q_proj', 'qproj']: qproj matches no module of "
                                             "MistralForCausalLM; its linear layers: down_proj, gate_proj, k_proj, "
                                             "lm_head, o_proj, q_proj, up_proj, v_proj (null = all of them but the "
                                             "output head)"),
])
def test_impossible_lora_settings_stop_before_any_model_loads(overrides, message, monkeypatch):
    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    cfg = make_cfg("lora=default", *overrides)
    with pytest.raises(ConfigError) as e:
        pipeline.validate_config(cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.unit
def test_the_dry_run_refuses_lora_targets_that_match_nothing_in_one_line():
    """Before: the dry run exited 0 with peft's error inside "plan: the model's shape is unknown (...)"."""
    status, out, err = run_train_py("dry_run=true", *LORA, "lora.target_modules=[foo]")
    assert status == 1 and err.strip().splitlines() == [
        "config error: lora.target_modules=['foo']: foo matches no module of MistralForCausalLM; its linear layers: "
        "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj (null = all of them but the output "
        "head)"]


@pytest.mark.unit
def test_default_targets_are_every_linear_layer_of_the_blocks_in_any_architecture(tmp_path):
    """Gemma-3 (text; model_type gemma3_text), which the old hand-kept family table lacked: adapters on
    every attention and MLP projection of every layer, none on the output head, r (in + out) each."""
    from transformers import AutoModelForCausalLM
    directory = build_model_dir("Gemma3ForCausalLM", tmp_path / "gemma3")
    cfg = make_cfg(*LORA, f"model.name_or_path={directory}")
    pipeline.validate_config(cfg)
    model = lora.apply(cfg, AutoModelForCausalLM.from_pretrained(directory))
    targeted = {n.partition(".lora_A.")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    parts = [f"self_attn.{t}" for t in BLOCK_LINEARS[:4]] + [f"mlp.{t}" for t in BLOCK_LINEARS[4:]]
    assert targeted == {f"base_model.model.model.layers.{i}.{p}" for i in range(2) for p in parts}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == adapter_count(model.config, 4, BLOCK_LINEARS)


@pytest.mark.distributed
def test_a_lora_run_stopped_by_sigterm_resumes_exactly_on_any_number_of_ranks(tmp_path):
    """A LoRA IFT run (adapter dropout on, so the RNG states matter) stopped by SIGTERM and continued
    with resume_from=latest equals the uninterrupted run step for step. Its checkpoints hold the
    adapters and their optimizer state only (the frozen base is read again from model.name_or_path).
    Without dropout (the ranks' dropout streams differ from one process's), a checkpoint of one
    process continues on two FSDP ranks like the uninterrupted run."""
    from training import checkpoints

    from test_checkpoints import (ACROSS_RANKS, ONE_PROCESS, STEPS as RESUME_STEPS, assert_continues, signal_after_step,
                                  start_cli)
    run = [*LORA, "lora.dropout=0.1"]
    reference = launch_run(tmp_path / "reference", *RESUME_STEPS, *run)

    run_dir = tmp_path / "stopped"
    status, out = signal_after_step(start_cli(run_dir, *run), run_dir, 2)
    assert status == 75, out[-3000:]  # sysexits' EX_TEMPFAIL, what schedulers requeue on
    stopped = max(checkpoints.complete_checkpoints(run_dir))
    saved = checkpoints.read_checkpoint(run_dir / "checkpoints" / f"step-{stopped}")
    assert saved["model"] and all(".lora_A." in k or ".lora_B." in k for k in saved["model"])
    resumed = launch_run(run_dir, *RESUME_STEPS, *run, "resume_from=latest")
    assert_continues((*reference, run_dir), resumed, ONE_PROCESS)

    still = [*LORA, "lora.dropout=0.0"]
    reference = launch_run(tmp_path / "still", *RESUME_STEPS, *still, "save_every=16")
    resumed = launch_run(tmp_path / "two", *RESUME_STEPS, *still, "trainer=FSDPTrainer", "nproc=2",
                         f"resume_from={tmp_path / 'still' / 'checkpoints' / 'step-2'}")
    assert_continues((*reference, None), resumed, ACROSS_RANKS)


@pytest.mark.unit
def test_lora_keys_without_choosing_lora_are_named():
    with pytest.raises(ConfigError, match=r"lora\.\* keys need lora=default on the command line"):
        config_schema.check_overrides(["lora.r=8"])
    with pytest.raises(ConfigError, match=r"unknown config key 'lora.alpah' \(did you mean 'alpha'\?\)"):
        config_schema.check_overrides(["lora=default", "lora.alpah=8"])


@pytest.mark.integration
def test_bf16_lora_keeps_the_frozen_base_in_bf16_and_trains_float32_adapters(tmp_path):
    """policy_dtype=bfloat16: the base (the memory) stays bf16, the adapters are float32 master
    weights, and the forward computes in bf16 under autocast; final/ is merged and saved in bf16."""
    from transformers import AutoModelForCausalLM

    from trainers import BasicTrainer
    cfg = make_cfg(*LORA, "model.policy_dtype=bfloat16")
    torch.manual_seed(0)
    model = lora.apply(cfg, AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.bfloat16))
    trainer = BasicTrainer.__new__(BasicTrainer)  # only wrap() is exercised: no data, no optimizer
    trainer.cfg, trainer.device, trainer.compute_dtype = cfg, torch.device("cpu"), torch.bfloat16
    trainer.plan = checkpoints.ResumePlan()  # a fresh run: the weights were read
    model = trainer.wrap(model, trainable=True)
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    ids = torch.tensor([[1, 5, 9, 14, 2]])
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16  # computed under autocast
    logits.float().logsumexp(-1).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())

    _, final = launch_run(tmp_path / "bf16", *STEPS, "n_examples=16", "loss=sft", "datasets=[ultrachat_sample]",
                          *LORA, "model.policy_dtype=bfloat16")
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    base = load_file(BASE / "model.safetensors")
    assert torch.equal(final["model.norm.weight"], base["model.norm.weight"].to(torch.bfloat16))
    assert not torch.equal(final["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16))
