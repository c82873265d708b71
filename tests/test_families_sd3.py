"""SD3 / SD3.5 (MMDiT) family: the original checkpoint names (kohya ``lora_sd3.py`` ``lora_unet_joint_blocks_*``,
ComfyUI ``diffusion_model.joint_blocks.*``) land on diffusers' SD3Transformer2DModel exactly as the same LoRA in
diffusers naming does, on an SD3-style model and on an SD3.5-Medium-style one (dual attention, qk norms); diffusers'
own single-file converter agrees; diffusers' LoRA loader places none of these keys (issue #9950)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import lorakit
from _peers import pinned_peer
from lorakit.errors import MatchError
from lorakit.families import detect_family

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402

from _family_util import original_checkpoint, randomise  # noqa: E402

TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
            pos_embed_max_size=8)
CONFIGS = {
    "sd3": TINY,  # SD3 Medium layout: no dual attention, no qk norms
    "sd35": dict(TINY, num_layers=3, dual_attention_layers=(0,), qk_norm="rms_norm"),  # SD3.5 Medium layout
}
R, ALPHA = 4, 2.0  # kohya scale alpha / rank = 0.5


def _tiny(cfg):
    torch.manual_seed(0)
    return randomise(SD3Transformer2DModel(**CONFIGS[cfg]).eval())


def _inputs():
    g = torch.Generator().manual_seed(5)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([10]))


def _plan(cfg):
    """``(original path, diffusers module(s), kind)`` written by hand: ``split`` = fused rows in file order,
    ``swap`` = original (shift, scale) -> diffusers (scale, shift), ``norm`` = a full diff on a qk norm weight."""
    last = CONFIGS[cfg]["num_layers"] - 1
    b0, bl = "transformer_blocks.0", f"transformer_blocks.{last}"
    plan = [
        ("joint_blocks.0.x_block.attn.qkv", [f"{b0}.attn.to_q", f"{b0}.attn.to_k", f"{b0}.attn.to_v"], "split"),
        (f"joint_blocks.{last}.context_block.attn.qkv",  # the context-pre-only block still has a qkv
         [f"{bl}.attn.add_q_proj", f"{bl}.attn.add_k_proj", f"{bl}.attn.add_v_proj"], "split"),
        ("joint_blocks.0.x_block.attn.proj", [f"{b0}.attn.to_out.0"], "plain"),
        ("joint_blocks.0.context_block.attn.proj", [f"{b0}.attn.to_add_out"], "plain"),
        (f"joint_blocks.{last}.x_block.mlp.fc1", [f"{bl}.ff.net.0.proj"], "plain"),
        ("joint_blocks.0.x_block.mlp.fc2", [f"{b0}.ff.net.2"], "plain"),
        ("joint_blocks.0.context_block.mlp.fc1", [f"{b0}.ff_context.net.0.proj"], "plain"),
        ("joint_blocks.0.context_block.mlp.fc2", [f"{b0}.ff_context.net.2"], "plain"),
        ("joint_blocks.0.x_block.adaLN_modulation.1", [f"{b0}.norm1.linear"], "plain"),  # 9 chunks in a dual block
        ("joint_blocks.0.context_block.adaLN_modulation.1", [f"{b0}.norm1_context.linear"], "plain"),
        (f"joint_blocks.{last}.context_block.adaLN_modulation.1", [f"{bl}.norm1_context.linear"], "swap"),
        ("final_layer.adaLN_modulation.1", ["norm_out.linear"], "swap"),
        ("final_layer.linear", ["proj_out"], "plain"),
        ("x_embedder.proj", ["pos_embed.proj"], "plain"),  # Conv2d 2x2, stride 2
        ("context_embedder", ["context_embedder"], "plain"),
        ("t_embedder.mlp.0", ["time_text_embed.timestep_embedder.linear_1"], "plain"),
        ("t_embedder.mlp.2", ["time_text_embed.timestep_embedder.linear_2"], "plain"),
        ("y_embedder.mlp.0", ["time_text_embed.text_embedder.linear_1"], "plain"),
        ("y_embedder.mlp.2", ["time_text_embed.text_embedder.linear_2"], "plain"),
    ]
    if cfg == "sd35":
        plan += [
            ("joint_blocks.0.x_block.attn2.qkv", [f"{b0}.attn2.to_q", f"{b0}.attn2.to_k", f"{b0}.attn2.to_v"], "split"),
            ("joint_blocks.0.x_block.attn2.proj", [f"{b0}.attn2.to_out.0"], "plain"),
            ("joint_blocks.1.x_block.attn.ln_q", ["transformer_blocks.1.attn.norm_q"], "norm"),
            ("joint_blocks.1.x_block.attn.ln_k", ["transformer_blocks.1.attn.norm_k"], "norm"),
            (f"joint_blocks.{last}.context_block.attn.ln_q", [f"{bl}.attn.norm_added_q"], "norm"),
            (f"joint_blocks.{last}.context_block.attn.ln_k", [f"{bl}.attn.norm_added_k"], "norm"),
            ("joint_blocks.0.x_block.attn2.ln_q", [f"{b0}.attn2.norm_q"], "norm"),
            ("joint_blocks.0.x_block.attn2.ln_k", [f"{b0}.attn2.norm_k"], "norm"),
        ]
    return plan


def _factors(model, plan, seed=1):
    """Random factors per original layer, shaped by the original (fused) layer: ``(down, up)`` or ``(diff,)``."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for path, targets, kind in plan:
        w = mods[targets[0]].weight
        if kind == "norm":
            out[path] = (torch.randn(w.shape, generator=g) * 0.3,)
            continue
        rows = sum(mods[t].weight.shape[0] for t in targets)
        down = torch.randn(R, *w.shape[1:], generator=g) * 0.3
        up = torch.randn(rows, R, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.3
        out[path] = (down, up)
    return out


def _original_file(plan, factors, naming):
    state = {}
    for path, _, _ in plan:
        stem = "lora_unet_" + path.replace(".", "_") if naming == "kohya" else f"diffusion_model.{path}"
        f = factors[path]
        if len(f) == 1:
            state[f"{stem}.diff"] = f[0]
        else:
            state |= {f"{stem}.lora_down.weight": f[0], f"{stem}.lora_up.weight": f[1], f"{stem}.alpha": torch.tensor(ALPHA)}
    return state


def _diffusers_equivalent(model, plan, factors, with_norms=True):
    """The same LoRA written by hand in diffusers naming (alpha baked into B): the reference."""
    mods = dict(model.named_modules())
    out = {}
    for path, targets, kind in plan:
        f = factors[path]
        if kind == "norm":
            if with_norms:
                out[f"transformer.{targets[0]}.diff"] = f[0]
            continue
        down, up = f
        if kind == "swap":  # original (shift, scale) rows -> diffusers (scale, shift)
            half = up.shape[0] // 2
            up = torch.cat([up[half:], up[:half]])
        start = 0
        for t in targets:
            n = mods[t].weight.shape[0]
            out[f"transformer.{t}.lora_A.weight"] = down
            out[f"transformer.{t}.lora_B.weight"] = up[start:start + n] * (ALPHA / R)
            start += n
        assert start == up.shape[0]
    return out


def _changed(model, base):
    ref = base.state_dict()
    return sorted(k for k, v in model.state_dict().items() if not torch.equal(v, ref[k]))


@pytest.mark.parametrize("naming", ["kohya", "comfyui"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_original_names_equal_diffusers_names(cfg, naming):
    base = _tiny(cfg)
    plan = _plan(cfg)
    factors = _factors(base, plan)
    state = _original_file(plan, factors, naming)
    lora = lorakit.load(state, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(state)  # every key accounted for
    assert detect_family(lora) == "sd3"
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    patch = lorakit.apply(ours, [(lora, 0.8)], strict=True)
    lorakit.apply(ref, [(_diffusers_equivalent(base, plan, factors), 0.8)], strict=True)
    assert patch.report.counts()["0:lora"] == {"matched": len(plan), "unmatched": 0, "shape_mismatches": 0}
    assert patch.report.families == ["sd3"] and patch.report.notes == []
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, ref.state_dict()[key], rtol=0, atol=1e-6, msg=key)
    # every target module got its rows / its swap, and nothing else changed (all LoRA layers have no bias)
    assert _changed(ours, base) == sorted(f"{t}.weight" for _, targets, _ in plan for t in targets)
    with torch.no_grad():
        out, ref_out, base_out = (m(**_inputs()).sample for m in (ours, ref, base))
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert (out - base_out).abs().max() > 1e-2
    patch.remove()
    assert _changed(ours, base) == []


def test_swap_is_needed_exactly_where_diffusers_uses_ada_layer_norm_continuous():
    """Only the context-pre-only last block and the final layer swap (shift, scale): the other blocks' context
    modulation (AdaLayerNormZero, 6 chunks) keeps the original row order."""
    from lorakit.families import FAMILIES

    base = _tiny("sd35")
    sd3 = next(f for f in FAMILIES if f.name == "sd3")
    swapped = sorted(alias for alias, targets, *_ in sd3.aliases("denoiser", base)
                     if any(t.transform for t in ([targets] if not isinstance(targets, list) else targets)))
    assert swapped == ["final_layer.adaLN_modulation.1", "joint_blocks.2.context_block.adaLN_modulation.1"]
    mods = dict(base.named_modules())
    assert type(mods["transformer_blocks.2.norm1_context"]).__name__ == "AdaLayerNormContinuous"
    assert mods["transformer_blocks.2.norm1_context.linear"].out_features == 2 * 16
    assert type(mods["transformer_blocks.1.norm1_context"]).__name__ == "AdaLayerNormZero"
    # a symmetric-looking mistake would go unseen: the unswapped LoRA must change the model differently
    plan = [p for p in _plan("sd35") if p[2] == "swap"]
    factors = _factors(base, plan)
    swapped_ref = _diffusers_equivalent(base, plan, factors)
    unswapped_ref = _diffusers_equivalent(base, [(p, t, "plain") for p, t, _ in plan], factors)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    lorakit.apply(a, lorakit.load(swapped_ref), strict=True)
    lorakit.apply(b, lorakit.load(unswapped_ref), strict=True)
    ours = copy.deepcopy(base)
    lorakit.apply(ours, lorakit.load(_original_file(plan, factors, "kohya")), strict=True)
    for key in ("transformer_blocks.2.norm1_context.linear.weight", "norm_out.linear.weight"):
        assert torch.equal(ours.state_dict()[key], a.state_dict()[key])
        assert not torch.allclose(ours.state_dict()[key], b.state_dict()[key])


def _convert(model, orig):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers({**orig, "pos_embed": model.state_dict()["pos_embed.pos_embed"]})


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_name_map_agrees_with_diffusers_single_file_converter(cfg):
    """diffusers' own converter of original SD3 checkpoints is the peer for the name map: the checkpoint rebuilt
    from lorakit's aliases converts back to the model exactly, and an original-named LoRA applied by lorakit
    gives what the converter gives for (original weights + the same deltas in original layout)."""
    model = _tiny(cfg)
    orig = original_checkpoint(model, "sd3")
    converted = _convert(model, orig)
    sd = model.state_dict()
    assert set(converted) == set(sd)
    assert [k for k in sd if not torch.equal(converted[k], sd[k])] == []

    plan = _plan(cfg)
    factors = _factors(model, plan, seed=2)
    deltas = {}
    for path, _, kind in plan:
        f = factors[path]
        w = orig[f"{path}.weight"]
        deltas[f"{path}.weight"] = f[0] if kind == "norm" else (f[1].flatten(1) @ f[0].flatten(1) * (ALPHA / R)).reshape(w.shape)
    peer = _convert(model, {k: v + deltas.get(k, 0) for k, v in orig.items()})
    strength = 0.75
    ours = copy.deepcopy(model)
    patch = lorakit.apply(ours, (lorakit.load(_original_file(plan, factors, "comfyui")), strength), strict=True)
    for key, value in sd.items():
        want = value + strength * (peer[key] - value)
        torch.testing.assert_close(ours.state_dict()[key], want, rtol=0, atol=1e-6, msg=key)
    assert _changed(ours, model) == sorted(k for k in sd if not torch.equal(peer[k], sd[k]))
    patch.remove()
    assert _changed(ours, model) == []


def test_diffusers_peft_loader_agrees_with_the_reference():
    """The hand-written diffusers-named reference means to diffusers (load_lora_adapter + fuse_lora, PEFT) what it
    means to lorakit, and the kohya file applied by lorakit gives the same weights."""
    pytest.importorskip("peft")
    base = _tiny("sd35")
    plan = [p for p in _plan("sd35") if p[2] != "norm"]  # diffusers loads LoRA factors only
    factors = _factors(base, plan, seed=3)
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    theirs.load_lora_adapter(_diffusers_equivalent(base, plan, factors), prefix="transformer", adapter_name="ref")
    theirs.fuse_lora(lora_scale=1.0)
    fused = {k.replace(".base_layer", ""): v for k, v in theirs.state_dict().items() if "lora_" not in k}
    lorakit.apply(ours, lorakit.load(_original_file(plan, factors, "kohya")), strict=True)
    assert set(fused) == set(ours.state_dict())
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, fused[key], rtol=0, atol=1e-6, msg=key)
    assert len(_changed(ours, base)) == sum(len(t) for _, t, _ in plan)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_loads_kohya_sd3_names_as_zero_keys_lorakit_places_all():
    """Peer fact (diffusers 0.42.1, issue #9950): SD3's ``lora_state_dict`` has no converter for
    ``lora_unet_joint_blocks_*`` and ``load_lora_into_transformer`` (what ``load_lora_weights`` calls) finds no
    key under ``transformer.``: a logged warning, and the model is unchanged."""
    from diffusers import StableDiffusion3Pipeline

    base = _tiny("sd35")
    plan = [p for p in _plan("sd35") if p[2] != "norm"]
    state = _original_file(plan, _factors(base, plan), "kohya")
    converted = StableDiffusion3Pipeline.lora_state_dict(dict(state))
    converted = converted[0] if isinstance(converted, tuple) else converted
    assert set(converted) == set(state)  # passed through untouched
    theirs = copy.deepcopy(base)
    capture = _Capture()
    logger = logging.getLogger("diffusers")
    logger.addHandler(capture)
    try:
        StableDiffusion3Pipeline.load_lora_into_transformer(dict(converted), transformer=theirs)
    finally:
        logger.removeHandler(capture)
    assert any("No LoRA keys associated to SD3Transformer2DModel" in m for m in capture.messages)
    assert getattr(theirs, "peft_config", None) is None
    assert _changed(theirs, base) == []
    patch = lorakit.apply(copy.deepcopy(base), lorakit.load(state), strict=True)
    assert patch.report.counts()["0:lora"] == {"matched": len(plan), "unmatched": 0, "shape_mismatches": 0}


def test_kohya_split_qkv_layout_and_loha():
    """kohya ``split_qkv=True`` saves qkv as one rank-3r LoRA (down stacked, up block-diagonal): it equals three
    rank-r LoRAs on to_q/to_k/to_v. A LoHa on a fused qkv and on a swapped modulation is cut from its full delta."""
    base = _tiny("sd3")
    g = torch.Generator().manual_seed(9)
    downs = [torch.randn(R, 16, generator=g) * 0.3 for _ in range(3)]
    ups = [torch.randn(16, R, generator=g) * 0.3 for _ in range(3)]
    up = torch.zeros(48, 3 * R)
    for j in range(3):
        up[16 * j:16 * (j + 1), R * j:R * (j + 1)] = ups[j]
    stem = "lora_unet_joint_blocks_1_x_block_attn_qkv"
    # the saved file is a plain kohya LoRA of rank 3r: read with scale alpha / (3r), like every loader reads it
    state = {f"{stem}.lora_down.weight": torch.cat(downs), f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(6.0)}
    ref = {}
    for j, n in enumerate(("to_q", "to_k", "to_v")):
        ref[f"transformer.transformer_blocks.1.attn.{n}.lora_A.weight"] = downs[j]
        ref[f"transformer.transformer_blocks.1.attn.{n}.lora_B.weight"] = ups[j] * (6.0 / (3 * R))

    # LoHa (LyCORIS) on the same model, on a fused qkv and on the swapped final modulation
    hada = {}
    for path, rows in (("joint_blocks_0_context_block_attn_qkv", 48), ("final_layer_adaLN_modulation_1", 32)):
        w = {n: torch.randn(*s, generator=g) * 0.5 for n, s in
             (("w1_a", (rows, 2)), ("w1_b", (2, 16)), ("w2_a", (rows, 2)), ("w2_b", (2, 16)))}
        hada |= {f"lora_unet_{path}.hada_{n}": v for n, v in w.items()} | {f"lora_unet_{path}.alpha": torch.tensor(1.0)}
        delta = (w["w1_a"] @ w["w1_b"]) * (w["w2_a"] @ w["w2_b"]) * 0.5  # alpha / rank
        if path.startswith("final"):
            ref["transformer.norm_out.linear.diff"] = torch.cat([delta[16:], delta[:16]])
        else:
            for j, n in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
                ref[f"transformer.transformer_blocks.0.attn.{n}.diff"] = delta[16 * j:16 * (j + 1)]
    for file in (state, hada):
        lora = lorakit.load(file, strict=True)
        assert lora.report.ok and set(lora.report.consumed) == set(file)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    lorakit.apply(ours, [(lorakit.load(state), 1.0), (lorakit.load(hada), 1.0)], strict=True)
    lorakit.apply(theirs, lorakit.load(ref), strict=True)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs.state_dict()[key], rtol=0, atol=1e-6, msg=key)
    assert len(_changed(ours, base)) == 3 + 3 + 1


def test_hook_mode_matches_fuse():
    base = _tiny("sd35")
    plan = _plan("sd35")
    factors = _factors(base, plan, seed=4)
    lora = lorakit.load(_original_file([p for p in plan if p[2] != "norm"], factors, "kohya"), strict=True)
    fused, hooked = copy.deepcopy(base), copy.deepcopy(base)
    lorakit.apply(fused, [(lora, 0.6)], strict=True)
    patch = lorakit.apply(hooked, [(lora, 0.6)], mode="hook", strict=True)
    assert _changed(hooked, base) == []  # hooks leave the weights alone
    with torch.no_grad():
        a, b, base_out = (m(**_inputs()).sample for m in (fused, hooked, base))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert (a - base_out).abs().max() > 1e-2
    patch.remove()
    with torch.no_grad():
        torch.testing.assert_close(hooked(**_inputs()).sample, base_out, rtol=0, atol=0)
    # a full diff on an RMSNorm weight: hook mode materialises it by value, equal to fuse; remove is bit-exact
    norms = lorakit.load(_original_file([p for p in plan if p[2] == "norm"], factors, "kohya"))
    fused, hooked = copy.deepcopy(base), copy.deepcopy(base)
    lorakit.apply(fused, [(norms, 0.6)], strict=True)
    patch = lorakit.apply(hooked, [(norms, 0.6)], mode="hook", strict=True)
    with torch.no_grad():
        a, b = (m(**_inputs()).sample for m in (fused, hooked))
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert (a - base_out).abs().max() > 1e-4
    patch.remove()
    assert _changed(hooked, base) == []


def test_sd35_lora_on_sd3_model_reports_what_it_cannot_place():
    """An SD3.5-Medium LoRA (dual attention, qk norms, a third block) on a 2-block SD3 model without either:
    strict=False applies the rest with a warning naming each left-over layer, and the family notes say why;
    strict=True refuses and leaves the model unchanged."""
    base = _tiny("sd3")
    sd35 = _tiny("sd35")
    keep = ("joint_blocks.0.x_block.attn.qkv", "final_layer.linear")
    extra = ("joint_blocks.0.x_block.attn2.qkv", "joint_blocks.2.x_block.mlp.fc1", "joint_blocks.1.x_block.attn.ln_q")
    plan = [p for p in _plan("sd35") if p[0] in keep + extra]
    state = _original_file(plan, _factors(sd35, plan), "kohya")
    lora = lorakit.load(state, strict=True)
    assert detect_family(lora) == "sd3"
    with pytest.raises(MatchError, match="joint_blocks_0_x_block_attn2_qkv"):
        lorakit.apply(base, lora, strict=True)
    assert _changed(base, _tiny("sd3")) == []
    ours = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="3 LoRA layer"):
        patch = lorakit.apply(ours, lora, strict=False)
    assert patch.report.unmatched["0:lora"] == sorted("lora_unet_" + p.replace(".", "_") for p in extra)
    assert len(patch.report.matched["0:lora"]) == 2
    notes = " | ".join(patch.report.notes)
    assert "joint block 2 but the model has 2" in notes
    assert "x_block.attn2" in notes and "joint block(s) 0" in notes
    assert "qk norms" in notes
    assert len(_changed(ours, base)) == 3 + 1


def _clip(hidden):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
        max_position_embeddings=16, projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()


def _t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4, vocab_size=99,
                                   feed_forward_proj="gated-gelu")).eval()


@pytest.mark.parametrize("naming", ["kohya", "comfyui"])
def test_text_encoders_te1_te2_te3_land_on_the_sd3_pipeline(naming):
    """kohya lora_te1_/te2_/te3_ (ComfyUI text_encoders.clip_l/clip_g/t5xxl) = CLIP-L / CLIP-G / T5 = the SD3
    pipeline's text_encoder / text_encoder_2 / text_encoder_3. CLIP-L and CLIP-G differ in width here, so a
    swapped encoder cannot pass silently."""
    pytest.importorskip("transformers")
    torch.manual_seed(1)
    pipe = {"denoiser": _tiny("sd3"), "text_encoder": _clip(32), "text_encoder_2": _clip(48), "text_encoder_3": _t5()}
    layers = (  # (kohya prefix, ComfyUI prefix, diffusers prefix, module, in, out)
        ("lora_unet_", "diffusion_model.", "transformer.", "joint_blocks.0.x_block.attn.qkv", 16, 48),
        ("lora_te1_", "text_encoders.clip_l.transformer.", "text_encoder.", "text_model.encoder.layers.0.self_attn.q_proj", 32, 32),
        ("lora_te2_", "text_encoders.clip_g.transformer.", "text_encoder_2.", "text_model.encoder.layers.0.mlp.fc1", 48, 96),
        ("lora_te3_", "text_encoders.t5xxl.transformer.", "text_encoder_3.", "encoder.block.0.layer.0.SelfAttention.q", 32, 32),
        ("lora_te3_", "text_encoders.t5xxl.transformer.", "text_encoder_3.", "encoder.block.0.layer.1.DenseReluDense.wi_0", 32, 64),
    )
    g = torch.Generator().manual_seed(4)
    state, ref = {}, {}
    for kohya, comfy, diff, module, cols, rows in layers:
        down, up = torch.randn(R, cols, generator=g) * 0.3, torch.randn(rows, R, generator=g) * 0.3
        stem = kohya + module.replace(".", "_") if naming == "kohya" else comfy + module
        state |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(ALPHA)}
        if module.endswith("qkv"):
            for j, n in enumerate(("to_q", "to_k", "to_v")):
                ref[f"{diff}transformer_blocks.0.attn.{n}.lora_A.weight"] = down
                ref[f"{diff}transformer_blocks.0.attn.{n}.lora_B.weight"] = up[16 * j:16 * (j + 1)] * (ALPHA / R)
        else:
            ref |= {f"{diff}{module}.lora_A.weight": down, f"{diff}{module}.lora_B.weight": up * (ALPHA / R)}
    lora = lorakit.load(state, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(state)
    assert detect_family(lora) == "sd3"
    before = {c: copy.deepcopy(m) for c, m in pipe.items()}
    ref_pipe = {c: copy.deepcopy(m) for c, m in pipe.items()}
    patch = lorakit.apply(pipe, lora, strict=True)
    lorakit.apply(ref_pipe, lorakit.load(ref, strict=True), strict=True)
    landed = sorted(t.split(":")[0] for ts in patch.report.matched["0:lora"].values() for t in ts)
    assert landed == sorted(["denoiser"] * 3 + ["text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_3"])
    expected = {"denoiser": 3, "text_encoder": 1, "text_encoder_2": 1, "text_encoder_3": 2}
    for comp, module in pipe.items():
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, ref_pipe[comp].state_dict()[key], rtol=0, atol=1e-6, msg=f"{comp}:{key}")
        assert len(_changed(module, before[comp])) == expected[comp], comp
    patch.remove()
    assert all(_changed(m, before[c]) == [] for c, m in pipe.items())


def _kohya_keys(*paths):
    out = {}
    for p in paths:
        out |= {f"{p}.lora_down.weight": torch.zeros(2, 8), f"{p}.lora_up.weight": torch.zeros(8, 2), f"{p}.alpha": torch.tensor(1.0)}
    return out


@pytest.mark.parametrize("state, family", [
    (_kohya_keys("lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_3_context_block_mlp_fc2",
                 "lora_unet_final_layer_adaLN_modulation_1", "lora_te3_encoder_block_0_layer_0_SelfAttention_q"), "sd3"),
    (_kohya_keys("diffusion_model.joint_blocks.0.x_block.attn2.qkv", "diffusion_model.x_embedder.proj"), "sd3"),
    (_kohya_keys("model.diffusion_model.joint_blocks.11.context_block.adaLN_modulation.1"), "sd3"),
    (_kohya_keys("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1",
                 "lora_unet_final_layer_adaLN_modulation_1"), "flux1"),
    (_kohya_keys("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_up_blocks_1_attentions_0_proj_in"), "not sd3"),
    (_kohya_keys("diffusion_model.blocks.0.self_attn.q", "diffusion_model.blocks.0.cross_attn.o"), "not sd3"),
    (_kohya_keys("lora_unet_x_embedder_proj", "lora_unet_final_layer_linear"), "not sd3"),  # FLUX-like without joint blocks
], ids=["kohya+te", "comfyui", "sgm-prefix", "flux", "sd15-diffusers", "wan", "embedders-only"])
def test_detect_family(state, family):
    lora = lorakit.load(state, strict=True)
    assert lora.report.ok
    got = detect_family(lora)
    if family == "not sd3":
        assert got != "sd3"
    else:
        assert got == family
