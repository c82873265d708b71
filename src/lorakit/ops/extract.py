"""Extract a LoRA from two checkpoints (BASE, TUNED): a low-rank factorisation of TUNED − BASE per layer,
conv LoRA for conv kernels, ``diff_b``/``w_norm``/``b_norm`` for biases and norms, or full ``diff`` tensors.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..adapters import FullDiff, LoRAWeights, NormDiff, WeightAdapter
from ..errors import FormatError, ShapeMismatchError
from ..formats.conventions import NATIVE_PREFIX, kohya_name, peft_prefix
from ..io import check_output
from ..model import Layer, LoRA
from .common import (
    UNSET,
    Checkpoint,
    OpResult,
    Progress,
    Record,
    TensorInfo,
    check_finite,
    parse_dtype,
    save_lora,
    select,
)
from .svd import Factorisation, allocate_budget, factorise

__all__ = ["ExtractLayerStat", "ExtractSummary", "ModuleParts", "extract"]

#: a module of a checkpoint: ``(component, module path)``
_Ident = tuple[str | None, str]


@dataclasses.dataclass(frozen=True)
class ExtractLayerStat(Record):
    """One changed tensor: the kind of delta it became (``lora``, ``diff``, ``w_norm``, ``b_norm``, ``diff_b``,
    ``diff_m``, or ``dropped`` by a budget) and its error. ``rank``/``energy`` only for factorised weights,
    ``bound_met`` only for those kept as LoRA factors."""

    key: str
    shape: list[int]
    kind: str
    rank: int | None = UNSET
    rel_error: float = UNSET
    energy: float = UNSET
    bound_met: bool = UNSET


@dataclasses.dataclass(frozen=True)
class ExtractSummary(Record):
    tensors_compared: int
    unchanged: int
    layers: int
    lora_layers: int
    dropped_by_budget: int
    unsupported: list[str]
    total_rank: int
    mean_rel_error: float
    max_rel_error: float
    parameters: int
    #: layers where the --rank cap stopped --energy/--max-error before the target was reached
    bound_not_met: list[str]


@dataclasses.dataclass
class ModuleParts:
    """What ``TUNED − BASE`` holds for one module while ranks are still being chosen: the factorised weight
    (``weight_shape`` is its kernel shape), or a dense/norm weight delta, a bias delta (file key ``bias_key``)
    and a modulation delta."""

    weight_factor: Factorisation | None = None
    weight_shape: tuple[int, ...] = ()
    full: torch.Tensor | None = None
    norm: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    bias_key: str = "diff_b"
    modulation: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class _Rules:
    """The rank options of :func:`extract`, checked once."""

    rank: int | None
    conv_rank: int | None
    energy: float | None
    max_error: float | None
    rank_budget: int | None
    size_budget_mb: float | None
    diff_only: bool
    min_diff: float

    def __post_init__(self) -> None:
        if self.energy is not None and self.max_error is not None:
            raise ValueError("pass either energy or max_error, not both")
        if self.rank_budget is not None and self.size_budget_mb is not None:
            raise ValueError("pass either rank_budget or size_budget_mb, not both")
        if self.budget and (self.energy is not None or self.max_error is not None):
            raise ValueError("a global budget and energy/max_error both choose the ranks; pass only one of them")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.max_error is not None and not 0 <= self.max_error < 1:
            raise ValueError(f"max_error must be in [0, 1), got {self.max_error}")

    @property
    def budget(self) -> bool:
        return self.rank_budget is not None or self.size_budget_mb is not None

    def rank_for(self, shape: torch.Size) -> int | None:
        """``rank`` for linear and 1×1 conv kernels, ``conv_rank`` (default ``rank``) for k×k convs."""
        if len(shape) == 2 or all(s == 1 for s in shape[2:]):
            return self.rank
        return self.rank if self.conv_rank is None else self.conv_rank


def _pair(base: Checkpoint, tuned: Checkpoint, include, exclude) -> list[tuple[TensorInfo, TensorInfo]]:
    b_keys = {k for k, i in base.infos.items() if select(i.key, include, exclude)}
    t_keys = {k for k, i in tuned.infos.items() if select(i.key, include, exclude)}
    for missing, here, there in ((b_keys - t_keys, base.path, tuned.path), (t_keys - b_keys, tuned.path, base.path)):
        if missing:
            some = ", ".join(sorted(i.ref for i in (base.infos.get(k) or tuned.infos[k] for k in missing))[:5])
            raise FormatError(
                f"{len(missing)} tensors of {here} are not in {there} (e.g. {some}); the checkpoints are not the same "
                "architecture. Restrict the comparison with --include/--exclude if that is intended."
            )
    pairs = []
    for k in sorted(b_keys, key=lambda k: (k[0] or "", k[1])):
        bi, ti = base.infos[k], tuned.infos[k]
        if bi.shape != ti.shape:
            raise ShapeMismatchError(
                f"{bi.ref}: shape {bi.shape} in {base.path} but {ti.shape} in {tuned.path}; "
                "the checkpoints are not the same architecture."
            )
        pairs.append((bi, ti))
    return pairs


def _layer_name(component: str | None, module: str, fmt: str) -> tuple[str, str]:
    """(layer name, layer path) of a checkpoint module in the output spelling."""
    for p in NATIVE_PREFIX["denoiser"]:  # single-file prefixes are not part of the module's identity
        if module.startswith(p):
            module = module[len(p):]
            break
    if fmt == "peft":
        return peft_prefix(component) + module, module
    return kohya_name(component or "denoiser", module), module.replace(".", "_")


@dataclasses.dataclass
class _Scan:
    """Every selected tensor pair diffed: parts per module, a stat per changed tensor (in pair order)."""

    modules: dict[_Ident, ModuleParts] = dataclasses.field(default_factory=dict)
    stats: dict[str, ExtractLayerStat] = dataclasses.field(default_factory=dict)
    unchanged: int = 0
    unsupported: list[str] = dataclasses.field(default_factory=list)


def _read_diff(b_ck: Checkpoint, t_ck: Checkpoint, bi: TensorInfo, ti: TensorInfo) -> torch.Tensor:
    b = b_ck.read(bi).float()
    check_finite(b, f"{b_ck.path}: {bi.ref}")
    t = t_ck.read(ti).float()
    check_finite(t, f"{t_ck.path}: {ti.ref}")
    return t - b


def _take_delta(parts: ModuleParts, param: str, diff: torch.Tensor, seed: int, rules: _Rules,
                norm_module: bool) -> str | None:
    """Store one tensor's delta in its module's parts; the stat kind, or None when no file spelling fits."""
    if param == "weight" and diff.dim() >= 2 and not rules.diff_only:
        r = rules.rank_for(diff.shape)
        if not r:
            return None  # --conv-rank 0 switches k×k convs off
        # energy/max_error are None under a global budget (checked in _Rules): the budget picks the ranks
        parts.weight_factor = factorise(diff.reshape(diff.shape[0], -1), rank=r, energy=rules.energy,
                                        max_error=rules.max_error, seed=seed)
        parts.weight_shape = tuple(diff.shape)
        return "lora"
    if param == "weight":
        if diff.dim() == 1:
            parts.norm = diff
            return "w_norm"
        parts.full = diff
        return "diff"
    if param == "bias" and diff.dim() == 1:
        parts.bias = diff
        parts.bias_key = "b_norm" if norm_module else "diff_b"
        return parts.bias_key
    if param == "modulation":
        parts.modulation = diff
        return "diff_m"
    return None


def _scan(b_ck: Checkpoint, t_ck: Checkpoint, pairs: list[tuple[TensorInfo, TensorInfo]], rules: _Rules,
          progress: Progress | None) -> _Scan:
    scan = _Scan()
    weight_ndim = {(i.component, i.key.rsplit(".", 1)[0]): len(i.shape) for i, _ in pairs if i.key.endswith(".weight")}
    for n, (bi, ti) in enumerate(pairs):
        if progress:
            progress("extract", n, len(pairs))
        if not bi.dtype.is_floating_point:
            continue
        diff = _read_diff(b_ck, t_ck, bi, ti)
        if diff.numel() == 0 or float(diff.abs().max()) <= rules.min_diff:
            scan.unchanged += 1
            continue
        if "." not in bi.key:
            scan.unsupported.append(bi.ref)
            continue
        module, param = bi.key.rsplit(".", 1)
        ident = (bi.component, module)
        parts = scan.modules.setdefault(ident, ModuleParts())
        kind = _take_delta(parts, param, diff, n, rules, weight_ndim.get(ident) == 1)
        if kind is None:
            scan.unsupported.append(bi.ref)
            continue
        # a factorised weight's error is known once its rank is final (_final_weight)
        scan.stats[bi.ref] = ExtractLayerStat(bi.ref, list(bi.shape), kind, rel_error=UNSET if kind == "lora" else 0.0)
    return scan


def _apply_budget(modules: dict[_Ident, ModuleParts], rules: _Rules, itemsize: int) -> None:
    """Global budgets: allocate rank units where σ² is largest (per byte for the size budget)."""
    factored = {str(k): p for k, p in modules.items() if p.weight_factor is not None}
    if not factored or not rules.budget:
        return
    facts = {k: p.weight_factor for k, p in factored.items()}
    spectra = {k: f.spectrum[: f.rank] for k, f in facts.items()}
    costs = {k: (f.up.shape[0] + f.down.shape[1]) * itemsize for k, f in facts.items()}
    size = None if rules.size_budget_mb is None else int(rules.size_budget_mb * 1e6)
    alloc = allocate_budget(spectra, costs, ranks=rules.rank_budget, size=size)
    for k, p in factored.items():
        p.weight_factor = facts[k].truncate(alloc[k])


def _final_weight(ident: _Ident, parts: ModuleParts, b_ck: Checkpoint, t_ck: Checkpoint,
                  stat: ExtractLayerStat) -> tuple[WeightAdapter | None, ExtractLayerStat]:
    """The adapter of a factorised weight at its final rank, and its completed stat."""
    f, shape = parts.weight_factor, parts.weight_shape
    if f.rank == 0:
        return None, dataclasses.replace(stat, kind="dropped", rank=0, rel_error=1.0, energy=0.0)
    if f.rank * (f.up.shape[0] + f.down.shape[1]) >= shape[0] * f.down.shape[1]:
        # Re-read the exact delta: stored dense it is lossless and no larger than the factors.
        key = (ident[0], ident[1] + ".weight")
        exact = t_ck.read(t_ck.infos[key]).float() - b_ck.read(b_ck.infos[key]).float()
        return FullDiff(exact), dataclasses.replace(stat, kind="diff", rank=None, rel_error=0.0, energy=1.0)
    down = f.down.reshape(f.rank, *shape[1:])
    up = f.up.reshape(shape[0], f.rank, *([1] * (len(shape) - 2)))
    weight = LoRAWeights(down=down, up=up, alpha=float(f.rank))
    return weight, dataclasses.replace(stat, rank=f.rank, rel_error=f.rel_error, energy=f.energy,
                                       bound_met=f.bound_met)


def _build_layers(scan: _Scan, b_ck: Checkpoint, t_ck: Checkpoint, fmt: str) -> dict[str, Layer]:
    """One layer per changed module (completing the stats of factorised weights in ``scan``)."""
    layers: dict[str, Layer] = {}
    for ident in sorted(scan.modules, key=lambda k: (k[0] or "", k[1])):
        comp, module = ident
        parts = scan.modules[ident]
        weight: WeightAdapter | None = None
        if parts.weight_factor is not None:
            ref = (f"{comp}/" if comp else "") + module + ".weight"
            weight, scan.stats[ref] = _final_weight(ident, parts, b_ck, t_ck, scan.stats[ref])
        elif parts.full is not None:
            weight = FullDiff(parts.full)
        elif parts.norm is not None:
            weight = NormDiff(parts.norm)
        if weight is None and parts.bias is None and parts.modulation is None:
            continue
        name, path = _layer_name(comp, module, fmt)
        layers[name] = Layer(
            name=name, component=comp, path=path, flat=fmt == "kohya", weight=weight, bias=parts.bias,
            params={} if parts.modulation is None else {"modulation": parts.modulation}, bias_key=parts.bias_key,
        )
    return layers


def _summarise(pairs: int, scan: _Scan, lora: LoRA) -> ExtractSummary:
    stats = list(scan.stats.values())
    errs = [s.rel_error for s in stats if s.kind == "lora"]
    return ExtractSummary(
        tensors_compared=pairs, unchanged=scan.unchanged, layers=len(lora.layers), lora_layers=len(errs),
        dropped_by_budget=sum(1 for s in stats if s.kind == "dropped"), unsupported=sorted(scan.unsupported),
        total_rank=sum(s.get("rank") or 0 for s in stats),
        mean_rel_error=sum(errs) / len(errs) if errs else 0.0, max_rel_error=max(errs, default=0.0),
        parameters=lora.parameters(), bound_not_met=sorted(s.key for s in stats if s.get("bound_met") is False),
    )


def extract(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    *,
    rank: int | None = 32,
    conv_rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    rank_budget: int | None = None,
    size_budget_mb: float | None = None,
    diff_only: bool = False,
    dtype: str | torch.dtype | None = None,
    format: str = "kohya",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    min_diff: float = 0.0,
    progress: Progress | None = None,
) -> OpResult:
    """Extract ``TUNED − BASE`` as a LoRA and write it to ``output`` (skipped when ``output`` is None).

    Rank rules: ``rank`` (linear and 1×1 conv) and ``conv_rank`` (k×k conv, default ``rank``) are fixed ranks,
    or caps for ``energy``/``max_error``; budgets share ``rank_budget`` total rank units / ``size_budget_mb``
    megabytes (1e6 bytes) of factors across layers. A layer whose chosen factors would hold more numbers
    than the dense delta is stored as a full ``diff`` (exact and smaller). Output ``alpha = rank`` (scale 1)."""
    rules = _Rules(rank, conv_rank, energy, max_error, rank_budget, size_budget_mb, diff_only, min_diff)
    out_dtype = parse_dtype(dtype)
    if output is not None:
        check_output(output, [base, tuned])
    b_ck, t_ck = Checkpoint(base), Checkpoint(tuned)
    pairs = _pair(b_ck, t_ck, include, exclude)
    scan = _scan(b_ck, t_ck, pairs, rules, progress)
    _apply_budget(scan.modules, rules, torch.finfo(out_dtype or torch.float32).bits // 8)
    layers = _build_layers(scan, b_ck, t_ck, format)
    lora = LoRA(layers=layers, metadata={"lorakit_op": "extract", "lorakit_rank": str(rank)}, format=format)
    if output is not None:
        if not layers:
            raise FormatError(f"{tuned} does not differ from {base} in any selected tensor; nothing to write")
        save_lora(lora, output, format, dtype=out_dtype, inputs=[base, tuned])
    if progress:
        progress("extract", len(pairs), len(pairs))
    summary = _summarise(len(pairs), scan, lora)
    return OpResult("extract", None if output is None else str(Path(output)), summary, list(scan.stats.values()),
                    lora=lora)
