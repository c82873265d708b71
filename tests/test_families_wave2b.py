"""HiDream, Lumina 2 and Krea 2: lorakit's name maps checked against diffusers 0.42.1's own converters.

- a LoRA in each naming in use (ComfyUI / ai-toolkit ``diffusion_model.`` names, kohya-flattened ``lora_unet_``,
  SimpleTuner ``transformer.`` / ``lycoris_``) fused by lorakit gives the weights diffusers' LoRA converter +
  ``load_lora_adapter`` + ``fuse_lora`` give for the ComfyUI file; hook mode gives the fused output; remove is
  bit-exact; the LoRA changes the output;
- the original-named checkpoint rebuilt from lorakit's alias map converts back to the model exactly through
  diffusers' single-file converter;
- fused projections: low-rank split by up rows, LoKr as the full delta sliced;
- where diffusers drops or breaks something, a pinned test says so.
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
from _wave2_util import check_against, lora_pair, peer_fused  # noqa: E402

R = 2


def _factors(picks, seed=1, r=R, scale=0.3):
    """``{layer: (down, up)}`` random rank-``r`` factors for ``(layer, rows, cols)`` picks."""
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(r, cols, generator=g) * scale, torch.randn(rows, r, generator=g) * scale)
            for name, rows, cols in picks}


def _file(factors, naming, alpha=1.0):
    """One LoRA in a naming: ``comfyui`` (``diffusion_model.`` + PEFT suffixes, alpha baked in, what diffusers'
    converters read), ``kohya`` (``lora_unet_`` flattened, ``alpha``), ``simpletuner`` (``transformer.`` + PEFT),
    ``lycoris`` (``lycoris_`` flattened, kohya suffixes)."""
    state = {}
    for name, (down, up) in factors.items():
        if naming == "comfyui":
            state |= lora_pair(f"diffusion_model.{name}", down, up * alpha / down.shape[0], None, "peft")
        elif naming == "simpletuner":
            state |= lora_pair(f"transformer.{name}", down, up * alpha / down.shape[0], None, "peft")
        else:
            prefix = "lora_unet_" if naming == "kohya" else "lycoris_"
            state |= lora_pair(prefix + name.replace(".", "_"), down, up, alpha, "kohya")
    return state


# -- HiDream ----------------------------------------------------------------------------------------------------

def _hidream():
    torch.manual_seed(0)
    model = diffusers.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[16, 8], text_emb_dim=8, num_routed_experts=2, num_activated_experts=1,
        axes_dims_rope=(4, 2, 2), max_resolution=(8, 8), llama_layers=[0, 1])
    return randomise(model.eval())


def _hidream_forward(model):
    g = torch.Generator().manual_seed(5)
    return model(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timesteps=torch.tensor([500]),
                 encoder_hidden_states_t5=torch.randn(1, 5, 16, generator=g),
                 encoder_hidden_states_llama3=torch.randn(2, 1, 5, 8, generator=g),
                 pooled_embeds=torch.randn(1, 8, generator=g)).sample


HD, HFF = 16, 256  # inner width (2 heads x 8), SwiGLU hidden of the tiny model
HIDREAM_PICK = (
    ("double_stream_blocks.0.block.attn1.to_q", HD, HD), ("double_stream_blocks.0.block.attn1.to_v_t", HD, HD),
    ("double_stream_blocks.0.block.attn1.to_out", HD, HD), ("double_stream_blocks.0.block.adaLN_modulation.1", 12 * HD, HD),
    ("double_stream_blocks.0.block.ff_i.experts.1.w1", HFF, HD), ("double_stream_blocks.0.block.ff_i.shared_experts.w2", HD, HFF),
    ("double_stream_blocks.0.block.ff_t.w3", HFF, HD),
    ("single_stream_blocks.0.block.attn1.to_k", HD, HD), ("single_stream_blocks.0.block.ff_i.experts.0.w2", HD, HFF),
    ("single_stream_blocks.0.block.adaLN_modulation.1", 6 * HD, HD),
    ("x_embedder.proj", HD, 16), ("caption_projection.2.linear", HD, 16), ("t_embedder.timestep_embedder.linear_1", HD, 256),
    ("p_embedder.pooled_embedder.linear_2", HD, HD), ("final_layer.adaLN_modulation.1", 2 * HD, HD),
    ("final_layer.linear", 16, HD),
)


@pytest.mark.parametrize("naming", ["comfyui", "kohya", "simpletuner", "lycoris"])
def test_hidream_lora_equals_diffusers_converter(naming):
    """Every naming lands as diffusers places the ComfyUI/ai-toolkit file (its converter strips ``diffusion_model.``):
    image and text streams, experts and shared experts, modulations in their own row order, embedders."""
    model = _hidream()
    factors = _factors(HIDREAM_PICK)
    state = _file(factors, naming)
    lora = lorakit.load(state, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(state)
    assert detect_family(lora) == "hidream"
    want = peer_fused(model, lcu._convert_non_diffusers_hidream_lora_to_diffusers(_file(factors, "comfyui")), 0.7)
    assert check_against(model, lora, want, 0.7, _hidream_forward, atol=1e-5) == len(HIDREAM_PICK)


def test_hidream_lokr_lands_whole():
    """LyCORIS LoKr (SimpleTuner's HiDream default, ComfyUI issue 7792): the full kron delta on the module."""
    model = _hidream()
    g = torch.Generator().manual_seed(3)
    w1, w2a, w2b = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g), torch.randn(2, 8, generator=g)
    stem = "lycoris_double_stream_blocks_0_block_attn1_to_v"
    state = {f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2_a": w2a, f"{stem}.lokr_w2_b": w2b, f"{stem}.alpha": torch.tensor(1.0)}
    lora = lorakit.load(state, strict=True)
    want = dict(model.state_dict())
    key = "double_stream_blocks.0.block.attn1.to_v.weight"
    want[key] = want[key] + 0.5 * torch.kron(w1, w2a @ w2b) * 0.5  # strength 0.5, alpha / rank 1 / 2
    assert check_against(model, lora, want, 0.5, _hidream_forward) == 1


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_hidream_loader_passes_kohya_and_lycoris_names_through():
    """diffusers' HiDream loader converts only files whose keys contain ``diffusion_model``: kohya / LyCORIS
    flattened names pass through unconverted and no key starts with ``transformer.``, so ``load_lora_weights``
    loads nothing. lorakit places them (test above)."""
    factors = _factors(HIDREAM_PICK[:3])
    for naming in ("kohya", "lycoris"):
        state = _file(factors, naming)
        out = diffusers.HiDreamImagePipeline.lora_state_dict(dict(state))
        assert set(out) == set(state)
        assert not any(k.startswith("transformer.") for k in out)


# -- Lumina 2 ---------------------------------------------------------------------------------------------------

def _lumina(hidden=32, heads=4, kv_heads=2, ffn=None, refiners=1):
    torch.manual_seed(0)
    model = diffusers.Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=hidden, num_layers=1, num_refiner_layers=refiners,
        num_attention_heads=heads, num_kv_heads=kv_heads, multiple_of=16, ffn_dim_multiplier=ffn,
        axes_dim_rope=(hidden // heads - 4, 2, 2), axes_lens=(32, 32, 32), cap_feat_dim=16)
    return randomise(model.eval())


def _lumina_wide():
    """The released attention widths (hidden 2304, 24 query / 8 key-value heads of 96: q 2304 rows, k and v 768)
    that diffusers' Lumina 2 converters hard-code: one main block, no refiner (the refiners' names are checked on the
    narrow model), a narrow feed-forward (64)."""
    return _lumina(hidden=2304, heads=24, kv_heads=8, ffn=0.01, refiners=0)


def _lumina_forward(model):
    g = torch.Generator().manual_seed(5)
    return model(hidden_states=torch.randn(1, 4, 4, 4, generator=g), timestep=torch.tensor([0.5]),
                 encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                 encoder_attention_mask=torch.ones(1, 3, dtype=torch.bool)).sample


def _lumina_picks(model):
    """Every layer diffusers' LoRA converter requires of each block (it pops them all), in original names, plus
    the layers it does not convert (``EXTRA``) with their sizes."""
    sd = model.state_dict()
    picks = []
    for stack in ("noise_refiner", "context_refiner", "layers"):
        b = f"{stack}.0"
        if f"{b}.attn.to_q.weight" not in sd:
            continue
        q, k, v = (sd[f"{b}.attn.to_{p}.weight"] for p in "qkv")
        picks.append((f"{b}.attention.qkv", q.shape[0] + k.shape[0] + v.shape[0], q.shape[1]))
        picks.append((f"{b}.attention.out", *sd[f"{b}.attn.to_out.0.weight"].shape))
        for i in (1, 2, 3):
            picks.append((f"{b}.feed_forward.w{i}", *sd[f"{b}.feed_forward.linear_{i}.weight"].shape))
        if stack != "context_refiner":
            picks.append((f"{b}.adaLN_modulation.1", *sd[f"{b}.norm1.linear.weight"].shape))
    return tuple(picks)


def _lumina_extra(model):
    sd = model.state_dict()
    return tuple((orig, *sd[f"{diff}.weight"].shape) for orig, diff in (
        ("x_embedder", "x_embedder"), ("cap_embedder.1", "time_caption_embed.caption_embedder.1"),
        ("t_embedder.mlp.0", "time_caption_embed.timestep_embedder.linear_1"),
        ("final_layer.adaLN_modulation.1", "norm_out.linear_1"), ("final_layer.linear", "norm_out.linear_2")))


def test_lumina2_name_map_matches_diffusers_single_file_converter():
    """Every original name converts back to the model's tensor (the fused qkv split by the model's own sizes
    here: diffusers' converter hard-codes the released 2304/768/768, pinned below)."""
    model = _lumina()
    sd = model.state_dict()
    orig = original_checkpoint(model, "lumina2")
    covered = {f"{t.module}.{p}" for a in lorakit.families.FAMILIES if a.name == "lumina2"
               for al in a.aliases("denoiser", model) for t in al.targets for p in ("weight", "bias")}
    # tensors no alias covers keep their name (ffn_norm1/2, the caption norm's RMSNorm, ...)
    orig |= {k: v for k, v in sd.items() if k not in covered and not k.startswith(("layers", "noise_refiner", "context_refiner"))
             or k.split(".", 2)[-1].startswith("ffn_norm")}
    qkv = {k: v for k, v in orig.items() if ".attention.qkv." in k}
    converted = sfu.convert_lumina2_to_diffusers({k: v for k, v in orig.items() if k not in qkv})
    missing = sorted(set(sd) - set(converted))
    assert all(".attn.to_" in k and ".to_out" not in k for k in missing) and len(missing) == 3 * 3 * 1
    assert [k for k in converted if k not in sd] == []
    assert [k for k in converted if not torch.equal(converted[k], sd[k])] == []


def test_lumina2_lora_equals_diffusers_converter():
    """ComfyUI / ai-toolkit (``diffusion_model.``) and kohya sd-scripts (``lora_unet_``) names land as diffusers'
    converter + PEFT place the ComfyUI file: fused qkv split by up rows, SwiGLU w1/w2/w3, block modulations."""
    model = _lumina_wide()
    factors = _factors(_lumina_picks(model), scale=0.05)
    want = peer_fused(model, lcu._convert_non_diffusers_lumina2_lora_to_diffusers(_file(factors, "comfyui")), 0.8)
    for naming in ("comfyui", "kohya"):
        state = _file(factors, naming)
        lora = lorakit.load(state, strict=True)
        assert lora.report.ok and set(lora.report.consumed) == set(state)
        assert detect_family(lora) == "lumina2"
        changed = check_against(model, lora, want, 0.8, _lumina_forward, atol=1e-5)
        assert changed == len(factors) + 2  # the fused qkv lands on three modules


def test_lumina2_heads_and_diffusers_names_resolve():
    """The layers diffusers' converter does not handle (embedders, final layer: pinned below) and diffusers-named
    files: lorakit places them where the single-file converter puts the weights."""
    model = _lumina()
    factors = _factors(_lumina_extra(model), seed=2)
    named = _file(factors, "comfyui")
    sd = model.state_dict()
    want = dict(sd)
    renamed = {"x_embedder": "x_embedder", "cap_embedder.1": "time_caption_embed.caption_embedder.1",
               "t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",
               "final_layer.adaLN_modulation.1": "norm_out.linear_1", "final_layer.linear": "norm_out.linear_2"}
    for orig, (down, up) in factors.items():
        key = f"{renamed[orig]}.weight"
        want[key] = sd[key] + 0.6 * (up / R) @ down
    assert check_against(model, lorakit.load(named, strict=True), want, 0.6, _lumina_forward) == len(factors)
    peft = {k.replace("diffusion_model.", "transformer.").replace(o, renamed[o]): v
            for k, v in named.items() for o in [k.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0]]}
    assert check_against(model, lorakit.load(peft, strict=True), peer_fused(model, peft, 0.6), 0.6, _lumina_forward) == 5


def test_lumina2_lokr_on_fused_qkv_is_the_full_delta_sliced():
    """A LoKr delta on the fused ``attention.qkv`` (unequal q / kv widths) cannot be split into factors: lorakit
    builds kron(w1, w2) and gives to_q, to_k, to_v their rows."""
    model = _lumina()
    g = torch.Generator().manual_seed(4)
    w1 = torch.randn(4, 2, generator=g)  # (32 + 16 + 16) / 16 x 32 / 16
    w2a, w2b = torch.randn(16, 2, generator=g), torch.randn(2, 16, generator=g)
    stem = "diffusion_model.layers.0.attention.qkv"
    state = {f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2_a": w2a, f"{stem}.lokr_w2_b": w2b, f"{stem}.alpha": torch.tensor(2.0)}
    delta = torch.kron(w1, w2a @ w2b) * (2.0 / 2)
    sd = model.state_dict()
    want = dict(sd)
    for n, (a, b) in (("to_q", (0, 32)), ("to_k", (32, 48)), ("to_v", (48, 64))):
        want[f"layers.0.attn.{n}.weight"] = sd[f"layers.0.attn.{n}.weight"] + 0.5 * delta[a:b]
    assert check_against(model, lorakit.load(state, strict=True), want, 0.5, _lumina_forward) == 3


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_lumina2_converters_hard_code_the_split_and_need_whole_blocks():
    """diffusers 0.42.1's Lumina 2 converters (1) split the fused qkv at 2304/768/768 rows whatever the model (any
    other width raises); (2) pop every layer of a block, so a LoRA on part of a block (qkv only) raises KeyError;
    (3) reject embedder / final-layer layers (ValueError: state_dict not empty); (4) kohya names are not converted
    (nothing starts with ``diffusion_model.``). lorakit reads the sizes from the model and places each layer."""
    model = _lumina()
    stem = "diffusion_model.layers.0.attention.qkv"
    part = {f"{stem}.lora_A.weight": torch.randn(R, 32), f"{stem}.lora_B.weight": torch.randn(64, R)}
    out = {k.replace("qkv", "out"): v[:32] for k, v in part.items()}
    with pytest.raises(KeyError, match="attention.qkv"):
        lcu._convert_non_diffusers_lumina2_lora_to_diffusers(dict(out))
    whole = _file(_factors(_lumina_picks(model)), "comfyui")
    with pytest.raises(RuntimeError, match="split_with_sizes|split_sizes"):
        lcu._convert_non_diffusers_lumina2_lora_to_diffusers(dict(whole))
    with pytest.raises(RuntimeError, match="split_with_sizes|split_sizes"):
        sfu.convert_lumina2_to_diffusers({"layers.0.attention.qkv.weight": torch.zeros(64, 32)})
    heads = _file(_factors(_lumina_extra(model)), "comfyui")
    with pytest.raises(ValueError, match="should be empty"):
        lcu._convert_non_diffusers_lumina2_lora_to_diffusers(dict(heads))
    kohya = _file(_factors(_lumina_picks(model)[:2]), "kohya")
    assert set(diffusers.Lumina2Pipeline.lora_state_dict(dict(kohya))) == set(kohya)
    ours = copy.deepcopy(model)
    lorakit.apply(ours, (lorakit.load(part, strict=True), 1.0), strict=True)
    changed = [k for k, v in ours.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert sorted(changed) == [f"layers.0.attn.to_{p}.weight" for p in "kqv"]


# -- Krea 2 -----------------------------------------------------------------------------------------------------

def _krea2():
    torch.manual_seed(0)
    model = diffusers.Krea2Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=3, text_num_attention_heads=2,
        text_num_key_value_heads=2, text_intermediate_size=24, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
        axes_dims_rope=(4, 2, 2))
    return randomise(model.eval())


def _krea2_forward(model):
    g = torch.Generator().manual_seed(5)
    ids = torch.zeros(4 + 9, 3)
    ids[4:, 1], ids[4:, 2] = torch.arange(9) // 3, torch.arange(9) % 3
    return model(hidden_states=torch.randn(1, 9, 16, generator=g), encoder_hidden_states=torch.randn(1, 4, 3, 16, generator=g),
                 timestep=torch.tensor([0.5]), position_ids=ids).sample


def _krea2_picks(model):
    """Every layer of the tiny model in original names, with its size."""
    from lorakit.families import FAMILIES

    family = next(f for f in FAMILIES if f.name == "krea2")
    mods = dict(model.named_modules())
    return tuple((a.name, *mods[a.targets[0].module].weight.shape) for a in family.aliases("denoiser", model)
                 if isinstance(mods[a.targets[0].module], torch.nn.Linear))


def test_krea2_name_map_matches_diffusers_single_file_converter():
    model = _krea2()
    sd = model.state_dict()
    # the original stores norms as ``.scale`` and the modulation tables as ``mod.lin`` / ``last.modulation.lin``
    norms = ("prenorm.", "postnorm.", "qnorm.", "knorm.", "txtmlp.0.", "last.norm.")
    orig = {(k[:-len("weight")] + "scale" if any(n in k for n in norms) else k): v
            for k, v in original_checkpoint(model, "krea2").items()}
    for i in range(2):
        orig[f"blocks.{i}.mod.lin"] = sd[f"transformer_blocks.{i}.scale_shift_table"].flatten()
    orig["last.modulation.lin"] = sd["final_layer.scale_shift_table"]
    converted = sfu.convert_krea2_transformer_checkpoint_to_diffusers(dict(orig))
    assert set(converted) == set(sd)
    assert [k for k in sd if not torch.equal(converted[k], sd[k])] == []


@pytest.mark.parametrize("naming", ["comfyui", "aitoolkit", "kohya"])
def test_krea2_lora_equals_diffusers_converter(naming):
    """The reference trainer / ComfyUI (``diffusion_model.``), ai-toolkit (``base_model.model.``) and kohya
    (``lora_unet_``) names land as diffusers' converter + PEFT place the ComfyUI file, every layer of the model."""
    model = _krea2()
    factors = _factors(_krea2_picks(model))
    if naming == "aitoolkit":
        state = {k.replace("diffusion_model.", "base_model.model."): v for k, v in _file(factors, "comfyui").items()}
    else:
        state = _file(factors, naming)
    lora = lorakit.load(state, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(state)
    assert detect_family(lora) == "krea2"
    want = peer_fused(model, lcu._convert_non_diffusers_krea2_lora_to_diffusers(_file(factors, "comfyui")), 0.7)
    assert check_against(model, lora, want, 0.7, _krea2_forward, atol=1e-5) == len(factors)


@pinned_peer("diffusers", "0.42.1")
def test_diffusers_krea2_loader_skips_kohya_and_rejects_alphas():
    """diffusers 0.42.1's Krea 2 loader converts only ``diffusion_model.`` / ``base_model.model.`` files with
    ``lora_A``/``lora_B`` keys: (1) kohya ``lora_unet_`` files (the InvokeAI fixture's naming) pass through
    unconverted and load nothing; (2) a ComfyUI file that keeps its ``alpha`` (or ``lora_down``/``lora_up``)
    raises ValueError. lorakit places both (above)."""
    model = _krea2()
    factors = _factors(_krea2_picks(model)[:2])
    kohya = _file(factors, "kohya")
    out = diffusers.Krea2Pipeline.lora_state_dict(dict(kohya))
    assert set(out) == set(kohya) and not any(k.startswith("transformer.") for k in out)
    with_alpha = {k.replace("lora_unet_blocks_0_attn_", "diffusion_model.blocks.0.attn."): v for k, v in kohya.items()}
    with pytest.raises(ValueError, match="should be empty"):
        lcu._convert_non_diffusers_krea2_lora_to_diffusers(dict(with_alpha))
    ours = copy.deepcopy(model)
    lorakit.apply(ours, (lorakit.load(with_alpha, strict=True), 1.0), strict=True)
    assert sum(not torch.equal(v, model.state_dict()[k]) for k, v in ours.state_dict().items()) == 2
