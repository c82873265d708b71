"""SDXL family: SGM/LDM UNet names (kohya SDXL ``lora_unet_input_blocks_...``, ComfyUI ``diffusion_model.``) land
on diffusers' UNet2DConditionModel exactly as the same LoRA in diffusers naming does, for SDXL- and SD1.x-shaped
UNets alike (the map is structural); diffusers' own SGM conversion agrees where it is right, and where it is not
(an upsampler without attentions, ``layers_per_block`` per block, 10+ input blocks, DoRA) lorakit still places
every key. No real SDXL key list ships in tests/fixtures/realkeys: the released SDXL and SD 1.5 UNets (meta device)
are checked against ComfyUI's block arithmetic instead."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lorakit
from _peers import pinned_peer
from lorakit.families import build_index, detect_family

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.utils import convert_state_dict_to_peft  # noqa: E402

RANK, ALPHA = 4, 2.0


def _sdxl():  # SDXL layout: plain first block, cross-attention blocks, linear proj_in, 2 transformer layers deep
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4), cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
    ).eval()


def _sd15():  # SD 1.x layout: attentions first, conv proj_in; upsamplers on an up block without and with attentions
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
        cross_attention_dim=32, norm_num_groups=8,
    ).eval()


def _per_block():  # layers_per_block as a list: 1 then 2 (the up blocks get 3 then 2 resnets)
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=(1, 2), block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8,
    ).eval()


# (SGM path, diffusers path), written out by hand: the reference the family's map is checked against
PICKS = {
    "sdxl": (
        ("time_embed.0", "time_embedding.linear_1"),
        ("label_emb.0.2", "add_embedding.linear_2"),
        ("input_blocks.0.0", "conv_in"),
        ("input_blocks.2.0.in_layers.2", "down_blocks.0.resnets.1.conv1"),
        ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
        ("input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
        ("input_blocks.5.1.transformer_blocks.0.attn1.to_q", "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q"),
        ("input_blocks.7.1.transformer_blocks.1.attn2.to_k", "down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k"),
        ("middle_block.1.proj_in", "mid_block.attentions.0.proj_in"),
        ("middle_block.2.emb_layers.1", "mid_block.resnets.1.time_emb_proj"),
        ("output_blocks.0.1.transformer_blocks.1.ff.net.0.proj",
         "up_blocks.0.attentions.0.transformer_blocks.1.ff.net.0.proj"),
        ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
        ("output_blocks.4.1.transformer_blocks.0.attn1.to_out.0", "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0"),
        ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
        ("output_blocks.8.0.out_layers.3", "up_blocks.2.resnets.2.conv2"),
        ("out.2", "conv_out"),
    ),
    "sd15": (
        ("time_embed.2", "time_embedding.linear_2"),
        ("input_blocks.1.1.proj_in", "down_blocks.0.attentions.0.proj_in"),  # 1x1 conv
        ("input_blocks.2.0.op", "down_blocks.0.downsamplers.0.conv"),
        ("input_blocks.3.1.transformer_blocks.0.attn2.to_v", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"),
        ("input_blocks.4.0.op", "down_blocks.1.downsamplers.0.conv"),
        ("input_blocks.5.0.skip_connection", "down_blocks.2.resnets.0.conv_shortcut"),
        ("middle_block.0.in_layers.2", "mid_block.resnets.0.conv1"),
        ("middle_block.1.proj_out", "mid_block.attentions.0.proj_out"),
        ("output_blocks.1.1.conv", "up_blocks.0.upsamplers.0.conv"),  # up block without attentions: index 1
        ("output_blocks.2.1.transformer_blocks.0.ff.net.2", "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"),
        ("output_blocks.3.2.conv", "up_blocks.1.upsamplers.0.conv"),  # up block with attentions: index 2
        ("output_blocks.5.0.skip_connection", "up_blocks.2.resnets.1.conv_shortcut"),
    ),
    "per_block": (
        ("input_blocks.1.1.transformer_blocks.0.attn1.to_k", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"),
        ("input_blocks.2.0.op", "down_blocks.0.downsamplers.0.conv"),
        ("input_blocks.4.0.in_layers.2", "down_blocks.1.resnets.1.conv1"),
        ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
        ("output_blocks.4.0.skip_connection", "up_blocks.1.resnets.1.conv_shortcut"),
        ("output_blocks.4.1.proj_in", "up_blocks.1.attentions.1.proj_in"),
    ),
}
MODELS = {"sdxl": _sdxl, "sd15": _sd15, "per_block": _per_block}


def _inputs(name):
    g = torch.Generator().manual_seed(7)
    extra = ({"added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.randn(1, 6, generator=g)}}
             if name == "sdxl" else {})
    return dict(sample=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([10]),
                encoder_hidden_states=torch.randn(1, 5, 32, generator=g), **extra)


def _factors(model, picks, seed=1):
    """Random rank-4 factors for each picked module, shaped the kohya/PEFT way (conv: down [r, in, kh, kw], up
    [out, r, 1, 1])."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for sgm, diff in picks:
        w = mods[diff].weight
        conv = w.dim() == 4
        out[sgm] = (torch.randn(RANK, *w.shape[1:], generator=g) * 0.3,
                    torch.randn(w.shape[0], RANK, *([1, 1] if conv else []), generator=g) * 0.3)
    return out


def _state(factors, naming, alpha=ALPHA):
    state = {}
    for sgm, (down, up) in factors.items():
        if naming == "kohya":
            stem = "lora_unet_" + sgm.replace(".", "_")
        elif naming == "comfyui":
            stem = "diffusion_model." + sgm
        else:  # single-file prefix with PEFT suffixes, alpha baked into B
            stem = "model.diffusion_model." + sgm
            state |= {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up * (alpha / RANK)}
            continue
        state |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}
    return state


def _diffusers_equivalent(factors, picks, alpha=ALPHA):
    """The same LoRA written by hand in diffusers naming (alpha baked in): the reference."""
    names = dict(picks)
    out = {}
    for sgm, (down, up) in factors.items():
        out[f"unet.{names[sgm]}.lora_A.weight"] = down
        out[f"unet.{names[sgm]}.lora_B.weight"] = up * (alpha / RANK)
    return out


@pytest.mark.parametrize("naming", ["kohya", "comfyui", "single-file-peft"])
@pytest.mark.parametrize("name", list(MODELS))
def test_sgm_names_equal_diffusers_names(name, naming):
    base = MODELS[name]()
    factors = _factors(base, PICKS[name])
    state = _state(factors, naming)
    lora = lorakit.load(state, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(state)
    # the UNet kind comes from names plus shapes (issue 17): both SD 1.x-layout test UNets have a 1x1-conv proj_in
    assert detect_family(lora) == {"sdxl": "sdxl", "sd15": "sd1", "per_block": "sd1"}[name]
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    patch = lorakit.apply(ours, [(lora, 0.8)], strict=True)
    lorakit.apply(ref, [(_diffusers_equivalent(factors, PICKS[name]), 0.8)], strict=True)
    base_sd, ref_sd = base.state_dict(), ref.state_dict()
    changed = 0
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, ref_sd[key], rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(value, base_sd[key])
    assert changed == len(PICKS[name])  # one weight per picked module, nothing else
    with torch.no_grad():
        out, ref_out, base_out = (m(**_inputs(name)).sample for m in (ours, ref, base))
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert (out - base_out).abs().max() > 1e-3
    patch.remove()
    assert all(torch.equal(v, base_sd[k]) for k, v in ours.state_dict().items())


def test_hook_mode_equals_fuse_on_sgm_names():
    base = _sd15()
    lora = lorakit.load(_state(_factors(base, PICKS["sd15"]), "kohya"), strict=True)
    fused, hooked = copy.deepcopy(base), copy.deepcopy(base)
    lorakit.apply(fused, lora, strict=True)
    patch = lorakit.apply(hooked, lora, mode="hook", strict=True)
    with torch.no_grad():
        a, b, c = (m(**_inputs("sd15")).sample for m in (fused, hooked, base))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert (a - c).abs().max() > 1e-3
    patch.remove()
    with torch.no_grad():
        assert torch.equal(hooked(**_inputs("sd15")).sample, c)


def _peer(state, unet):
    """diffusers' SGM conversion (``_maybe_map_sgm_blocks_to_diffusers`` + ``_convert_non_diffusers_lora_to_diffusers``)."""
    return StableDiffusionXLPipeline.lora_state_dict(dict(state), unet_config=unet.config)


def _sgm_modules(unet):
    """Every Linear/Conv2d of the UNet under its SGM name, from the family's own map."""
    index = build_index({"denoiser": unet})
    mods = index.modules["denoiser"]
    out = []
    for _, alias in index.aliases("denoiser"):
        if "." in alias and alias.split(".")[0] in ("input_blocks", "middle_block", "output_blocks", "time_embed",
                                                    "label_emb", "out"):
            module = index.lookup("denoiser", alias)[0].module
            if isinstance(mods[module], (torch.nn.Linear, torch.nn.Conv2d)):
                out.append((alias, module))
    return out


def test_every_sdxl_layer_agrees_with_diffusers_conversion_and_peft_fuse():
    """A kohya LoCon over every Linear/Conv2d of the SDXL UNet in SGM names: diffusers' conversion (applied by
    lorakit, and loaded into the UNet with load_lora_adapter + fuse_lora) gives lorakit's weights. One alpha for
    all modules: diffusers mis-scales mixed alphas on attention layers (FORMATS §9.2)."""
    unet = _sdxl()
    picks = _sgm_modules(unet)
    assert len(picks) == len({d for _, d in picks}) > 200  # one SGM name per module
    factors = _factors(unet, picks, seed=2)
    state = _state({k: (d * 0.3, u * 0.3) for k, (d, u) in factors.items()}, "kohya")
    converted, alphas = _peer(state, unet)
    ours, theirs, peer = copy.deepcopy(unet), copy.deepcopy(unet), copy.deepcopy(unet)
    lorakit.apply(ours, lorakit.load(state, strict=True), strict=True)
    # diffusers returns the alphas apart from the tensors: its dict alone is the LoRA at scale 1, hence the strength
    lorakit.apply(theirs, [(lorakit.load(converted, strict=True), ALPHA / RANK)], strict=True)
    peer.load_lora_adapter(converted, prefix="unet", network_alphas=alphas)
    peer.fuse_lora(lora_scale=1.0)
    peer.unload_lora()
    base_sd, theirs_sd, peer_sd = unet.state_dict(), theirs.state_dict(), peer.state_dict()
    changed = 0
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs_sd[key], rtol=0, atol=1e-6, msg=key)
        torch.testing.assert_close(value, peer_sd[key], rtol=0, atol=1e-5, msg=key)
        changed += not torch.equal(value, base_sd[key])
    assert changed == len(picks)


def _deep_sd1():
    """SD 1.x depth: 4 levels of 2 layers, 12 input and 12 output blocks."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=4, cross_attention_dim=32,
        norm_num_groups=8).eval()


DEEP_PICKS = (("input_blocks.1.1.proj_in", "down_blocks.0.attentions.0.proj_in"),
              ("input_blocks.10.0.in_layers.2", "down_blocks.3.resnets.0.conv1"),
              ("output_blocks.11.1.proj_out", "up_blocks.3.attentions.2.proj_out"),
              ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"))


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_misplaces_sd1_layouts():
    """Peer bugs (diffusers 0.42.1, SGM remap with the UNet's config): an upsampler on an up block WITHOUT
    attentions (``output_blocks.N.1.conv``) becomes ``up_blocks.i.attentions.1.conv``; ``layers_per_block`` given
    per block raises TypeError; with 10+ input blocks (SD 1.x: 12) ``input_blocks_1`` also claims
    ``input_blocks_10_*`` keys and the remap raises KeyError. lorakit's side: the next test."""
    unet = _sd15()
    converted, _ = _peer(_state(_factors(unet, PICKS["sd15"]), "kohya"), unet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = lorakit.apply(copy.deepcopy(unet), lorakit.load(converted, strict=True), strict=False)
    assert theirs.report.unmatched["0:lora"] == ["unet.up_blocks.0.attentions.1.conv"]
    per_block = _per_block()
    with pytest.raises(TypeError):
        _peer(_state(_factors(per_block, PICKS["per_block"]), "kohya"), per_block)
    deep = _deep_sd1()
    with pytest.raises(KeyError):
        _peer(_state(_factors(deep, DEEP_PICKS), "kohya"), deep)


def test_sd1_layouts_diffusers_misplaces_land_where_diffusers_names_do():
    """The layouts of the peer bugs above (any diffusers version): lorakit places every SGM key."""
    unet = _sd15()
    state = _state(_factors(unet, PICKS["sd15"]), "kohya")
    ours = lorakit.apply(copy.deepcopy(unet), lorakit.load(state, strict=True), strict=True)
    assert ours.report.matched["0:lora"]["lora_unet_output_blocks_1_1_conv"] == ["denoiser:up_blocks.0.upsamplers.0.conv"]

    per_block = _per_block()
    state = _state(_factors(per_block, PICKS["per_block"]), "kohya")
    ours = lorakit.apply(per_block, lorakit.load(state, strict=True), strict=True)
    assert ours.report.counts()["0:lora"]["matched"] == len(PICKS["per_block"])

    deep = _deep_sd1()
    factors = _factors(deep, DEEP_PICKS)
    state = _state(factors, "kohya")
    ours, ref = copy.deepcopy(deep), copy.deepcopy(deep)
    lorakit.apply(ours, lorakit.load(state, strict=True), strict=True)
    lorakit.apply(ref, lorakit.load(_diffusers_equivalent(factors, DEEP_PICKS)), strict=True)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ours.state_dict().items())
    assert sum(not torch.equal(v, deep.state_dict()[k]) for k, v in ours.state_dict().items()) == len(DEEP_PICKS)


def _mixed(unet):
    """Two SGM-named kohya LoRAs and one diffusers-named (``lora_unet_mid_block_...``) in one file."""
    picks = PICKS["sdxl"][6:9]
    factors = _factors(unet, picks)
    sgm = _state(dict(list(factors.items())[:2]), "kohya")
    (_, diff), (down, up) = picks[2], factors[picks[2][0]]
    stem = "lora_unet_" + diff.replace(".", "_")
    mixed = {**sgm, f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(ALPHA)}
    return picks, factors, mixed


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_drops_the_sgm_keys_of_a_mixed_file():
    """Peer fact (diffusers 0.42.1): a file mixing SGM and diffusers UNet names loses its SGM keys in diffusers'
    remap, silently."""
    unet = _sdxl()
    converted, _ = _peer(_mixed(unet)[2], unet)
    assert {k.rsplit(".lora", 1)[0] for k in converted} == {"unet.mid_block.attentions.0.proj_in"}


def test_mixed_sgm_and_diffusers_names_all_land():
    """A file mixing SGM and diffusers UNet names (which diffusers' remap mishandles, above): every key lands."""
    unet = _sdxl()
    picks, factors, mixed = _mixed(unet)
    lora = lorakit.load(mixed, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(mixed)
    ours, ref = copy.deepcopy(unet), copy.deepcopy(unet)
    lorakit.apply(ours, lora, strict=True)
    lorakit.apply(ref, lorakit.load(_diffusers_equivalent(factors, picks)), strict=True)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, ref.state_dict()[key], rtol=0, atol=1e-6, msg=key)
    assert sum(not torch.equal(v, unet.state_dict()[k]) for k, v in ours.state_dict().items()) == 3


def test_dora_on_sgm_names():
    """kohya DoRA (``dora_scale`` [out, 1]) on SGM names equals PEFT DoRA (``lora_magnitude_vector``) on diffusers
    names and the DoRA formula (diffusers' SDXL loader drops every ``dora_scale``: the next test)."""
    unet = _sdxl()
    picks = (PICKS["sdxl"][6], PICKS["sdxl"][11])  # a Linear and a 3x3 conv
    factors = _factors(unet, picks)
    mods = dict(unet.named_modules())
    g = torch.Generator().manual_seed(9)
    mags = {sgm: mods[diff].weight.flatten(1).norm(dim=1) * (1 + 0.2 * torch.rand(mods[diff].weight.shape[0], generator=g))
            for sgm, diff in picks}
    state = _state(factors, "kohya")
    state |= {f"lora_unet_{sgm.replace('.', '_')}.dora_scale": m.reshape(-1, 1) for sgm, m in mags.items()}
    ref_state = _diffusers_equivalent(factors, picks)
    ref_state |= {f"unet.{diff}.lora_magnitude_vector": mags[sgm] for sgm, diff in picks}
    lora = lorakit.load(state, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(state)
    ours, ref = copy.deepcopy(unet), copy.deepcopy(unet)
    lorakit.apply(ours, lora, strict=True)
    lorakit.apply(ref, lorakit.load(ref_state), strict=True)
    ours_sd = ours.state_dict()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours_sd[key], value, rtol=0, atol=1e-6, msg=key)
    for sgm, diff in picks:  # W' = m · (W + s·BA) / ‖W + s·BA‖ per output row
        w = mods[diff].weight
        down, up = factors[sgm]
        w1 = w + (ALPHA / RANK) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        want = mags[sgm].reshape(-1, *[1] * (w.dim() - 1)) * w1 / w1.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
        torch.testing.assert_close(ours_sd[f"{diff}.weight"], want, rtol=1e-5, atol=1e-6)


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_drops_kohya_dora_scale():
    """Peer fact (diffusers 0.42.1): the SDXL loader's SGM conversion drops every ``dora_scale`` (with a warning);
    lorakit applies them (test_dora_on_sgm_names)."""
    unet = _sdxl()
    picks = (PICKS["sdxl"][6], PICKS["sdxl"][11])
    state = _state(_factors(unet, picks), "kohya")
    mods = dict(unet.named_modules())
    state |= {f"lora_unet_{sgm.replace('.', '_')}.dora_scale": mods[diff].weight.flatten(1).norm(dim=1).reshape(-1, 1)
              for sgm, diff in picks}
    converted, _ = _peer(state, unet)
    assert converted and not any("magnitude" in k or "dora" in k for k in converted)


def _clip(projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(3)
    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99, max_position_embeddings=16, projection_dim=32, bos_token_id=0, eos_token_id=2)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def test_sdxl_pipeline_kohya_file_lands_on_unet_and_both_text_encoders():
    pipe = {"denoiser": _sdxl(), "text_encoder": _clip(), "text_encoder_2": _clip(projection=True)}
    picks = PICKS["sdxl"][5:8]
    factors = _factors(pipe["denoiser"], picks)
    state = _state(factors, "kohya")
    g = torch.Generator().manual_seed(4)
    ref_state = _diffusers_equivalent(factors, picks)
    for prefix, comp, path, cols, rows in (
        ("lora_te1_", "text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", 32, 32),
        ("lora_te1_", "text_encoder", "text_model.encoder.layers.0.mlp.fc2", 64, 32),
        ("lora_te2_", "text_encoder_2", "text_model.encoder.layers.0.self_attn.out_proj", 32, 32),
        ("lora_te2_", "text_encoder_2", "text_model.encoder.layers.0.mlp.fc1", 32, 64),
    ):
        down, up = torch.randn(RANK, cols, generator=g) * 0.3, torch.randn(rows, RANK, generator=g) * 0.3
        stem = prefix + path.replace(".", "_")
        state |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(ALPHA)}
        ref_state |= {f"{comp}.{path}.lora_A.weight": down, f"{comp}.{path}.lora_B.weight": up * (ALPHA / RANK)}
    lora = lorakit.load(state, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(state)
    assert detect_family(lora) == "sdxl"
    before = {c: copy.deepcopy(m.state_dict()) for c, m in pipe.items()}
    ref = {c: copy.deepcopy(m) for c, m in pipe.items()}
    converted = copy.deepcopy(pipe)
    patch = lorakit.apply(pipe, lora, strict=True)
    lorakit.apply(ref, lorakit.load(ref_state), strict=True)
    # diffusers' text-encoder keys come out in the old attention-processor spelling (``self_attn.to_q_lora``); its
    # text-encoder loader renames them with convert_state_dict_to_peft before use, and so does the peer here
    peer_state = _peer(state, pipe["denoiser"])[0]
    peer_state = {k: v for k, v in peer_state.items() if k.startswith("unet.")} | convert_state_dict_to_peft(
        {k: v for k, v in peer_state.items() if not k.startswith("unet.")})
    lorakit.apply(converted, [(lorakit.load(peer_state, strict=True), ALPHA / RANK)], strict=True)
    landed = {t.split(":")[0] for ts in patch.report.matched["0:lora"].values() for t in ts}
    assert landed == set(pipe)
    for comp, module in pipe.items():
        changed = 0
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, ref[comp].state_dict()[key], rtol=0, atol=1e-6, msg=f"{comp} {key}")
            torch.testing.assert_close(value, converted[comp].state_dict()[key], rtol=0, atol=1e-6, msg=f"{comp} {key}")
            changed += not torch.equal(value, before[comp][key])
        assert changed == (3 if comp == "denoiser" else 2), comp
    patch.remove()
    for comp, module in pipe.items():
        assert all(torch.equal(v, before[comp][k]) for k, v in module.state_dict().items())


def test_detect_family():
    def kohya(*paths):
        return {f"lora_unet_{p}.{s}": torch.zeros(2, 2) for p in paths for s in ("lora_down.weight", "lora_up.weight")}

    sgm = kohya("input_blocks_4_1_transformer_blocks_0_attn1_to_q", "output_blocks_2_2_conv", "label_emb_0_0",
                "middle_block_1_proj_in", "time_embed_0", "out_2")
    assert detect_family(lorakit.load(sgm)) == "sdxl"
    # one mid-block projection of width 2: SD 1.x, 2.x and SDXL all have it, nothing tells them apart
    assert detect_family(lorakit.load({"diffusion_model.middle_block.1.proj_out.lora_A.weight": torch.zeros(2, 2),
                                       "diffusion_model.middle_block.1.proj_out.lora_B.weight": torch.zeros(2, 2)})) is None
    others = (
        kohya("double_blocks_0_img_attn_qkv", "single_blocks_1_linear1"),  # FLUX
        kohya("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "up_blocks_1_resnets_0_conv1",
              "mid_block_attentions_0_proj_in", "time_embedding_linear_1"),  # SD 1.5 / diffusers-named SDXL
        kohya("joint_blocks_0_x_block_attn_qkv"),  # SD3
        kohya("blocks_0_self_attn_q", "blocks_1_ffn_0"),  # Wan (musubi)
        {"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 2),
         "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": torch.zeros(2, 2)},  # PEFT
    )
    for state in others:
        assert detect_family(lorakit.load(state)) != "sdxl", sorted(state)[0]
    # the SD 1.5 layout is SGM too, but attention in input_blocks.1 is SD 1.x/2.x's: names alone cannot say which
    assert detect_family(list(dict(PICKS["sd15"]))) is None


def test_unplaceable_sgm_keys_are_reported():
    """An SDXL LoRA on an SD 1.x UNet: ``label_emb`` (SDXL's add_embedding) and ``output_blocks.8`` (SD 1.x here has
    6 output blocks) have no home. strict=False warns and reports them; strict=True refuses."""
    unet = _sd15()
    factors = _factors(unet, PICKS["sd15"][1:2])
    g = torch.Generator().manual_seed(5)
    extra = {"label_emb.0.0": (torch.randn(RANK, 80, generator=g), torch.randn(128, RANK, generator=g)),
             "output_blocks.8.1.proj_in": (torch.randn(RANK, 64, generator=g), torch.randn(64, RANK, generator=g))}
    state = _state({**factors, **extra}, "kohya")
    lora = lorakit.load(state, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(state)
    model = copy.deepcopy(unet)
    with pytest.warns(UserWarning, match="label_emb"):
        patch = lorakit.apply(model, lora, strict=False)
    assert sorted(patch.report.unmatched["0:lora"]) == ["lora_unet_label_emb_0_0", "lora_unet_output_blocks_8_1_proj_in"]
    assert patch.report.counts()["0:lora"]["matched"] == 1
    with pytest.raises(lorakit.MatchError, match="label_emb"):
        lorakit.apply(copy.deepcopy(unet), lora, strict=True)


def _comfyui_reference(unet):
    """``{SGM module: diffusers module}`` by ComfyUI's block arithmetic (``comfy/utils.py::unet_to_diffusers``, one
    ``num_res_blocks`` for every level): input block ``1 + (L+1)·x + i``, downsampler after the last layer, output
    block ``(L+1)·x + i``, upsampler on the level's last output block at ``.1.conv`` or, after an attention,
    ``.2.conv``. Resnet and attention internals are filled in from the diffusers module names."""
    L = unet.config.layers_per_block
    mods = dict(unet.named_modules())
    blocks = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
              "input_blocks.0.0": "conv_in", "out.2": "conv_out", "middle_block.0": "mid_block.resnets.0",
              "middle_block.1": "mid_block.attentions.0", "middle_block.2": "mid_block.resnets.1"}
    for x in range(len(unet.down_blocks)):
        for i in range(L):
            blocks[f"input_blocks.{1 + (L + 1) * x + i}.0"] = f"down_blocks.{x}.resnets.{i}"
            blocks[f"input_blocks.{1 + (L + 1) * x + i}.1"] = f"down_blocks.{x}.attentions.{i}"
        blocks[f"input_blocks.{1 + (L + 1) * x + L}.0.op"] = f"down_blocks.{x}.downsamplers.0.conv"
    for x in range(len(unet.up_blocks)):
        attn = f"up_blocks.{x}.attentions.0" in mods
        for i in range(L + 1):
            blocks[f"output_blocks.{(L + 1) * x + i}.0"] = f"up_blocks.{x}.resnets.{i}"
            blocks[f"output_blocks.{(L + 1) * x + i}.1"] = f"up_blocks.{x}.attentions.{i}"
        blocks[f"output_blocks.{(L + 1) * x + L}.{2 if attn else 1}.conv"] = f"up_blocks.{x}.upsamplers.0.conv"
    resnet = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
              "conv_shortcut": "skip_connection"}
    ref = {}
    for sgm, diff in blocks.items():
        for name, mod in mods.items():
            if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if name == diff:
                ref[sgm] = name
            elif name.startswith(diff + "."):
                rest = name[len(diff) + 1:]
                ref[f"{sgm}.{resnet.get(rest, rest)}"] = name
    return ref


@pytest.mark.parametrize("variant", ["sdxl", "sd15"])
def test_released_unets_every_module_has_its_sgm_name(variant):
    """The released SDXL (2.57B) and SD 1.5 UNets on the meta device: every Linear/Conv2d has the SGM name
    ComfyUI's arithmetic gives it, dotted and kohya-flattened, and resolves to that module."""
    from lorakit.families.offline import meta_components

    unet = meta_components(variant, ("denoiser",))["denoiser"]
    ref = _comfyui_reference(unet)
    weighted = {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert set(ref.values()) == weighted  # the reference itself covers the model
    index = build_index({"denoiser": unet})
    for sgm, diff in ref.items():
        for alias in (sgm, sgm.replace(".", "_")):
            assert [t.module for t in index.lookup("denoiser", alias)] == [diff], alias
    assert set(dict(_sgm_modules(unet))) == set(ref)  # and the family adds no other SGM module name
    if variant == "sd15":  # 12 input blocks: input_blocks.1 must not swallow input_blocks.10/11
        assert ref["input_blocks.11.0.in_layers.2"] == "down_blocks.3.resnets.1.conv1"


def test_label_emb_of_a_class_conditioned_unet():
    """Class-conditioned UNets (SD 2.x unCLIP style) keep ``label_emb`` for their ``class_embedding`` MLP."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(32,), norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                cross_attention_dim=32, attention_head_dim=4, class_embed_type="timestep").eval()
    index = build_index({"denoiser": unet})
    assert [t.module for t in index.lookup("denoiser", "label_emb_0_2")] == ["class_embedding.linear_2"]
    assert index.lookup("denoiser", "middle_block.1.proj_in")[0].module == "mid_block.attentions.0.proj_in"


def test_old_diffusers_text_encoder_attention_spelling():
    """diffusers' kohya conversion (and diffusers <= 0.16 files) name CLIP attention LoRAs ``self_attn.to_q_lora`` /
    ``to_out_lora``; diffusers' convert_state_dict_to_peft maps them onto ``q_proj`` / ``out_proj``."""
    te = _clip()
    g = torch.Generator().manual_seed(6)
    state = {}
    for old in ("to_q", "to_out"):
        stem = f"text_encoder.text_model.encoder.layers.0.self_attn.{old}_lora"
        state |= {f"{stem}.down.weight": torch.randn(RANK, 32, generator=g), f"{stem}.up.weight": torch.randn(32, RANK, generator=g)}
    patch = lorakit.apply({"text_encoder": te}, lorakit.load(state, strict=True), strict=True)
    targets = sorted(t.rsplit(".", 1)[1] for ts in patch.report.matched["0:lora"].values() for t in ts)
    assert targets == ["out_proj", "q_proj"]
