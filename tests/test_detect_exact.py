"""Detection is exact where names tie: SD3 in diffusers names is told from FLUX.1 by the released widths, an
attention-only Qwen-Image file is told from FLUX.1 by its block indices (or is ``None`` when nothing can tell), a
FLUX.1 file covering every double block stays FLUX.1; ``inspect`` shows the candidates when it is unsure; and the
Z-Image dot-spelled files' underscore alphas scale their layers.

Key lists only (zero-stride views carry the released shapes without memory), except the alpha test, which applies
to a tiny Z-Image transformer.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.families import detect_family, family_candidates

pytest.importorskip("diffusers")


def _shaped(layers: dict[str, tuple[int, int]], rank: int = 4) -> dict[str, torch.Tensor]:
    """A PEFT file of ``{module path: (out, in)}`` at the real sizes, as storage-free views."""
    z = torch.zeros((), dtype=torch.int8)
    out = {}
    for path, (rows, cols) in layers.items():
        out[f"{path}.lora_A.weight"] = z.expand(rank, cols)
        out[f"{path}.lora_B.weight"] = z.expand(rows, rank)
    return out


def _joint(blocks, width: int, names=("attn.to_q", "attn.to_k", "attn.add_q_proj", "attn.to_out.0"),
           prefix: str = "transformer.") -> dict[str, tuple[int, int]]:
    return {f"{prefix}transformer_blocks.{i}.{n}": (width, width) for i in blocks for n in names}


def _cands(state) -> list[dict]:
    return [c.to_dict() for c in family_candidates(lorakit.load(state))[:4]]


@pytest.mark.parametrize("width, blocks", [(1536, range(24)), (1536, (0, 5)), (2432, (0, 37))],
                         ids=["sd3-medium-all", "sd3-medium-partial", "sd3.5-large"])
def test_sd3_diffusers_names_are_sd3(width, blocks):
    """SD3's diffusers names are FLUX.1's (joint attention, ff, norm1.linear): SD3's widths decide."""
    layers = _joint(blocks, width)
    for i in blocks:
        layers[f"transformer.transformer_blocks.{i}.ff.net.0.proj"] = (4 * width, width)
        layers[f"transformer.transformer_blocks.{i}.norm1.linear"] = (6 * width, width)
    layers["transformer.context_embedder"] = (width, 4096)
    state = _shaped(layers)
    assert detect_family(lorakit.load(state)) == "sd3", _cands(state)
    best = family_candidates(lorakit.load(state))[0]
    assert best.family == "sd3" and best.fit == 1.0 and best.variant.startswith("sd3")


def test_sd35_medium_dual_attention_names_are_sd3():
    layers = _joint((0, 12), 1536, names=("attn.to_q", "attn2.to_q", "attn2.to_out.0"))
    assert detect_family(lorakit.load(_shaped(layers))) == "sd3"


def test_sd3_names_without_a_joint_block_are_not_sd3():
    """``proj_out`` / ``context_embedder`` alone are every DiT's names: no joint block, no SD3."""
    state = _shaped({"transformer.proj_out": (64, 1536), "transformer.context_embedder": (1536, 4096)})
    assert detect_family(lorakit.load(state)) != "sd3"


def test_flux_diffusers_files_stay_flux():
    """At FLUX.1's widths: every double block (HunyuanVideo has one more, Qwen-Image 41 more) -> flux1; single
    blocks (no Qwen-Image or SD3 name) -> flux1 by the FLUX.1 prior over HunyuanVideo."""
    doubles = _shaped(_joint(range(19), 3072))
    assert detect_family(lorakit.load(doubles)) == "flux1", _cands(doubles)
    singles = _shaped({**_joint((0,), 3072),
                       "transformer.single_transformer_blocks.0.attn.to_q": (3072, 3072),
                       "transformer.single_transformer_blocks.0.proj_mlp": (12288, 3072)})
    assert detect_family(lorakit.load(singles)) == "flux1", _cands(singles)


def test_qwen_image_attention_only_files():
    """Qwen-Image's joint attention has FLUX.1's names and width (3072): a block index FLUX.1 (19 double blocks)
    and HunyuanVideo (20) lack decides; blocks 0-1 alone are truly ambiguous (None) and the candidates say so."""
    deep = _shaped(_joint((0, 30, 59), 3072, prefix=""))
    assert detect_family(lorakit.load(deep)) == "qwen-image", _cands(deep)
    nineteen = _shaped(_joint((0, 19), 3072, prefix=""))
    assert detect_family(lorakit.load(nineteen)) not in ("flux1", "sd3"), _cands(nineteen)
    shallow = _shaped(_joint((0, 1), 3072, prefix=""))
    lora = lorakit.load(shallow)
    assert detect_family(lora) is None
    cands = family_candidates(lora)
    fitting = {c.family for c in cands if c.fit == 1.0}
    assert {"flux1", "qwen-image", "hunyuanvideo"} <= fitting and "sd3" not in fitting
    # names only (no shapes): the block index still rules FLUX.1 out
    assert detect_family([f"transformer_blocks.{i}.attn.to_q" for i in (0, 40)]) == "qwen-image"


def test_qwen_image_mlp_names_are_qwen_image():
    layers = {**_joint((0,), 3072, prefix=""), "transformer_blocks.0.img_mlp.net.0.proj": (12288, 3072),
              "transformer_blocks.0.txt_mod.1": (18432, 3072)}
    assert detect_family(lorakit.load(_shaped(layers))) == "qwen-image"


def test_inspect_shows_candidates_when_unsure(tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from lorakit.cli import cli

    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) for k, v in _shaped(_joint((0, 1), 3072, prefix="")).items()}
    info = lorakit.inspect(state)
    assert info.family is None
    assert {c["family"] for c in info.candidates} >= {"flux1", "qwen-image"}
    assert all("score" in c and "fit" in c for c in info.candidates) and len(info.candidates) <= 3
    assert info.to_dict()["candidates"] == info.candidates
    sure = lorakit.inspect(_shaped(_joint((0, 40), 3072, prefix="")))
    assert sure.family == "qwen-image" and sure.candidates == []
    path = tmp_path / "unsure.safetensors"
    save_file(state, str(path))
    result = CliRunner().invoke(cli, ["inspect", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "candidates" in result.output and "qwen-image" in result.output and "flux1" in result.output


def _zimage():
    from diffusers import ZImageTransformer2DModel

    from lorakit.pipelines.z_image import TINY_TRANSFORMER

    torch.manual_seed(0)
    return ZImageTransformer2DModel(**TINY_TRANSFORMER).eval()


def test_z_image_underscore_alphas_scale_dot_spelled_layers():
    """Anime-Z style: ``layers.0.attention.to.v.lora.down.weight`` with ``layers.0.attention.to_v.alpha``: the
    alpha pairs with its layer (scale alpha / rank), as if it were spelled like the weights."""
    model = _zimage()
    g = torch.Generator().manual_seed(1)
    rank, alpha = 4, 2.0
    down, up = torch.randn(rank, 32, generator=g), torch.randn(32, rank, generator=g)
    stem = "layers.0.attention"
    underscore = {f"{stem}.to.v.lora.down.weight": down, f"{stem}.to.v.lora.up.weight": up,
                  f"{stem}.to_v.alpha": torch.tensor(alpha)}
    lora = lorakit.load(underscore, strict=True)
    assert lora.report.ok and len(lora) == 1
    assert lora.layers[f"{stem}.to.v"].alpha == alpha
    dotted = lorakit.load({**{k: v for k, v in underscore.items() if "alpha" not in k},
                           f"{stem}.to.v.alpha": torch.tensor(alpha)}, strict=True)

    base = model.layers[0].attention.to_v.weight.detach().clone()
    deltas = []
    for file in (lora, dotted):
        m = _zimage()
        lorakit.apply(m, (file, 1.0), strict=True)
        deltas.append(m.layers[0].attention.to_v.weight.detach() - base)
    expected = (alpha / rank) * up @ down
    assert deltas[0].abs().max() > 0  # the LoRA really changed the weight
    torch.testing.assert_close(deltas[0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(deltas[0], deltas[1], rtol=0, atol=0)


def test_stray_alphas_pair_only_when_unambiguous():
    """An underscore alpha with no dot-spelled layer, or whose layer has its own alpha, stays reported."""
    g = torch.Generator().manual_seed(2)
    pair = {"a.to.v.lora.down.weight": torch.randn(2, 8, generator=g),
            "a.to.v.lora.up.weight": torch.randn(8, 2, generator=g)}
    lone = lorakit.load({**pair, "a.to_q.alpha": torch.tensor(1.0)})
    assert list(lone.report.invalid) == ["a.to_q.alpha"] and lone.layers["a.to.v"].alpha is None
    twice = lorakit.load({**pair, "a.to.v.alpha": torch.tensor(1.0), "a.to_v.alpha": torch.tensor(3.0)})
    assert list(twice.report.invalid) == ["a.to_v.alpha"] and twice.layers["a.to.v"].alpha == 1.0


def test_peft_conversion_without_a_model_uses_the_release_the_layers_fit(tmp_path) -> None:
    """An SD3.5 Large file in original (kohya) names, saved as PEFT with no model: its fused ``qkv`` splits at
    SD3.5 Large's width (2432), not SD3 Medium's (1536), the family's default release."""
    import lorakit
    from lorakit.io import read_tensors

    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 2432, generator=g), torch.randn(3 * 2432, 4, generator=g)
    src = tmp_path / "sd35l.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": down,
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": up,
               "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(4.0)}, str(src))
    out = lorakit.save(lorakit.load(src), tmp_path / "peft.safetensors", "peft")
    tensors = read_tensors(out)[0]
    q_b = tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    assert q_b.shape == (2432, 4) and torch.equal(q_b, up[:2432])
    assert torch.equal(tensors["transformer.transformer_blocks.0.attn.to_v.lora_B.weight"], up[2 * 2432:])
    assert torch.equal(tensors["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"], down)
