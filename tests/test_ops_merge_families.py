"""merge routes names through the model family: a BFL-named (fused qkv/linear1) LoRA into a diffusers folder,
and a diffusers-named LoRA into a BFL single-file checkpoint (slices of the fused tensors, scale/shift order)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.ops import merge

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402

TINY = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
H, MLP = 32, 128


def test_bfl_lora_into_a_diffusers_folder(tmp_path):
    torch.manual_seed(0)
    base = FluxTransformer2DModel(**TINY).eval()
    base.save_pretrained(tmp_path / "model" / "transformer")
    g = torch.Generator().manual_seed(1)
    state = {}
    for stem, rows in (("lora_unet_double_blocks_0_img_attn_qkv", 3 * H), ("lora_unet_single_blocks_0_linear1", 3 * H + MLP),
                       ("lora_unet_final_layer_adaLN_modulation_1", 2 * H), ("lora_unet_double_blocks_0_txt_mlp_2", H)):
        cols = MLP if stem.endswith("mlp_2") else H
        state[f"{stem}.lora_down.weight"] = torch.randn(2, cols, generator=g) * 0.3
        state[f"{stem}.lora_up.weight"] = torch.randn(rows, 2, generator=g) * 0.3
        state[f"{stem}.alpha"] = torch.tensor(1.0)
    save_file(state, tmp_path / "bfl.safetensors")
    result = merge(tmp_path / "model", [(tmp_path / "bfl.safetensors", 0.8)], tmp_path / "merged")
    lora_report = result.summary["loras"][0]
    assert lora_report["matched"] == 4 and lora_report["routed"] == 4 and lora_report["family"] == "flux1"
    assert result.summary["patched_tensors"] == 3 + 4 + 1 + 1

    merged = FluxTransformer2DModel.from_pretrained(tmp_path / "merged" / "transformer").eval()
    ref = copy.deepcopy(base)
    lorakit.apply(ref, (tmp_path / "bfl.safetensors", 0.8), strict=True)
    changed = 0
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(value, base.state_dict()[key])
    assert changed == 3 + 4 + 1 + 1  # non-vacuous, and every split part got its rows


def test_diffusers_lora_into_a_bfl_single_file(tmp_path):
    # FLUX-dev sizes (3072 wide): the split points come from the family's meta-device model
    d = 3072
    g = torch.Generator().manual_seed(2)
    ckpt = {
        "double_blocks.0.img_attn.qkv.weight": torch.randn(3 * d, d, generator=g).half(),
        "double_blocks.0.img_attn.qkv.bias": torch.randn(3 * d, generator=g).half(),
        "double_blocks.0.img_attn.proj.weight": torch.randn(d, d, generator=g).half(),
        "final_layer.adaLN_modulation.1.weight": torch.randn(2 * d, d, generator=g).half(),
    }
    save_file(ckpt, tmp_path / "flux1-dev.safetensors")
    lora = {}
    for name, rows in (("attn.to_k", d), ("attn.to_v", d)):
        lora[f"transformer.transformer_blocks.0.{name}.lora_A.weight"] = torch.randn(1, d, generator=g)
        lora[f"transformer.transformer_blocks.0.{name}.lora_B.weight"] = torch.randn(rows, 1, generator=g) * 0.01
    lora["transformer.norm_out.linear.lora_A.weight"] = torch.randn(1, d, generator=g)
    lora["transformer.norm_out.linear.lora_B.weight"] = torch.randn(2 * d, 1, generator=g) * 0.01
    save_file(lora, tmp_path / "diffusers.safetensors")
    result = merge(tmp_path / "flux1-dev.safetensors", [(tmp_path / "diffusers.safetensors", 1.0)], tmp_path / "out.safetensors")
    assert result.summary["loras"][0]["routed"] == 3 and result.summary["patched_tensors"] == 2
    out = load_file(tmp_path / "out.safetensors")

    def delta(name):
        return (lora[f"transformer.{name}.lora_B.weight"] @ lora[f"transformer.{name}.lora_A.weight"])

    qkv = ckpt["double_blocks.0.img_attn.qkv.weight"].float()
    expected = qkv.clone()
    expected[d:2 * d] += delta("transformer_blocks.0.attn.to_k")
    expected[2 * d:] += delta("transformer_blocks.0.attn.to_v")
    torch.testing.assert_close(out["double_blocks.0.img_attn.qkv.weight"], expected.half(), rtol=0, atol=0)
    assert torch.equal(out["double_blocks.0.img_attn.qkv.weight"][:d], ckpt["double_blocks.0.img_attn.qkv.weight"][:d])
    assert not torch.equal(out["double_blocks.0.img_attn.qkv.weight"][d:], ckpt["double_blocks.0.img_attn.qkv.weight"][d:])
    # diffusers' norm_out.linear is (scale, shift); BFL's final adaLN is (shift, scale)
    dn = delta("norm_out.linear")
    ada = ckpt["final_layer.adaLN_modulation.1.weight"].float()
    torch.testing.assert_close(out["final_layer.adaLN_modulation.1.weight"],
                               (ada + torch.cat([dn[d:], dn[:d]])).half(), rtol=0, atol=0)
    for key in ("double_blocks.0.img_attn.qkv.bias", "double_blocks.0.img_attn.proj.weight"):
        assert torch.equal(out[key], ckpt[key])  # untouched tensors are copied bit for bit


def test_diffusers_lora_into_an_sgm_single_file(tmp_path):
    # an SDXL single file (model.diffusion_model. + SGM names, released sizes) and a diffusers-named LoRA
    g = torch.Generator().manual_seed(3)
    ckpt = {
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": torch.randn(640, 640, generator=g).half(),
        "model.diffusion_model.label_emb.0.0.weight": torch.randn(1280, 2816, generator=g).half(),
        "model.diffusion_model.output_blocks.5.0.skip_connection.weight": torch.randn(640, 1920, 1, 1, generator=g).half(),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(768).half(),
    }
    save_file(ckpt, tmp_path / "sdxl.safetensors")
    lora = {}
    for name, cols, rows in (("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 640, 640),
                             ("add_embedding.linear_1", 2816, 1280)):
        lora[f"unet.{name}.lora_A.weight"] = torch.randn(2, cols, generator=g)
        lora[f"unet.{name}.lora_B.weight"] = torch.randn(rows, 2, generator=g) * 0.01
    lora["unet.up_blocks.1.resnets.2.conv_shortcut.lora_A.weight"] = torch.randn(2, 1920, 1, 1, generator=g)
    lora["unet.up_blocks.1.resnets.2.conv_shortcut.lora_B.weight"] = torch.randn(640, 2, 1, 1, generator=g) * 0.01
    save_file(lora, tmp_path / "lora.safetensors")
    result = merge(tmp_path / "sdxl.safetensors", [(tmp_path / "lora.safetensors", 1.0)], tmp_path / "out.safetensors")
    assert result.summary["loras"][0]["routed"] == 3 and result.summary["loras"][0]["family"] == "sdxl"
    out = load_file(tmp_path / "out.safetensors")
    for sgm, diff in (("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
                      ("label_emb.0.0", "add_embedding.linear_1"), ("output_blocks.5.0.skip_connection", "up_blocks.1.resnets.2.conv_shortcut")):
        key = f"model.diffusion_model.{sgm}.weight"
        a, b = lora[f"unet.{diff}.lora_A.weight"].flatten(1), lora[f"unet.{diff}.lora_B.weight"].flatten(1)
        want = (ckpt[key].float() + (b @ a).reshape(ckpt[key].shape)).half()
        torch.testing.assert_close(out[key], want, rtol=0, atol=0)
        assert not torch.equal(out[key], ckpt[key])
