"""Fuzz format detection: random key sets and shapes give a LoRA or a typed lorakit error, never a
KeyError/AttributeError/IndexError, and every key is accounted for when loading succeeds."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorakit
from lorakit.errors import LorakitError

PREFIXES = ["", "lora_unet_", "lora_te_", "lora_te2_", "unet.", "transformer.", "text_encoder.", "diffusion_model.",
            "base_model.model.", "lycoris_", "lora_transformer_", "model.diffusion_model."]
MODULES = ["a", "blocks.0.q", "down_blocks_0_attn1_to_q", "x.processor.to_out", "b.c", "z"]
SUFFIXES = [".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".lora_B.weight", ".lora_B.bias",
            ".lora_mid.weight", ".dora_scale", ".lora_magnitude_vector", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a",
            ".hada_w2_b", ".hada_t1", ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w2_b", ".lokr_t2", ".diff",
            ".diff_b", ".diff_m", ".w_norm", ".b_norm", ".oft_blocks", ".on_input", ".weight", "_lora.down.weight",
            ".lora.up.weight", ".lora_linear_layer.down.weight", ".lora_A.default.weight", "", ".down.weight"]
SHAPES = st.lists(st.integers(min_value=0, max_value=4), min_size=0, max_size=4)


@st.composite
def state_dicts(draw):
    n = draw(st.integers(min_value=1, max_value=8))
    out = {}
    for _ in range(n):
        key = draw(st.sampled_from(PREFIXES)) + draw(st.sampled_from(MODULES)) + draw(st.sampled_from(SUFFIXES))
        shape = draw(SHAPES)
        value = torch.randn(shape) if draw(st.booleans()) else torch.full(shape, draw(st.sampled_from([0.0, 1.0, float("nan")])))
        out[key] = value
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state_dicts(), st.booleans())
def test_detection_only_raises_typed_errors(state, strict):
    try:
        lora = lorakit.load(state, strict=strict)
    except LorakitError:
        return
    report = lora.report
    accounted = (set(report.consumed) | set(report.unsupported) | set(report.invalid) | set(report.unknown)
                 | set(report.base_weights))
    assert accounted == set(state)
    assert len(accounted) == sum(map(len, (report.consumed, report.unsupported, report.invalid, report.unknown,
                                           report.base_weights)))  # each key in exactly one place
    repr(lora)
    for layer in lora:
        # every loaded layer can compute its delta (or says clearly why not)
        try:
            if layer.dora is None:
                layer.delta_weight()
            layer.delta_bias()
        except LorakitError:
            pass
