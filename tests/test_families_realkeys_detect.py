"""Detection is exact on every real key list in ``tests/fixtures/realkeys`` (a confusion table), and every layer
of the wave-2 lists lands on its family's released model (meta device) or is reported with a reason.

A fixture's family is the prefix of its file name (``hidream_…``, ``qwen-image_…``); ``detect_family`` must return
it, or ``None`` where the names and shapes are truly ambiguous (listed in ``AMBIGUOUS`` with the reason), never
another family. Lists whose source gave no shapes are detected from their names alone.
"""

from __future__ import annotations

import dataclasses
import glob
import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.families import FAMILIES, detect_family, family_candidates
from lorakit.families.detect import FileEvidence

pytest.importorskip("diffusers")

_DIR = Path(__file__).parent / "fixtures" / "realkeys"
#: top-level lists (every test of the repository reads them) and ``extra/`` lists (see its README: lists other
#: tests cannot read as they are)
REALKEYS = sorted(glob.glob(str(_DIR / "*.json"))) + sorted(glob.glob(str(_DIR / "extra" / "*.json")))
FAMILY_NAMES = {f.name for f in FAMILIES}

#: fixture stem -> why its names and shapes cannot tell its family (detect_family must say None)
AMBIGUOUS = {
    "qwen-image_dotted__invokeai_fixture":
        "attention-only diffusers names (transformer_blocks.N.attn.to_q/to_k) at width 3072 over blocks 0-1: FLUX.1, "
        "HunyuanVideo and Qwen-Image all have these modules with these shapes (SD3's widths are 1536/2432), and "
        "FLUX.1 and Qwen-Image files are equally common (equal priors)",
    "flux2_bfl_lokr__diffusers_issue13261":
        "FLUX.2-klein-9B LoKr in bare BFL names (double_blocks 3-4, single_blocks 10-16) from a log, no shapes: every "
        "name is FLUX.1's too and lands on both released models; with names only, no prior decides",
    "sd3_lora_transformer_kohya__comfyui_issue3701":
        "SD3-Medium attention-only names (lora_transformer_transformer_blocks_13/22_attn_*) from a log, no shapes: "
        "Qwen-Image has the same modules and 60 blocks, so both land every layer (FLUX.1 and HunyuanVideo lack block "
        "22). With its real shapes (1536 wide) SD3-Medium is the only fit (test_confusion_table_sd3_diffusers_file_"
        "is_not_flux)",
}
#: fixture stem -> layers that do not land with fitting shapes on the released model, and why
MISFIT = {
    "qwen-image_kohya_lokr__invokeai_fixture":
        "lokr_w1 [out, 16] and lokr_w2 [16, in] are a low-rank pair written under LoKr names: their Kronecker "
        "product would be [16 out, 16 in], which fits no module (the fixture is synthetic)",
}


#: fixture stem -> the released variant its layers land on, where that is not the family's default
VARIANT = {
    # Wan 2.1 I2V LoRAs: the image cross-attention (k_img, v_img, norm_k_img) exists in the I2V 14B model only
    "wan_comfy_kohya_diff__wanvideowrapper_issue1862": "wan2.1-i2v-14b",
    "wan_comfy_peft_alpha__wanvideowrapper_issue445": "wan2.1-i2v-14b",
}


#: fixture stem -> why detect_family gets it wrong today (a strict xfail: it fails loudly once fixed); empty now
KNOWN_WRONG: dict[str, str] = {}


def _param(path: str):
    stem = Path(path).stem
    marks = [pytest.mark.xfail(strict=True, reason=KNOWN_WRONG[stem])] if stem in KNOWN_WRONG else []
    return pytest.param(path, id=stem[:48], marks=marks)


def _family_of(path: str) -> str:
    return Path(path).stem.split("_", 1)[0]


def _generic_shape(key: str) -> list[int]:
    """A stand-in shape for a key whose source gave none (detection then reads names only)."""
    if key.endswith(".alpha"):
        return []
    if key.endswith(".dora_scale"):
        return [16, 1]
    if "lokr_w" in key:
        return [4, 4]
    return [4, 16] if ("down" in key or "lora_A" in key) else [16, 4]


def _load(path: str):
    data = json.loads(Path(path).read_text())
    keys = data["keys"]
    shaped = all(v is not None for v in keys.values())
    # real shapes at no memory or time: zero-stride integer views carry the shape without storage, and the
    # loader's finiteness check (floating tensors only) does not sweep them
    state = {}
    for k, v in keys.items():
        shape = v if v is not None else _generic_shape(k)
        state[k] = torch.zeros((), dtype=torch.int8).expand(shape) if shape else torch.tensor(1.0)
    return lorakit.load(state), shaped


def _evidence(lora, shaped: bool) -> FileEvidence:
    ev = FileEvidence.of(lora)
    return ev if shaped else dataclasses.replace(ev, shapes={}, text_widths={})


def test_every_fixture_names_a_registered_family():
    assert REALKEYS
    assert {_family_of(p) for p in REALKEYS} <= FAMILY_NAMES


@pytest.mark.parametrize("fixture", [_param(p) for p in REALKEYS])
def test_detect_family_on_real_key_lists(fixture):
    lora, shaped = _load(fixture)
    ev = _evidence(lora, shaped)
    got = detect_family(ev)
    stem = Path(fixture).stem
    cands = [c.to_dict() for c in family_candidates(ev)[:3]]
    if stem in AMBIGUOUS:
        assert got is None, (got, cands)
        return
    assert got == _family_of(fixture), (got, cands)


def _pair(g, stem, rows, cols, naming="peft"):
    down, up = torch.randn(2, cols, generator=g), torch.randn(rows, 2, generator=g)
    if naming == "kohya":
        return {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
    return {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up}


def test_confusion_table_hunyuanvideo_files_are_not_flux():
    """HunyuanVideo's original names (``img_attn_qkv``, ``individual_token_refiner``) and musubi's flattened ones
    over the 20 + 40 blocks FLUX.1 (19 + 38) lacks share FLUX.1's block vocabulary; neither is detected as FLUX.1."""
    g = torch.Generator().manual_seed(0)
    hunyuan = {**_pair(g, "diffusion_model.double_blocks.0.img_attn_qkv", 9216, 3072),
               **_pair(g, "diffusion_model.double_blocks.0.img_attn_proj", 3072, 3072),
               **_pair(g, "diffusion_model.single_blocks.0.linear2", 3072, 15360),
               **_pair(g, "diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn_qkv", 9216, 3072)}
    assert detect_family(lorakit.load(hunyuan)) == "hunyuanvideo"
    musubi = {}
    for i in (0, 19):
        musubi |= _pair(g, f"lora_unet_double_blocks_{i}_img_attn_qkv", 9216, 3072, "kohya")
    for i in (0, 39):
        musubi |= _pair(g, f"lora_unet_single_blocks_{i}_linear1", 3 * 3072 + 12288, 3072, "kohya")
    assert detect_family(lorakit.load(musubi)) == "hunyuanvideo"


def test_confusion_table_flux2_bfl_names_are_not_flux1():
    """ai-toolkit and ComfyUI write FLUX.2 LoRAs in BFL names FLUX.1 shares (``diffusion_model.double_blocks.N
    .img_attn.qkv``); with FLUX.2-dev's shapes (6144 wide, single block 47) the file is FLUX.2, with FLUX.1's it
    stays FLUX.1."""
    g = torch.Generator().manual_seed(0)
    flux2 = {}
    for i in (0, 7):
        flux2 |= _pair(g, f"diffusion_model.double_blocks.{i}.img_attn.qkv", 3 * 6144, 6144)
        flux2 |= _pair(g, f"diffusion_model.double_blocks.{i}.img_mlp.0", 2 * 18432, 6144)
    for i in (0, 47):
        flux2 |= _pair(g, f"diffusion_model.single_blocks.{i}.linear2", 6144, 6144 + 18432)
    lora = lorakit.load(flux2)
    assert detect_family(lora) == "flux2", [c.to_dict() for c in family_candidates(lora)]
    flux1 = {}
    for i in (0, 7):
        flux1 |= _pair(g, f"diffusion_model.double_blocks.{i}.img_attn.qkv", 3 * 3072, 3072)
        flux1 |= _pair(g, f"diffusion_model.double_blocks.{i}.img_mlp.0", 4 * 3072, 3072)
    for i in (0, 37):
        flux1 |= _pair(g, f"diffusion_model.single_blocks.{i}.linear2", 3072, 3072 + 4 * 3072)
    lora = lorakit.load(flux1)
    assert detect_family(lora) == "flux1", [c.to_dict() for c in family_candidates(lora)]


def test_confusion_table_sd3_diffusers_file_is_not_flux():
    """SD3.5-large in diffusers names (``transformer.transformer_blocks.N.attn.to_q``, ``ff_context``): FLUX.1's
    names, SD3's widths (2432) and 38 blocks: SD3.5 Large's released model is the one it fits, so it is sd3."""
    g = torch.Generator().manual_seed(0)
    sd3 = {}
    for i in (0, 37):
        sd3 |= _pair(g, f"transformer.transformer_blocks.{i}.attn.to_q", 2432, 2432)
        sd3 |= _pair(g, f"transformer.transformer_blocks.{i}.attn.add_k_proj", 2432, 2432)
        sd3 |= _pair(g, f"transformer.transformer_blocks.{i}.ff_context.net.0.proj", 4 * 2432, 2432)
    lora = lorakit.load(sd3)
    assert detect_family(lora) == "sd3", [c.to_dict() for c in family_candidates(lora)]


def test_lumina2_and_z_image_tell_apart_by_modulation_and_width():
    """Both are NextDiT with the same original block names: the block modulation (``adaLN_modulation.1`` Lumina 2,
    ``.0`` Z-Image) decides, and for attention-only files the released widths (2304 vs 3840)."""
    g = torch.Generator().manual_seed(1)

    def kohya(stem, rows, cols):
        return {f"lora_unet_{stem}.lora_down.weight": torch.randn(2, cols, generator=g),
                f"lora_unet_{stem}.lora_up.weight": torch.randn(rows, 2, generator=g)}

    lumina = {**kohya("layers_0_attention_qkv", 2304 + 2 * 768, 2304), **kohya("layers_25_attention_out", 2304, 2304)}
    zimage = {**kohya("layers_0_attention_qkv", 3 * 3840, 3840), **kohya("layers_29_attention_out", 3840, 3840)}
    assert detect_family(lorakit.load(lumina)) == "lumina2"
    assert detect_family(lorakit.load(zimage)) == "z-image"
    assert detect_family(lorakit.load({**lumina, **kohya("layers_0_adaLN_modulation_1", 4 * 2304, 1024)})) == "lumina2"
    assert detect_family(lorakit.load({**zimage, **kohya("layers_0_adaLN_modulation_0", 4 * 3840, 256)})) == "z-image"
    # toy widths fit neither release: names alone cannot tell
    toy = {**kohya("layers_0_attention_qkv", 48, 16), **kohya("layers_0_attention_out", 16, 16)}
    assert detect_family(lorakit.load(toy)) is None


WAVE2 = [p for p in REALKEYS if _family_of(p) != "flux1"]  # FLUX.1 lists: tests/test_families_flux.py


@pytest.mark.parametrize("fixture", WAVE2, ids=lambda p: Path(p).stem[:48])
def test_every_layer_lands_on_the_released_model(fixture):
    from lorakit.families import Resolver
    from lorakit.families.offline import meta_components

    lora, shaped = _load(fixture)
    stem = Path(fixture).stem
    resolver = Resolver(meta_components(VARIANT.get(stem, _family_of(fixture)), ("denoiser",)))
    res = resolver.resolve(lora)
    assert res.unmatched == [], sorted(layer.name for layer in res.unmatched)[:5]
    assert len(res.matched) == len(lora.layers) > 0
    if not shaped:
        return  # the source gave no shapes: the names land, widths cannot be checked
    mods = resolver.index.modules["denoiser"]
    misfit = []
    for layer, targets in res.matched:
        w = layer.weight
        rows = sum((t.src_rows[1] - t.src_rows[0]) if t.src_rows else mods[t.module].weight.shape[0] for t in targets)
        cols = mods[targets[0].module].weight.shape[1]
        shape = _delta_shape(w)
        if shape != (rows, cols):
            misfit.append(layer.path)
    if stem in MISFIT:
        assert misfit, f"{stem} is listed as a misfit ({MISFIT[stem]}) but every layer fits now"
    else:
        assert misfit == [], misfit[:5]


def _delta_shape(w) -> tuple[int, int] | None:
    if w.kind == "lora":
        return int(w.up.shape[0]), int(w.down.shape[1])
    if w.kind == "lokr":
        return w.out_features(), int(w.w1().shape[1] * w.w2().shape[1])
    return None


def test_z_image_dot_spelled_file_pairs_its_alphas():
    """Alphas under underscore names (``layers.1.attention.to_v.alpha``) join their dot-spelled layers
    (``layers.1.attention.to.v.lora.down.weight``): none is reported invalid, each layer carries its alpha."""
    path = _DIR / "extra" / "z-image_dotted__diffusers_issue13203.json"
    lora, _ = _load(str(path))
    keys = json.loads(path.read_text())["keys"]
    # the quoted log ends inside layers.21.attention.to_out.0 (its lora.up is cut off): that module alone is
    # incomplete, which the report says; every other key loads
    cut = "layers.21.attention.to_out.0"
    assert set(lora.report.invalid) == {f"{cut}.alpha", f"{cut}.lora.down.weight"}, lora.report.problems()
    assert "missing up" in lora.report.invalid[f"{cut}.alpha"]
    layers = {layer.name: layer for layer in lora}
    alphas = [k for k in keys if k.endswith(".alpha") and not k.startswith(cut + ".")]
    assert alphas
    for key in alphas:
        stem = key[: -len(".alpha")]
        home = stem if stem in layers else stem.replace("_", ".")
        assert layers[home].alpha == 1.0 and key in layers[home].keys, key
