"""SVDQuant-style layers and the low-rank-branch route for LoRAs (Nunchaku's idea, with plain torch kernels).

A :class:`LowRankQuantLinear` holds ``W ≈ L·R + Q(W − L·R)``: a 16-bit branch ``lowrank_up [out, r] ·
lowrank_down [r, in]`` from the top singular directions of ``W``, and the residual quantized per output row
(``int8`` absmax, or ``fp8`` e4m3 with a per-row scale). The forward dequantizes the residual into the activation
dtype (a plain matmul, no custom kernel) and adds the branch.

A LoRA is put on such a layer *exactly*, without requantizing, by appending its factors to the branch
(:func:`branch_stage`, strength folded into ``up``); several LoRAs compose by concatenation, and the undo puts the
very original tensors back, so ``remove()`` restores the old ranks bit for bit. The layer is also a
:class:`~lorakit.quant.schemes.QuantKind` (``library="lorakit"``), so hook and fuse mode work on it like on any
other quantized layer.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShapeMismatchError, UnsupportedAdapterError
from .fp8 import FP8_DTYPES, round_fp8
from .schemes import QuantInfo, QuantKind, swap_state

__all__ = [
    "LOWRANK_SCHEMES", "BranchStaged", "LowRankKind", "LowRankQuantLinear", "branch_commit", "branch_stage",
    "load_lowrank", "lowrank_state_dict", "quantize_model", "quantize_state_dict",
]

LOWRANK_SCHEMES = ("int8", "fp8")
METADATA_KEY = "lorakit.lowrank"


def _quantize_rows(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (fp32 ``[out, in]``) -> (storage, per-row fp32 scale ``[out, 1]``) with ``w ≈ storage · scale``."""
    amax = w.abs().amax(dim=1, keepdim=True)
    if scheme == "int8":
        scale = (amax / 127.0).clamp_min(1e-12)
        return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale
    if scheme == "fp8":
        fp8 = FP8_DTYPES[0]
        scale = (amax / torch.finfo(fp8).max).clamp_min(1e-12)
        return round_fp8(w / scale, fp8), scale
    raise ValueError(f"scheme must be one of {', '.join(LOWRANK_SCHEMES)}, got {scheme!r}")


def _svd_split(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of ``w`` (fp32): ``up = U·√S``, ``down = √S·Vᵀ``."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


class LowRankQuantLinear(nn.Module):
    """``y = x·(weight·weight_scale)ᵀ + (x·lowrank_downᵀ)·lowrank_upᵀ + bias``: an int8/fp8 residual with per-row
    scales next to a 16-bit low-rank branch. Build one with :meth:`from_linear`."""

    def __init__(self, in_features: int, out_features: int, rank: int, scheme: str = "int8", bias: bool = True,
                 branch_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if scheme not in LOWRANK_SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(LOWRANK_SCHEMES)}, got {scheme!r}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        storage = torch.int8 if scheme == "int8" else FP8_DTYPES[0]
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=storage), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, 1))
        self.lowrank_up = nn.Parameter(torch.zeros(out_features, rank, dtype=branch_dtype), requires_grad=False)
        self.lowrank_down = nn.Parameter(torch.zeros(rank, in_features, dtype=branch_dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @property
    def rank(self) -> int:
        return int(self.lowrank_down.shape[0])

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, scheme: str = "int8",
                    branch_dtype: torch.dtype = torch.bfloat16) -> LowRankQuantLinear:
        """``W = L·R + Q(W − L·R)``: ``L·R`` the top-``rank`` SVD of ``W`` (rounded to ``branch_dtype``), the
        residual quantized per row."""
        w = linear.weight.detach().float()
        if not 0 < rank < min(w.shape):
            raise ValueError(f"rank must be in 1..{min(w.shape) - 1} for a {tuple(w.shape)} weight, got {rank}")
        out = cls(linear.in_features, linear.out_features, rank, scheme, linear.bias is not None, branch_dtype)
        up, down = _svd_split(w, rank)
        up, down = up.to(branch_dtype), down.to(branch_dtype)
        q, scale = _quantize_rows(w - up.float() @ down.float(), scheme)
        out.weight.data, out.weight_scale = q, scale
        out.lowrank_up.data, out.lowrank_down.data = up, down
        if linear.bias is not None:
            out.bias.data = linear.bias.detach().clone()
        return out

    def residual(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.float()

    def dequantize(self) -> torch.Tensor:
        """The logical weight in fp32: residual plus branch."""
        return self.residual() + self.lowrank_up.float() @ self.lowrank_down.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)
        y = F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        return y + F.linear(F.linear(x, self.lowrank_down.to(x.dtype)), self.lowrank_up.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme}, rank={self.rank}"


class LowRankKind(QuantKind):
    """:class:`LowRankQuantLinear` as a quantized layer: hook mode leaves it untouched; fuse mode requantizes the
    residual ``deq(W) + ΔW − L·R`` and keeps the branch (``mode="branch"`` is the exact route)."""

    library = "lorakit"
    state_names = ("weight", "weight_scale")

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, LowRankQuantLinear)

    def info(self, module: nn.Module) -> QuantInfo:
        return QuantInfo(self.library, f"{module.scheme} per-row + low-rank branch r={module.rank}",
                         (module.out_features, module.in_features), module.lowrank_up.dtype)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.dequantize()

    def requantize(self, module: nn.Module, weight: torch.Tensor, rounding: str,
                   generator: torch.Generator | None) -> dict[str, Any]:
        if not self.float8(module):
            self._refuse_stochastic(rounding, module.scheme)
        residual = weight.float() - module.lowrank_up.float() @ module.lowrank_down.float()
        q, scale = _quantize_rows(residual, module.scheme)
        if rounding != "nearest":
            q = round_fp8(residual / scale, q.dtype, rounding, generator)
        return {"weight": nn.Parameter(q, requires_grad=False), "weight_scale": scale}

    def storage(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": module.weight, "weight_scale": module.weight_scale,
                "lowrank_up": module.lowrank_up, "lowrank_down": module.lowrank_down}

    def float8(self, module: nn.Module) -> bool:
        return module.scheme == "fp8"


# -- the branch route --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BranchStaged:
    """A layer's new branch tensors (old ones plus every LoRA's factors), computed but not yet swapped in."""

    name: str
    module: LowRankQuantLinear
    new_state: dict[str, Any]
    old_rank: int
    new_rank: int


def branch_stage(entries: list[tuple[str, nn.Module, list[tuple[int, Any, tuple[int, int] | None]]]],
                 strengths: Sequence[float]) -> list[BranchStaged]:
    """For each ``(name, module, [(lora index, LowRank factors or None, dst_rows)])``: the module's branch with the
    factors appended, ``up`` scaled by ``strength · scale`` (zero rows outside ``dst_rows``). Nothing is swapped;
    raises :class:`UnsupportedAdapterError` for a module without a branch or an adapter without exact factors."""
    staged = []
    for name, module, pieces in entries:
        if not isinstance(module, LowRankQuantLinear):
            raise UnsupportedAdapterError(
                f"{name} is a {type(module).__name__}, not a low-rank-branch layer: mode='branch' needs a model "
                "written by `lorakit quantize --lowrank`; use mode='hook' (or 'fuse') on this model"
            )
        ups, downs = [module.lowrank_up], [module.lowrank_down]
        dtype = module.lowrank_up.dtype
        for lora, factors, dst in pieces:
            s = float(strengths[lora])
            if s == 0.0:
                continue
            if factors is None:
                raise UnsupportedAdapterError(
                    f"{name}: this adapter (LoHa, LoKr, DoRA, full diff, ...) has no exact low-rank factors to append "
                    "to the branch; apply it with mode='hook'"
                )
            up = factors.up.float().reshape(factors.up.shape[0], -1) * (s * factors.scale)
            down = factors.down.float().reshape(factors.down.shape[0], -1)
            if down.shape[1] != module.in_features:
                raise ShapeMismatchError(f"{name}: LoRA down {tuple(down.shape)} does not fit in={module.in_features}")
            rows = (0, module.out_features) if dst is None else dst
            if up.shape[0] != rows[1] - rows[0]:
                raise ShapeMismatchError(f"{name}: LoRA up {tuple(up.shape)} does not fit rows {rows}")
            full = torch.zeros(module.out_features, up.shape[1])
            full[rows[0]:rows[1]] = up
            ups.append(full.to(dtype))
            downs.append(down.to(dtype))
        if len(ups) == 1:
            continue
        new = {"lowrank_up": nn.Parameter(torch.cat(ups, 1), requires_grad=False),
               "lowrank_down": nn.Parameter(torch.cat(downs, 0), requires_grad=False)}
        staged.append(BranchStaged(name, module, new, module.rank, int(new["lowrank_down"].shape[0])))
    return staged


def branch_commit(staged: list[BranchStaged]) -> list[Callable[[], None]]:
    """Swap the longer branches in; one undo per layer puts the very original tensors (and ranks) back."""
    undos: list[Callable[[], None]] = []
    for s in staged:
        old = swap_state(s.module, s.new_state)
        undos.append(lambda module=s.module, old=old: swap_state(module, old) and None)
    return undos


# -- whole models and files ----------------------------------------------------------------------------------------
def quantize_model(model: nn.Module, scheme: str = "int8", rank: int = 32, *, min_features: int = 0,
                   branch_dtype: torch.dtype = torch.bfloat16) -> dict[str, dict[str, float]]:
    """Replace every ``nn.Linear`` of ``model`` whose smaller side exceeds ``rank`` (and ``min_features``) by a
    :class:`LowRankQuantLinear`, in place. Returns per layer the relative Frobenius error of the weight with the
    branch (``error``) and of plain per-row quantization without it (``error_no_branch``)."""
    errors: dict[str, dict[str, float]] = {}
    for name, child in list(model.named_modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is not nn.Linear or min(sub.in_features, sub.out_features) <= max(rank, min_features):
                continue
            full = f"{name}.{attr}" if name else attr
            q = LowRankQuantLinear.from_linear(sub, rank, scheme, branch_dtype)
            w = sub.weight.detach().float()
            plain_q, plain_s = _quantize_rows(w, scheme)
            errors[full] = {
                "error": float((q.dequantize() - w).norm() / w.norm()),
                "error_no_branch": float((plain_q.float() * plain_s - w).norm() / w.norm()),
            }
            setattr(child, attr, q)
    return errors


def lowrank_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state dict and the metadata (scheme and rank per layer) that :func:`load_lowrank` reads."""
    layers = {name: {"scheme": m.scheme, "rank": m.rank, "in": m.in_features, "out": m.out_features,
                     "bias": m.bias is not None}
              for name, m in model.named_modules() if isinstance(m, LowRankQuantLinear)}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return state, {METADATA_KEY: json.dumps(layers, sort_keys=True)}


def load_lowrank(model: nn.Module, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> nn.Module:
    """Put the low-rank-branch layers named in ``metadata`` into ``model`` (a float model of the same
    architecture) and load ``state`` into it (strict)."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        raise UnsupportedAdapterError(f"no {METADATA_KEY!r} metadata: not a file written by `lorakit quantize --lowrank`")
    for name, spec in json.loads(raw).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        branch_dtype = state[f"{name}.lowrank_up"].dtype
        setattr(parent, attr, LowRankQuantLinear(spec["in"], spec["out"], spec["rank"], spec["scheme"], spec["bias"],
                                                 branch_dtype))
    model.load_state_dict(state, strict=True, assign=True)
    return model


def quantize_state_dict(state: dict[str, torch.Tensor], scheme: str = "int8", rank: int = 32, *,
                        exclude: str = r"embed|norm", branch_dtype: torch.dtype = torch.bfloat16,
                        ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, dict[str, float]]]:
    """A checkpoint's every 2-D floating ``<name>.weight`` whose smaller side exceeds ``rank`` (and whose name does
    not match ``exclude``: embeddings, norms) as ``weight`` (int8/fp8) + ``weight_scale`` + ``lowrank_up`` +
    ``lowrank_down``; other tensors unchanged. Returns the new state, the metadata :func:`load_lowrank` reads, and
    per layer the relative error with and without the branch."""
    out: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    errors: dict[str, dict[str, float]] = {}
    skip = re.compile(exclude) if exclude else None
    for key, t in state.items():
        name = key.removesuffix(".weight")
        if (not key.endswith(".weight") or t.dim() != 2 or not t.is_floating_point() or min(t.shape) <= rank
                or (skip is not None and skip.search(name))):
            out.setdefault(key, t)
            continue
        lin = nn.Linear(t.shape[1], t.shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter(t.detach().float(), requires_grad=False)
        q = LowRankQuantLinear.from_linear(lin, rank, scheme, branch_dtype)
        for part in ("weight", "weight_scale", "lowrank_up", "lowrank_down"):
            out[f"{name}.{part}"] = getattr(q, part).detach().contiguous()
        layers[name] = {"scheme": scheme, "rank": rank, "in": int(t.shape[1]), "out": int(t.shape[0]),
                        "bias": f"{name}.bias" in state}
        w = lin.weight
        plain_q, plain_s = _quantize_rows(w, scheme)
        errors[name] = {"error": float((q.dequantize() - w).norm() / w.norm()),
                        "error_no_branch": float((plain_q.float() * plain_s - w).norm() / w.norm())}
    return out, {METADATA_KEY: json.dumps(layers, sort_keys=True)}, errors
