"""HunyuanVideo, LTX-Video and LTX-2: lorakit's name maps checked against diffusers' own converters.

- the original-named checkpoint rebuilt from lorakit's alias map converts back to the model exactly through
  diffusers' single-file converters (a wrong name, row split or scale/shift order shows up as a tensor that does
  not come back);
- a LoRA in original naming (ComfyUI / diffusion-pipe dotted, kohya/musubi flattened) fused by lorakit gives the
  weights that diffusers' LoRA converter + ``load_lora_adapter`` + ``fuse_lora`` give; hook mode gives the same
  output; remove is bit-exact;
- where diffusers drops or breaks a layer, a pinned test says so.
"""

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

R = 2


def _hunyuan():
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_single_layers=2,
        num_refiner_layers=1, patch_size=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))


def _ltxv():
    return diffusers.LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                                cross_attention_dim=16, num_layers=2, caption_channels=16)


def _ltx2():
    return diffusers.LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=1, caption_channels=16, use_prompt_adaln_single=False)


MODELS = {"hunyuanvideo": _hunyuan, "ltx-video": _ltxv, "ltx2": _ltx2}


def _model(name):
    torch.manual_seed(0)
    return randomise(MODELS[name]().eval())


def _inputs(name):
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if name == "hunyuanvideo":
        return dict(hidden_states=r(1, 4, 2, 4, 4), timestep=torch.tensor([500]), encoder_hidden_states=r(1, 5, 16),
                    encoder_attention_mask=torch.ones(1, 5), pooled_projections=r(1, 8), guidance=torch.tensor([3.5]))
    return dict(hidden_states=r(1, 2 * 4 * 4, 4), encoder_hidden_states=r(1, 5, 16), timestep=torch.tensor([500]),
                encoder_attention_mask=torch.ones(1, 5), num_frames=2, height=4, width=4)


def _single_file(name, orig):
    if name == "hunyuanvideo":
        return sfu.convert_hunyuan_video_transformer_to_diffusers(dict(orig))
    if name == "ltx-video":
        return sfu.convert_ltx_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v for k, v in orig.items()})
    return sfu.convert_ltx2_transformer_to_diffusers({"model.diffusion_model." + k: v for k, v in orig.items()})


def _original(name, model):
    """The original-named checkpoint; HunyuanVideo's ``single_blocks.N.linear1`` left out: diffusers' converters
    split it at 3072 rows whatever the width (pinned below), so they cannot convert it on a small model."""
    from lorakit.families import FAMILIES

    family = next(f for f in FAMILIES if f.name == name)
    covered = {f"{t.module}.{p}" for a in family.aliases("denoiser", model) for t in a.targets for p in ("weight", "bias")}
    # tensors no alias covers have the same name in both namespaces (LTX: everything inside the blocks)
    orig = {k: v for k, v in model.state_dict().items() if k not in covered}
    orig.update(original_checkpoint(model, name))
    if name == "hunyuanvideo":  # keep one spelling per tensor: the original one
        orig = {k: v for k, v in orig.items()
                if k.split(".")[0] not in ("transformer_blocks", "single_transformer_blocks") and ".linear1." not in k}
    return orig


_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def _params_only(model):
    """Tensors that are parameters, not modules' weights (scale_shift_table, ...): same name in both namespaces."""
    mods = {n for n, _ in model.named_modules()}
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in mods or "." not in k}


@pytest.mark.parametrize("name", list(MODELS))
def test_name_map_matches_diffusers_single_file_converter(name):
    model = _model(name)
    orig = _original(name, model)
    sd = model.state_dict()
    converted = _single_file(name, orig)
    missing = sorted(set(sd) - set(converted))
    linear1 = sorted(f"single_transformer_blocks.{i}.{m}.{p}" for i in range(2) for m in _LINEAR1 for p in ("weight", "bias"))
    assert missing == (linear1 if name == "hunyuanvideo" else [])  # every other tensor has an original name
    wrong = [k for k in sd if k in converted and not torch.equal(converted[k], sd[k])]
    assert wrong == []


# layers per family: fused splits, the swapped final modulation, refiner, embeddings, renamed heads
PICK = {
    "hunyuanvideo": ("double_blocks.0.img_attn_qkv", "double_blocks.1.txt_attn_qkv", "double_blocks.0.img_mlp.fc1",
                     "double_blocks.1.txt_mod.linear", "double_blocks.0.img_attn_proj", "single_blocks.1.linear2",
                     "single_blocks.0.modulation.linear", "final_layer.adaLN_modulation.1", "time_in.mlp.0",
                     "txt_in.individual_token_refiner.blocks.0.self_attn_qkv", "txt_in.individual_token_refiner.blocks.0.mlp.fc2",
                     "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1", "vector_in.in_layer"),
    "ltx-video": ("transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn2.to_out.0", "transformer_blocks.0.ff.net.0.proj",
                  "patchify_proj", "adaln_single.linear", "adaln_single.emb.timestep_embedder.linear_1",
                  "caption_projection.linear_2", "proj_out"),
    "ltx2": ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.audio_attn2.to_k", "transformer_blocks.0.audio_to_video_attn.to_q",
             "transformer_blocks.0.video_to_audio_attn.to_v", "transformer_blocks.0.audio_ff.net.2", "patchify_proj",
             "audio_patchify_proj", "adaln_single.linear", "av_ca_a2v_gate_adaln_single.linear",
             "av_ca_audio_scale_shift_adaln_single.emb.timestep_embedder.linear_2", "audio_adaln_single.linear"),
}


def _lora(name, orig, naming, suffix=("lora_down.weight", "lora_up.weight")):
    """Random rank-2 factors for every picked layer, alpha 1: ({file key: tensor}, {orig weight key: ΔW})."""
    g = torch.Generator().manual_seed(3)
    state, deltas = {}, {}
    for path in PICK[name]:
        w = orig[f"{path}.weight"]
        down = torch.randn(R, w[0].numel(), generator=g) * 0.2
        up = torch.randn(w.shape[0], R, generator=g) * 0.2
        deltas[f"{path}.weight"] = (up @ down * (1 / R)).reshape(w.shape)
        if w.dim() > 2:
            down = down.reshape(R, *w.shape[1:])
            up = up.reshape(*up.shape, *([1] * (w.dim() - 2)))
        stem = ("lora_unet_" + path.replace(".", "_")) if naming == "kohya" else f"diffusion_model.{path}"
        state |= {f"{stem}.{suffix[0]}": down, f"{stem}.{suffix[1]}": up, f"{stem}.alpha": torch.tensor(1.0)}
    return state, deltas


@pytest.mark.parametrize("naming", ["kohya", "comfyui"])
@pytest.mark.parametrize("name", list(MODELS))
def test_original_named_lora_equals_single_file_conversion(name, naming):
    model = _model(name)
    orig = _original(name, model)
    state, deltas = _lora(name, orig, naming)
    lora = lorakit.load(state, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(state)
    # the peer: diffusers' single-file converter turns the original ΔW into diffusers names (and rows)
    zero = {k: torch.zeros_like(v) for k, v in orig.items()}
    peer = _single_file(name, {**zero, **deltas})
    ours = copy.deepcopy(model)
    patch = lorakit.apply(ours, (lora, 0.75), strict=True)
    changed = 0
    for key, value in model.state_dict().items():
        want = value + 0.75 * peer[key] if key in peer else value
        torch.testing.assert_close(ours.state_dict()[key], want, rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(ours.state_dict()[key], value)
    assert changed >= len(PICK[name])  # a fused layer changes several tensors
    patch.remove()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ours.state_dict().items())


def _peft(model, converted):
    """diffusers' path: the converted PEFT state dict through ``load_lora_adapter`` and ``fuse_lora``."""
    ref = copy.deepcopy(model)
    ref.load_lora_adapter(converted, prefix="transformer", adapter_name="x")
    ref.fuse_lora(lora_scale=1.0)
    ref.unload_lora()
    return ref


@pytest.mark.parametrize("name", ["hunyuanvideo", "ltx-video"])
def test_lora_equals_diffusers_converter_and_load_lora_weights(name):
    """PEFT-suffixed original names (diffusion-pipe, LTX-Video-Trainer ComfyUI export): lorakit fused = diffusers'
    LoRA converter + load_lora_adapter + fuse_lora, on the layers diffusers converts (see the pinned tests)."""
    model = _model(name)
    orig = _original(name, model)
    # pinned below: diffusers chunks lora_A of the refiner qkv and swaps the rows of lora_A of the final modulation
    keep = {"hunyuanvideo": lambda p: "self_attn_qkv" not in p and p != "final_layer.adaLN_modulation.1",
            "ltx-video": lambda p: p.startswith("transformer_blocks") or p.startswith("caption_projection")}[name]
    saved = PICK[name]
    try:
        PICK[name] = tuple(p for p in saved if keep(p))
        state, _ = _lora(name, orig, "comfyui", suffix=("lora_A.weight", "lora_B.weight"))
    finally:
        PICK[name] = saved
    state = {k: v for k, v in state.items() if not k.endswith(".alpha")}  # diffusion-pipe files carry no alpha
    if name == "hunyuanvideo":
        converted = lcu._convert_hunyuan_video_lora_to_diffusers(dict(state))
    else:
        converted = lcu._convert_non_diffusers_ltxv_lora_to_diffusers(dict(state))
    ref = _peft(model, converted)
    lora = lorakit.load(state, strict=True)
    # a video-only LTX file in diffusers' block names is LTX-2's too, and the tiny widths fit neither released model
    assert detect_family(lora) == (name if name == "hunyuanvideo" else None)
    fused, hooked = copy.deepcopy(model), copy.deepcopy(model)
    patch = lorakit.apply(fused, (lora, 1.0), strict=True)
    lorakit.apply(hooked, (lora, 1.0), mode="hook", strict=True)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=0, atol=1e-5, msg=key)
    with torch.no_grad():
        a, b, c, base = (m(**_inputs(name)).sample for m in (fused, hooked, ref, model))
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5)
    assert (a - base).abs().max() > 1e-3  # non-vacuous
    patch.remove()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fused.state_dict().items())


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_hunyuan_converter_hard_codes_hidden_size_3072():
    """diffusers splits ``single_blocks.N.linear1`` at 3072 rows whatever the model's width: on any other width
    (a tiny or a distilled model) its q/k/v/mlp pieces are wrong; lorakit reads the sizes from the model."""
    model = _model("hunyuanvideo")
    state = {"diffusion_model.single_blocks.0.linear1.lora_A.weight": torch.randn(R, 16),
             "diffusion_model.single_blocks.0.linear1.lora_B.weight": torch.randn(3 * 16 + 64, R)}
    with pytest.raises(RuntimeError, match="split_sizes"):  # 3072 x 3 rows asked, 112 there
        lcu._convert_hunyuan_video_lora_to_diffusers(dict(state))
    with pytest.raises(RuntimeError, match="split_sizes"):  # its single-file converter: the same
        sfu.convert_hunyuan_video_transformer_to_diffusers({"single_blocks.0.linear1.weight": torch.zeros(112, 16)})
    lora = lorakit.load(state, strict=True)
    res = lorakit.families.Resolver({"denoiser": model}).resolve(lora)
    rows = [t.src_rows for t in res.matched[0][1]]
    assert rows == [(0, 16), (16, 32), (32, 48), (48, 112)]


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_ltxv_lora_converter_keeps_original_head_names():
    """diffusers' LTX-Video LoRA converter only strips ``diffusion_model.``: ``patchify_proj`` and
    ``adaln_single`` keep their original names, match no module of LTXVideoTransformer3DModel and are dropped;
    lorakit places them on ``proj_in`` / ``time_embed``."""
    model = _model("ltx-video")
    state = {"diffusion_model.patchify_proj.lora_A.weight": torch.randn(R, 4),
             "diffusion_model.patchify_proj.lora_B.weight": torch.randn(16, R),
             "diffusion_model.adaln_single.linear.lora_A.weight": torch.randn(R, 16),
             "diffusion_model.adaln_single.linear.lora_B.weight": torch.randn(96, R)}
    converted = lcu._convert_non_diffusers_ltxv_lora_to_diffusers(dict(state))
    assert sorted(converted)[0].startswith("transformer.adaln_single.")
    names = {n for n, _ in model.named_modules()}
    assert not any(k[len("transformer."):].rsplit(".lora_", 1)[0] in names for k in converted)
    ours = copy.deepcopy(model)
    lorakit.apply(ours, (lorakit.load(state, strict=True), 1.0), strict=True)
    for key in ("proj_in.weight", "time_embed.linear.weight"):
        assert not torch.equal(ours.state_dict()[key], model.state_dict()[key])


def test_simpletuner_trailing_underscore_names_resolve():
    """SimpleTuner writes ``lora_unet_transformer_blocks_12_attn_add_k_proj_`` (ComfyUI issue 4347)."""
    model = _model("hunyuanvideo")
    state = {"lora_unet_transformer_blocks_1_attn_add_k_proj_.lora_down.weight": torch.randn(R, 16),
             "lora_unet_transformer_blocks_1_attn_add_k_proj_.lora_up.weight": torch.randn(16, R),
             "lora_unet_single_transformer_blocks_0_proj_mlp_.lora_down.weight": torch.randn(R, 16),
             "lora_unet_single_transformer_blocks_0_proj_mlp_.lora_up.weight": torch.randn(64, R)}
    ours = copy.deepcopy(model)
    patch = lorakit.apply(ours, (lorakit.load(state, strict=True), 1.0), strict=True)
    for key in ("transformer_blocks.1.attn.add_k_proj.weight", "single_transformer_blocks.0.proj_mlp.weight"):
        assert not torch.equal(ours.state_dict()[key], model.state_dict()[key])
    patch.remove()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ours.state_dict().items())


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_hunyuan_converter_chunks_the_refiner_qkv_down_matrix():
    """For the token refiner's fused ``self_attn_qkv`` diffusers' LoRA converter chunks ``lora_A`` (the shared
    down matrix) into three as it does ``lora_B``: a rank-3 LoRA gets rank-1 down and rank-3 up matrices that
    cannot load (other ranks raise in the converter). lorakit copies the down matrix and splits the up rows."""
    model = _model("hunyuanvideo")
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(3, 16, generator=g), torch.randn(48, 3, generator=g)
    stem = "diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn_qkv"
    state = {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up}
    converted = lcu._convert_hunyuan_video_lora_to_diffusers(dict(state))
    q = "transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_q"
    assert converted[f"{q}.lora_A.weight"].shape == (1, 16)  # rank 3 -> 1
    assert converted[f"{q}.lora_B.weight"].shape == (16, 3)  # the up rows split right: the ranks disagree
    true_q = up[:16] @ down
    ours = copy.deepcopy(model)
    lorakit.apply(ours, (lorakit.load(state, strict=True), 1.0), strict=True)
    key = "context_embedder.token_refiner.refiner_blocks.0.attn.to_q.weight"
    torch.testing.assert_close(ours.state_dict()[key] - model.state_dict()[key], true_q, rtol=0, atol=1e-6)


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_hunyuan_converter_swaps_the_down_matrix_of_the_final_modulation():
    """``final_layer.adaLN_modulation.1`` stores (shift, scale), diffusers' ``norm_out.linear`` (scale, shift):
    the rows of the delta swap, i.e. the rows of ``lora_B``. diffusers' LoRA converter swaps the two halves of
    ``lora_A`` too (it treats every tensor as a weight), which gives a different delta; lorakit swaps the delta's
    rows only (its single-file converter check above confirms the row order)."""
    model = _model("hunyuanvideo")
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 16, generator=g), torch.randn(32, 2, generator=g)
    stem = "diffusion_model.final_layer.adaLN_modulation.1"
    state = {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up}
    converted = lcu._convert_hunyuan_video_lora_to_diffusers(dict(state))
    a, b = converted["transformer.norm_out.linear.lora_A.weight"], converted["transformer.norm_out.linear.lora_B.weight"]
    true = torch.cat([up[16:], up[:16]]) @ down
    assert torch.equal(a, torch.cat([down[1:], down[:1]]))  # the down matrix's rows swapped
    assert (b @ a - true).abs().max() > 1e-2
    ours = copy.deepcopy(model)
    lorakit.apply(ours, (lorakit.load(state, strict=True), 1.0), strict=True)
    torch.testing.assert_close(ours.state_dict()["norm_out.linear.weight"] - model.state_dict()["norm_out.linear.weight"],
                               true, rtol=0, atol=1e-6)
