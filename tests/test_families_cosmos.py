"""Cosmos family: NVIDIA's native Predict2 names (kohya-flattened, ComfyUI, diffusion-pipe/Anima, cosmos-predict2's
``net.`` + PEFT), Cosmos 1.0 names and the Predict2.5 image-context layers land on diffusers'
CosmosTransformer3DModel exactly as the same LoRA in diffusers naming; diffusers' converters (single-file for
checkpoints, Anima's for LoRAs) agree; what diffusers 0.42.1 does not convert is pinned."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from _peers import pinned_peer
from lorakit.errors import MatchError
from lorakit.families import detect_family

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers import CosmosTransformer3DModel  # noqa: E402
from diffusers.loaders import AnimaLoraLoaderMixin  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

from _family_util import original_checkpoint  # noqa: E402

# head dim 16: CosmosRotaryPosEmbed divides by (head_dim // 4 * ... - 2); 8 gives a zero division.
# concat_padding_mask=False: True resizes the mask with torchvision in the forward (not installed).
TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2.0,
            text_embed_dim=24, adaln_lora_dim=8, max_size=(4, 16, 16), patch_size=(1, 2, 2),
            rope_scale=(1.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type=None)
# Predict2.5 with the Transfer2.5 image context: text projection 20 -> 24, image projection 12 -> hidden (32)
TINY_25 = dict(TINY, use_crossattn_projection=True, crossattn_proj_in_channels=20, encoder_hidden_states_channels=24,
               img_context_dim_in=12, img_context_num_tokens=4, img_context_dim_out=32)
R, ALPHA, STRENGTH = 4, 2.0, 0.8

# (native Predict2 name, diffusers module): LoRA layers, then norm weights carried as full ``diff``s
LAYERS = (
    ("blocks.0.self_attn.q_proj", "transformer_blocks.0.attn1.to_q"),
    ("blocks.1.self_attn.output_proj", "transformer_blocks.1.attn1.to_out.0"),
    ("blocks.0.cross_attn.k_proj", "transformer_blocks.0.attn2.to_k"),  # 24 -> 32: text width
    ("blocks.1.cross_attn.v_proj", "transformer_blocks.1.attn2.to_v"),
    ("blocks.1.cross_attn.q_proj", "transformer_blocks.1.attn2.to_q"),
    ("blocks.0.mlp.layer1", "transformer_blocks.0.ff.net.0.proj"),
    ("blocks.1.mlp.layer2", "transformer_blocks.1.ff.net.2"),
    ("blocks.0.adaln_modulation_self_attn.1", "transformer_blocks.0.norm1.linear_1"),
    ("blocks.1.adaln_modulation_cross_attn.2", "transformer_blocks.1.norm2.linear_2"),
    ("blocks.0.adaln_modulation_mlp.2", "transformer_blocks.0.norm3.linear_2"),
    ("x_embedder.proj.1", "patch_embed.proj"),
    ("t_embedder.1.linear_1", "time_embed.t_embedder.linear_1"),
    ("t_embedder.1.linear_2", "time_embed.t_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
    ("final_layer.adaln_modulation.1", "norm_out.linear_1"),
    ("final_layer.adaln_modulation.2", "norm_out.linear_2"),  # (shift, scale) on both sides: no swap
)
NORMS = (
    ("blocks.1.self_attn.k_norm", "transformer_blocks.1.attn1.norm_k"),
    ("blocks.0.cross_attn.q_norm", "transformer_blocks.0.attn2.norm_q"),
    ("t_embedding_norm", "time_embed.norm"),
)
# Cosmos 1.0 (blocks.blockN.blocks.{0 self-attn, 1 cross-attn, 2 MLP}); ``to_q.1`` is the q norm
LAYERS_1 = (
    ("blocks.block0.blocks.0.block.attn.to_q.0", "transformer_blocks.0.attn1.to_q"),
    ("blocks.block1.blocks.0.block.attn.to_out.0", "transformer_blocks.1.attn1.to_out.0"),
    ("blocks.block0.blocks.1.block.attn.to_k.0", "transformer_blocks.0.attn2.to_k"),
    ("blocks.block1.blocks.2.block.layer1", "transformer_blocks.1.ff.net.0.proj"),
    ("blocks.block0.blocks.2.adaLN_modulation.2", "transformer_blocks.0.norm3.linear_2"),
    ("blocks.block1.blocks.1.adaLN_modulation.1", "transformer_blocks.1.norm2.linear_1"),
    ("final_layer.adaLN_modulation.2", "norm_out.linear_2"),
)
NORMS_1 = (("blocks.block0.blocks.0.block.attn.to_q.1", "transformer_blocks.0.attn1.norm_q"),
           ("affline_norm", "time_embed.norm"))
# Predict2.5: image cross-attention and the context projections (same names on both sides)
LAYERS_25 = (
    ("blocks.0.cross_attn.k_img", "transformer_blocks.0.attn2.k_img"),
    ("blocks.1.cross_attn.q_img", "transformer_blocks.1.attn2.q_img"),
    ("blocks.1.cross_attn.v_img", "transformer_blocks.1.attn2.v_img"),
    ("crossattn_proj.0", "crossattn_proj.0"),
    ("img_context_proj.0", "img_context_proj.0"),
    ("blocks.0.self_attn.q_proj", "transformer_blocks.0.attn1.to_q"),
)
NORMS_25 = (("blocks.1.cross_attn.k_img_norm", "transformer_blocks.1.attn2.k_img_norm"),)


def _model(**cfg):
    torch.manual_seed(0)
    model = CosmosTransformer3DModel(**(cfg or TINY)).eval()
    with torch.no_grad():  # norm weights start at ones, biases at zero: make every parameter matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(v25=False):
    g = torch.Generator().manual_seed(5)
    text = torch.randn(1, 6, 20 if v25 else 24, generator=g)
    context = (text, torch.randn(1, 4, 12, generator=g)) if v25 else text
    return dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=torch.tensor([0.5]),
                encoder_hidden_states=context)


def _factors(model, layers, norms, seed=1):
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out: dict[str, object] = {}
    for name, diff in layers:
        w = mods[diff].weight
        out[name] = (torch.randn(R, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], R, generator=g) * 0.3)
    for name, diff in norms:
        out[name] = torch.randn(mods[diff].weight.shape, generator=g) * 0.2
    return out


def _native_file(factors, naming):
    """The LoRA in a native naming: kohya (flattened), ComfyUI (dotted, lora_down/up + alpha), diffusion-pipe /
    Anima trainers (dotted PEFT, alpha baked in), NVIDIA cosmos-predict2 (PEFT inside ``net``)."""
    stems = {"kohya": lambda n: "lora_unet_" + n.replace(".", "_"), "comfyui": lambda n: f"diffusion_model.{n}",
             "diffusion-pipe": lambda n: f"diffusion_model.{n}", "cosmos-predict2": lambda n: f"net.{n}",
             "comfyui-net": lambda n: f"diffusion_model.net.{n}"}
    state = {}
    for name, f in factors.items():
        stem = stems[naming](name)
        if isinstance(f, torch.Tensor):
            state[f"{stem}.diff"] = f
            continue
        down, up = f
        if naming in ("kohya", "comfyui", "comfyui-net"):
            state |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(ALPHA)}
        elif naming == "diffusion-pipe":
            state |= {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up * (ALPHA / R)}
        else:
            state |= {f"{stem}.lora_A.default.weight": down, f"{stem}.lora_B.default.weight": up * (ALPHA / R)}
    return state


def _diffusers_equivalent(factors, pairs):
    """The same LoRA written by hand in diffusers naming (alpha baked in): the reference."""
    to_diff = dict(pairs)
    out = {}
    for name, f in factors.items():
        stem = f"transformer.{to_diff[name]}"
        if isinstance(f, torch.Tensor):
            out[f"{stem}.diff"] = f
        else:
            out |= {f"{stem}.lora_A.weight": f[0], f"{stem}.lora_B.weight": f[1] * (ALPHA / R)}
    return out


def _check_equal(state, factors, pairs, base, v25=False, mode="fuse"):
    lora = lorakit.load(state, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(state)
    assert detect_family(lora) == "cosmos"
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    patch = lorakit.apply(ours, [(lora, STRENGTH)], mode=mode, strict=True)
    lorakit.apply(ref, [(_diffusers_equivalent(factors, pairs), STRENGTH)], mode=mode, strict=True)
    assert patch.report.counts()["0:lora"] == {"matched": len(pairs), "unmatched": 0, "shape_mismatches": 0}
    assert patch.report.families == ["cosmos"] and patch.report.notes == []
    got, want, orig = ours.state_dict(), ref.state_dict(), base.state_dict()
    changed = 0
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(value, orig[key])
    assert changed == (0 if mode == "hook" else len(pairs))  # one tensor per layer: pure renames, no splits
    for name, diff in pairs:  # norms: W + s * diff, independently of the reference
        if isinstance(factors[name], torch.Tensor) and mode == "fuse":
            expect = orig[f"{diff}.weight"] + STRENGTH * factors[name]
            torch.testing.assert_close(got[f"{diff}.weight"], expect, rtol=0, atol=1e-6)
    with torch.no_grad():
        out, ref_out, base_out = (m(**_inputs(v25)).sample for m in (ours, ref, base))
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert (out - base_out).abs().max() > 1e-2
    patch.remove()
    assert all(torch.equal(v, orig[k]) for k, v in ours.state_dict().items())
    return out


@pytest.fixture(scope="module")
def base():
    return _model()


@pytest.mark.parametrize("naming", ["kohya", "comfyui", "comfyui-net", "diffusion-pipe", "cosmos-predict2"])
def test_predict2_names_equal_diffusers_names(naming, base):
    factors = _factors(base, LAYERS, NORMS)
    _check_equal(_native_file(factors, naming), factors, LAYERS + NORMS, base)


def test_hook_mode_gives_the_fused_output(base):
    factors = _factors(base, LAYERS, ())  # norm diffs have no unfused path (UnsupportedAdapterError): fuse only
    state = _native_file(factors, "comfyui")
    hooked = _check_equal(state, factors, LAYERS, base, mode="hook")
    fused = copy.deepcopy(base)
    lorakit.apply(fused, [(lorakit.load(state), STRENGTH)], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(hooked, fused(**_inputs()).sample, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("naming", ["kohya", "comfyui-net"])
def test_cosmos_1_names_equal_diffusers_names(naming, base):
    factors = _factors(base, LAYERS_1, NORMS_1, seed=2)
    _check_equal(_native_file(factors, naming), factors, LAYERS_1 + NORMS_1, base)


@pytest.mark.parametrize("naming", ["cosmos-predict2", "kohya"])
def test_predict2_5_image_context_names(naming):
    model = _model(**TINY_25)
    factors = _factors(model, LAYERS_25, NORMS_25, seed=3)
    _check_equal(_native_file(factors, naming), factors, LAYERS_25 + NORMS_25, model, v25=True)


def _original(model, version):
    """lorakit's map inverted into a native checkpoint of one Cosmos version (``net.`` prefixed, as NVIDIA saves)."""
    orig = original_checkpoint(model, "cosmos")
    v1 = lambda k: ".block" in k or k.startswith(("affline_norm", "final_layer.adaLN"))  # noqa: E731
    v2 = lambda k: k.startswith(("blocks.", "t_embedding_norm", "final_layer.adaln")) and not v1(k)  # noqa: E731
    keep = v1 if version == "1.0" else v2
    shared = ("x_embedder.", "t_embedder.", "final_layer.linear", "crossattn_proj.", "img_context_proj.")
    return {f"net.{k}": v for k, v in orig.items() if not k.startswith("net.") and (keep(k) or k.startswith(shared))}


class _KeepOnPop(dict):
    """``pop`` without removing: see the 1.0 case below."""

    def pop(self, key, *default):
        return self[key] if key in self else dict.pop(self, key, *default)


@pytest.mark.parametrize("version", ["1.0", "2.0", "2.5"])
def test_name_map_round_trips_through_diffusers_single_file_converter(version):
    """Every tensor of the model has a native name in lorakit's map that diffusers' converter sends back to it."""
    model = _model(**(TINY_25 if version == "2.5" else TINY))
    orig = _original(model, version)
    sd = model.state_dict()
    if version == "1.0":  # a dict that keeps popped keys reaches the 1.0 table (the peer bug: next test)
        orig = _KeepOnPop(orig)
    converted = sfu.convert_cosmos_transformer_checkpoint_to_diffusers(orig)
    assert set(converted) == set(sd)
    assert [k for k in sd if not torch.equal(converted[k], sd[k])] == []


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_single_file_converter_gives_cosmos_1_the_2_0_table():
    """Peer bug (diffusers 0.42.1): the converter pops every key out of ``checkpoint`` and only then looks for its
    Cosmos 1.0 marker key there, so 1.0 checkpoints always get the 2.0 rename table (the conversion script, which
    picks the table by model type, is right)."""
    model = _model(**TINY)
    orig = _original(model, "1.0")
    assert "net.blocks.block1.blocks.0.block.attn.to_q.0.weight" in orig
    wrong = sfu.convert_cosmos_transformer_checkpoint_to_diffusers(dict(orig))
    assert "transformer_blocks.block1.transformer_blocks.0.block.attn.to_q.0.weight" in wrong
    assert not set(wrong) >= set(model.state_dict())


def test_anima_converter_agrees_with_lorakit(base):
    """diffusers' only native-name LoRA converter (AnimaLoraLoaderMixin, for the Predict2-based Anima): loaded with
    PEFT and fused by diffusers, the weights equal lorakit's."""
    factors = _factors(base, LAYERS, ())
    state = _native_file(factors, "diffusion-pipe")
    converted = AnimaLoraLoaderMixin.lora_state_dict(dict(state))
    assert set(converted) == set(_diffusers_equivalent(factors, LAYERS))
    peer = copy.deepcopy(base)
    peer.load_lora_adapter(converted, prefix="transformer", adapter_name="peer")
    peer.fuse_lora(lora_scale=STRENGTH)
    peer.unload_lora()
    ours = copy.deepcopy(base)
    lorakit.apply(ours, [(lorakit.load(state, strict=True), STRENGTH)], strict=True)
    got, theirs, orig = ours.state_dict(), peer.state_dict(), base.state_dict()
    assert set(theirs) == set(got)
    changed = 0
    for key, value in got.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6, msg=key)
        changed += not torch.equal(value, orig[key])
    assert changed == len(LAYERS)


@pinned_peer("diffusers", "0.42.1")
def test_what_diffusers_does_not_convert_is_pinned(base):
    """diffusers 0.42.1: Cosmos2_5_PredictBasePipeline (CosmosLoraLoaderMixin) passes native names through, so
    nothing names a module; Anima's converter renames ``diffusion_model.`` paths only (not kohya ``lora_unet_``,
    not ``net.``, not ``q_norm``) and leaves kohya suffixes, which PEFT then cannot load. lorakit places them all."""
    from diffusers import Cosmos2_5_PredictBasePipeline

    factors = _factors(base, LAYERS, NORMS)
    comfy = _native_file(factors, "comfyui")
    passed = Cosmos2_5_PredictBasePipeline.lora_state_dict(dict(comfy))
    assert passed.keys() == comfy.keys()
    modules = {n for n, _ in base.named_modules()}
    assert not any(k.removeprefix("diffusion_model.").rsplit(".", 2)[0] in modules for k in passed)
    assert not hasattr(diffusers.Cosmos2TextToImagePipeline, "lora_state_dict")  # Predict2 pipelines: no LoRA loader

    kohya = _native_file(factors, "kohya")
    assert AnimaLoraLoaderMixin.lora_state_dict(dict(kohya)).keys() == kohya.keys()
    net = AnimaLoraLoaderMixin.lora_state_dict(dict(_native_file(factors, "comfyui-net")))
    assert "transformer.net.transformer_blocks.0.attn1.to_q.lora_down.weight" in net  # no module of that name
    anima = AnimaLoraLoaderMixin.lora_state_dict(dict(comfy))
    assert "transformer.transformer_blocks.0.attn1.to_q.lora_down.weight" in anima  # path renamed, suffix kept
    assert "transformer.transformer_blocks.1.self_attn.k_norm.diff" in anima  # q_norm/k_norm not renamed
    with pytest.raises(IndexError):  # PEFT's loader on lora_down/lora_up keys
        copy.deepcopy(base).load_lora_adapter({k: v for k, v in anima.items() if "lora_" in k}, prefix="transformer")
    for state in (comfy, kohya):
        patch = lorakit.apply(copy.deepcopy(base), lorakit.load(state, strict=True), strict=True)
        assert patch.report.counts()["0:lora"]["matched"] == len(LAYERS) + len(NORMS)


def test_detection():
    factors = _factors(_model(), LAYERS, NORMS)
    for naming in ("kohya", "comfyui", "comfyui-net", "diffusion-pipe", "cosmos-predict2"):
        assert detect_family(lorakit.load(_native_file(factors, naming))) == "cosmos", naming
    assert detect_family(["blocks_0_mlp_layer1", "llm_adapter_blocks_0_self_attn_q_proj"]) == "cosmos"  # Anima
    one = lambda stem, n=4: {f"{stem}.lora_down.weight": torch.ones(1, n), f"{stem}.lora_up.weight": torch.ones(n, 1)}  # noqa: E731
    flux = one("lora_unet_double_blocks_0_img_attn_qkv") | one("diffusion_model.single_blocks.0.linear1")
    sd15 = one("lora_unet_down_blocks_0_attentions_0_proj_in") | one("lora_unet_mid_block_attentions_0_proj_out")
    wan = one("diffusion_model.blocks.0.self_attn.q") | one("diffusion_model.blocks.0.ffn.0")
    sd3 = one("lora_unet_joint_blocks_0_x_block_attn_qkv") | one("lora_unet_final_layer_adaLN_modulation_1")
    for state in (flux, sd15, wan, sd3):
        assert detect_family(lorakit.load(state)) != "cosmos"
    assert detect_family(lorakit.load(flux)) == "flux1" and detect_family(lorakit.load(wan)) == "wan"


def test_layers_without_a_home_are_reported(base):
    """A 14B LoRA's extra blocks and Anima's llm_adapter have no module here: strict raises and leaves the model
    as it was; otherwise a warning names them, the rest is applied and the notes say why."""
    factors = _factors(base, LAYERS[:1], ())
    g = torch.Generator().manual_seed(9)
    extra = {"blocks.30.self_attn.q_proj": (torch.randn(R, 32, generator=g), torch.randn(32, R, generator=g)),
             "llm_adapter.blocks.0.self_attn.q_proj": (torch.randn(R, 16, generator=g), torch.randn(16, R, generator=g))}
    lora = lorakit.load(_native_file(factors | extra, "comfyui"), strict=True)
    assert lora.report.ok and detect_family(lora) == "cosmos"
    model = copy.deepcopy(base)
    with pytest.raises(MatchError, match="2 layer"):
        lorakit.apply(model, lora, strict=True)
    orig = base.state_dict()
    assert all(torch.equal(v, orig[k]) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match="2 LoRA layer"):
        patch = lorakit.apply(model, lora)
    assert patch.report.unmatched["0:lora"] == ["diffusion_model.blocks.30.self_attn.q_proj",
                                                "diffusion_model.llm_adapter.blocks.0.self_attn.q_proj"]
    assert patch.report.counts()["0:lora"]["matched"] == 1
    assert len(patch.report.notes) == 2
    assert "blocks up to 30" in patch.report.notes[0] and "1 layer(s) of Anima's llm_adapter" in patch.report.notes[1]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, orig[k])]
    assert changed == ["transformer_blocks.0.attn1.to_q.weight"]
