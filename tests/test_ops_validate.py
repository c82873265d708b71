"""lorakit.ops.validate: per-module relative error against TUNED − BASE, coverage, success rate, layer
names, and the self-contained HTML report."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from lorakit.ops import extract, validate


def _files(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {
        "a.weight": torch.randn(48, 40, generator=g),
        "b.weight": torch.randn(32, 16, 3, 3, generator=g),
        "c.weight": torch.randn(20, 20, generator=g),
        "same.weight": torch.randn(8, 8, generator=g),
    }
    tuned = dict(base)
    tuned["a.weight"] = base["a.weight"] + 0.1 * torch.randn(48, 40, generator=g)  # full rank change
    tuned["b.weight"] = base["b.weight"] + 0.1 * (torch.randn(32, 2, generator=g) @ torch.randn(2, 144, generator=g)).reshape(32, 16, 3, 3)
    tuned["c.weight"] = base["c.weight"] + 0.05 * torch.randn(20, 20, generator=g)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", base, tuned


def test_validate_numbers_match_the_truncation_error(tmp_path):
    b, t, base, tuned = _files(tmp_path)
    extract(b, t, tmp_path / "l.safetensors", rank=4, include=["a.*", "b.*"])
    res = validate(tmp_path / "l.safetensors", b, t, report=tmp_path / "report.html")
    rows = {r["key"]: r for r in res.layers}
    s = torch.linalg.svdvals((tuned["a.weight"] - base["a.weight"]).double())
    best = float((s[4:] ** 2).sum().sqrt() / s.norm())
    assert best > 0.5  # a random full-rank change is poorly captured at rank 4: non-vacuous
    assert abs(rows["a.weight"]["rel_error"] - best) < 0.01 * best
    assert rows["b.weight"]["rel_error"] < 1e-5  # rank-2 change, captured exactly
    assert rows["c.weight"]["covered"] is False and rows["c.weight"]["rel_error"] == 1.0
    assert "same.weight" not in rows
    summary = res.summary
    assert summary["changed_modules"] == 3 and summary["covered_modules"] == 2
    assert abs(summary["coverage"] - 2 / 3) < 1e-9
    assert abs(summary["success_rate"] - 1 / 3) < 1e-9
    assert summary["layer_names"] == ["lora_unet_a", "lora_unet_b"]
    json.dumps(res.to_dict())  # serialisable for --json
    text = (tmp_path / "report.html").read_text()
    assert text.count("<img") == 3 and "data:image/png;base64," in text
    assert "a.weight" in text


def test_validate_strength_and_spurious_layers(tmp_path):
    b, t, base, tuned = _files(tmp_path)
    extract(b, t, tmp_path / "full.safetensors", rank=64)
    good = validate(tmp_path / "full.safetensors", b, t)
    assert good.summary["success_rate"] == 1.0 and good.summary["max_rel_error"] < 1e-5
    half = validate(tmp_path / "full.safetensors", b, t, strength=0.5)
    assert abs(half.summary["max_rel_error"] - 0.5) < 1e-5 and half.summary["success_rate"] == 0.0
    # a LoRA layer on a tensor the fine-tune did not change is reported, not hidden
    save_file({"lora_unet_same.lora_down.weight": torch.ones(1, 8), "lora_unet_same.lora_up.weight": torch.ones(8, 1)},
              tmp_path / "sp.safetensors")
    res = validate(tmp_path / "sp.safetensors", b, t)
    assert res.summary["spurious"][0]["key"] == "same.weight"
    assert abs(res.summary["spurious"][0]["abs_norm"] - 8.0) < 1e-5
    assert res.summary["coverage"] == 0.0
