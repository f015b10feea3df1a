"""The FLOPs count of training/flops.py against independent counts: the parameters by hand from the config,
causal pairs by brute force, and whole steps against torch's FlopCounterMode, which counts every
matrix product the model's forward and backward actually run."""

import copy

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import losses
from forward import ModelCall
from training import flops

from conftest import tiny_model

pytestmark = pytest.mark.unit


def test_the_shape_is_the_hand_counted_weight_matrices_of_the_config():
    for tie in (False, True):
        model = tiny_model(tie=tie)
        c = model.config  # hidden 32, 4 heads of 8, 2 kv heads, intermediate 64, 2 layers, vocab 64
        per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64  # q, k and v, o, gate/up/down
        shape = flops.shape_of(model)
        assert shape.body == c.num_hidden_layers * per_layer  # norms (1-D) and embeddings are not products
        assert shape.head == 64 * 32 and shape.attn_width == 32
        assert shape.windows == (c.sliding_window,) * 2 == (4096, 4096)  # MistralConfig's default window


def test_a_4bit_packed_weight_counts_as_the_matrix_it_stands_for():
    """QLoRA: bitsandbytes' Params4bit holds two 4-bit values a byte, (out*in/2, 1), with the real shape
    in its quant_state; counted by its storage, the body (and MFU) would be half."""
    import types

    class Params4bit(torch.nn.Parameter):  # the attributes flops reads, as bitsandbytes 0.50.2 has them
        pass

    model = tiny_model()
    plain = flops.shape_of(model).body
    for layer in model.model.layers:
        for linear in (layer.self_attn.q_proj, layer.mlp.down_proj):
            shape = linear.weight.shape
            packed = Params4bit(torch.zeros(shape.numel() // 2, 1, dtype=torch.uint8), requires_grad=False)
            packed.quant_state = types.SimpleNamespace(shape=shape)
            linear.weight = packed
    assert flops.shape_of(model).body == plain == 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64)


@pytest.mark.parametrize("window", [None, 1, 3, 7, 50])
def test_attention_pairs_count_every_visible_query_key_pair(window):
    for n in range(0, 20):
        brute = sum(1 for i in range(n) for j in range(n) if j <= i and (window is None or i - j < window))
        assert flops.attention_pairs(n, window) == brute


def _measured(loss, model, batch, chunk=None, reference=None):
    """FlopCounterMode's count of the products inside the models (the policy's forward and backward, the
    reference's forward) of one micro-batch's loss. The loss's own small products outside them
    (Relation Propagation's scan) are not part of the formula, so they are left out."""
    policy_name = type(model).__name__
    with FlopCounterMode(display=False) as counter:
        out = losses.batch_loss(loss, model, reference, batch, losses.ONE_STEP, ModelCall(loss_chunk_tokens=chunk))
        out.row_losses.sum().backward()
    return sum(counter.get_flop_counts()[policy_name].values())


def _equal_length_batch(B, T, P, prefix=""):
    ids = torch.randint(4, 64, (B, T))
    labels = ids.clone()
    labels[:, :P] = -100
    return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": torch.ones(B, T, dtype=torch.long),
            f"{prefix}labels": labels}


@pytest.mark.parametrize("loss_name, lam, chunk", [("sft", None, None), ("sft", None, 4), ("ift", 0.2, 512),
                                                   ("ift", 0.0, 512), ("ift", 0.2, 5), ("dft", None, 512)])
def test_a_step_costs_what_flop_counter_mode_counts(loss_name, lam, chunk, monkeypatch):
    torch.manual_seed(0)
    model = tiny_model()
    model.config._attn_implementation = "eager"  # plain matmuls, which FlopCounterMode sees
    B, T, P = 2, 12, 4  # no padding; T - P = 8 targets per row, 16 per call
    loss = losses.build({"name": loss_name, **({"min_lambda": lam, "max_lambda": lam} if lam is not None else {})})
    measured = _measured(loss, model, _equal_length_batch(B, T, P), chunk)
    # eager attention computes the whole T x T square before masking: count that here, the formula's
    # causal pairs (the work the model needs) are checked against brute force above
    monkeypatch.setattr(flops, "attention_pairs", lambda n, window=None: np.asarray(n) * np.asarray(n))
    expected = flops.call_flops(flops.shape_of(model), [T] * B, [T - P] * B, loss.no_grad_passes(losses.ONE_STEP),
                                head_chunk=chunk)
    assert measured == expected
    if chunk == 4:  # 16 targets > 4: the head's backward recomputes the logits: 2·V·H·16 more
        assert expected - flops.call_flops(flops.shape_of(model), [T] * B, [T - P] * B) == 2 * 64 * 32 * 16


def test_a_dpo_step_with_a_live_reference_costs_one_more_forward(monkeypatch):
    torch.manual_seed(0)
    model = tiny_model()
    model.config._attn_implementation = "eager"
    reference = copy.deepcopy(model).requires_grad_(False)
    B, T, P = 2, 10, 3
    batch = {**_equal_length_batch(B, T, P, "chosen_"), **_equal_length_batch(B, T, P, "rejected_")}
    measured = _measured(losses.build({"name": "dpo"}), model, batch, chunk=512, reference=reference)  # both models: one class
    monkeypatch.setattr(flops, "attention_pairs", lambda n, window=None: np.asarray(n) * np.asarray(n))
    shape = flops.shape_of(model)
    # one trained call over chosen and rejected (2B sequences), and the reference's forward over the same
    assert measured == flops.call_flops(shape, [T] * 2 * B, [T - P] * 2 * B, no_grad_passes=1)
    assert measured > flops.call_flops(shape, [T] * 2 * B, [T - P] * 2 * B)


@pytest.mark.parametrize("chunk", [512, 5])  # all 16 answer tokens in one chunk, and in four
def test_an_asft_step_costs_the_reference_forward_and_both_heads_recomputed(chunk, monkeypatch):
    """The reference's forward (its head at the answer tokens computed inside the policy's, for the KL over
    the vocabulary), and a backward that recomputes both heads' logits whatever the chunk."""
    torch.manual_seed(0)
    model = tiny_model()
    model.config._attn_implementation = "eager"
    reference = copy.deepcopy(model).requires_grad_(False)
    B, T, P = 2, 12, 4
    loss = losses.build({"name": "asft"})
    measured = _measured(loss, model, _equal_length_batch(B, T, P), chunk=chunk, reference=reference)
    monkeypatch.setattr(flops, "attention_pairs", lambda n, window=None: np.asarray(n) * np.asarray(n))
    shape = flops.shape_of(model)
    expected = flops.call_flops(shape, [T] * B, [T - P] * B, no_grad_passes=1, head_chunk=chunk,
                                head_recomputes=loss.head_recomputes)
    assert measured == expected
    assert expected == flops.call_flops(shape, [T] * B, [T - P] * B, no_grad_passes=1) + 2 * 2 * 64 * 32 * 16


def test_lora_and_activation_checkpointing_change_the_count_as_documented():
    shape = flops.Shape(body=1000, head=100, attn_width=8, windows=(None, None))
    tokens, targets = [5, 3], [2, 1]
    weights, attention, head = 2 * 1000 * 8, 4 * 8 * 2 * (15 + 6), 2 * 100 * 3
    assert flops.forward_flops(shape, tokens, targets) == (weights, attention, head)
    full = flops.call_flops(shape, tokens, targets)
    assert full == 3 * (weights + attention + head)  # 6·N per token: forward + twice for backward
    assert flops.call_flops(shape, tokens, targets, lora=True) == 2 * (weights + head) + 3 * attention
    assert flops.call_flops(shape, tokens, targets, recompute_blocks=True) == full + weights + attention
    assert flops.call_flops(shape, tokens, targets, head_chunk=3) == full  # 3 targets fit in one chunk
    assert flops.call_flops(shape, tokens, targets, head_chunk=2) == full + head


def test_known_cards_have_their_peak_and_an_override_wins():
    assert flops.card_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert flops.card_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert flops.card_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert flops.card_peak_tflops("NVIDIA A10G") == 70.0
    assert flops.card_peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert flops.card_peak_tflops("Some Future Card") is None
    assert flops.device_peak_tflops(torch.device("cpu")) is None
    assert flops.device_peak_tflops(torch.device("cpu"), 12.5) == 12.5
