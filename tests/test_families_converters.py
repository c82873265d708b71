"""Every family's name map checked against diffusers' own single-file converters (the peer that turns the
original checkpoints into diffusers models): the original-named checkpoint rebuilt from lorakit's map
converts back to the model exactly, and a LoRA in original naming (kohya-flattened or ComfyUI dotted)
applied by lorakit gives the weights that diffusers' converter gives for the same deltas."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.families import detect_family

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

from _family_util import original_checkpoint, randomise  # noqa: E402


def _sdxl():
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4), cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32)


def _sd15():  # layers_per_block=1, conv proj_in, an upsampler on a block without attentions
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8)


def _sd35():  # SD3.5-medium style: dual attention in block 0, qk norms, context-pre-only last block
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")


def _wan(i2v=False):
    extra = dict(image_dim=16, added_kv_proj_dim=16) if i2v else {}
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, **extra)


def _cosmos():
    return diffusers.CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=16, adaln_lora_dim=8, max_size=(4, 16, 16), patch_size=(1, 2, 2), rope_scale=(1.0, 1.0, 1.0),
        concat_padding_mask=False, extra_pos_embed_type=None)  # True needs torchvision in the forward


def _inputs(name, model):
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if name in ("sdxl", "sd15"):
        extra = {"added_cond_kwargs": {"text_embeds": r(1, 32), "time_ids": r(1, 6)}} if name == "sdxl" else {}
        return dict(sample=r(1, 4, 16, 16), timestep=torch.tensor([10]), encoder_hidden_states=r(1, 5, 32), **extra)
    if name == "sd35":
        return dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 5, 16), pooled_projections=r(1, 16),
                    timestep=torch.tensor([10]))
    if name.startswith("wan"):
        extra = {"encoder_hidden_states_image": r(1, 4, 16)} if name == "wan_i2v" else {}
        return dict(hidden_states=r(1, 4, 2, 8, 8), timestep=torch.tensor([500]), encoder_hidden_states=r(1, 6, 16), **extra)
    return dict(hidden_states=r(1, 4, 2, 8, 8), timestep=torch.tensor([500]), encoder_hidden_states=r(1, 6, 16),
                padding_mask=torch.zeros(1, 1, 8, 8))


def _convert(name, model, orig, delta=False):
    """diffusers' single-file converter on an original-named state dict (plus the non-module tensors it needs,
    zero when converting deltas)."""
    orig = dict(orig)
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()} if delta else model.state_dict()
    if name in ("sdxl", "sd15"):
        return sfu.convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in orig.items()}, dict(model.config))
    if name == "sd35":
        orig["pos_embed"] = sd["pos_embed.pos_embed"]
        return sfu.convert_sd3_transformer_checkpoint_to_diffusers(orig)
    if name.startswith("wan"):
        orig["head.modulation"] = sd["scale_shift_table"]
        for i in range(len(model.blocks)):
            orig[f"blocks.{i}.modulation"] = sd[f"blocks.{i}.scale_shift_table"]
        return sfu.convert_wan_transformer_to_diffusers(orig)
    return sfu.convert_cosmos_transformer_checkpoint_to_diffusers({"net." + k: v for k, v in orig.items()})


MODELS = {"sdxl": (_sdxl, "sdxl"), "sd15": (_sd15, "sdxl"), "sd35": (_sd35, "sd3"), "wan": (_wan, "wan"),
          "wan_i2v": (lambda: _wan(True), "wan"), "cosmos": (_cosmos, "cosmos")}


def _original(name):
    build, family = MODELS[name]
    torch.manual_seed(0)
    model = randomise(build().eval())
    orig = original_checkpoint(model, family)
    if family == "cosmos":  # keep one spelling per tensor: Predict2 names without ``net.`` (added by _convert)
        orig = {k: v for k, v in orig.items()
                if not k.startswith("net.") and ".block" not in k and "affline" not in k and "adaLN" not in k}
    return model, family, orig


@pytest.mark.parametrize("name", list(MODELS))
def test_name_map_matches_diffusers_single_file_converter(name):
    model, _, orig = _original(name)
    converted = _convert(name, model, orig)
    sd = model.state_dict()
    assert set(converted) == set(sd)  # every tensor of the model has an original name, and no other
    wrong = [k for k in sd if not torch.equal(converted[k], sd[k])]
    assert wrong == []


# detection names the UNet kind (issue 17): the SD 1.x pick has a 1x1-conv proj_in and SGM input_blocks.1.1
DETECTED = {"sd15": "sd1"}

# a few layers per family: fused splits, swaps, resnets, samplers, norms, embeddings
PICK = {
    "sdxl": ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.4.0.in_layers.2", "input_blocks.3.0.op",
             "output_blocks.2.2.conv", "middle_block.1.proj_in", "label_emb.0.0", "output_blocks.8.0.skip_connection"),
    "sd15": ("input_blocks.1.1.proj_in", "output_blocks.1.1.conv", "output_blocks.2.1.transformer_blocks.0.ff.net.2",
             "middle_block.2.emb_layers.1"),
    "sd35": ("joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.attn.qkv", "joint_blocks.0.x_block.attn2.qkv",
             "joint_blocks.1.context_block.adaLN_modulation.1", "final_layer.adaLN_modulation.1",
             "joint_blocks.1.x_block.mlp.fc2", "joint_blocks.0.context_block.attn.proj"),
    "wan": ("blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.0.ffn.0", "head.head", "time_projection.1"),
    "wan_i2v": ("blocks.1.cross_attn.k_img", "img_emb.proj.1", "blocks.0.self_attn.v"),
    "cosmos": ("blocks.0.self_attn.q_proj", "blocks.1.cross_attn.output_proj", "blocks.0.mlp.layer1",
               "blocks.1.adaln_modulation_mlp.2", "final_layer.adaln_modulation.2", "x_embedder.proj.1"),
}


@pytest.mark.parametrize("naming", ["kohya", "comfyui"])
@pytest.mark.parametrize("name", list(MODELS))
def test_original_named_lora_equals_diffusers_conversion(name, naming):
    model, family, orig = _original(name)
    g = torch.Generator().manual_seed(3)
    state, deltas = {}, {}
    for path in PICK[name]:
        w = orig[f"{path}.weight"]
        down = torch.randn(2, w[0].numel(), generator=g) * 0.2
        up = torch.randn(w.shape[0], 2, generator=g) * 0.2
        deltas[f"{path}.weight"] = (up @ down * 0.5).reshape(w.shape)  # alpha 1, rank 2
        if w.dim() == 4:
            down = down.reshape(2, *w.shape[1:])
            up = up.reshape(*up.shape, 1, 1)
        stem = ("lora_unet_" + path.replace(".", "_")) if naming == "kohya" else f"diffusion_model.{path}"
        state |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(1.0)}
    lora = lorakit.load(state, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(state)
    assert detect_family(lora) == DETECTED.get(name, family)

    # the peer: diffusers' converter turns (original + ΔW) into diffusers names; its difference is ΔW in diffusers naming
    zero = {k: torch.zeros_like(v) for k, v in orig.items()}
    peer_delta = _convert(name, model, {**zero, **deltas}, delta=True)
    strength = 0.75
    ours = copy.deepcopy(model)
    patch = lorakit.apply(ours, (lora, strength), strict=True)
    changed = 0
    for key, value in model.state_dict().items():
        want = value + strength * peer_delta[key] if key in peer_delta else value
        torch.testing.assert_close(ours.state_dict()[key], want, rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(ours.state_dict()[key], value)
    assert changed == sum(int(peer_delta[k].abs().sum() > 0) for k in peer_delta)
    assert changed >= len(PICK[name])  # a fused layer changes several tensors
    with torch.no_grad():
        out, base_out = (m(**_inputs(name, m)).sample for m in (ours, model))
    assert (out - base_out).abs().max() > 1e-4  # non-vacuous: the LoRA changes the output
    patch.remove()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ours.state_dict().items())
