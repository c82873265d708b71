"""``save(format="kohya")`` / ``convert --to kohya`` write the names kohya's trainers write for the family (issue 17
§4): FLUX.1 in sd-scripts' BFL names with fused ``img_attn_qkv`` / ``linear1`` (down stacked along the rank, up
block-diagonal, as sd-scripts' ``networks/convert_flux_lora.py`` fuses them), SDXL in SGM names, SD 1.x in the
diffusers names flattened (``lora_te_text_model_...``), Wan in musubi-tuner's (``lora_unet_blocks_0_self_attn_q``);
always with ``.alpha``. Each converted file reads back as format ``kohya`` and fuses to the same weights as its
source through ``lorakit.apply`` (rtol 1e-6), and diffusers' own loader reads the FLUX and Wan files to the same
weights. Non-vacuity: every comparison also asserts the LoRA moved the weights.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

import lorakit

pytest.importorskip("diffusers")

RANK = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pair(m: torch.nn.Module, g: torch.Generator, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rank, m.in_features, generator=g) * 0.1, torch.randn(m.out_features, rank, generator=g) * 0.1


def _linears(root: torch.nn.Module, suffixes: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[str]:
    return [n for n, m in root.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(suffixes)
            and not any(s in n for s in skip)]


def peft_file(path: Path, parts: dict[str, torch.nn.Module], names: dict[str, list[str]], seed: int = 0,
              metadata: dict[str, str] | None = None) -> Path:
    """A diffusers/PEFT file: ``<prefix>.<module>.lora_A/B.weight`` for ``names[prefix]`` of ``parts[prefix]``."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, modules in names.items():
        mods = dict(parts[prefix].named_modules())
        for name in modules:
            a, b = _pair(mods[name], g)
            state[f"{prefix}.{name}.lora_A.weight"], state[f"{prefix}.{name}.lora_B.weight"] = a, b
    save_file(state, str(path), metadata=metadata)
    return path


def keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return sorted(f.keys())


def layers(path: Path) -> set[str]:
    return {k.split(".", 1)[0] for k in keys(path)}


def fused(target, path: Path) -> dict[str, torch.Tensor]:
    """The weights of ``target`` with the LoRA at ``path`` fused by lorakit (restored afterwards)."""
    with lorakit.apply(target, str(path), mode="fuse", strict=True):
        return {k: v.detach().clone() for k, v in _state(target).items()}


def _state(target) -> dict[str, torch.Tensor]:
    if isinstance(target, torch.nn.Module):
        return target.state_dict()
    return {f"{c}.{k}": v for c in ("unet", "transformer", "text_encoder") if getattr(target, c, None) is not None
            for k, v in getattr(target, c).state_dict().items()}


def assert_same_fused(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], base: dict[str, torch.Tensor]):
    moved = 0
    for k, w in want.items():
        delta_w, delta_g = w - base[k], got[k] - base[k]
        scale = float(delta_w.abs().max())
        torch.testing.assert_close(delta_g, delta_w, rtol=1e-6, atol=1e-6 * max(scale, 1e-12), msg=k)
        moved += scale > 1e-4
    assert moved > 0, "the LoRA changed no weight: the comparison is vacuous"
    return moved


def convert(src: Path, dst: Path, model=None) -> lorakit.LoRA:
    lorakit.save(lorakit.load(str(src)), str(dst), format="kohya", model=model)
    back = lorakit.load(str(dst))
    assert back.format == "kohya"
    assert back.report.ok, back.report.problems()
    alphas = {k.rsplit(".", 1)[0] for k in keys(dst) if k.endswith(".alpha")}
    assert alphas == {k.split(".", 1)[0] for k in keys(dst) if ".lora_down." in k}, "every LoRA layer has .alpha"
    return back


# -- FLUX.1 ---------------------------------------------------------------------------------------------------

FLUX_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out")
FLUX_MORE = ("ff.net.0.proj", "ff_context.net.2", "norm1.linear", "norm.linear", "proj_out", "x_embedder",
             "context_embedder", "time_text_embed.timestep_embedder.linear_1", "norm_out.linear")


@pytest.fixture(scope="module")
def flux():
    return lorakit.tiny_pipeline("flux", seed=0)


def test_flux_peft_file_gets_sd_scripts_names_and_the_same_weights(flux, tmp_path):
    tr = flux.transformer
    # single block 0 also has proj_mlp (linear1 complete), block 1 not (proj_mlp rows are zero)
    names = _linears(tr, FLUX_ATTN + FLUX_MORE, skip=("single_transformer_blocks.1.proj_mlp",))
    names.append("single_transformer_blocks.0.proj_mlp")
    src = peft_file(tmp_path / "flux.safetensors", {"transformer": tr}, {"transformer": names})
    dst = tmp_path / "flux-kohya.safetensors"
    convert(src, dst, model=flux)
    got = layers(dst)
    for name in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_1_txt_attn_qkv",
                 "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_txt_attn_proj",
                 "lora_unet_double_blocks_0_img_mlp_0", "lora_unet_double_blocks_0_txt_mlp_2",
                 "lora_unet_double_blocks_0_img_mod_lin", "lora_unet_single_blocks_0_linear1",
                 "lora_unet_single_blocks_1_linear1", "lora_unet_single_blocks_0_linear2",
                 "lora_unet_single_blocks_0_modulation_lin", "lora_unet_img_in", "lora_unet_txt_in",
                 "lora_unet_time_in_in_layer", "lora_unet_final_layer_linear",
                 "lora_unet_final_layer_adaLN_modulation_1"):
        assert name in got, name
    assert not any(n.startswith(("lora_transformer_", "transformer")) for n in got)
    with safe_open(str(dst), "pt") as f:
        # sd-scripts' layout: down [3r, in], up [3 * inner, 3r] block-diagonal, alpha = the rank (scale 1 as the source)
        down, up = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"), \
            f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight")
        inner = tr.transformer_blocks[0].attn.to_q.out_features
        assert down.shape == (3 * RANK, tr.transformer_blocks[0].attn.to_q.in_features)
        assert up.shape == (3 * inner, 3 * RANK)
        assert not up[:inner, RANK:].any() and not up[inner:2 * inner, :RANK].any()
        assert float(f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.alpha")) == 3 * RANK
        mlp = tr.single_transformer_blocks[1].proj_mlp.out_features
        assert f.get_tensor("lora_unet_single_blocks_1_linear1.lora_up.weight").shape == (3 * inner + mlp, 3 * RANK)
        assert f.get_tensor("lora_unet_single_blocks_0_linear1.lora_up.weight").shape == (3 * inner + mlp, 4 * RANK)
    base = {k: v.clone() for k, v in tr.state_dict().items()}
    assert_same_fused(fused(tr, dst), fused(tr, src), base)


def test_flux_differing_alphas_are_folded_into_up(flux, tmp_path):
    """A OneTrainer-style file (``lora_transformer_`` + diffusers names, lorakit's old kohya output) whose q, k, v
    have different alpha/rank: one alpha is written for the fused qkv, the other ratios go into their up rows."""
    tr = flux.transformer
    g = torch.Generator().manual_seed(1)
    state = {}
    for proj, alpha in (("to_q", 4.0), ("to_k", 8.0), ("to_v", 2.0)):
        a, b = _pair(dict(tr.named_modules())[f"transformer_blocks.0.attn.{proj}"], g)
        key = f"lora_transformer_transformer_blocks_0_attn_{proj}"
        state |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(alpha)}
    src, dst = tmp_path / "ot.safetensors", tmp_path / "k.safetensors"
    save_file(state, str(src))
    convert(src, dst, model=flux)
    assert layers(dst) == {"lora_unet_double_blocks_0_img_attn_qkv"}
    with safe_open(str(dst), "pt") as f:
        assert float(f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.alpha")) == 3 * RANK  # q's ratio, 1
    base = {k: v.clone() for k, v in tr.state_dict().items()}
    assert assert_same_fused(fused(tr, dst), fused(tr, src), base) == 3


def test_diffusers_reads_the_flux_file_to_the_same_weights(tmp_path):
    """diffusers' kohya FLUX converter splits ``linear1`` with FLUX.1's sizes written in, so the tiny pipeline takes
    a file without single-block q/k/v (fused double-block qkv, linear2, final layer); FLUX.1-size ``linear1`` is
    checked on diffusers' converted state dict below. The final layer is left out: diffusers' converter writes
    ``final_layer`` keys without the ``transformer.`` prefix, and its loader then drops them."""
    pipe = lorakit.tiny_pipeline("flux", seed=0)
    tr = pipe.transformer
    names = _linears(tr, FLUX_ATTN + ("ff.net.0.proj", "norm1.linear", "proj_out"),
                     skip=("single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"))
    names.remove("proj_out")  # final_layer: diffusers 0.42.1 drops it (its converter forgets "transformer.")
    src = peft_file(tmp_path / "flux.safetensors", {"transformer": tr}, {"transformer": names}, seed=2)
    dst = tmp_path / "flux-kohya.safetensors"
    convert(src, dst, model=pipe)
    assert "lora_unet_single_blocks_0_linear2" in layers(dst)
    base = {k: v.clone() for k, v in tr.state_dict().items()}
    want = fused(tr, src)
    pipe.load_lora_weights(str(dst))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert_same_fused(tr.state_dict(), want, base)


def test_diffusers_splits_flux1_size_linear1_back_exactly(tmp_path):
    """At FLUX.1's sizes (the meta-device model of ``--model flux1``), diffusers' converter reads the fused
    ``linear1`` / ``img_attn_qkv`` back into the source's deltas."""
    from diffusers import FluxPipeline

    from lorakit.families.offline import meta_components

    meta = meta_components("flux1", ("denoiser",))["denoiser"]
    g = torch.Generator().manual_seed(3)
    mods = dict(meta.named_modules())
    state = {}
    picks = [f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")]
    picks += [f"single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    for name in picks:
        a, b = _pair(mods[name], g)
        state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"] = a, b
    src, dst = tmp_path / "flux1.safetensors", tmp_path / "flux1-kohya.safetensors"
    save_file(state, str(src))
    convert(src, dst, model="flux1")
    assert layers(dst) == {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"}
    converted = FluxPipeline.lora_state_dict(str(dst))
    converted = converted[0] if isinstance(converted, tuple) else converted
    for name in picks:
        a, b = state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"]
        ca, cb = converted[f"transformer.{name}.lora_A.weight"], converted[f"transformer.{name}.lora_B.weight"]
        want = b @ a
        err = float((cb.float() @ ca.float() - want).abs().max())  # (assert_close takes seconds at this size)
        assert 0 < float(want.abs().max()) and err <= 1e-6 * float(want.abs().max()), (name, err)


# -- SDXL / SD 1.x -----------------------------------------------------------------------------------------------

UNET = ("attn1.to_q", "attn1.to_k", "attn2.to_v", "attn2.to_out.0", "proj_in", "ff.net.2")


def test_sdxl_gets_sgm_names(tmp_path):
    pipe = lorakit.tiny_pipeline("sdxl", seed=0)
    unet = pipe.unet
    names = _linears(unet, UNET) + ["down_blocks.0.resnets.0.time_emb_proj"]
    src = peft_file(tmp_path / "sdxl.safetensors", {"unet": unet}, {"unet": names}, seed=4)
    dst = tmp_path / "sdxl-kohya.safetensors"
    convert(src, dst, model=pipe)
    got = layers(dst)
    sgm = {alias: t[0].module for alias, t in _sgm_aliases(unet).items()}
    # every layer is named by its SGM alias, e.g. lora_unet_input_blocks_N_1_transformer_blocks_0_attn1_to_q
    assert got == {"lora_unet_" + alias.replace(".", "_") for alias, module in sgm.items() if module in names}
    assert any(n.startswith("lora_unet_input_blocks_") and n.endswith("_1_transformer_blocks_0_attn1_to_q") for n in got)
    assert any(n.startswith("lora_unet_middle_block_1_transformer_blocks_") for n in got)
    assert any(n.startswith("lora_unet_output_blocks_") for n in got)
    assert "lora_unet_input_blocks_1_0_emb_layers_1" in got  # a resnet's time_emb_proj in SGM names
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    assert_same_fused(fused(unet, dst), fused(unet, src), base)


def _sgm_aliases(unet) -> dict:
    from lorakit.families.base import Alias
    from lorakit.families.sdxl import SDXL

    return {a.name: a.targets for a in map(Alias.of, SDXL().aliases("denoiser", unet))}


def test_sdxl_without_a_fitting_model_keeps_diffusers_names(tmp_path):
    """Without a model, the published SDXL UNet gives the SGM numbers; a LoRA whose shapes do not fit it (here the
    tiny UNet's) would get wrong numbers, so diffusers names are written, with a warning."""
    unet = lorakit.tiny_pipeline("sdxl", seed=0).unet
    names = [n for n in _linears(unet, UNET) if n.startswith("down_blocks.1.")]
    src = peft_file(tmp_path / "sdxl.safetensors", {"unet": unet}, {"unet": names}, seed=5,
                    metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    dst = tmp_path / "sdxl-kohya.safetensors"
    with pytest.warns(UserWarning, match="does not fit any published sdxl model"):
        convert(src, dst)
    assert layers(dst) == {"lora_unet_" + n.replace(".", "_") for n in names}


def test_sd1_gets_flattened_diffusers_names_with_text_model(tmp_path):
    pipe = lorakit.tiny_pipeline("sd1", seed=0)
    te = ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1")
    names = {"unet": _linears(pipe.unet, UNET), "text_encoder": _linears(pipe.text_encoder, te)}
    src = peft_file(tmp_path / "sd1.safetensors", {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, names,
                    seed=6)
    dst = tmp_path / "sd1-kohya.safetensors"
    convert(src, dst, model=pipe)
    got = layers(dst)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in got
    assert any(n.startswith("lora_unet_up_blocks_") for n in got)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in got
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in got
    assert all(n.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_",
                             "lora_te_text_model_")) for n in got)
    base = {k: v.clone() for k, v in _state(pipe).items()}
    assert_same_fused(fused(pipe, dst), fused(pipe, src), base)


def _old_diffusers(path: Path, unet) -> Path:
    """An attention-processor file (diffusers <= 0.16): ``<attention>.processor.to_k_lora.down.weight``."""
    g = torch.Generator().manual_seed(7)
    mods = dict(unet.named_modules())
    state = {}
    for name in _linears(unet, ("attn1.to_k", "attn2.to_out.0")):
        head, tail = name.rsplit(".attn", 1)  # "1.to_k" / "2.to_out.0"
        n, proj = tail.split(".", 1)
        old = f"{head}.attn{n}.processor.{proj.removesuffix('.0')}"
        a, b = _pair(mods[name], g)
        state[f"{old}_lora.down.weight"], state[f"{old}_lora.up.weight"] = a, b
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("how", ["model", "cli-sd15", "none"])
def test_old_diffusers_attention_processor_file_gets_kohya_names(how, tmp_path):
    pipe = lorakit.tiny_pipeline("sd1", seed=0)
    src, dst = _old_diffusers(tmp_path / "old.safetensors", pipe.unet), tmp_path / "old-kohya.safetensors"
    assert any(".processor.to_k_lora.down.weight" in k for k in keys(src))
    if how == "cli-sd15":
        from lorakit.cli import cli

        result = CliRunner().invoke(cli, ["convert", str(src), str(dst), "--to", "kohya", "--model", "sd15"])
        assert result.exit_code == 0, result.output
    else:
        lorakit.save(lorakit.load(str(src)), str(dst), format="kohya", model=pipe if how == "model" else None)
    back = lorakit.load(str(dst))
    assert back.format == "kohya" and back.report.ok
    got = layers(dst)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k" in got
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0" in got
    assert all(n.startswith("lora_unet_") and "processor" not in n for n in got)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    assert_same_fused(fused(pipe.unet, dst), fused(pipe.unet, src), base)


# -- Wan (musubi-tuner) -----------------------------------------------------------------------------------------

# diffusers' musubi Wan converter wants all of q, k, v, o of an attention when it has one of them
WAN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
       "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def test_wan_gets_musubi_names_that_diffusers_reads(tmp_path):
    pipe = lorakit.tiny_pipeline("wan-t2v", seed=0)
    tr = pipe.transformer
    names = _linears(tr, WAN)
    src = peft_file(tmp_path / "wan.safetensors", {"transformer": tr}, {"transformer": names}, seed=8,
                    metadata={"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": 8})})
    dst = tmp_path / "wan-kohya.safetensors"
    convert(src, dst, model=pipe)
    got = layers(dst)
    for name in ("lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_0_self_attn_k", "lora_unet_blocks_0_self_attn_o",
                 "lora_unet_blocks_1_cross_attn_q", "lora_unet_blocks_0_cross_attn_o", "lora_unet_blocks_0_ffn_0",
                 "lora_unet_blocks_1_ffn_2"):
        assert name in got, name
    assert len(got) == len(names) and all(n.startswith("lora_unet_blocks_") for n in got)
    with safe_open(str(dst), "pt") as f:
        assert float(f.get_tensor("lora_unet_blocks_0_self_attn_q.alpha")) == 8.0
    base = {k: v.clone() for k, v in tr.state_dict().items()}
    want = fused(tr, src)
    assert_same_fused(fused(tr, dst), want, base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(dst))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert_same_fused(tr.state_dict(), want, base)


def test_unknown_family_keeps_the_file_names(tmp_path):
    """No model and no family: the names are the file's own, flattened (the behaviour before family names)."""
    lin = torch.nn.Linear(8, 8)
    src = peft_file(tmp_path / "x.safetensors", {"transformer": torch.nn.ModuleDict({"foo": lin})},
                    {"transformer": ["foo"]})
    dst = tmp_path / "x-kohya.safetensors"
    lorakit.save(lorakit.load(str(src)), str(dst), format="kohya")
    assert layers(dst) == {"lora_transformer_foo"}
    assert "lora_transformer_foo.alpha" in keys(dst)


@pytest.mark.parametrize(("family", "variant", "module", "want"), [
    ("cosmos", "cosmos", "transformer_blocks.0.attn1.to_q", "lora_unet_blocks_0_self_attn_q_proj"),
    ("sd3", "sd3", "transformer_blocks.0.attn.to_q", "lora_unet_joint_blocks_0_x_block_attn_qkv"),
    # no model: the published Wan that fits (1.3B here, not the default 14B) names the modules
    ("wan", None, "blocks.29.attn2.to_out.0", "lora_unet_blocks_29_cross_attn_o"),
])
def test_other_families_write_original_names(family, variant, module, want, tmp_path):
    """Families with original names in lorakit's tables write them (docs/families.md lists which)."""
    from lorakit.families.offline import meta_components

    meta = meta_components(variant or "wan2.1-t2v-1.3b", ("denoiser",))["denoiser"]
    a = torch.zeros(RANK, meta.get_submodule(module).in_features)
    b = torch.zeros(meta.get_submodule(module).out_features, RANK)
    a[0, 0] = b[0, 0] = 1.0
    src, dst = tmp_path / f"{family}.safetensors", tmp_path / f"{family}-kohya.safetensors"
    save_file({f"transformer.{module}.lora_A.weight": a, f"transformer.{module}.lora_B.weight": b}, str(src))
    convert(src, dst, model=variant)
    assert layers(dst) == {want}


def test_converting_leaves_the_model_untouched(tmp_path):
    """Converting never touches the model it names modules from (a live pipeline stays bit-identical)."""
    pipe = lorakit.tiny_pipeline("flux", seed=0)
    before = copy.deepcopy(pipe.transformer.state_dict())
    names = _linears(pipe.transformer, ("attn.to_q", "attn.to_k"))
    src = peft_file(tmp_path / "f.safetensors", {"transformer": pipe.transformer}, {"transformer": names})
    convert(src, tmp_path / "k.safetensors", model=pipe)
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in before.items())
