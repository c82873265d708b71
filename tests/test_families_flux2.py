"""FLUX.2: BFL / ComfyUI / ai-toolkit / kohya names land on diffusers' Flux2Transformer2DModel as diffusers' own
converters place them (its single-file converter for the name map, its LoRA converters + PEFT for LoRAs); where
diffusers drops or misplaces a layer, a pinned test shows it; LoKr on the fused qkv is exact."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.families import detect_family

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders import lora_conversion_utils as lcu  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

from _family_util import original_checkpoint, randomise  # noqa: E402
from _peers import pinned_peer  # noqa: E402
from _wave2_util import check_against, lora_pair, peer_fused  # noqa: E402

H, FF = 16, 48  # inner width (2 heads x 8), feed-forward hidden (mlp_ratio 3)


def _tiny():
    torch.manual_seed(0)
    model = diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2))
    return randomise(model.eval())


def _forward(model):
    g = torch.Generator().manual_seed(5)
    return model(hidden_states=torch.randn(1, 16, 8, generator=g), encoder_hidden_states=torch.randn(1, 6, 16, generator=g),
                 timestep=torch.tensor([0.5]), img_ids=torch.zeros(1, 16, 4), txt_ids=torch.zeros(1, 6, 4),
                 guidance=torch.tensor([3.5])).sample


def test_name_map_matches_diffusers_single_file_converter():
    model = _tiny()
    orig = {k: v for k, v in original_checkpoint(model, "flux2").items() if not k.startswith("sformer_blocks")}
    # BFL stores the q/k norms as ``.scale``
    orig = {(k[:-len("weight")] + "scale" if "_norm." in k else k): v for k, v in orig.items()}
    converted = sfu.convert_flux2_transformer_checkpoint_to_diffusers(dict(orig))
    sd = model.state_dict()
    assert set(converted) == set(sd)
    assert [k for k in sd if not torch.equal(converted[k], sd[k])] == []


# (BFL layer, rows, cols): fused qkv (split by rows), fused linear1 (kept), projections, embedders
PICK = (
    ("double_blocks.0.img_attn.qkv", 3 * H, H), ("double_blocks.1.txt_attn.qkv", 3 * H, H),
    ("double_blocks.0.img_attn.proj", H, H), ("double_blocks.1.txt_attn.proj", H, H),
    ("double_blocks.0.img_mlp.0", 2 * FF, H), ("double_blocks.1.txt_mlp.2", H, FF),
    ("single_blocks.0.linear1", 3 * H + 2 * FF, H), ("single_blocks.1.linear2", H, H + FF),
    ("img_in", H, 8), ("txt_in", H, 16), ("final_layer.linear", 8, H),
)
EXTRA = (("double_stream_modulation_img.lin", 6 * H, 16), ("single_stream_modulation.lin", 3 * H, 16),
         ("time_in.in_layer", 16, 16), ("guidance_in.out_layer", 16, 16))


def _factors(picks, seed=1, r=4):
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(r, cols, generator=g) * 0.3, torch.randn(rows, r, generator=g) * 0.3)
            for name, rows, cols in picks}


def _file(factors, naming, alpha=2.0):
    state = {}
    for name, (down, up) in factors.items():
        if naming == "kohya":
            state |= lora_pair("lora_unet_" + name.replace(".", "_"), down, up, alpha, "kohya")
        else:  # ai-toolkit / ComfyUI: diffusion_model. + BFL names, PEFT suffixes, alpha baked in
            state |= lora_pair("diffusion_model." + name, down, up * alpha / down.shape[0], None, "peft")
    return state


def _peer_convert(state, naming):
    if naming == "kohya":
        return lcu._convert_kohya_flux2_lora_to_diffusers(dict(state))
    return lcu._convert_non_diffusers_flux2_lora_to_diffusers(dict(state))


@pytest.mark.parametrize("naming", ["kohya", "aitoolkit"])
def test_bfl_lora_equals_diffusers_converter(naming):
    model = _tiny()
    picks = PICK + (EXTRA if naming == "aitoolkit" else ())  # kohya's converter drops EXTRA (pinned below)
    state = _file(_factors(picks), naming)
    lora = lorakit.load(state, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(state)
    # BFL block names alone are FLUX.1's too (which one is told by shapes, not names); the modulations are FLUX.2's
    if naming == "aitoolkit":
        assert detect_family(lora) == "flux2"
    want = peer_fused(model, _peer_convert(state, naming), 0.8)
    changed = check_against(model, lora, want, 0.8, _forward)
    assert changed == len(picks) + 4  # each fused qkv lands on three modules


def test_lycoris_and_diffusers_names_resolve():
    """LyCORIS (``lycoris_transformer_blocks_0_attn_to_q``) and diffusers / ``sformer_blocks`` names place on the
    model's own modules, the same as the PEFT file diffusers loads."""
    model = _tiny()
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(4, H, generator=g), torch.randn(H, 4, generator=g)
    down2, up2 = torch.randn(4, H, generator=g), torch.randn(3 * H + 2 * FF, 4, generator=g)
    named = {
        **lora_pair("lycoris_transformer_blocks_0_attn_to_q", down, up, 4.0, "kohya"),
        **lora_pair("diffusion_model.sformer_blocks.1.attn.to_add_out", down, up, 4.0, "kohya"),
        **lora_pair("lycoris_single_transformer_blocks_0_attn_to_qkv_mlp_proj", down2, up2, 4.0, "kohya"),
    }
    peft = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": down,
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": up,
            "transformer.transformer_blocks.1.attn.to_add_out.lora_A.weight": down,
            "transformer.transformer_blocks.1.attn.to_add_out.lora_B.weight": up,
            "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight": down2,
            "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B.weight": up2}
    lora = lorakit.load(named, strict=True)
    assert check_against(model, lora, peer_fused(model, peft, 0.6), 0.6, _forward) == 3


def test_lokr_on_fused_qkv_is_the_full_delta_sliced():
    """A LoKr delta on BFL's fused ``img_attn.qkv`` cannot be split into factors: lorakit builds the whole
    kron(w1, w2 a @ w2 b) and gives each of to_q/to_k/to_v its rows (diffusers instead fuses the model's qkv)."""
    model = _tiny()
    g = torch.Generator().manual_seed(3)
    w1 = torch.randn(4, 2, generator=g)  # (3H / 12) x (H / 8)
    w2a, w2b = torch.randn(12, 2, generator=g), torch.randn(2, 8, generator=g)
    state = {"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": w1,
             "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2_a": w2a,
             "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2_b": w2b,
             "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(1.0)}
    lora = lorakit.load(state, strict=True)
    delta = torch.kron(w1, w2a @ w2b) * (1.0 / 2)  # alpha / rank of the decomposed factor
    sd = model.state_dict()
    want = dict(sd)
    for i, n in enumerate(("to_q", "to_k", "to_v")):
        key = f"transformer_blocks.0.attn.{n}.weight"
        want[key] = sd[key] + 0.5 * delta[i * H:(i + 1) * H]
    assert check_against(model, lora, want, 0.5, _forward, atol=1e-6) == 3


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_flux2_lora_converters_drop_and_misorder():
    """diffusers 0.42.1: (1) the ai-toolkit/BFL converter puts ``final_layer.adaLN_modulation.1`` on
    ``norm_out.linear`` without swapping (shift, scale) -> (scale, shift), although its single-file converter
    swaps the same weight; (2) the kohya converter drops modulation, guidance and final adaLN layers with a
    warning (all but ``time_in``). lorakit swaps and places all of them."""
    model = _tiny()
    factors = _factors((("final_layer.adaLN_modulation.1", 2 * H, 16),), seed=4)
    down, up = factors["final_layer.adaLN_modulation.1"]
    state = _file(factors, "aitoolkit")
    peer = peer_fused(model, _peer_convert(state, "aitoolkit"), 1.0)
    base = model.state_dict()["norm_out.linear.weight"]
    delta = up * 0.5 @ down
    torch.testing.assert_close(peer["norm_out.linear.weight"], base + delta)  # rows not swapped
    ours = copy.deepcopy(model)
    lorakit.apply(ours, [(state, 1.0)], strict=True)
    torch.testing.assert_close(ours.state_dict()["norm_out.linear.weight"],
                               base + torch.cat([delta[H:], delta[:H]]), rtol=0, atol=1e-6)

    kohya = _file(_factors(EXTRA), "kohya")
    converted = lcu._convert_kohya_flux2_lora_to_diffusers(dict(kohya))
    # only time_in survives: the modulations and guidance_in are dropped (with a warning)
    assert {k.rsplit(".", 2)[0] for k in converted} == {"transformer.time_guidance_embed.timestep_embedder.linear_1"}
    ours = copy.deepcopy(model)
    patch = lorakit.apply(ours, [(kohya, 1.0)], strict=True)
    assert patch.report.touched_tensors == len(EXTRA)
    changed = [k for k, v in ours.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert sorted(changed) == sorted(["double_stream_modulation_img.linear.weight", "single_stream_modulation.linear.weight",
                                      "time_guidance_embed.timestep_embedder.linear_1.weight",
                                      "time_guidance_embed.guidance_embedder.linear_2.weight"])
