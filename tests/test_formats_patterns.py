"""PEFT ``alpha_pattern`` keys are regexes: matched as PEFT does, but never with catastrophic backtracking
(issue 16: ``{"(a+)+": 2}`` took seconds on a 27-character module name)."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from lorakit import errors
from lorakit.formats import reader


def _peft_rule(pattern: str, path: str) -> bool:
    """PEFT's own rule (peft.utils.other.get_pattern_key), for reference on benign inputs."""
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:  # pragma: no cover - peft is optional
        return re.match(rf"(.*\.)?({pattern})$", path) is not None
    return get_pattern_key([pattern], path) == pattern


BENIGN = [
    ("to_q", "down_blocks.0.attn.to_q"),
    ("attn.to_q", "down_blocks.0.attn.to_q"),
    ("down_blocks.0.attn.to_q", "down_blocks.0.attn.to_q"),
    ("to_q", "down_blocks.0.attn.to_qk"),
    ("a.to_q", "xa.to_q"),
    ("a.to_q", "a_to_q"),  # PEFT's "." is a wildcard
    (r"blocks\.0\.attn.*", "blocks.0.attn.to_k"),
    (r"blocks\.0\.attn.*", "blocks.1.attn.to_k"),
    (r"blocks\.0\.attn.*", "x.blocks.0.attn"),
    (r"blocks\.\d+\.attn\.to_(q|k)", "transformer.blocks.12.attn.to_k"),
    (r"blocks\.\d+\.attn\.to_(q|k)", "transformer.blocks.12.attn.to_v"),
    (r".*\.to_out\.0", "single_blocks.3.attn.to_out.0"),
    (r"(to_q|to_k)", "attn.to_k"),
    (r"^blocks\.0\.ff", "blocks.0.ff"),
    (r"[ab]_proj", "attn.a_proj"),
    (r"to_[qkv]$", "attn.to_v"),
    ("proj_in", "down_blocks.0.attentions.0.proj_in"),
]


@pytest.mark.parametrize(("pattern", "path"), BENIGN)
def test_benign_patterns_match_as_peft_does(pattern, path):
    assert reader._pattern_matches(pattern, path) == _peft_rule(pattern, path)


def test_benign_set_is_not_vacuous():
    results = {reader._pattern_matches(p, m) for p, m in BENIGN}
    assert results == {True, False}


@pytest.mark.parametrize("pattern", ["(a+)+", "(a*)*b", "(a|a)+", "(a|aa)*c", r"(\w+\.)+x", "(a)\\1", ".*.*.*.*y",
                                     "(a{1,30}){1,30}"])
def test_catastrophic_patterns_are_refused_quickly(pattern):
    path = "a" * 40
    start = time.perf_counter()
    with pytest.raises(errors.FormatError, match=re.escape(repr(pattern))) as info:
        reader._pattern_matches(pattern, path)
    assert time.perf_counter() - start < 0.5
    assert "alpha_pattern" in str(info.value)


def test_redos_pattern_in_a_file_is_a_format_error_within_half_a_second():
    name = "a" * 40
    tensors = {
        f"unet.{name}.lora_A.weight": torch.randn(2, 4),
        f"unet.{name}.lora_B.weight": torch.randn(4, 2),
    }
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 2, "unet.alpha_pattern": {"(a+)+": 2}})}
    start = time.perf_counter()
    with pytest.raises(errors.FormatError, match=r"lora_adapter_metadata: alpha_pattern key '\(a\+\)\+'"):
        reader.parse_state_dict(tensors, meta)
    assert time.perf_counter() - start < 0.5


def test_alpha_pattern_still_applies_from_metadata():
    tensors = {}
    for name in ("blocks.0.attn.to_q", "blocks.1.attn.to_q"):
        tensors[f"unet.{name}.lora_A.weight"] = torch.randn(2, 4)
        tensors[f"unet.{name}.lora_B.weight"] = torch.randn(4, 2)
    cfg = {"unet.r": 2, "unet.lora_alpha": 2, "unet.alpha_pattern": {r"blocks\.0\.attn.*": 8}}
    lora = reader.parse_state_dict(tensors, {"lora_adapter_metadata": json.dumps(cfg)})
    scales = {layer.path: layer.weight.scale for layer in lora}
    assert scales == {"blocks.0.attn.to_q": 4.0, "blocks.1.attn.to_q": 1.0}


def test_literal_fallback_for_invalid_regex():
    # not a valid regex: PEFT would raise; lorakit matches it literally, as before
    assert reader._pattern_matches("to_q[", "attn.to_q[")
    assert not reader._pattern_matches("to_q[", "attn.to_q")
