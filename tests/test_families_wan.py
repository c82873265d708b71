"""Wan 2.1/2.2 family: original (ComfyUI/ai-toolkit), musubi and LightX2V names land on diffusers'
WanTransformer3DModel exactly as the same LoRA in diffusers naming; diff_m reaches scale_shift_table; the
T2V/I2V mismatch is reported; diffusers' own converter agrees on what it keeps."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lorakit
from lorakit.families import detect_family

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

D, FFN, TXT, IMG = 16, 32, 16, 16
CFG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
           text_dim=TXT, freq_dim=16, ffn_dim=FFN, num_layers=2, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _model(i2v: bool = False):
    torch.manual_seed(0)
    extra = dict(image_dim=IMG, added_kv_proj_dim=D) if i2v else {}
    model = WanTransformer3DModel(**CFG, **extra).eval()
    with torch.no_grad():  # diffusers initialises some tables to zero: make every parameter matter
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.1)
    return model


def _inputs(i2v: bool = False):
    g = torch.Generator().manual_seed(5)
    out = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=torch.tensor([500]),
               encoder_hidden_states=torch.randn(1, 6, TXT, generator=g))
    if i2v:
        out["encoder_hidden_states_image"] = torch.randn(1, 4, IMG, generator=g)
    return out


# (original name, diffusers name, in, out)
PAIRS = [
    ("blocks.0.self_attn.q", "blocks.0.attn1.to_q", D, D),
    ("blocks.1.self_attn.o", "blocks.1.attn1.to_out.0", D, D),
    ("blocks.0.cross_attn.k", "blocks.0.attn2.to_k", D, D),
    ("blocks.1.cross_attn.o", "blocks.1.attn2.to_out.0", D, D),
    ("blocks.0.ffn.0", "blocks.0.ffn.net.0.proj", D, FFN),
    ("blocks.1.ffn.2", "blocks.1.ffn.net.2", FFN, D),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1", TXT, D),
    ("time_projection.1", "condition_embedder.time_proj", D, 6 * D),
    ("head.head", "proj_out", D, 4 * 4),
]
I2V_PAIRS = [("blocks.0.cross_attn.k_img", "blocks.0.attn2.add_k_proj", D, D),
             ("blocks.1.cross_attn.v_img", "blocks.1.attn2.add_v_proj", D, D)]


def _factors(pairs, seed=1, r=2):
    g = torch.Generator().manual_seed(seed)
    return {orig: (torch.randn(r, i, generator=g) * 0.3, torch.randn(o, r, generator=g) * 0.3) for orig, _, i, o in pairs}


def _file(pairs, factors, naming, alpha=1.0, r=2):
    state = {}
    for orig, _, _, _ in pairs:
        down, up = factors[orig]
        if naming == "native":  # ComfyUI / ai-toolkit: diffusion_model. + lora_A/B + alpha
            stem, a, b = f"diffusion_model.{orig}", "lora_A.weight", "lora_B.weight"
        else:  # musubi-tuner: flattened original names
            stem, a, b = "lora_unet_" + orig.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        state |= {f"{stem}.{a}": down, f"{stem}.{b}": up, f"{stem}.alpha": torch.tensor(alpha)}
    return state


def _diffusers_named(pairs, factors, alpha=1.0, r=2):
    out = {}
    for orig, diff, _, _ in pairs:
        down, up = factors[orig]
        out |= {f"transformer.{diff}.lora_A.weight": down, f"transformer.{diff}.lora_B.weight": up * (alpha / r)}
    return out


def _compare(model, ours, ref, expect_changed, i2v=False):
    changed = 0
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, ref.state_dict()[key], rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(value, model.state_dict()[key])
    assert changed == expect_changed
    with torch.no_grad():
        out, ref_out, base_out = (m(**_inputs(i2v)).sample for m in (ours, ref, model))
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert (out - base_out).abs().max() > 1e-3


@pytest.mark.parametrize("naming", ["native", "musubi"])
@pytest.mark.parametrize("i2v", [False, True])
def test_original_names_equal_diffusers_names(naming, i2v):
    pairs = PAIRS + (I2V_PAIRS if i2v else [])
    factors = _factors(pairs)
    lora = lorakit.load(_file(pairs, factors, naming), strict=True)
    assert detect_family(lora) == "wan"
    base = _model(i2v)
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    patch = lorakit.apply(ours, [(lora, 0.8)], strict=True)
    assert patch.report.notes == []  # I2V LoRA on I2V, T2V on T2V: nothing to say
    lorakit.apply(ref, [(lorakit.load(_diffusers_named(pairs, factors)), 0.8)], strict=True)
    _compare(base, ours, ref, len(pairs), i2v)
    patch.remove()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in ours.state_dict().items())


def _lightx2v(seed=3):
    g = torch.Generator().manual_seed(seed)
    return {
        "diffusion_model.blocks.0.diff_m": torch.randn(1, 6, D, generator=g) * 0.1,
        "diffusion_model.head.diff_m": torch.randn(1, 2, D, generator=g) * 0.1,
        "diffusion_model.blocks.1.norm3.diff": torch.randn(D, generator=g) * 0.1,
        "diffusion_model.blocks.1.norm3.diff_b": torch.randn(D, generator=g) * 0.1,
        "diffusion_model.blocks.0.self_attn.norm_q.diff": torch.randn(D, generator=g) * 0.1,
        "diffusion_model.blocks.0.self_attn.q.diff_b": torch.randn(D, generator=g) * 0.1,
        "diffusion_model.blocks.1.ffn.2.diff": torch.randn(D, FFN, generator=g) * 0.1,
    }


def test_lightx2v_diffs_reach_modulation_norms_and_biases():
    state = _lightx2v()
    lora = lorakit.load(state, strict=True)
    assert lora.format == "lightx2v" and detect_family(lora) == "wan"
    base = _model()
    model = copy.deepcopy(base)
    s = 0.6
    patch = lorakit.apply(model, (lora, s), strict=True)
    expected = {
        "blocks.0.scale_shift_table": state["diffusion_model.blocks.0.diff_m"],
        "scale_shift_table": state["diffusion_model.head.diff_m"],
        "blocks.1.norm2.weight": state["diffusion_model.blocks.1.norm3.diff"],  # original norm3 = diffusers norm2
        "blocks.1.norm2.bias": state["diffusion_model.blocks.1.norm3.diff_b"],
        "blocks.0.attn1.norm_q.weight": state["diffusion_model.blocks.0.self_attn.norm_q.diff"],
        "blocks.0.attn1.to_q.bias": state["diffusion_model.blocks.0.self_attn.q.diff_b"],
        "blocks.1.ffn.net.2.weight": state["diffusion_model.blocks.1.ffn.2.diff"],
    }
    after = model.state_dict()
    for key, value in base.state_dict().items():
        want = value + s * expected[key] if key in expected else value
        torch.testing.assert_close(after[key], want, rtol=0, atol=1e-6, msg=key)
    assert sum(not torch.equal(after[k], v) for k, v in base.state_dict().items()) == len(expected)
    with torch.no_grad():
        assert (model(**_inputs()).sample - base(**_inputs()).sample).abs().max() > 1e-3
    patch.remove()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())


def test_diffusers_converter_agrees_on_pairs_and_drops_the_diffs():
    """Peer: diffusers' Wan converter gives the same weights for A/B pairs and diff_b, and drops diff_m and
    norm diffs (FORMATS.md §9.4); lorakit applies those too."""
    from diffusers import WanPipeline

    pairs = [p for p in PAIRS if p[0].startswith("blocks.")]  # see the next test for the global layers
    factors = _factors(pairs, seed=4)
    state = _file(pairs, factors, "native", alpha=1.0) | {
        "diffusion_model.blocks.0.self_attn.q.diff_b": torch.randn(D) * 0.1,
        "diffusion_model.blocks.0.diff_m": torch.randn(1, 6, D) * 0.1,
        "diffusion_model.blocks.1.norm3.diff": torch.randn(D) * 0.1,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = WanPipeline.lora_state_dict(copy.deepcopy(state))
    converted = converted[0] if isinstance(converted, tuple) else converted
    assert not any("diff_m" in k or "norm" in k for k in converted)  # the peer drops them
    ours = lorakit.load(state, strict=True)
    theirs = lorakit.load(converted, strict=True)
    assert len(ours) == len(pairs) + 2 and len(theirs) == len(pairs)
    base = _model()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    lorakit.apply(a, ours, strict=True)
    lorakit.apply(b, theirs, strict=True)
    dropped = {"blocks.0.scale_shift_table", "blocks.1.norm2.weight"}
    for key, value in a.state_dict().items():
        if key in dropped:
            assert not torch.equal(value, b.state_dict()[key])  # only lorakit applied these
        else:
            torch.testing.assert_close(value, b.state_dict()[key], rtol=0, atol=1e-6, msg=key)


def test_diffusers_converter_refuses_alpha_on_global_layers():
    """Peer bug (diffusers 0.42.1): an ``alpha`` on a non-block layer (``head.head``, ``text_embedding.0``) is left
    over by the Wan converter, which then raises; lorakit places the layer with its alpha."""
    from diffusers import WanPipeline

    pairs = [p for p in PAIRS if p[0] in ("blocks.0.self_attn.q", "head.head")]
    state = _file(pairs, _factors(pairs), "native", alpha=1.0)
    with pytest.raises(ValueError, match="head.head.alpha"):
        WanPipeline.lora_state_dict(copy.deepcopy(state))
    lora = lorakit.load(state, strict=True)
    patch = lorakit.apply(_model(), lora, strict=True)
    assert patch.report.matched["0:lora"]["diffusion_model.head.head"] == ["denoiser:proj_out"]
    assert lora.layers["diffusion_model.head.head"].weight.scale == 0.5


def test_t2v_lora_on_i2v_model_is_noted_and_i2v_lora_on_t2v_is_reported():
    factors = _factors(PAIRS + I2V_PAIRS)
    t2v = lorakit.load(_file(PAIRS, factors, "native"))
    patch = lorakit.apply(_model(i2v=True), t2v, strict=True)
    assert len(patch.report.notes) == 1 and "T2V LoRA on an I2V model" in patch.report.notes[0]
    assert "4 layers" in patch.report.notes[0] and "note:" in patch.report.summary()

    i2v = lorakit.load(_file(PAIRS + I2V_PAIRS, factors, "musubi"))
    with pytest.warns(UserWarning, match="2 LoRA layer"):
        patch = lorakit.apply(_model(i2v=False), i2v)
    assert patch.report.unmatched["0:lora"] == ["lora_unet_blocks_0_cross_attn_k_img", "lora_unet_blocks_1_cross_attn_v_img"]
    assert patch.report.counts()["0:lora"]["matched"] == len(PAIRS)


def test_detection_does_not_take_other_families():
    flux = lorakit.load({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(1, 4),
                         "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(12, 1)})
    cosmos = lorakit.load({"diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight": torch.ones(1, 4),
                           "diffusion_model.blocks.0.self_attn.q_proj.lora_B.weight": torch.ones(4, 1)})
    sd15 = lorakit.load({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(1, 4),
                         "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(4, 1)})
    assert detect_family(flux) == "flux1"
    assert detect_family(cosmos) != "wan" and detect_family(sd15) != "wan"
