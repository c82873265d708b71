"""``lorakit convert --to nunchaku``: the file Nunchaku's ``update_lora_params`` loads for a FLUX SVDQuant model.

Nunchaku cannot be imported here: its wheels bundle the CUDA extension (and ``nunchaku.lora.flux`` imports it);
``pip install nunchaku`` gets an unrelated PyPI package (piece-wise linear segmentation, 0.16.1). So the default
tests carry no peer call; the last test runs Nunchaku's converter from a source checkout when ``NUNCHAKU_SRC`` names
one. The reference below is this test's own: the packed layout is written as an index formula for every
element, from mit-han-lab/nunchaku ``nunchaku/lora/flux/nunchaku_converter.py::pack_lowrank_weight`` and
``packer.py::NunchakuWeightPacker.pack_lowrank_weight`` (commit 4132b3bf): 16x16 fragments; in a fragment, row
n = n_pack·8 + n_lane and column k = k_pack·8 + k_lane·2 + reg; stored in the order (fragment column of the long
side, fragment row, n_lane, k_lane, n_pack, k_pack, reg). The quant-model file is synthetic, with Nunchaku's key
layout (qweight/wscales/smooth/smooth_orig/bias/lora_down/lora_up per W4A4 projection) on the tiny FLUX sizes.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.pipelines.flux import TINY_TRANSFORMER
from lorakit.quant.nunchaku import pack_lowrank, to_nunchaku, to_nunchaku_state_dict, unpack_lowrank

D = TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"]  # 32
MLP = 4 * D
RANK0 = 32  # the SVDQuant branch
DOUBLE = {"qkv_proj": (D, 3 * D), "qkv_proj_context": (D, 3 * D), "out_proj": (D, D), "out_proj_context": (D, D),
          "mlp_fc1": (D, MLP), "mlp_fc2": (MLP, D), "mlp_context_fc1": (D, MLP), "mlp_context_fc2": (MLP, D)}
SINGLE = {"qkv_proj": (D, 3 * D), "mlp_fc1": (D, MLP), "out_proj": (D, D), "mlp_fc2": (MLP, D)}


def _positions(c: int, r: int, down: bool) -> torch.Tensor:
    """pos[i, j] = flat index in the packed [c, r] tensor of element (i, j) of the unpacked factor (down [r, c],
    up [c, r]), from the fragment index formula."""
    rows, cols = (r, c) if down else (c, r)
    i = torch.arange(rows)[:, None].expand(rows, cols)
    j = torch.arange(cols)[None, :].expand(rows, cols)
    n, k = (i, j)  # down: n = rank, k = in; up: n = out, k = rank
    long_frag, short_frag = (k // 16, n // 16) if down else (n // 16, k // 16)
    short_frags = (r // 16)
    n_in, k_in = n % 16, k % 16
    n_pack, n_lane = n_in // 8, n_in % 8
    k_pack, k_lane, reg = k_in // 8, (k_in % 8) // 2, k_in % 2
    frag = long_frag * short_frags + short_frag
    return ((((frag * 8 + n_lane) * 4 + k_lane) * 2 + n_pack) * 2 + k_pack) * 2 + reg


def ref_pack(w: torch.Tensor, down: bool) -> torch.Tensor:
    rows, cols = w.shape
    c, r = (cols, rows) if down else (rows, cols)
    out = torch.empty(c * r, dtype=w.dtype)
    out[_positions(c, r, down).reshape(-1)] = w.reshape(-1)
    return out.reshape(c, r)


def ref_unpack(p: torch.Tensor, down: bool) -> torch.Tensor:
    c, r = p.shape
    pos = _positions(c, r, down)
    return p.reshape(-1)[pos.reshape(-1)].reshape(pos.shape)


@pytest.mark.parametrize("down", [True, False])
def test_packing_matches_the_index_formula(down):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 160, generator=g).to(torch.bfloat16) if down else torch.randn(160, 48, generator=g).to(torch.bfloat16)
    packed = pack_lowrank(w, down=down)
    assert packed.shape == ((160, 48) if down else (160, 48))
    assert torch.equal(packed, ref_pack(w, down))
    assert torch.equal(unpack_lowrank(packed, down=down), w)
    odd = torch.randn(5, 40, generator=g) if down else torch.randn(40, 5, generator=g)  # padded to 16 first
    padded = pack_lowrank(odd, down=down)
    assert padded.shape == (48, 16)
    back = unpack_lowrank(padded, down=down)
    assert torch.equal(back[: odd.shape[0], : odd.shape[1]], odd) and back.abs().sum() == odd.abs().sum()


def _quant_model(seed: int = 1) -> dict[str, torch.Tensor]:
    """A synthetic Nunchaku FLUX SVDQuant state dict on the tiny sizes (int4 weights: two per int8 byte)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for prefix, n, table in (("transformer_blocks", 2, DOUBLE), ("single_transformer_blocks", 2, SINGLE)):
        for b in range(n):
            for name, (i, o) in table.items():
                k = f"{prefix}.{b}.{name}"
                sd[f"{k}.qweight"] = torch.randint(-128, 127, (o, i // 2), generator=g, dtype=torch.int8)
                sd[f"{k}.wscales"] = torch.rand(max(1, i // 64), o, generator=g).to(torch.bfloat16)
                sd[f"{k}.smooth"] = (torch.rand(i, generator=g) + 0.5).to(torch.bfloat16)
                sd[f"{k}.smooth_orig"] = sd[f"{k}.smooth"].clone()
                sd[f"{k}.bias"] = torch.randn(o, generator=g).to(torch.bfloat16)
                sd[f"{k}.lora_down"] = ref_pack(torch.randn(RANK0, i, generator=g).to(torch.bfloat16), down=True)
                sd[f"{k}.lora_up"] = ref_pack(torch.randn(o, RANK0, generator=g).to(torch.bfloat16), down=False)
            norm = "norm1.linear" if prefix == "transformer_blocks" else "norm.linear"
            sd[f"{prefix}.{b}.{norm}.qweight"] = torch.zeros(6 * D, D // 8, dtype=torch.int32)  # AWQ W4A16
            sd[f"{prefix}.{b}.{norm}.bias"] = torch.zeros(6 * D, dtype=torch.bfloat16)
    return sd


def _lora(seed: int = 2, r: int = 4) -> lorakit.LoRA:
    """diffusers names on double block 0, BFL/kohya names on single block 1 (fused linear1 = qkv + mlp), plus an
    unquantized module; alpha != rank, so the scale must be folded in."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def put(name, i, o, rank=r):
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, i, generator=g) * 0.1
        sd[f"{name}.lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.1
        sd[f"{name}.alpha"] = torch.tensor(2.0)

    for proj in ("to_q", "to_k", "to_v", "to_out_0", "add_q_proj"):
        put(f"lora_transformer_transformer_blocks_0_attn_{proj}", D, D)
    put("lora_transformer_transformer_blocks_0_ff_net_0_proj", D, MLP, rank=6)  # fc1 rank 6, fc2 none: padded
    put("lora_unet_single_blocks_1_linear1", D, 3 * D + MLP)
    put("lora_unet_single_blocks_1_linear2", D + MLP, D)
    put("lora_transformer_x_embedder", TINY_TRANSFORMER["in_channels"], D)
    return lorakit.load(sd)


@pytest.fixture(scope="module")
def tiny_flux():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**TINY_TRANSFORMER)


def _delta(lora, name):
    return lora.layers[name].delta_weight().float()


def _product(out, key):
    up, down = ref_unpack(out[f"{key}.lora_up"], False).float(), ref_unpack(out[f"{key}.lora_down"], True).float()
    return up, down


def test_keys_shapes_dtypes_and_numerics(tiny_flux):
    qm, lora = _quant_model(), _lora()
    out, report = to_nunchaku_state_dict(lora, qm, model=tiny_flux)
    # key set: every W4A4 projection's branch (Nunchaku rewrites them all) + the unquantized x_embedder
    branches = {k.rsplit(".", 1)[0] for k in qm if k.endswith(".lora_down")}
    want = {f"{b}.{s}" for b in branches for s in ("lora_down", "lora_up")}
    want |= {"x_embedder.lora_A.weight", "x_embedder.lora_B.weight"}
    assert set(out) == want, set(out) ^ want
    assert not report.skipped
    for key in branches:
        down, up = out[f"{key}.lora_down"], out[f"{key}.lora_up"]
        assert down.dtype == up.dtype == torch.bfloat16
        assert down.shape[0] == qm[f"{key}.lora_down"].shape[0] and up.shape[0] == qm[f"{key}.lora_up"].shape[0]
        assert down.shape[1] == up.shape[1] and down.shape[1] % 16 == 0
        u, d = _product(out, key)
        u0, d0 = ref_unpack(qm[f"{key}.lora_up"], False).float(), ref_unpack(qm[f"{key}.lora_down"], True).float()
        assert torch.equal(u[:, :RANK0], u0) and torch.equal(d[:RANK0], d0)  # the model's branch comes first, as is
    # untouched projections keep rank 32 exactly
    assert out["transformer_blocks.1.qkv_proj.lora_down"].shape[1] == RANK0
    assert torch.equal(out["transformer_blocks.1.qkv_proj.lora_down"], qm["transformer_blocks.1.qkv_proj.lora_down"])

    def lora_part(key):
        u, d = _product(out, key)
        return u[:, RANK0:] @ d[RANK0:]

    def close(got, ref):
        assert float(ref.norm()) > 0, "the LoRA must change this projection"
        assert float((got - ref).norm() / ref.norm()) < 1e-2  # bf16 storage of the factors

    blk = "lora_transformer_transformer_blocks_0_attn"
    qkv = torch.cat([_delta(lora, f"{blk}_{p}") for p in ("to_q", "to_k", "to_v")])
    close(lora_part("transformer_blocks.0.qkv_proj"), qkv)
    ctx = lora_part("transformer_blocks.0.qkv_proj_context")
    close(ctx[:D], _delta(lora, f"{blk}_add_q_proj"))
    assert ctx[D:].abs().max() == 0  # k/v rows of the context projection get no delta
    close(lora_part("transformer_blocks.0.out_proj"), _delta(lora, f"{blk}_to_out_0"))
    close(lora_part("transformer_blocks.0.mlp_fc1"), _delta(lora, "lora_transformer_transformer_blocks_0_ff_net_0_proj"))
    # the fused MLP kernel wants equal ranks: fc2 gets 16 zero rank columns to match fc1's 6 -> 16
    fc2 = out["transformer_blocks.0.mlp_fc2.lora_down"]
    assert fc2.shape[1] == out["transformer_blocks.0.mlp_fc1.lora_down"].shape[1] == RANK0 + 16
    assert lora_part("transformer_blocks.0.mlp_fc2").abs().max() == 0
    # single block 1: linear1 rows -> qkv_proj (q/k/v share one down: rank 4, not 12) and mlp_fc1
    lin1 = _delta(lora, "lora_unet_single_blocks_1_linear1")
    close(lora_part("single_transformer_blocks.1.qkv_proj"), lin1[: 3 * D])
    close(lora_part("single_transformer_blocks.1.mlp_fc1"), lin1[3 * D:])
    assert out["single_transformer_blocks.1.qkv_proj.lora_down"].shape[1] == RANK0 + 16  # 4 padded to 16
    # linear2 (proj_out, input [attn | mlp]) -> out_proj (first D columns) and mlp_fc2 (the rest)
    lin2 = _delta(lora, "lora_unet_single_blocks_1_linear2")
    close(lora_part("single_transformer_blocks.1.out_proj")[:, :D], lin2[:, :D])
    close(lora_part("single_transformer_blocks.1.mlp_fc2")[:, :MLP], lin2[:, D:])
    # unquantized: diffusers names, B @ A = ΔW (scale folded into B)
    xa, xb = out["x_embedder.lora_A.weight"].float(), out["x_embedder.lora_B.weight"].float()
    close(xb @ xa, _delta(lora, "lora_transformer_x_embedder"))
    assert report.ranks["transformer_blocks.0.qkv_proj"] == (RANK0, 12)  # three different downs: block-diagonal


def test_strength_and_smoothing(tiny_flux):
    """Strength scales the LoRA columns only. The smoothing factors do not enter: Nunchaku's W4A4 kernel runs the
    branch on the unsmoothed input (gemm_w4a4.cuh: EpilogueLoraDown before the smoothing quantize epilogue)."""
    qm, lora = _quant_model(), _lora()
    a, _ = to_nunchaku_state_dict(lora, qm, model=tiny_flux)
    half, _ = to_nunchaku_state_dict(lora, qm, model=tiny_flux, strength=0.5)
    key = "transformer_blocks.0.out_proj"
    ua, da = _product(a, key)
    uh, dh = _product(half, key)
    assert torch.equal(ua[:, :RANK0], uh[:, :RANK0])
    assert torch.allclose(uh[:, RANK0:] @ dh[RANK0:], 0.5 * (ua[:, RANK0:] @ da[RANK0:]), rtol=1e-2, atol=1e-4)
    qm2 = {k: (v * 3 if k.endswith((".smooth", ".smooth_orig")) else v) for k, v in qm.items()}
    b, _ = to_nunchaku_state_dict(lora, qm2, model=tiny_flux)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_writes_the_file_atomically(tmp_path, tiny_flux):
    from lorakit.cli import cli

    qm_path = tmp_path / "svdq-int4.safetensors"
    save_file(_quant_model(), str(qm_path))
    src = lorakit.save(_lora(), tmp_path / "style.safetensors")
    out = tmp_path / "svdq-style.safetensors"
    res = CliRunner().invoke(cli, ["convert", str(src), str(out), "--to", "nunchaku", "--quant-model", str(qm_path),
                                   "--model", "tiny-flux"])
    assert res.exit_code == 0, res.output
    assert "nunchaku" in res.output and "branch rank: model 32 + LoRA" in res.output
    print(res.output)
    got = load_file(str(out))
    ref, _ = to_nunchaku_state_dict(lorakit.load(src), _quant_model(), model=tiny_flux)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style.safetensors", "svdq-int4.safetensors",
                                                          "svdq-style.safetensors"]
    bad = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "x.safetensors"), "--to", "nunchaku"])
    assert bad.exit_code != 0 and "--quant-model" in bad.output


def test_refuses_non_factor_adapters(tmp_path, tiny_flux):
    from lorakit.errors import UnsupportedAdapterError

    g = torch.Generator().manual_seed(0)
    sd = {"lora_transformer_transformer_blocks_0_attn_to_q.hada_w1_a": torch.randn(D, 2, generator=g),
          "lora_transformer_transformer_blocks_0_attn_to_q.hada_w1_b": torch.randn(2, D, generator=g),
          "lora_transformer_transformer_blocks_0_attn_to_q.hada_w2_a": torch.randn(D, 2, generator=g),
          "lora_transformer_transformer_blocks_0_attn_to_q.hada_w2_b": torch.randn(2, D, generator=g)}
    with pytest.raises(UnsupportedAdapterError, match="to_q.*no exact low-rank"):
        to_nunchaku(lorakit.load(sd), _quant_model(), tmp_path / "x.safetensors", model=tiny_flux)
    assert not (tmp_path / "x.safetensors").exists()


NUNCHAKU_SRC = os.environ.get("NUNCHAKU_SRC")  # a checkout of mit-han-lab/nunchaku (no build needed)


@pytest.mark.skipif(not NUNCHAKU_SRC, reason="set NUNCHAKU_SRC to a mit-han-lab/nunchaku checkout to run the peer")
def test_bit_identical_to_nunchakus_own_converter(tiny_flux):
    """The peer itself: Nunchaku's ``convert_to_nunchaku_flux_lowrank_dict`` and the helpers it uses, executed from
    its source files (the package cannot be imported without its CUDA extension; its CUDA-free helpers are stubbed:
    ``ceil_divide``, ``filter_state_dict``, ``tqdm``, a logger). Run on 4132b3bf: 48 of 48 tensors bit-identical."""
    import ast
    import logging

    flux = Path(NUNCHAKU_SRC) / "nunchaku" / "lora" / "flux"
    ns = {"torch": torch, "tp": typing, "logger": logging.getLogger("nunchaku-peer"), "tqdm": lambda x, **k: x,
          "ceil_divide": lambda a, b: (a + b - 1) // b,
          "filter_state_dict": lambda sd, filter_prefix: {k: v for k, v in sd.items() if k.startswith(filter_prefix)}}
    for name in ("utils.py", "packer.py", "nunchaku_converter.py"):
        tree = ast.parse((flux / name).read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not (name == "utils.py" and node.name != "pad"):
                exec(compile(ast.Module([node], []), str(flux / name), "exec"), ns)  # noqa: S102 - the peer's source
    g = torch.Generator().manual_seed(5)
    peft: dict[str, torch.Tensor] = {}

    def put(path, i, o, r=4):
        peft[f"transformer.{path}.lora_A.weight"] = (torch.randn(r, i, generator=g) * 0.1).to(torch.bfloat16)
        peft[f"transformer.{path}.lora_B.weight"] = (torch.randn(o, r, generator=g) * 0.1).to(torch.bfloat16)

    for b in range(2):
        for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            put(f"transformer_blocks.{b}.attn.{p}", D, D)
        for ff in ("ff", "ff_context"):
            put(f"transformer_blocks.{b}.{ff}.net.0.proj", D, MLP)
            put(f"transformer_blocks.{b}.{ff}.net.2", MLP, D)
        for p in ("to_q", "to_k", "to_v"):
            put(f"single_transformer_blocks.{b}.attn.{p}", D, D)
        put(f"single_transformer_blocks.{b}.proj_mlp", D, MLP)
        put(f"single_transformer_blocks.{b}.proj_out", D + MLP, D)
    qm = _quant_model()
    theirs = ns["convert_to_nunchaku_flux_lowrank_dict"](qm, dict(peft))
    ours, _ = to_nunchaku_state_dict(lorakit.load(peft), qm, model=tiny_flux)
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
