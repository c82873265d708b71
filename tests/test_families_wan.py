"""Wan 2.1/2.2 family: original (ComfyUI / ai-toolkit / diffusion-pipe / DiffSynth), musubi and LightX2V names land
on diffusers' WanTransformer3DModel exactly as the same LoRA in diffusers naming; diff_m reaches scale_shift_table,
norm/bias/full diffs reach their tensors; the T2V/I2V mismatch is reported; diffusers' own converters agree on
what they keep, and what they drop or refuse is pinned."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lorakit
from _peers import pinned_peer
from lorakit.errors import MatchError
from lorakit.families import detect_family

diffusers = pytest.importorskip("diffusers")
from diffusers import WanPipeline, WanTransformer3DModel  # noqa: E402

D, FFN, TXT, IMG, FREQ, OUT, R = 16, 32, 16, 16, 16, 4 * 1 * 2 * 2, 2
CFG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
           text_dim=TXT, freq_dim=FREQ, ffn_dim=FFN, num_layers=2, cross_attn_norm=True,
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


def _lin(i, o):
    return (R, i), (o, R)


# (original name, diffusers module, lora down shape, lora up shape): every Linear kind and the Conv3d patch embedding
PAIRS = [
    ("blocks.0.self_attn.q", "blocks.0.attn1.to_q", *_lin(D, D)),
    ("blocks.0.self_attn.k", "blocks.0.attn1.to_k", *_lin(D, D)),
    ("blocks.1.self_attn.v", "blocks.1.attn1.to_v", *_lin(D, D)),
    ("blocks.1.self_attn.o", "blocks.1.attn1.to_out.0", *_lin(D, D)),
    ("blocks.0.cross_attn.q", "blocks.0.attn2.to_q", *_lin(D, D)),
    ("blocks.0.cross_attn.k", "blocks.0.attn2.to_k", *_lin(D, D)),
    ("blocks.1.cross_attn.v", "blocks.1.attn2.to_v", *_lin(D, D)),
    ("blocks.1.cross_attn.o", "blocks.1.attn2.to_out.0", *_lin(D, D)),
    ("blocks.0.ffn.0", "blocks.0.ffn.net.0.proj", *_lin(D, FFN)),
    ("blocks.1.ffn.2", "blocks.1.ffn.net.2", *_lin(FFN, D)),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1", *_lin(TXT, D)),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2", *_lin(D, D)),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1", *_lin(FREQ, D)),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2", *_lin(D, D)),
    ("time_projection.1", "condition_embedder.time_proj", *_lin(D, 6 * D)),
    ("head.head", "proj_out", *_lin(D, OUT)),
    ("patch_embedding", "patch_embedding", (R, 4, 1, 2, 2), (D, R, 1, 1, 1)),
]
I2V_PAIRS = [
    ("blocks.0.cross_attn.k_img", "blocks.0.attn2.add_k_proj", *_lin(D, D)),
    ("blocks.1.cross_attn.v_img", "blocks.1.attn2.add_v_proj", *_lin(D, D)),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj", *_lin(IMG, IMG)),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2", *_lin(IMG, D)),
]
BLOCK_LAYERS = [(o, d) for o, d, *_ in PAIRS + I2V_PAIRS if o.startswith("blocks.")]


def _factors(pairs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {orig: (torch.randn(*down, generator=g) * 0.3, torch.randn(*up, generator=g) * 0.3)
            for orig, _, down, up in pairs}


# naming -> (key stem of an original name, down suffix, up suffix, writes alpha)
NAMINGS = {
    "native": (lambda o: f"diffusion_model.{o}", "lora_A.weight", "lora_B.weight", True),  # ai-toolkit, diffusion-pipe
    "comfyui": (lambda o: f"diffusion_model.{o}", "lora_down.weight", "lora_up.weight", True),
    "musubi": (lambda o: "lora_unet_" + o.replace(".", "_"), "lora_down.weight", "lora_up.weight", True),
    "diffsynth": (lambda o: o, "lora_A.weight", "lora_B.weight", False),  # bare original names, PEFT suffixes
}


def _file(pairs, factors, naming="native", alpha=1.0):
    stem, a, b, with_alpha = NAMINGS[naming]
    state = {}
    for orig, *_ in pairs:
        down, up = factors[orig]
        state |= {f"{stem(orig)}.{a}": down, f"{stem(orig)}.{b}": up}
        if with_alpha:
            state[f"{stem(orig)}.alpha"] = torch.tensor(alpha)
    return state


def _diffusers_named(pairs, factors, scale):
    """The same LoRA written by hand in diffusers naming, alpha baked into lora_B: the reference."""
    out = {}
    for orig, diff, *_ in pairs:
        down, up = factors[orig]
        out |= {f"transformer.{diff}.lora_A.weight": down, f"transformer.{diff}.lora_B.weight": up * scale}
    return out


def _load(state):
    lora = lorakit.load(state, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(state)  # every key accounted for
    return lora


def _assert_same_weights(a, b, base, expect_changed):
    changed = 0
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key], rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(value, base.state_dict()[key])
    assert changed == expect_changed


def _outputs(i2v, *models):
    with torch.no_grad():
        return [m(**_inputs(i2v)).sample for m in models]


@pytest.mark.parametrize("naming", list(NAMINGS))
@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_original_names_equal_diffusers_names(naming, i2v):
    pairs = PAIRS + (I2V_PAIRS if i2v else [])
    factors = _factors(pairs)
    lora = _load(_file(pairs, factors, naming))
    assert detect_family(lora) == "wan" and len(lora) == len(pairs)
    base = _model(i2v)
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    patch = lorakit.apply(ours, [(lora, 0.8)], strict=True)
    assert patch.report.notes == []  # I2V LoRA on I2V, T2V on T2V: nothing to say
    assert "wan" in patch.report.families
    scale = 1.0 / R if NAMINGS[naming][3] else 1.0
    lorakit.apply(ref, [(_load(_diffusers_named(pairs, factors, scale)), 0.8)], strict=True)
    _assert_same_weights(ours, ref, base, len(pairs))  # one weight per layer, nothing else
    out, ref_out, base_out = _outputs(i2v, ours, ref, base)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert (out - base_out).abs().max() > 1e-3  # non-vacuous
    patch.remove()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in ours.state_dict().items())


def test_hook_mode_equals_fuse_mode():
    pairs = PAIRS[:10] + [p for p in PAIRS if p[0] == "head.head"]
    factors = _factors(pairs, seed=2)
    g = torch.Generator().manual_seed(9)
    state = _file(pairs, factors, "comfyui") | {"diffusion_model.blocks.0.self_attn.q.diff_b": torch.randn(D, generator=g)}
    lora = _load(state)
    base = _model()
    fused, hooked = copy.deepcopy(base), copy.deepcopy(base)
    lorakit.apply(fused, (lora, 0.7), strict=True)
    patch = lorakit.apply(hooked, (lora, 0.7), mode="hook", strict=True)
    a, b, base_out = _outputs(False, fused, hooked, base)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert (a - base_out).abs().max() > 1e-3
    patch.set_strengths([0.0])
    torch.testing.assert_close(_outputs(False, hooked)[0], base_out, rtol=0, atol=0)


def _lightx2v(i2v: bool, seed=3):
    """A LightX2V-style distill file: diff_m, norm diffs, bias diffs and full weight diffs (original names), with
    the diffusers tensor each one lands on."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    items = [
        ("blocks.0.diff_m", "blocks.0.scale_shift_table", rnd(1, 6, D)),
        ("head.diff_m", "scale_shift_table", rnd(1, 2, D)),  # the head's modulation is the model's own table
        ("blocks.1.norm3.diff", "blocks.1.norm2.weight", rnd(D)),  # original norm3 = diffusers norm2
        ("blocks.1.norm3.diff_b", "blocks.1.norm2.bias", rnd(D)),
        ("blocks.0.self_attn.norm_q.diff", "blocks.0.attn1.norm_q.weight", rnd(D)),
        ("blocks.1.cross_attn.norm_k.diff", "blocks.1.attn2.norm_k.weight", rnd(D)),
        ("blocks.0.self_attn.q.diff_b", "blocks.0.attn1.to_q.bias", rnd(D)),
        ("blocks.0.ffn.2.diff", "blocks.0.ffn.net.2.weight", rnd(D, FFN)),
        ("head.head.diff", "proj_out.weight", rnd(OUT, D)),
        ("head.head.diff_b", "proj_out.bias", rnd(OUT)),
        ("time_projection.1.diff_b", "condition_embedder.time_proj.bias", rnd(6 * D)),
        ("patch_embedding.diff", "patch_embedding.weight", rnd(D, 4, 1, 2, 2)),
        ("patch_embedding.diff_b", "patch_embedding.bias", rnd(D)),
    ]
    if i2v:
        items += [
            ("blocks.0.cross_attn.norm_k_img.diff", "blocks.0.attn2.norm_added_k.weight", rnd(D)),
            ("blocks.1.cross_attn.k_img.diff_b", "blocks.1.attn2.add_k_proj.bias", rnd(D)),
            ("img_emb.proj.0.diff", "condition_embedder.image_embedder.norm1.weight", rnd(IMG)),
            ("img_emb.proj.0.diff_b", "condition_embedder.image_embedder.norm1.bias", rnd(IMG)),
            ("img_emb.proj.4.diff", "condition_embedder.image_embedder.norm2.weight", rnd(D)),
        ]
    state = {f"diffusion_model.{k}": v for k, _, v in items}
    expected = {tensor: v for _, tensor, v in items}
    return state, expected


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_lightx2v_diffs_reach_modulation_norms_biases_and_weights(i2v):
    state, expected = _lightx2v(i2v)
    lora = _load(state)
    assert lora.format == "lightx2v" and detect_family(lora) == "wan"
    base = _model(i2v)
    model = copy.deepcopy(base)
    s = 0.6
    patch = lorakit.apply(model, (lora, s), strict=True)
    assert patch.report.notes == [] if i2v else True
    after = model.state_dict()
    for key, value in base.state_dict().items():
        want = value + s * expected[key] if key in expected else value
        torch.testing.assert_close(after[key], want, rtol=0, atol=1e-6, msg=key)
    assert sum(not torch.equal(after[k], v) for k, v in base.state_dict().items()) == len(expected)
    out, base_out = _outputs(i2v, model, base)
    assert (out - base_out).abs().max() > 1e-3
    patch.remove()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())


def _convert(state):
    """diffusers' own Wan conversion (WanPipeline.lora_state_dict picks the native or the musubi converter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WanPipeline.lora_state_dict(copy.deepcopy(state))


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_converter_agrees_on_pairs_and_bias_diffs_and_drops_the_rest():
    """Peer: diffusers' native converter gives the same weights for A/B pairs, diff_b and head.head.diff (+ diff_b,
    written as a LoRA with an identity lora_B), and drops diff_m, norm diffs, full diffs inside blocks, the patch
    embedding and a lone time_projection diff_b (FORMATS.md §9.4): lorakit applies those too."""
    pairs = [p for p in PAIRS if p[0].startswith("blocks.")]  # an alpha on a global layer breaks the peer (below)
    factors = _factors(pairs, seed=4)
    state, expected = _lightx2v(False, seed=6)
    state |= _file(pairs, factors, "native", alpha=1.0)
    converted = _convert(state)
    assert all(k.startswith("transformer.") for k in converted)
    assert not any("diff" in k or "norm" in k or "scale_shift" in k for k in converted)
    ours, theirs = _load(state), _load(converted)
    assert len(theirs) == len(pairs) + 1  # pairs (with their diff_b) and head.head: nothing else survived
    base = _model()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    lorakit.apply(a, ours, strict=True)
    lorakit.apply(b, theirs, strict=True)
    kept = {"blocks.0.attn1.to_q.bias", "proj_out.weight", "proj_out.bias"}
    dropped = set(expected) - kept
    assert len(dropped) == 10
    for key, value in a.state_dict().items():
        if key in dropped:
            assert not torch.equal(value, b.state_dict()[key]), key  # only lorakit applied these
            assert torch.equal(b.state_dict()[key], base.state_dict()[key]), key
        else:
            torch.testing.assert_close(value, b.state_dict()[key], rtol=0, atol=1e-6, msg=key)
    assert not torch.equal(a.state_dict()["proj_out.weight"], base.state_dict()["proj_out.weight"])


PEER_FAILURES = {
    # an alpha on a global layer is left over by the converter, which then raises (diffusers 0.42.1)
    "head.head alpha": ({"head.head": "lora"}, ValueError, "head.head.alpha"),
    "text_embedding alpha": ({"text_embedding.0": "lora"}, ValueError, "text_embedding.0.alpha"),
    # head.head.diff without its diff_b: the identity lora_B is sized from a bias that is not there
    "head.head.diff alone": ({"head.head": "diff"}, KeyError, "proj_out.lora_B.bias"),
    # a bias diff on the text embedding alone: the converter pops a lora_A that is not there
    "text_embedding diff_b alone": ({"text_embedding.0": "diff_b"}, KeyError, "text_embedding.0.lora_A.weight"),
}


def _global_layer_file(case):
    """A native file with blocks.0.self_attn.q (with an alpha) and the global layers of one PEER_FAILURES case."""
    layers = PEER_FAILURES[case][0]
    shapes = {o: (down, up) for o, _, down, up in PAIRS}
    targets = {o: d for o, d, *_ in PAIRS}
    factors = _factors(PAIRS, seed=7)
    state = _file(PAIRS[:1], factors, "native")
    for orig, kind in layers.items():
        if kind == "lora":
            state |= _file([(orig, targets[orig], *shapes[orig])], factors, "native")
        elif kind == "diff":
            state[f"diffusion_model.{orig}.diff"] = torch.randn(shapes[orig][1][0], shapes[orig][0][1]) * 0.1
        else:
            state[f"diffusion_model.{orig}.diff_b"] = torch.randn(shapes[orig][1][0]) * 0.1
    return state


@pinned_peer("diffusers", "0.42.1")
@pytest.mark.parametrize("case", list(PEER_FAILURES))
def test_diffusers_converter_failures_on_global_layers(case):
    """Peer bugs pinned (diffusers 0.42.1); lorakit's side: the next test."""
    _, error, match = PEER_FAILURES[case]
    with pytest.raises(error, match=match):
        _convert(_global_layer_file(case))


@pytest.mark.parametrize("case", list(PEER_FAILURES))
def test_global_layers_the_converter_fails_on_are_placed(case):
    """lorakit places each global layer of the files diffusers' converter fails on (any diffusers version)."""
    layers = PEER_FAILURES[case][0]
    targets = {o: d for o, d, *_ in PAIRS}
    lora = _load(_global_layer_file(case))
    base = _model()
    model = copy.deepcopy(base)
    patch = lorakit.apply(model, lora, strict=True)
    for orig in layers:
        assert patch.report.matched["0:lora"][f"diffusion_model.{orig}"] == [f"denoiser:{targets[orig]}"]
        param = "bias" if layers[orig] == "diff_b" else "weight"
        key = f"{targets[orig]}.{param}"
        assert not torch.equal(model.state_dict()[key], base.state_dict()[key])
    if "head.head" in layers and layers["head.head"] == "lora":
        assert lora.layers["diffusion_model.head.head"].weight.scale == 1.0 / R


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_musubi_file_equals_diffusers_musubi_converter(i2v):
    """Peer: a whole musubi-tuner file (every block, every layer musubi trains) converted by diffusers'
    ``_convert_musubi_wan_lora_to_diffusers`` gives the same weights as lorakit reading it directly."""
    base = _model(i2v)
    layers = [(o, d) for o, d in BLOCK_LAYERS if i2v or "_img" not in o]
    pairs = []
    for i in range(len(base.blocks)):  # the converter wants all of them in every block
        for orig, diff in layers:
            o, d = (f"blocks.{i}.{x.split('.', 2)[2]}" for x in (orig, diff))
            if o not in {p[0] for p in pairs}:
                mod = dict(base.named_modules())[d]
                pairs.append((o, d, (R, mod.in_features), (mod.out_features, R)))
    assert len(pairs) == len(base.blocks) * (12 if i2v else 10)
    factors = _factors(pairs, seed=8)
    state = _file(pairs, factors, "musubi", alpha=1.0)
    converted = _convert(state)
    ours, theirs = _load(state), _load(converted)
    assert detect_family(ours) == "wan" and len(ours) == len(theirs) == len(pairs)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    lorakit.apply(a, (ours, 0.9), strict=True)
    lorakit.apply(b, (theirs, 0.9), strict=True)
    _assert_same_weights(a, b, base, len(pairs))
    out, base_out = _outputs(i2v, a, base)
    assert (out - base_out).abs().max() > 1e-3


def test_t2v_lora_on_i2v_model_is_noted_and_i2v_lora_on_t2v_is_reported():
    factors = _factors(PAIRS + I2V_PAIRS)
    t2v = _load(_file(PAIRS, factors, "native"))
    patch = lorakit.apply(_model(i2v=True), t2v, strict=True)
    assert len(patch.report.notes) == 1 and "T2V LoRA on an I2V model" in patch.report.notes[0]
    assert "4 layers" in patch.report.notes[0] and "note:" in patch.report.summary()

    blocks_i2v = [p for p in I2V_PAIRS if p[0].startswith("blocks.")]
    state = _file(PAIRS + blocks_i2v, factors, "musubi") | {
        "lora_unet_blocks_0_cross_attn_norm_k_img.diff": torch.ones(D)}
    i2v = _load(state)
    with pytest.raises(MatchError, match="3 layer"):
        lorakit.apply(_model(i2v=False), i2v, strict=True)
    with pytest.warns(UserWarning, match="3 LoRA layer"):
        patch = lorakit.apply(_model(i2v=False), i2v)
    assert patch.report.unmatched["0:lora"] == [
        "lora_unet_blocks_0_cross_attn_k_img", "lora_unet_blocks_0_cross_attn_norm_k_img", "lora_unet_blocks_1_cross_attn_v_img"]
    assert patch.report.counts()["0:lora"]["matched"] == len(PAIRS)
    assert patch.report.notes == []


def _peft(*names):
    return lorakit.load({k: v for n in names for k, v in (
        (f"{n}.lora_A.weight", torch.ones(1, 4)), (f"{n}.lora_B.weight", torch.ones(4, 1)))})


def test_detection_takes_wan_namings_and_not_other_families():
    factors = _factors(PAIRS)
    for naming in NAMINGS:
        assert detect_family(_load(_file(PAIRS, factors, naming))) == "wan", naming
    assert detect_family(_load(_lightx2v(False)[0])) == "wan"
    assert detect_family(_peft("transformer.blocks.0.attn1.to_q", "transformer.blocks.0.ffn.net.0.proj")) == "wan"

    flux = lorakit.load({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(1, 4),
                         "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(12, 1)})
    sd15 = lorakit.load({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(1, 4),
                         "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(4, 1)})
    cosmos = _peft("diffusion_model.blocks.0.self_attn.q_proj", "diffusion_model.blocks.0.mlp.layer1")
    sd3 = _peft("diffusion_model.joint_blocks.0.x_block.attn.qkv")
    # HunyuanDiT's diffusers names share blocks.N.attn1.to_q; its ff.net / skip_linear are not Wan's
    hunyuan_dit = _peft("transformer.blocks.0.attn1.to_q", "transformer.blocks.0.attn2.to_k",
                        "transformer.blocks.0.attn1.to_v", "transformer.blocks.0.ff.net.0.proj")
    assert detect_family(flux) == "flux1"
    for other in (sd15, cosmos, sd3, hunyuan_dit):
        assert detect_family(other) != "wan"


def test_videox_fun_double_underscore_names():
    # VideoX-Fun (Wan Fun) writes ``lora_unet__blocks_0_cross_attn_k``: one underscore too many after the prefix
    g = torch.Generator().manual_seed(21)
    down, up = torch.randn(2, D, generator=g), torch.randn(D, 2, generator=g)
    state = {"lora_unet__blocks_0_cross_attn_k.lora_down.weight": down,
             "lora_unet__blocks_0_cross_attn_k.lora_up.weight": up,
             "lora_unet__blocks_0_cross_attn_k.alpha": torch.tensor(2.0)}
    lora = lorakit.load(state, strict=True)
    assert detect_family(lora) == "wan"
    base = _model()
    model = copy.deepcopy(base)
    patch = lorakit.apply(model, lora, strict=True)
    assert patch.report.matched["0:lora"] == {"lora_unet__blocks_0_cross_attn_k": ["denoiser:blocks.0.attn2.to_k"]}
    key = "blocks.0.attn2.to_k.weight"
    torch.testing.assert_close(model.state_dict()[key], base.state_dict()[key] + up @ down, rtol=0, atol=1e-6)
