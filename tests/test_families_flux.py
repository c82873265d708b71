"""FLUX.1 family: BFL / kohya / ComfyUI / XLabs names land on diffusers' FluxTransformer2DModel exactly as the
same LoRA in diffusers naming does, and every layer of the real published FLUX key lists is placed."""

from __future__ import annotations

import copy
import glob
import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.families import detect_family
from lorakit.runtime.resolve import Resolver

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402

TINY = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
H, MLP = 32, 128


def _tiny():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**TINY).eval()


def _inputs():
    g = torch.Generator().manual_seed(5)
    return dict(hidden_states=torch.randn(1, 16, 4, generator=g), encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(6, 3))


def _factors(seed=1, r=4):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    return {
        ("img_attn.qkv", 0): (rnd(r, H), rnd(3 * H, r)),
        ("txt_attn.qkv", 1): (rnd(r, H), rnd(3 * H, r)),
        ("img_attn.proj", 0): (rnd(r, H), rnd(H, r)),
        ("img_mlp.0", 1): (rnd(r, H), rnd(MLP, r)),
        ("linear1", 0): (rnd(r, H), rnd(3 * H + MLP, r)),
        ("linear2", 1): (rnd(r, H + MLP), rnd(H, r)),
        ("final_layer.adaLN_modulation.1", None): (rnd(r, H), rnd(2 * H, r)),
    }


def _bfl_name(part: str, block: int | None) -> str:
    if block is None:
        return part
    kind = "single_blocks" if part.startswith("linear") else "double_blocks"
    return f"{kind}.{block}.{part}"


def _diffusers_equivalent(factors, alpha=2.0, r=4):
    """The same LoRA written by hand in diffusers naming (alpha baked in): the reference."""
    s = alpha / r
    out = {}

    def put(name, down, up):
        out[f"transformer.{name}.lora_A.weight"] = down
        out[f"transformer.{name}.lora_B.weight"] = up * s

    for (part, b), (down, up) in factors.items():
        if part == "img_attn.qkv":
            for i, n in enumerate(("to_q", "to_k", "to_v")):
                put(f"transformer_blocks.{b}.attn.{n}", down, up[i * H:(i + 1) * H])
        elif part == "txt_attn.qkv":
            for i, n in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
                put(f"transformer_blocks.{b}.attn.{n}", down, up[i * H:(i + 1) * H])
        elif part == "img_attn.proj":
            put(f"transformer_blocks.{b}.attn.to_out.0", down, up)
        elif part == "img_mlp.0":
            put(f"transformer_blocks.{b}.ff.net.0.proj", down, up)
        elif part == "linear1":
            for n, (a, e) in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
                                 ((0, H), (H, 2 * H), (2 * H, 3 * H), (3 * H, 3 * H + MLP))):
                put(f"single_transformer_blocks.{b}.{n}", down, up[a:e])
        elif part == "linear2":
            put(f"single_transformer_blocks.{b}.proj_out", down, up)
        else:  # BFL (shift, scale) -> diffusers (scale, shift)
            put("norm_out.linear", down, torch.cat([up[H:], up[:H]]))
    return out


@pytest.mark.parametrize("naming", ["kohya", "comfyui", "bfl-peft"])
def test_bfl_names_equal_diffusers_names(naming):
    factors = _factors()
    state = {}
    for (part, b), (down, up) in factors.items():
        bfl = _bfl_name(part, b)
        if naming == "kohya":
            base = "lora_unet_" + bfl.replace(".", "_")
            state |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": torch.tensor(2.0)}
        elif naming == "comfyui":
            base = "diffusion_model." + bfl
            state |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": torch.tensor(2.0)}
        else:  # BFL names with PEFT suffixes (ai-toolkit), alpha baked the diffusers way
            state |= {f"{bfl}.lora_A.weight": down, f"{bfl}.lora_B.weight": up * 0.5}
    lora = lorakit.load(state, strict=True)
    assert detect_family(lora) == "flux1"
    base = _tiny()
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    patch = lorakit.apply(ours, [(lora, 0.8)], strict=True)
    lorakit.apply(ref, [(_diffusers_equivalent(factors), 0.8)], strict=True)
    changed = 0
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, ref.state_dict()[key], rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(value, base.state_dict()[key])
    assert changed == 3 + 3 + 1 + 1 + 4 + 1 + 1  # every split target got its rows
    with torch.no_grad():
        out, ref_out, base_out = (m(**_inputs()).sample for m in (ours, ref, base))
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert (out - base_out).abs().max() > 1e-3
    patch.remove()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in ours.state_dict().items())


def test_xlabs_names_and_hook_mode():
    factors = _factors()
    (d1, u1), (d2, u2) = factors[("img_attn.qkv", 0)], factors[("img_attn.proj", 0)]
    state = {
        "double_blocks.0.processor.qkv_lora1.down.weight": d1, "double_blocks.0.processor.qkv_lora1.up.weight": u1,
        "double_blocks.0.processor.proj_lora1.down.weight": d2, "double_blocks.0.processor.proj_lora1.up.weight": u2,
    }
    lora = lorakit.load(state, strict=True)
    assert lora.format == "xlabs"
    ref_state = {k: v for k, v in _diffusers_equivalent(
        {("img_attn.qkv", 0): (d1, u1), ("img_attn.proj", 0): (d2, u2)}, alpha=4.0).items()}  # no alpha: scale 1
    base = _tiny()
    fused, hooked, ref = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    lorakit.apply(fused, [(lora, 1.0)], strict=True)
    lorakit.apply(hooked, [(lora, 1.0)], mode="hook", strict=True)
    lorakit.apply(ref, [(ref_state, 1.0)], strict=True)
    with torch.no_grad():
        a, b, c, base_out = (m(**_inputs()).sample for m in (fused, hooked, ref, base))
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5)
    assert (a - base_out).abs().max() > 1e-3


FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


@pytest.fixture(scope="module")
def flux_dev_meta():
    # FLUX-dev's released sizes on the meta device: transformer, CLIP-L (text_encoder) and T5-XXL (text_encoder_2)
    from lorakit.families.offline import meta_components

    comps = meta_components("flux1-dev")
    transformer = comps["denoiser"]
    assert all(getattr(transformer.config, k) == v for k, v in FLUX_DEV.items() if k != "axes_dims_rope")
    return Resolver(comps)


REALKEYS = sorted(p for p in glob.glob(str(Path(__file__).parent / "fixtures" / "realkeys" / "flux1_*.json")))


def _shape(key, shape):
    if shape is not None:
        return shape
    return [] if key.endswith("alpha") else ([4, 3072] if ("down" in key or "lora_A" in key) else [3072, 4])


@pytest.mark.parametrize("fixture", REALKEYS, ids=lambda p: Path(p).stem[:40])
def test_real_flux_files_are_placed(fixture, flux_dev_meta):
    data = json.loads(Path(fixture).read_text())
    state = {k: torch.empty(_shape(k, v), device="meta") for k, v in data["keys"].items()}
    lora = lorakit.load(_materialise_small(state))
    res = flux_dev_meta.resolve(lora)
    # every layer has a home, text encoders included: kohya's lora_te3_ and OneTrainer's lora_te2_ are the T5
    assert res.unmatched == [], sorted(layer.name for layer in res.unmatched)[:5]
    mods = flux_dev_meta.index.modules
    misfit = []
    for layer, targets in res.matched:
        w = layer.weight
        if w is None or w.kind != "lora":
            continue
        rows = sum((t.src_rows[1] - t.src_rows[0]) if t.src_rows else mods[t.component][t.module].weight.shape[0] for t in targets)
        module = mods[targets[0].component][targets[0].module]
        if rows != w.up.shape[0] or module.weight.shape[1] != w.down.shape[1]:
            misfit.append(layer.path)
    # the BFL depth control LoRA widens img_in (x_embedder) from 64 to 128 input channels: a reshape, reported
    assert set(misfit) <= {"img_in"}, misfit[:5]
    assert len(res.matched) == len(lora) > 0


def _materialise_small(state):
    """Real shapes, tiny memory: expanded zero-stride views carry the shape without the storage."""
    return {k: torch.zeros(()).expand(v.shape) if v.dim() else torch.tensor(1.0) for k, v in state.items()}
