"""Peer equivalence with diffusers/PEFT: the same LoRA file, the same tiny model, fused by diffusers
(``load_lora_adapter`` + ``fuse_lora``) and by ``lorakit.apply`` gives the same weights and outputs."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from _peers import pinned_peer

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from diffusers import UNet2DConditionModel  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402

TINY = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1"]


def _unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY).eval()


def _peft_file(tmp_path, *, use_dora=False, alpha=8, rank=4, alpha_pattern=None):
    """A diffusers-written PEFT LoRA file with random non-zero factors, and its config."""
    unet = _unet()
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False,
                     use_dora=use_dora, alpha_pattern=alpha_pattern or {})
    unet.add_adapter(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
            if "lora_magnitude_vector" in name:
                p.copy_(p.abs() + 0.3)
    state = get_peft_model_state_dict(unet)
    path = tmp_path / "peft_lora.safetensors"
    from diffusers import StableDiffusionPipeline

    meta = {k: v for k, v in cfg.to_dict().items() if k in ("r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_dora", "target_modules")}
    meta["target_modules"] = list(meta["target_modules"])
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state, unet_lora_adapter_metadata=meta,
                                              weight_name=path.name)
    return path


def _diffusers_load(model, path):
    """diffusers' metadata-honouring path. (``model.load_lora_adapter(path)`` on a file path drops the
    ``lora_adapter_metadata`` header and loads alpha = r: see test_diffusers_path_load_ignores_alpha.)"""
    from diffusers import StableDiffusionPipeline

    state, _, meta = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    model.load_lora_adapter(state, prefix="unet", adapter_name="a", metadata=meta)


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 5, 16, generator=g)


# DoRA is compared at s = 1 only: for s != 1 lorakit applies W + s(W' - W) (linear in s, s = 0 exact)
# while PEFT scales the delta inside the norm; the two definitions agree at s = 1.
@pytest.mark.parametrize("use_dora, strength", [(False, 1.0), (False, 0.6), (True, 1.0)])
def test_peft_file_fused_matches_diffusers(tmp_path, use_dora, strength):
    path = _peft_file(tmp_path, use_dora=use_dora, alpha_pattern={"down_blocks.0.attentions.0.proj_in": 2})
    base = _unet()
    ours = copy.deepcopy(base)
    theirs = copy.deepcopy(base)
    sample, t, ctx = _inputs()
    with torch.no_grad():
        ref_out = base(sample, t, ctx).sample

    _diffusers_load(theirs, path)
    theirs.fuse_lora(lora_scale=strength)
    theirs_w = {k: v for k, v in theirs.state_dict().items() if "lora_" not in k}

    lora = lorakit.load(path)
    assert lora.report.ok, lora.report.problems()
    patch = lorakit.apply(ours, [(lora, strength)], strict=True)
    ours_w = ours.state_dict()

    changed = 0
    for key, value in ours_w.items():
        peer_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        peer = theirs_w.get(key, theirs_w.get(peer_key))
        assert peer is not None, key
        torch.testing.assert_close(value, peer, rtol=1e-5, atol=2e-6, msg=key)
        changed += not torch.equal(value, base.state_dict()[key])
    assert changed >= 20  # non-vacuity: the LoRA touched many weights
    with torch.no_grad():
        out = ours(sample, t, ctx).sample
    assert not torch.allclose(out, ref_out, atol=1e-4)
    patch.remove()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, base.state_dict()[key]), key


def test_peft_file_hook_matches_diffusers_unfused_forward(tmp_path):
    path = _peft_file(tmp_path)
    base = _unet()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    _diffusers_load(theirs, path)
    sample, t, ctx = _inputs()
    hooks = lorakit.apply(ours, [(path, 1.0)], mode="hook", strict=True)
    with torch.no_grad():
        ours_out = ours(sample, t, ctx).sample
        theirs_out = theirs(sample, t, ctx).sample
        base_out = base(sample, t, ctx).sample
    torch.testing.assert_close(ours_out, theirs_out, rtol=1e-4, atol=1e-5)
    assert (ours_out - base_out).abs().max() > 1e-3
    hooks.remove()
    with torch.no_grad():
        assert torch.equal(ours(sample, t, ctx).sample, base_out)


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_unfuse_drifts_in_bf16(tmp_path):
    """The bug lorakit exists to avoid (diffusers 0.42.1): unfuse subtracts a recomputed delta (FORMATS.md §9.3),
    so a bf16 model is not restored. lorakit's side: the next test."""
    path = _peft_file(tmp_path)
    base = _unet().to(torch.bfloat16)
    theirs = copy.deepcopy(base)
    _diffusers_load(theirs, path)
    theirs.fuse_lora()
    theirs.unfuse_lora()
    theirs.unload_lora()
    assert sum(not torch.equal(v, base.state_dict()[k]) for k, v in theirs.state_dict().items()) > 0


def test_lorakit_restores_bf16_exactly(tmp_path):
    """Five apply/remove cycles of the same file on a bf16 model leave every weight bit-exact."""
    path = _peft_file(tmp_path)
    base = _unet().to(torch.bfloat16)
    ours = copy.deepcopy(base)
    for _ in range(5):
        patch = lorakit.apply(ours, [(path, 1.0)])
        assert any(not torch.equal(v, base.state_dict()[k]) for k, v in ours.state_dict().items())  # it applied
        patch.remove()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in ours.state_dict().items())


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_path_load_ignores_alpha(tmp_path):
    """Peer quirk (diffusers 0.42.1): ``load_lora_adapter(<file path>)`` loads scale 1 although the file's
    ``lora_adapter_metadata`` says lora_alpha=8, r=4 (scale 2). lorakit reads the header."""
    path = _peft_file(tmp_path)
    theirs = _unet()
    theirs.load_lora_adapter(str(path), prefix="unet", adapter_name="a")
    lora = lorakit.load(path)
    assert {layer.weight.scale for layer in lora} == {2.0}
    assert theirs.peft_config["a"].lora_alpha == theirs.peft_config["a"].r  # the quirk, documented


def _kohya_export():
    """A PEFT DoRA on a tiny UNet and diffusers' kohya export of it."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    unet = _unet()
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights=False, use_dora=True)
    unet.add_adapter(cfg)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_magnitude_vector" in name:
                p.copy_(p.abs() + 0.3)
    peft_state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    return unet, convert_state_dict_to_kohya(peft_state)


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_kohya_export_misnames_dora_magnitudes():
    """Peer quirk (diffusers 0.42.1): the kohya export writes DoRA magnitudes as
    ``..._attn1.to_q.lora_magnitude_vector`` (not renamed, path half flattened: FORMATS.md §9.1)."""
    _, kohya_state = _kohya_export()
    assert any(".to_q.lora_magnitude_vector" in k for k in kohya_state)


def test_diffusers_convert_state_dict_to_kohya_output_is_fully_placed(tmp_path):
    """Whatever diffusers' kohya export names its DoRA magnitudes (0.42.1: the quirk above), lorakit places every
    key and keeps the DoRA delta."""
    unet, kohya_state = _kohya_export()
    lora = lorakit.load(kohya_state, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(kohya_state)
    assert lora.adapter_types()["dora"] == lora.adapter_types()["lora"] == len(lora) > 0
    ours = copy.deepcopy(_unet())
    peer = copy.deepcopy(unet)
    peer.fuse_lora()
    lorakit.apply(ours, [(lora, 1.0)], strict=True)
    for key, value in ours.state_dict().items():
        if "attn1.to_q.weight" in key or "attn2.to_k.weight" in key:
            theirs = peer.state_dict()[key.replace(".weight", ".base_layer.weight")]
            torch.testing.assert_close(value, theirs, rtol=1e-5, atol=2e-6)
            assert not torch.equal(value, _unet().state_dict()[key])
