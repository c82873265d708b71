"""Family files across a pipeline's components, and the peers' loaders on the same files: SDXL kohya (SGM UNet
names + lora_te1_/lora_te2_) against diffusers' SGM conversion, SD3 kohya (MMDiT + lora_te1..3) which diffusers
does not convert, and Cosmos 1.0 names."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lorakit
from _peers import pinned_peer
from lorakit.families import detect_family

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from test_families_converters import _original  # noqa: E402


def _kohya(orig, picks, seed=3, alpha=2.0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for path in picks:
        w = orig[f"{path}.weight"]
        conv = w.dim() == 4
        down = torch.randn(2, *w.shape[1:], generator=g) * 0.2 if conv else torch.randn(2, w.shape[1], generator=g) * 0.2
        up = torch.randn(w.shape[0], 2, *([1, 1] if conv else []), generator=g) * 0.2
        stem = "lora_unet_" + path.replace(".", "_")
        state |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}
    return state


def _peer_sgm(state, unet):
    from diffusers import StableDiffusionXLPipeline

    out = StableDiffusionXLPipeline.lora_state_dict(dict(state), unet_config=unet.config)
    return out[0] if isinstance(out, tuple) else out


def test_sdxl_sgm_names_agree_with_diffusers_conversion():
    unet, _, orig = _original("sdxl")
    picks = ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.4.0.in_layers.2", "input_blocks.3.0.op",
             "output_blocks.2.2.conv", "middle_block.1.proj_in", "label_emb.0.0", "output_blocks.8.0.skip_connection",
             "output_blocks.3.0.emb_layers.1")
    state = _kohya(orig, picks)  # alpha = rank: diffusers returns alphas apart from the tensors
    converted = _peer_sgm(state, unet)
    ours, theirs = copy.deepcopy(unet), copy.deepcopy(unet)
    lorakit.apply(ours, lorakit.load(state), strict=True)
    lorakit.apply(theirs, lorakit.load(converted), strict=True)
    changed = 0
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs.state_dict()[key], rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(value, unet.state_dict()[key])
    assert changed == len(picks)


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_misplaces_an_upsampler_without_attentions_lorakit_does_not():
    """Peer bug (diffusers 0.42.1): SGM ``output_blocks.N.1.conv`` (the upsampler of an up block WITHOUT attentions,
    as in SD 1.x's first up block) becomes ``up_blocks.i.attentions.1.conv``, which no UNet has."""
    unet, _, orig = _original("sd15")
    state = _kohya(orig, ("output_blocks.1.1.conv", "input_blocks.1.1.proj_in"))
    converted = _peer_sgm(state, unet)
    assert any("up_blocks.0.attentions.1.conv" in k for k in converted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = lorakit.apply(copy.deepcopy(unet), lorakit.load(converted))
    assert theirs.report.unmatched["0:lora"] == ["unet.up_blocks.0.attentions.1.conv"]
    ours = lorakit.apply(copy.deepcopy(unet), lorakit.load(state), strict=True)
    assert ours.report.matched["0:lora"]["lora_unet_output_blocks_1_1_conv"] == ["denoiser:up_blocks.0.upsamplers.0.conv"]


def _clip(hidden=32, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99, max_position_embeddings=16, projection_dim=hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4, vocab_size=99,
                                   feed_forward_proj="gated-gelu")).eval()


def _te_keys(prefix, module_path, cols, rows, g):
    stem = f"{prefix}{module_path.replace('.', '_')}"
    return {f"{stem}.lora_down.weight": torch.randn(2, cols, generator=g),
            f"{stem}.lora_up.weight": torch.randn(rows, 2, generator=g), f"{stem}.alpha": torch.tensor(2.0)}


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_kohya_file_lands_on_every_component(family):
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(4)
    if family == "sdxl":
        denoiser, _, orig = _original("sdxl")
        pipe = {"denoiser": denoiser, "text_encoder": _clip(), "text_encoder_2": _clip(projection=True)}
        state = _kohya(orig, ("input_blocks.7.1.transformer_blocks.1.attn2.to_k", "output_blocks.0.0.in_layers.2"))
        tes = (("lora_te1_", "text_model.encoder.layers.0.self_attn.q_proj", 32, 32),
               ("lora_te2_", "text_model.encoder.layers.0.mlp.fc1", 32, 64))
    else:
        denoiser, _, orig = _original("sd35")
        pipe = {"denoiser": denoiser, "text_encoder": _clip(projection=True), "text_encoder_2": _clip(projection=True),
                "text_encoder_3": _t5()}
        state = _kohya(orig, ("joint_blocks.0.x_block.attn.qkv", "joint_blocks.1.context_block.adaLN_modulation.1"))
        tes = (("lora_te1_", "text_model.encoder.layers.0.self_attn.q_proj", 32, 32),
               ("lora_te2_", "text_model.encoder.layers.0.self_attn.v_proj", 32, 32),
               ("lora_te3_", "encoder.block.0.layer.1.DenseReluDense.wo", 64, 32))
    for prefix, path, cols, rows in tes:
        state |= _te_keys(prefix, path, cols, rows, g)
    lora = lorakit.load(state, strict=True)
    assert detect_family(lora) == family
    before = {c: copy.deepcopy(m.state_dict()) for c, m in pipe.items()}
    patch = lorakit.apply(pipe, lora, strict=True)
    landed = {t.split(":")[0] for ts in patch.report.matched["0:lora"].values() for t in ts}
    assert landed == set(pipe)
    for comp, module in pipe.items():
        assert any(not torch.equal(v, before[comp][k]) for k, v in module.state_dict().items()), comp
    patch.remove()
    for comp, module in pipe.items():
        assert all(torch.equal(v, before[comp][k]) for k, v in module.state_dict().items())


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_does_not_convert_kohya_sd3_names():
    """Peer fact (diffusers 0.42.1, issue #9950): ``lora_unet_joint_blocks_*`` keys pass through SD3's
    ``lora_state_dict`` untouched, so none of them names a module of SD3Transformer2DModel."""
    from diffusers import StableDiffusion3Pipeline

    model, _, orig = _original("sd35")
    state = _kohya(orig, ("joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.mlp.fc1"))
    out = StableDiffusion3Pipeline.lora_state_dict(dict(state))
    out = out[0] if isinstance(out, tuple) else out
    assert set(out) == set(state)
    modules = {n for n, _ in model.named_modules()}
    assert not any(k.split(".")[0].removeprefix("lora_unet_") in modules for k in out)
    patch = lorakit.apply(copy.deepcopy(model), lorakit.load(state), strict=True)
    assert patch.report.counts()["0:lora"] == {"matched": 2, "unmatched": 0, "shape_mismatches": 0}


def test_cosmos_1_names_and_net_prefix():
    model, _, orig = _original("cosmos")
    g = torch.Generator().manual_seed(6)
    state = {}
    for name, diff in (("net.blocks.block0.blocks.0.block.attn.to_q.0", "transformer_blocks.0.attn1.to_q"),
                       ("net.blocks.block1.blocks.2.block.layer2", "transformer_blocks.1.ff.net.2"),
                       ("net.blocks.0.cross_attn.v_proj", "transformer_blocks.0.attn2.to_v")):
        w = dict(model.named_modules())[diff].weight
        state |= {f"diffusion_model.{name}.lora_A.weight": torch.randn(2, w.shape[1], generator=g),
                  f"diffusion_model.{name}.lora_B.weight": torch.randn(w.shape[0], 2, generator=g)}
    lora = lorakit.load(state, strict=True)
    assert detect_family(lora) == "cosmos"
    ours = copy.deepcopy(model)
    patch = lorakit.apply(ours, lora, strict=True)
    assert sorted(t for ts in patch.report.matched["0:lora"].values() for t in ts) == [
        "denoiser:transformer_blocks.0.attn1.to_q", "denoiser:transformer_blocks.0.attn2.to_v",
        "denoiser:transformer_blocks.1.ff.net.2"]
    assert sum(not torch.equal(v, model.state_dict()[k]) for k, v in ours.state_dict().items()) == 3


def test_convert_sgm_kohya_to_peft_without_a_model(tmp_path):
    # SDXL's released sizes come from the meta-device model; rank 1 keeps the file small
    g = torch.Generator().manual_seed(8)
    state = {}
    for path, cols, rows in (("input_blocks.4.1.transformer_blocks.0.attn1.to_q", 640, 640), ("label_emb.0.0", 2816, 1280),
                             ("output_blocks.2.2.conv", 1280 * 9, 1280)):
        stem = "lora_unet_" + path.replace(".", "_")
        down = torch.randn(1, cols, generator=g)
        up = torch.randn(rows, 1, generator=g)
        if path.endswith("conv"):
            down, up = down.reshape(1, 1280, 3, 3), up.reshape(rows, 1, 1, 1)
        state |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(1.0)}
    src = lorakit.load(state)
    assert detect_family(src) == "sdxl"
    out = lorakit.save(src, tmp_path / "peft.safetensors", format="peft")
    from safetensors.torch import load_file

    got = load_file(out)
    stems = {k.rsplit(".lora_", 1)[0] for k in got}
    assert stems == {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "unet.add_embedding.linear_1",
                     "unet.up_blocks.0.upsamplers.0.conv"}
    assert torch.equal(got["unet.up_blocks.0.upsamplers.0.conv.lora_A.weight"],
                       state["lora_unet_output_blocks_2_2_conv.lora_down.weight"])
