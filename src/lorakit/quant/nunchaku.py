"""``lorakit convert LORA OUT --to nunchaku --quant-model SVDQ``: a FLUX.1 LoRA in the file layout that Nunchaku's
``NunchakuFluxTransformer2dModel.update_lora_params`` loads for its SVDQuant (W4A4) models.

The layout, read from mit-han-lab/nunchaku ``nunchaku/lora/flux/nunchaku_converter.py`` and ``packer.py`` (commit
4132b3bf, 2025-08-23); the code below is lorakit's own:

- Quantized projections carry a 16-bit low-rank branch ``y += lora_up @ (lora_down @ x)`` (SVDQuant's ``L1 L2``).
  A LoRA is added by **concatenating** its factors onto that branch (rank 32 + r); the model's own branch is read from
  the quant-model file and written back first, so loading the file replaces the branch as a whole.
- Names: double blocks ``transformer_blocks.i.{qkv_proj, qkv_proj_context, out_proj, out_proj_context, mlp_fc1,
  mlp_fc2, mlp_context_fc1, mlp_context_fc2}``; single blocks ``single_transformer_blocks.i.{qkv_proj, mlp_fc1,
  out_proj, mlp_fc2}``, where diffusers' ``proj_out`` (input ``[attn | mlp]``) is split by input columns into
  ``out_proj`` and ``mlp_fc2``, both with the full ``up``. ``to_q/to_k/to_v`` land on rows of ``qkv_proj``; factors
  with different ``down`` go block-diagonal, an identical ``down`` is shared.
- Tensors: ``lora_down`` is stored ``[in, rank]`` and ``lora_up`` ``[out, rank]``, both padded to multiples of 16 and
  permuted into the tensor-core fragment order (:func:`pack_lowrank`). The two MLP projections of a block get equal
  ranks (zero padding), as the fused MLP kernel needs.
- AdaNorm linears (``norm1.linear``, ``norm1_context.linear``, ``norm.linear``, W4A16): factors unpacked, ``up`` rows
  reordered from ``[split, dim]`` to ``[dim, split]``, rank padded to 16.
- Everything outside the blocks (``x_embedder``, ``proj_out``, ...) is written with diffusers names
  (``lora_A.weight``/``lora_B.weight``): Nunchaku adds ``lora_B @ lora_A`` to those float weights.
- Strength and ``alpha / rank`` are folded into ``lora_up`` (Nunchaku's files carry no alpha).
- Smoothing: the W4A4 kernel computes the branch on the *unsmoothed* input (``EpilogueLoraDown`` runs before the
  quantize epilogue divides by ``smooth_factor``, ``src/kernels/zgemm/gemm_w4a4.cuh``), so no smoothing factor is
  folded into the LoRA; the model's ``smooth`` tensors are left alone.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import FormatError, MatchError, UnsupportedAdapterError
from ..families import Resolver, components_of
from ..families.offline import meta_components
from ..io import read_tensors, write_tensors
from ..model import LoRA
from ..placement import low_rank_factors

__all__ = ["NunchakuReport", "pack_lowrank", "to_nunchaku", "to_nunchaku_state_dict", "unpack_lowrank"]

_FRAG = 16  # rows and columns of one packed fragment
# one fragment's axes: n = n_pack(2) · n_lane(8); k = k_pack(2) · k_lane(4) · reg(2); stored lane-major
_SPLIT = (2, 8, 2, 4, 2)
_ORDER = (0, 1, 3, 5, 2, 4, 6)  # (c_frag, r_frag, n_pack, n_lane, k_pack, k_lane, reg) -> lanes first

_DOUBLE = {
    "attn.to_q": ("qkv_proj", 0), "attn.to_k": ("qkv_proj", 1), "attn.to_v": ("qkv_proj", 2),
    "attn.add_q_proj": ("qkv_proj_context", 0), "attn.add_k_proj": ("qkv_proj_context", 1),
    "attn.add_v_proj": ("qkv_proj_context", 2),
    "attn.to_out.0": ("out_proj", None), "attn.to_add_out": ("out_proj_context", None),
    "ff.net.0.proj": ("mlp_fc1", None), "ff.net.2": ("mlp_fc2", None),
    "ff_context.net.0.proj": ("mlp_context_fc1", None), "ff_context.net.2": ("mlp_context_fc2", None),
    "norm1.linear": ("norm1.linear", None), "norm1_context.linear": ("norm1_context.linear", None),
}
_SINGLE = {
    "attn.to_q": ("qkv_proj", 0), "attn.to_k": ("qkv_proj", 1), "attn.to_v": ("qkv_proj", 2),
    "proj_mlp": ("mlp_fc1", None), "proj_out": ("proj_out", None), "norm.linear": ("norm.linear", None),
}
_ADANORM_SPLITS = {"norm1.linear": 6, "norm1_context.linear": 6, "norm.linear": 3}
_MLP_PAIRS = (("mlp_fc1", "mlp_fc2"), ("mlp_context_fc1", "mlp_context_fc2"))


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    r, c = -t.shape[0] % rows, -t.shape[1] % cols
    return torch.nn.functional.pad(t, (0, c, 0, r)) if r or c else t


def pack_lowrank(weight: torch.Tensor, down: bool) -> torch.Tensor:
    """A branch factor in Nunchaku's packed order: ``down`` ``[rank, in]`` -> ``[in, rank]``; ``up`` ``[out, rank]``
    -> ``[out, rank]``; both padded to multiples of 16 first. The fragment's n axis is rank (down) or out (up)."""
    w = _pad(weight, _FRAG, _FRAG)
    if down:  # n = rank, k = in
        n, k = w.shape
        tiles = w.reshape(n // _FRAG, _FRAG, k // _FRAG, _FRAG).permute(2, 0, 1, 3)
        c, r = k, n
    else:  # n = out, k = rank
        n, k = w.shape
        tiles = w.reshape(n // _FRAG, _FRAG, k // _FRAG, _FRAG).permute(0, 2, 1, 3)
        c, r = n, k
    tiles = tiles.reshape(*tiles.shape[:2], *_SPLIT).permute(*_ORDER)
    return tiles.contiguous().reshape(c, r)


def unpack_lowrank(packed: torch.Tensor, down: bool) -> torch.Tensor:
    """The inverse of :func:`pack_lowrank` (padding kept): ``down`` ``[in, rank]`` -> ``[rank, in]``; ``up`` as is."""
    c, r = packed.shape
    if c % _FRAG or r % _FRAG:
        raise FormatError(f"a packed Nunchaku low-rank factor of shape {tuple(packed.shape)}: both sides must be "
                          "multiples of 16")
    cf, rf = c // _FRAG, r // _FRAG
    inverse = [_ORDER.index(i) for i in range(len(_ORDER))]
    tiles = packed.reshape(cf, rf, 8, 4, 2, 2, 2).permute(*inverse).reshape(cf, rf, _FRAG, _FRAG)
    if down:
        return tiles.permute(1, 2, 0, 3).reshape(r, c)
    return tiles.permute(0, 2, 1, 3).reshape(c, r)


@dataclasses.dataclass
class NunchakuReport:
    """What :func:`to_nunchaku` wrote: layers converted, branch ranks per projection (model's + LoRA's), and file
    layers it could not place (with the reason)."""

    path: str | None
    layers: int
    ranks: dict[str, tuple[int, int]]
    unquantized: list[str]
    skipped: dict[str, str]

    def lines(self) -> list[str]:
        grown = [r for r in self.ranks.values() if r[1]]
        out = [f"wrote {self.path} (nunchaku, {self.layers} LoRA layers -> {len(grown)} quantized projections with "
               f"a longer branch, {len(self.unquantized)} unquantized modules)"]
        if grown:
            base = sorted({r[0] for r in grown})
            extra = sorted({r[1] for r in grown})
            out.append(f"branch rank: model {'/'.join(map(str, base))} + LoRA {'/'.join(map(str, extra))}")
        if self.skipped:
            out.append(f"{len(self.skipped)} layers not converted: "
                       + "; ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())[:5]))
        return out


@dataclasses.dataclass
class _Piece:
    down: torch.Tensor  # [r, in] fp32
    up: torch.Tensor  # [rows, r] fp32, scale and strength folded in
    rows: tuple[int, int] | None  # rows of the projection's output, None = all
    out: int  # the projection's output features (3 × a q/k/v module's)


def _collect(lora: LoRA, comps: Mapping[str, nn.Module], strength: float
             ) -> tuple[dict[tuple[str, str], list[_Piece]], dict[str, list[_Piece]], dict[str, str]]:
    """Each file layer's exact factors, keyed by (block, Nunchaku local name) or by unquantized module path."""
    resolver = Resolver(comps)
    blocks: dict[tuple[str, str], list[_Piece]] = {}
    loose: dict[str, list[_Piece]] = {}
    skipped: dict[str, str] = {}
    for layer in lora:
        targets = resolver.lookup(layer)
        if not targets:
            skipped[layer.name] = "matches no FLUX transformer module"
            continue
        if layer.bias is not None:
            skipped[layer.name] = "bias deltas are not converted"
        for t in targets:
            if t.component != "denoiser":
                skipped[layer.name] = f"text-encoder layers ({t.component}) are not part of a Nunchaku transformer"
                break
            module = resolver.module(t)
            factors = low_rank_factors(layer, t, module.weight)
            if factors is None or len(factors.in_shape) > 1:
                raise UnsupportedAdapterError(
                    f"{layer.name}: {layer.weight.kind if layer.weight else 'this'} adapter has no exact low-rank "
                    "factors to append to Nunchaku's branch; convert it to a LoRA first (lorakit extract / resize)")
            up = factors.up.float().reshape(factors.up.shape[0], -1) * (strength * factors.scale)
            piece = _Piece(factors.down.float().reshape(factors.down.shape[0], -1), up, t.dst_rows,
                           int(module.weight.shape[0]))
            parts = t.module.split(".")
            if parts[0] in ("transformer_blocks", "single_transformer_blocks") and len(parts) > 2:
                block, local = ".".join(parts[:2]), ".".join(parts[2:])
                table = _DOUBLE if parts[0] == "transformer_blocks" else _SINGLE
                if local not in table:
                    skipped[layer.name] = f"{local} has no Nunchaku counterpart"
                    continue
                name, index = table[local]
                if index is not None:  # q/k/v of a fused qkv_proj: rows of the size of one projection
                    n = module.weight.shape[0]
                    piece.rows, piece.out = (index * n, (index + 1) * n), 3 * n
                blocks.setdefault((block, name), []).append(piece)
            else:
                loose.setdefault(t.module, []).append(piece)
    return blocks, loose, skipped


def _merge(pieces: list[_Piece], out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(down [r, in], up [out, r])`` for all pieces of a projection: pieces sharing an identical ``down``
    share its rank; others go block-diagonal (zero rows outside each piece's rows)."""
    downs: list[torch.Tensor] = []
    cols: list[list[_Piece]] = []
    for p in pieces:
        for i, d in enumerate(downs):
            if d.shape == p.down.shape and torch.equal(d, p.down):
                cols[i].append(p)
                break
        else:
            downs.append(p.down)
            cols.append([p])
    ups = []
    for group, d in zip(cols, downs, strict=True):
        up = torch.zeros(out_features, d.shape[0])
        for p in group:
            a, b = p.rows or (0, out_features)
            up[a:b] += p.up
        ups.append(up)
    return torch.cat(downs, 0), torch.cat(ups, 1)


def _proj_out_split(model: Mapping[str, torch.Tensor], block: str, pieces: list[_Piece]) -> dict[str, list[_Piece]]:
    """Single blocks: diffusers' ``proj_out`` (input ``[attn | mlp]``) -> Nunchaku's out_proj / mlp_fc2 columns."""
    n1 = int(model[f"{block}.out_proj.qweight"].shape[1]) * 2  # int4 packs two values per byte
    return {"out_proj": [_Piece(p.down[:, :n1], p.up, p.rows, p.out) for p in pieces],
            "mlp_fc2": [_Piece(p.down[:, n1:], p.up, p.rows, p.out) for p in pieces]}


def _model_branch(model: Mapping[str, torch.Tensor], key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    down, up = model.get(f"{key}.lora_down"), model.get(f"{key}.lora_up")
    if down is None or up is None or down.numel() == 0:
        return None
    return unpack_lowrank(down, down=True), unpack_lowrank(up, down=False)


def _blocks_of(model: Mapping[str, torch.Tensor]) -> list[str]:
    names = {".".join(k.split(".")[:2]) for k in model if k.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    return sorted(names, key=lambda b: (b.split(".")[0], int(b.split(".")[1])))


def _projections(model: Mapping[str, torch.Tensor], block: str) -> list[str]:
    """The W4A4 projections of a block in the quant-model file: those with a ``qweight`` and a branch."""
    return sorted({k[len(block) + 1:].rsplit(".", 1)[0] for k in model
                   if k.startswith(block + ".") and k.endswith(".lora_down")})


def to_nunchaku_state_dict(lora: LoRA, quant_model: Mapping[str, torch.Tensor], *, strength: float = 1.0,
                           model: object | None = None, dtype: torch.dtype = torch.bfloat16
                           ) -> tuple[dict[str, torch.Tensor], NunchakuReport]:
    """The tensors of the Nunchaku LoRA file for ``lora`` on the SVDQuant model whose state dict is ``quant_model``.
    ``model`` (a FLUX pipeline/transformer, ``{component: module}`` or a family name; default ``"flux1"`` on the meta
    device) names the diffusers modules the LoRA's layers are resolved against."""
    comps = meta_components(model or "flux1", ("denoiser",)) if model is None or isinstance(model, str) \
        else components_of(model)
    if "denoiser" not in comps:
        raise MatchError("--to nunchaku needs a FLUX transformer to resolve the LoRA's names; pass model='flux1'")
    blocks, loose, skipped = _collect(lora, comps, strength)
    for (block, name) in [k for k in blocks if k[1] == "proj_out"]:
        for local, pieces in _proj_out_split(quant_model, block, blocks.pop((block, name))).items():
            blocks.setdefault((block, local), []).extend(pieces)
    extras: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (block, name), pieces in blocks.items():
        key = f"{block}.{name}"
        if not any(k.startswith(key + ".") for k in quant_model):
            raise MatchError(f"{key}: not in the quant model; is --quant-model a Nunchaku FLUX SVDQuant transformer "
                             "of the same size as the LoRA's model?")
        extras[(block, name)] = _merge(pieces, max(p.out for p in pieces))
    _equal_mlp_ranks(extras, quant_model)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, int]] = {}
    for block in _blocks_of(quant_model):
        locals_ = set(_projections(quant_model, block)) | {n for (b, n) in extras if b == block}
        for name in sorted(locals_):
            key = f"{block}.{name}"
            branch = _model_branch(quant_model, key)
            extra = extras.get((block, name))
            if branch is None and extra is None:
                continue
            like = quant_model.get(f"{key}.lora_down")
            out_dtype = like.dtype if like is not None and like.numel() else dtype
            down, up, r0 = _concat(branch, extra)
            ranks[key] = (r0, 0 if extra is None else int(extra[0].shape[0]))
            if name in _ADANORM_SPLITS:
                up = _reorder_adanorm(up, _ADANORM_SPLITS[name])
                tensors[f"{key}.lora_down"] = _pad(down, _FRAG, 1).to(out_dtype)
                tensors[f"{key}.lora_up"] = _pad(up, 1, _FRAG).to(out_dtype)
            else:
                tensors[f"{key}.lora_down"] = pack_lowrank(down.to(out_dtype), down=True)
                tensors[f"{key}.lora_up"] = pack_lowrank(up.to(out_dtype), down=False)
    for path, pieces in loose.items():
        down, up = _merge(pieces, max(p.out for p in pieces))
        tensors[f"{path}.lora_A.weight"] = down.to(dtype)
        tensors[f"{path}.lora_B.weight"] = up.to(dtype)
    report = NunchakuReport(None, len(lora) - len(skipped), ranks, sorted(loose), skipped)
    return tensors, report


def _concat(branch: tuple[torch.Tensor, torch.Tensor] | None, extra: tuple[torch.Tensor, torch.Tensor] | None
            ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The model's branch followed by the LoRA's factors (rank r0 + r); the LoRA's ``down`` is padded to the
    branch's (padded) input width and its ``up`` to the branch's output rows."""
    if branch is None:  # the caller skips projections with neither
        return extra[0], extra[1], 0  # type: ignore[index]
    d0, u0 = branch[0].float(), branch[1].float()
    if extra is None:
        return d0, u0, int(d0.shape[0])
    d1 = torch.nn.functional.pad(extra[0], (0, d0.shape[1] - extra[0].shape[1]))
    u1 = torch.nn.functional.pad(extra[1], (0, 0, 0, u0.shape[0] - extra[1].shape[0]))
    return torch.cat([d0, d1], 0), torch.cat([u0, u1], 1), int(d0.shape[0])


def _equal_mlp_ranks(extras: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]],
                     model: Mapping[str, torch.Tensor]) -> None:
    """The fused MLP kernel runs fc1's and fc2's branches together: pad the smaller LoRA rank with zeros (a
    projection the LoRA does not touch gets an all-zero piece of that rank; Nunchaku's own converter stops there)."""
    for block in {b for b, _ in extras}:
        for fc1, fc2 in _MLP_PAIRS:
            a, b = extras.get((block, fc1)), extras.get((block, fc2))
            if a is None and b is None:
                continue
            rank = max(x[0].shape[0] for x in (a, b) if x is not None)
            for name, x in ((fc1, a), (fc2, b)):
                if x is None:
                    branch = _model_branch(model, f"{block}.{name}")
                    if branch is None:
                        continue
                    x = (branch[0].new_zeros(0, branch[0].shape[1]).float(), branch[1].new_zeros(branch[1].shape[0], 0).float())
                if x[0].shape[0] < rank:
                    x = (torch.nn.functional.pad(x[0], (0, 0, 0, rank - x[0].shape[0])),
                         torch.nn.functional.pad(x[1], (0, rank - x[1].shape[1])))
                extras[(block, name)] = x


def _reorder_adanorm(up: torch.Tensor, splits: int) -> torch.Tensor:
    c, r = up.shape
    return up.reshape(splits, c // splits, r).transpose(0, 1).reshape(c, r).contiguous()


def to_nunchaku(lora: LoRA, quant_model: str | os.PathLike[str] | Mapping[str, torch.Tensor],
                output: str | os.PathLike[str], *, strength: float = 1.0, model: object | None = None,
                inputs: Iterable[str | os.PathLike[str] | None] = ()) -> NunchakuReport:
    """Write the Nunchaku file for ``lora`` on ``quant_model`` (a path or its state dict) to ``output``, atomically;
    never over the LoRA, the quant model or ``inputs``."""
    paths = [lora.source, *inputs]
    if not isinstance(quant_model, Mapping):
        paths.append(quant_model)
        quant_model, _ = read_tensors(Path(quant_model))
    tensors, report = to_nunchaku_state_dict(lora, quant_model, strength=strength, model=model)
    if not tensors:
        raise MatchError("no layer of the LoRA lands on the Nunchaku model; is it a FLUX.1 LoRA?")
    report.path = str(write_tensors(tensors, output, {"lorakit_converted_to": "nunchaku-flux"}, inputs=paths))
    return report
