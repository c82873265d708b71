"""Cross-family runtime rules: DoRA on a fused projection is computed on the rebuilt fused weight then split
(never approximated), kohya's third text encoder (T5) lands on a FLUX pipeline's text_encoder_2, and the
offline meta-device models resolve names without weights."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.families.offline import FAMILY_NAMES, meta_components, variant_for

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import FluxTransformer2DModel  # noqa: E402

TINY = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
H, MLP = 32, 128


def _flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**TINY).eval()


def _reference_dora(w: torch.Tensor, up, down, scale, magnitude, axis: str) -> torch.Tensor:
    """W' = m · (W + ΔW) / ‖W + ΔW‖, the norm per output row (axis out) or per input column (axis in)."""
    w1 = w.double() + (up.double() @ down.double()) * scale
    if axis == "out":
        return magnitude.double().reshape(-1, 1) * w1 / w1.norm(dim=1, keepdim=True)
    return magnitude.double().reshape(1, -1) * w1 / w1.norm(dim=0, keepdim=True)


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("mode", ["fuse", "hook"])
def test_dora_on_fused_linear1_is_computed_on_the_fused_weight(axis, mode):
    g = torch.Generator().manual_seed(3)
    rows = 3 * H + MLP
    down, up = torch.randn(4, H, generator=g) * 0.3, torch.randn(rows, 4, generator=g) * 0.3
    base = _flux()
    blk = "single_transformer_blocks.0"
    parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    mods = dict(base.named_modules())
    fused = torch.cat([mods[f"{blk}.{p}"].weight.detach() for p in parts])
    # a magnitude near the fused weight's own norms, so the LoRA is a modest change
    norms = fused.norm(dim=1) if axis == "out" else fused.norm(dim=0)
    magnitude = norms * (1 + 0.2 * torch.rand(norms.shape, generator=g))
    stem = "lora_unet_single_blocks_0_linear1"
    dora_scale = magnitude.reshape(-1, 1) if axis == "out" else magnitude.reshape(1, -1)
    state = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(2.0),
             f"{stem}.dora_scale": dora_scale}
    lora = lorakit.load(state, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(state)

    strength = 0.7
    model = copy.deepcopy(base)
    patch = lorakit.apply(model, [(lora, strength)], mode=mode, strict=True)
    expected = _reference_dora(fused, up, down, 0.5, magnitude, axis)
    expected = fused.double() + strength * (expected - fused.double())  # lorakit's strength: W + s(W' − W)
    start = 0
    for p in parts:
        n = mods[f"{blk}.{p}"].weight.shape[0]
        got_mod = dict(model.named_modules())[f"{blk}.{p}"]
        if mode == "fuse":
            got = got_mod.weight.double()
        else:  # the hook adds x @ ΔWᵀ: read the effective weight back through the module
            eye = torch.eye(H)
            got = (got_mod(eye) - (got_mod.bias if got_mod.bias is not None else 0)).T.double()
        torch.testing.assert_close(got, expected[start:start + n], rtol=1e-5, atol=1e-5)
        assert (got - fused[start:start + n].double()).abs().max() > 1e-3  # non-vacuous
        start += n
    patch.remove()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())


def test_dora_over_a_partly_present_fused_weight_is_refused_not_approximated():
    # A DoRA norm over the columns needs every row of the fused weight: if the model lacks a part (rows with
    # no module), the delta cannot be computed exactly and the layer is refused with a typed error.
    from lorakit.errors import UnsupportedAdapterError
    from lorakit.families import Target
    from lorakit.placement import fused_base

    layer = next(iter(lorakit.load({"a.lora_down.weight": torch.ones(1, 4), "a.lora_up.weight": torch.ones(6, 1),
                                    "a.dora_scale": torch.ones(1, 4)})))
    q, v = torch.randn(2, 4), torch.randn(2, 4)
    targets = [Target("denoiser", "q", src_rows=(0, 2)), Target("denoiser", "v", src_rows=(4, 6))]
    with pytest.raises(UnsupportedAdapterError, match="rows 2:4 have no module"):
        fused_base(layer, targets, [q, v])
    k = torch.randn(2, 4)
    whole = fused_base(layer, [*targets, Target("denoiser", "k", src_rows=(2, 4))], [q, v, k])
    assert torch.equal(whole, torch.cat([q, k, v]))
    # a row transform is undone in the rebuilt weight (file order)
    swapped = fused_base(layer, [Target("denoiser", "n", transform="swap_scale_shift")], [torch.arange(4.0).reshape(4, 1)])
    assert swapped.flatten().tolist() == [2.0, 3.0, 0.0, 1.0]


def _tiny_text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(1)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=99, max_position_embeddings=16)).eval()
    t5 = T5EncoderModel(T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4, vocab_size=99,
                                 feed_forward_proj="gated-gelu")).eval()
    return clip, t5


def test_kohya_te3_t5_lands_on_flux_text_encoder_2():
    clip, t5 = _tiny_text_encoders()
    pipe = {"denoiser": _flux(), "text_encoder": clip, "text_encoder_2": t5}
    g = torch.Generator().manual_seed(6)
    state = {}
    for stem, cols, rows in (("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32, 32),
                             ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", 32, 32),
                             ("lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0", 32, 64),
                             ("lora_unet_double_blocks_0_img_attn_proj", H, H)):
        state[f"{stem}.lora_down.weight"] = torch.randn(2, cols, generator=g)
        state[f"{stem}.lora_up.weight"] = torch.randn(rows, 2, generator=g)
    before = {c: copy.deepcopy(m.state_dict()) for c, m in pipe.items()}
    patch = lorakit.apply(pipe, lorakit.load(state, strict=True), strict=True)
    targets = sorted(t for ts in patch.report.matched["0:lora"].values() for t in ts)
    assert targets == ["denoiser:transformer_blocks.0.attn.to_out.0",
                       "text_encoder:text_model.encoder.layers.0.self_attn.q_proj"
                       if any(n.startswith("text_model.") for n, _ in clip.named_modules())
                       else "text_encoder:encoder.layers.0.self_attn.q_proj",
                       "text_encoder_2:encoder.block.0.layer.0.SelfAttention.q",
                       "text_encoder_2:encoder.block.0.layer.1.DenseReluDense.wi_0"]
    q = t5.encoder.block[0].layer[0].SelfAttention.q.weight
    d, u = state["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"], state[
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"]
    torch.testing.assert_close(q, before["text_encoder_2"]["encoder.block.0.layer.0.SelfAttention.q.weight"] + u @ d)
    patch.remove()
    for comp, module in pipe.items():
        assert all(torch.equal(v, before[comp][k]) for k, v in module.state_dict().items())


def test_te3_stays_unmatched_when_text_encoder_2_is_a_clip():
    # SD3 numbering: lora_te3_ is text_encoder_3; an SDXL-like pipeline (CLIP as text_encoder_2) has no place for it
    clip, _ = _tiny_text_encoders()
    clip2 = copy.deepcopy(clip)
    g = torch.Generator().manual_seed(7)
    state = {"lora_te3_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 32, generator=g),
             "lora_te3_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 2, generator=g),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 32, generator=g),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 2, generator=g)}
    with pytest.warns(UserWarning, match="lora_te3_"):
        patch = lorakit.apply({"text_encoder": clip, "text_encoder_2": clip2}, lorakit.load(state))
    assert patch.report.unmatched["0:lora"] == ["lora_te3_encoder_layers_0_self_attn_q_proj"]


def test_offline_meta_models_have_real_sizes_and_no_data():
    assert {"sd15", "sdxl", "sd3", "flux1", "wan", "cosmos"} <= set(FAMILY_NAMES)
    assert variant_for("FLUX1") == "flux1-dev"
    with pytest.raises(KeyError, match="unknown model family 'sd9'"):
        variant_for("sd9")
    unet = meta_components("sdxl", ("denoiser",))["denoiser"]
    assert all(p.device.type == "meta" for p in unet.parameters())
    assert 2.5e9 < sum(p.numel() for p in unet.parameters()) < 2.6e9  # SDXL UNet: 2.567B
    # label_emb exists only in SDXL's UNet (add_embedding), conv proj_in only in SD1.5's
    assert dict(unet.named_modules())["add_embedding.linear_1"].in_features == 2816
    sd15 = meta_components("sd15", ("denoiser",))["denoiser"]
    assert dict(sd15.named_modules())["down_blocks.0.attentions.0.proj_in"].weight.dim() == 4
    assert meta_components("sdxl", ("denoiser",))["denoiser"] is unet  # cached


def test_inspect_coverage_against_a_family_name(tmp_path):
    g = torch.Generator().manual_seed(8)
    state = {}
    for stem, cols, rows in (("lora_unet_double_blocks_0_img_attn_qkv", 3072, 3 * 3072),
                             ("lora_unet_single_blocks_37_linear1", 3072, 3 * 3072 + 12288),
                             ("lora_unet_not_a_module", 8, 8)):
        state[f"{stem}.lora_down.weight"] = torch.randn(2, cols, generator=g)
        state[f"{stem}.lora_up.weight"] = torch.zeros(rows, 2)
    info = lorakit.inspect(state, model="flux1")
    assert info["family"] == "flux1"
    cov = info["coverage"]
    assert cov["matched"] == 2 and cov["unmatched"] == ["lora_unet_not_a_module"]
    assert "flux1" in cov["families"]
    assert cov["touched_modules"] == 3 + 4  # fused qkv and linear1 land on their split modules
    # the rest of FLUX-dev's weighted modules (meta device, no weights loaded; no text encoder built)
    assert set(cov["weighted_modules"]) == {"denoiser"} and cov["weighted_modules"]["denoiser"] > 600
    assert cov["untouched_modules"] == cov["weighted_modules"]["denoiser"] - 7


def _kohya_flux(g, h=H, mlp=MLP, r=2):
    state = {}
    for stem, cols, rows in (("lora_unet_double_blocks_0_img_attn_qkv", h, 3 * h),
                             ("lora_unet_single_blocks_0_linear1", h, 3 * h + mlp),
                             ("lora_unet_final_layer_adaLN_modulation_1", h, 2 * h),
                             ("lora_unet_double_blocks_0_img_mlp_0", h, mlp)):
        state[f"{stem}.lora_down.weight"] = torch.randn(r, cols, generator=g) * 0.3
        state[f"{stem}.lora_up.weight"] = torch.randn(rows, r, generator=g) * 0.3
        state[f"{stem}.alpha"] = torch.tensor(1.0)
    return state


def test_convert_bfl_names_to_peft_splits_fused_layers_exactly(tmp_path):
    g = torch.Generator().manual_seed(9)
    src = _kohya_flux(g)
    base = _flux()
    out = lorakit.save(lorakit.load(src), tmp_path / "peft.safetensors", format="peft", model=base)
    converted = lorakit.load(out, strict=True)
    assert converted.format == "peft" and len(converted) == 3 + 4 + 1 + 1
    assert {layer.path for layer in converted} >= {"transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp",
                                                   "norm_out.linear", "transformer_blocks.0.ff.net.0.proj"}
    direct, via_peft = copy.deepcopy(base), copy.deepcopy(base)
    lorakit.apply(direct, (lorakit.load(src), 0.9), strict=True)
    lorakit.apply(via_peft, (converted, 0.9), strict=True)
    changed = 0
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(via_peft.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(value, base.state_dict()[key])
    assert changed == 3 + 4 + 1 + 1

    # the peer reads lorakit's PEFT file and lands the same weights
    from diffusers import FluxPipeline

    peer = copy.deepcopy(base)
    state, meta = FluxPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    peer.load_lora_adapter(state, prefix="transformer", adapter_name="x", metadata=meta)
    peer.fuse_lora(lora_scale=0.9)
    peer.unload_lora()
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(peer.state_dict()[key], value, rtol=0, atol=1e-5, msg=key)


def test_convert_without_a_model_uses_the_family_meta_model(tmp_path):
    # FLUX-dev sizes (3072 wide) at rank 1: the split points come from the meta-device model
    g = torch.Generator().manual_seed(10)
    src = _kohya_flux(g, h=3072, mlp=12288, r=1)
    out = lorakit.save(lorakit.load(src), tmp_path / "peft.safetensors", format="peft")
    from safetensors.torch import load_file

    got = load_file(out)
    up = src["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert torch.equal(got["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"], up[3072:6144])
    assert torch.equal(got["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"],
                       src["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"])
    ada = src["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    assert torch.equal(got["transformer.norm_out.linear.lora_B.weight"], torch.cat([ada[3072:], ada[:3072]]))
    assert len([k for k in got if k.endswith("lora_A.weight")]) == 3 + 4 + 1 + 1


def test_cli_inspect_json_has_family_and_coverage(tmp_path):
    import json

    from click.testing import CliRunner
    from safetensors.torch import save_file

    from lorakit.cli import cli as main

    g = torch.Generator().manual_seed(11)
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 3072, generator=g),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(9216, 2, generator=g),
               "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(2, 3072, generator=g),
               "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(21504, 2, generator=g)},
              tmp_path / "f.safetensors")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "f.safetensors"), "--json", "--model", "flux1"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["family"] == "flux1"
    assert info["coverage"]["matched"] == 2 and info["coverage"]["unmatched"] == []
    bad = CliRunner().invoke(main, ["inspect", str(tmp_path / "f.safetensors"), "--model", "sdxl", "--json"])
    assert bad.exit_code == 0 and json.loads(bad.output)["coverage"]["matched"] == 0  # a FLUX LoRA on SDXL: nothing


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lokr_and_loha_on_fused_qkv_are_sliced_from_the_full_delta(kind):
    # LoKr/LoHa do not split into per-row factors: the full fused delta is built, then cut by rows
    g = torch.Generator().manual_seed(12)
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    if kind == "lokr":  # (3H x H) = kron([3, 2], [H, H/2])
        w1, w2 = torch.randn(3, 2, generator=g), torch.randn(H, H // 2, generator=g) * 0.1
        state = {f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2": w2}
        full = torch.kron(w1, w2)  # no alpha with full factors: scale 1
    else:
        a1, b1 = torch.randn(3 * H, 2, generator=g) * 0.3, torch.randn(2, H, generator=g) * 0.3
        a2, b2 = torch.randn(3 * H, 2, generator=g) * 0.3, torch.randn(2, H, generator=g) * 0.3
        state = {f"{stem}.hada_w1_a": a1, f"{stem}.hada_w1_b": b1, f"{stem}.hada_w2_a": a2, f"{stem}.hada_w2_b": b2,
                 f"{stem}.alpha": torch.tensor(2.0)}
        full = (a1 @ b1) * (a2 @ b2)  # alpha = rank: scale 1
    base = _flux()
    model = copy.deepcopy(base)
    lorakit.apply(model, (lorakit.load(state, strict=True), 0.5), strict=True)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        key = f"transformer_blocks.0.attn.{name}.weight"
        torch.testing.assert_close(model.state_dict()[key], base.state_dict()[key] + 0.5 * full[i * H:(i + 1) * H],
                                   rtol=0, atol=1e-6)
        assert not torch.equal(model.state_dict()[key], base.state_dict()[key])


def test_cli_convert_with_a_family_name(tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from lorakit.cli import cli

    g = torch.Generator().manual_seed(13)
    src = {"diffusion_model.double_blocks.0.txt_attn.qkv.lora_down.weight": torch.randn(1, 3072, generator=g),
           "diffusion_model.double_blocks.0.txt_attn.qkv.lora_up.weight": torch.randn(9216, 1, generator=g)}
    save_file(src, tmp_path / "in.safetensors")
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"),
                                      "--to", "peft", "--model", "flux1"])
    assert result.exit_code == 0, result.output
    got = load_file(tmp_path / "out.safetensors")
    up = src["diffusion_model.double_blocks.0.txt_attn.qkv.lora_up.weight"]
    assert torch.equal(got["transformer.transformer_blocks.0.attn.add_v_proj.lora_B.weight"], up[6144:])
    assert len(got) == 6
