"""lorakit.ops.merge: exact ``W + Σ s ΔW`` rounded once, bit-identical untouched tensors, streaming output
equal to an in-memory reference, folders and prefixes, and typed failures that leave nothing behind."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.errors import MatchError, NonFiniteError, OverwriteError, ShapeMismatchError
from lorakit.ops import merge
from lorakit.ops.merge import parse_lora_spec


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _model(dtype=torch.float16, prefix: str = "") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{prefix}blocks.0.attn.to_q.weight": torch.randn(64, 48, generator=g).to(dtype),
        f"{prefix}blocks.0.attn.to_q.bias": torch.randn(64, generator=g).to(dtype),
        f"{prefix}blocks.0.conv.weight": torch.randn(32, 16, 3, 3, generator=g).to(dtype),
        f"{prefix}blocks.1.ff.weight": torch.randn(40, 48, generator=g).to(dtype),
        f"{prefix}step": torch.tensor([3], dtype=torch.int64),
    }


def _lora(seed: int, rank: int, alpha: float, with_bias: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "lora_unet_blocks_0_attn_to_q.lora_down.weight": torch.randn(rank, 48, generator=g),
        "lora_unet_blocks_0_attn_to_q.lora_up.weight": torch.randn(64, rank, generator=g),
        "lora_unet_blocks_0_attn_to_q.alpha": torch.tensor(alpha),
        "lora_unet_blocks_0_conv.lora_down.weight": torch.randn(rank, 16, 3, 3, generator=g),
        "lora_unet_blocks_0_conv.lora_up.weight": torch.randn(32, rank, 1, 1, generator=g),
        "lora_unet_blocks_0_conv.alpha": torch.tensor(alpha),
    }
    if with_bias:
        sd["lora_unet_blocks_0_attn_to_q.diff_b"] = torch.randn(64, generator=g)
    return sd


def _dense(sd: dict, name: str, shape) -> torch.Tensor:
    down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * (float(sd[f"{name}.alpha"]) / down.shape[0])


def _reference(model: dict, loras: list[tuple[dict, float]], prefix: str = "") -> dict[str, torch.Tensor]:
    out = dict(model)
    for key, mod in ((f"{prefix}blocks.0.attn.to_q.weight", "attn_to_q"), (f"{prefix}blocks.0.conv.weight", "conv")):
        acc = model[key].float()
        for sd, s in loras:
            acc = acc + s * _dense(sd, f"lora_unet_blocks_0_{mod}", acc.shape)
        out[key] = acc.to(model[key].dtype)
    bias_key = f"{prefix}blocks.0.attn.to_q.bias"
    acc = model[bias_key].float()
    changed = False
    for sd, s in loras:
        if "lora_unet_blocks_0_attn_to_q.diff_b" in sd:
            acc = acc + s * sd["lora_unet_blocks_0_attn_to_q.diff_b"]
            changed = True
    if changed:
        out[bias_key] = acc.to(model[bias_key].dtype)
    return out


@pytest.fixture
def files(tmp_path):
    model = _model()
    save_file(model, tmp_path / "base.safetensors", metadata={"modelspec.title": "tiny"})
    a, b = _lora(1, 4, 2.0, with_bias=True), _lora(2, 8, 16.0)
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    return tmp_path, model, a, b


def test_merge_equals_dense_sum_and_keeps_untouched_bits(files):
    tmp, model, a, b = files
    res = merge(tmp / "base.safetensors", [(tmp / "a.safetensors", 0.8), (tmp / "b.safetensors", -0.3)], tmp / "out.safetensors")
    out = load_file(tmp / "out.safetensors")
    ref = _reference(model, [(a, 0.8), (b, -0.3)])
    assert list(out) == sorted(model) or set(out) == set(model)
    for key in model:
        assert out[key].dtype == model[key].dtype
        assert torch.equal(out[key], ref[key]), key
    for key in ("blocks.1.ff.weight", "step"):
        assert out[key].numpy().tobytes() == model[key].numpy().tobytes()
    for key in ("blocks.0.attn.to_q.weight", "blocks.0.conv.weight", "blocks.0.attn.to_q.bias"):
        assert not torch.equal(out[key], model[key])  # non-vacuous
    assert res.summary["patched_tensors"] == 3
    with safe_open(str(tmp / "out.safetensors"), "pt") as fh:
        assert fh.metadata() == {"modelspec.title": "tiny"}


def test_streaming_output_equals_in_memory_reference(files):
    tmp, model, a, _ = files
    merge(tmp / "base.safetensors", [(tmp / "a.safetensors", 1.0)], tmp / "s.safetensors", dtype="bf16")
    ref = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in _reference(model, [(a, 1.0)]).items()}
    # the reference's fp16 rounding happened before the bf16 cast; recompute patched tensors in fp32 directly
    for key, mod in (("blocks.0.attn.to_q.weight", "attn_to_q"), ("blocks.0.conv.weight", "conv")):
        ref[key] = (model[key].float() + _dense(a, f"lora_unet_blocks_0_{mod}", model[key].shape)).to(torch.bfloat16)
    ref["blocks.0.attn.to_q.bias"] = (model["blocks.0.attn.to_q.bias"].float() + a["lora_unet_blocks_0_attn_to_q.diff_b"]).to(torch.bfloat16)
    save_file(ref, tmp / "ref.safetensors")
    got, want = load_file(tmp / "s.safetensors"), load_file(tmp / "ref.safetensors")
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    # header sanity: 8-byte length + JSON, data offsets contiguous
    raw = (tmp / "s.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert (8 + n) % 8 == 0 and header["blocks.0.conv.weight"]["dtype"] == "BF16"


def test_merge_pt_format_and_prefixed_checkpoint(tmp_path):
    model = _model(torch.float32, prefix="model.diffusion_model.")
    save_file(model, tmp_path / "ldm.safetensors")
    a = _lora(3, 4, 4.0)
    save_file(a, tmp_path / "a.safetensors")
    merge(tmp_path / "ldm.safetensors", [(tmp_path / "a.safetensors", 0.5)], tmp_path / "o.pt", format="pt")
    out = torch.load(tmp_path / "o.pt", weights_only=True)
    ref = _reference(model, [(a, 0.5)], prefix="model.diffusion_model.")
    for key in model:
        assert torch.equal(out[key], ref[key]), key
    assert not torch.equal(out["model.diffusion_model.blocks.0.conv.weight"], model["model.diffusion_model.blocks.0.conv.weight"])


def test_merge_plain_pickled_state_dict_to_safetensors(tmp_path):
    model = {k: v for k, v in _model(torch.float32).items()}
    torch.save({"state_dict": model}, tmp_path / "m.ckpt")
    a = _lora(5, 2, 1.0)
    save_file(a, tmp_path / "a.safetensors")
    merge(tmp_path / "m.ckpt", [(tmp_path / "a.safetensors", 2.0)], tmp_path / "m.safetensors")
    out = load_file(tmp_path / "m.safetensors")
    ref = _reference(model, [(a, 2.0)])
    assert set(out) == set(model) and all(torch.equal(out[k], ref[k]) for k in model)
    assert not torch.equal(out["blocks.0.attn.to_q.weight"], model["blocks.0.attn.to_q.weight"])


def test_merge_into_diffusers_folder(tmp_path):
    model = _model(torch.float32)
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    save_file(model, tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "pipe" / "unet" / "config.json").write_text('{"a": 1}')
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    a = _lora(4, 4, 4.0)
    save_file(a, tmp_path / "a.safetensors")
    merge(tmp_path / "pipe", [(tmp_path / "a.safetensors", 1.0)], tmp_path / "merged")
    out = load_file(tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors")
    ref = _reference(model, [(a, 1.0)])
    assert all(torch.equal(out[k], ref[k]) for k in model)
    assert not torch.equal(out["blocks.0.conv.weight"], model["blocks.0.conv.weight"])
    assert (tmp_path / "merged" / "unet" / "config.json").read_text() == '{"a": 1}'
    assert (tmp_path / "merged" / "model_index.json").exists()


def test_merge_failures_are_typed_and_leave_nothing(files):
    tmp, model, a, _ = files
    base = tmp / "base.safetensors"
    before = {p.name: _sha(p) for p in tmp.glob("*.safetensors")}
    out = tmp / "out.safetensors"
    save_file({"lora_unet_nowhere.lora_down.weight": torch.ones(2, 4), "lora_unet_nowhere.lora_up.weight": torch.ones(4, 2)},
              tmp / "none.safetensors")
    with pytest.raises(MatchError, match="none.safetensors"):
        merge(base, [(tmp / "none.safetensors", 1.0)], out)
    wrong = dict(a)
    wrong["lora_unet_blocks_0_attn_to_q.lora_down.weight"] = torch.ones(4, 40)
    save_file(wrong, tmp / "wrong.safetensors")
    with pytest.raises(ShapeMismatchError, match="blocks_0_attn_to_q"):
        merge(base, [(tmp / "a.safetensors", 1.0), (tmp / "wrong.safetensors", 1.0)], out)
    huge = dict(a)
    huge["lora_unet_blocks_0_conv.lora_up.weight"] = torch.full((32, 4, 1, 1), 1e30)
    huge["lora_unet_blocks_0_conv.lora_down.weight"] = torch.full((4, 16, 3, 3), 1e30)
    save_file(huge, tmp / "huge.safetensors")
    with pytest.raises(NonFiniteError, match="blocks.0.conv.weight"):
        merge(base, [(tmp / "huge.safetensors", 1.0)], out)
    with pytest.raises(OverwriteError):
        merge(base, [(tmp / "a.safetensors", 1.0)], base)
    with pytest.raises(OverwriteError):
        merge(base, [(tmp / "a.safetensors", 1.0)], tmp / "a.safetensors")
    assert not out.exists()
    assert not list(tmp.glob(".*.tmp"))
    assert {p.name: _sha(p) for p in tmp.glob("*.safetensors") if p.name in before} == before


def test_parse_lora_spec():
    assert parse_lora_spec("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_lora_spec("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_spec("dir:x/a.safetensors:-1") == ("dir:x/a.safetensors", -1.0)
    assert parse_lora_spec("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)


def test_merge_loha_layer_equals_its_dense_delta(tmp_path):
    from lorakit.adapters import LoHaWeights

    model = _model(torch.float32)
    save_file(model, tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(8)
    t = {"lora_unet_blocks_1_ff.hada_w1_a": torch.randn(40, 2, generator=g), "lora_unet_blocks_1_ff.hada_w1_b": torch.randn(2, 48, generator=g),
         "lora_unet_blocks_1_ff.hada_w2_a": torch.randn(40, 2, generator=g), "lora_unet_blocks_1_ff.hada_w2_b": torch.randn(2, 48, generator=g),
         "lora_unet_blocks_1_ff.alpha": torch.tensor(1.0)}
    save_file(t, tmp_path / "loha.safetensors")
    merge(tmp_path / "base.safetensors", [(tmp_path / "loha.safetensors", 0.7)], tmp_path / "o.safetensors")
    loha = LoHaWeights(t["lora_unet_blocks_1_ff.hada_w1_a"], t["lora_unet_blocks_1_ff.hada_w1_b"],
                       t["lora_unet_blocks_1_ff.hada_w2_a"], t["lora_unet_blocks_1_ff.hada_w2_b"], alpha=1.0)
    want = model["blocks.1.ff.weight"] + 0.7 * loha.delta_weight()
    out = load_file(tmp_path / "o.safetensors")
    assert torch.equal(out["blocks.1.ff.weight"], want)
    assert not torch.equal(out["blocks.1.ff.weight"], model["blocks.1.ff.weight"])
    assert torch.equal(out["blocks.0.conv.weight"], model["blocks.0.conv.weight"])
