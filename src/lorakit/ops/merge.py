"""Bake LoRAs into a checkpoint, streaming: each tensor is read, patched in fp32 (``W + Σ sᵢ ΔWᵢ``, rounded
once) and written before the next is read, so peak memory is about the largest tensor plus the LoRAs.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import InternalError, MatchError, OverwriteError, ShapeMismatchError
from ..families import Resolver, Target
from ..io import (
    atomic_folder,
    atomic_output,
    check_output,
    parse_lora_spec,  # re-exported: the CLI and the library share one parser
    read_metadata,
    remove_stale_temps,
)
from ..model import Layer, LoRA
from ..placement import bias_delta, weight_delta
from .common import (
    ST_NAMES,
    Checkpoint,
    OpResult,
    Progress,
    Record,
    TensorInfo,
    check_finite,
    checkpoint_resolver,
    load_lora,
    module_tensors,
    parse_dtype,
)

__all__ = ["DeltaKind", "MergeLoraReport", "MergeSummary", "PlanEntry", "merge", "parse_lora_spec", "plan_merge"]


@dataclasses.dataclass(frozen=True)
class MergeLoraReport(Record):
    """How one LoRA of a merge matched the checkpoint: layers matched (``routed`` of them through the
    ``family`` router) and the names of the layers that match no module."""

    lora: str
    strength: float
    matched: int
    routed: int
    family: str | None
    unmatched: list[str]


@dataclasses.dataclass(frozen=True)
class MergeSummary(Record):
    tensors: int
    patched_tensors: int
    loras: list[MergeLoraReport]
    #: the output dtype of floating tensors (None: as in the base)
    dtype: str | None


class DeltaKind(str, enum.Enum):
    """Which tensor of a module a planned delta lands on."""

    WEIGHT = "weight"
    BIAS = "bias"
    PARAM = "param"  # another parameter: Wan modulation / scale_shift_table ...


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """One LoRA layer's delta on one checkpoint tensor (``param`` of ``target.module``, rows ``target.dst_rows``)."""

    strength: float
    layer: Layer
    kind: DeltaKind
    param: str
    target: Target
    #: placed through the family router (fused/split rows, row transforms, renamed parameters)
    routed: bool = False

    def delta(self, w: torch.Tensor) -> torch.Tensor:
        """fp32 delta (strength 1) of this entry for checkpoint tensor ``w``, shaped like the rows it lands on."""
        if self.kind is DeltaKind.WEIGHT:
            return weight_delta(self.layer, self.target, w)
        if self.kind is DeltaKind.BIAS:
            return bias_delta(self.layer, self.target)
        inverse = {b: a for a, b in self.target.param_map}
        return self.layer.params[inverse.get(self.param, self.param)].float()


#: checkpoint tensor ``(component, key)`` -> the deltas landing on it
Plan = dict[tuple[str | None, str], list[PlanEntry]]


@dataclasses.dataclass
class _LoraMatches:
    targets: dict[str, list[Target]] = dataclasses.field(default_factory=dict)
    routed: set[str] = dataclasses.field(default_factory=set)
    unmatched: list[str] = dataclasses.field(default_factory=list)


def _rows_fit(layer: Layer, target: Target, info: TensorInfo) -> str | None:
    """Why a routed delta does not fit its checkpoint tensor rows (None when it does)."""
    w = layer.weight
    if w is None:
        return None
    rows_src = (target.src_rows[1] - target.src_rows[0]) if target.src_rows else w.out_features()
    rows_dst = (target.dst_rows[1] - target.dst_rows[0]) if target.dst_rows else info.shape[0]
    numel = w.delta_numel()
    cols = math.prod(info.shape[1:])
    if rows_src != rows_dst or numel != w.out_features() * cols:
        return (f"layer {layer.name} gives {rows_src} rows of {numel // max(1, w.out_features())} "
                f"values for {rows_dst} rows of {info.ref} {info.shape}")
    return None


def _match(resolver: Resolver, lora: LoRA) -> _LoraMatches:
    found = _LoraMatches()
    for layer in lora:
        direct = resolver.direct(layer)
        targets = direct or resolver.routed(layer)
        if not targets:
            found.unmatched.append(layer.name)
            continue
        found.targets[layer.name] = targets
        if not direct:
            found.routed.add(layer.name)
    found.unmatched.sort()
    return found


def _wanted(layer: Layer, target: Target) -> list[tuple[DeltaKind, str, int]]:
    """``(kind, checkpoint parameter, elements)`` of every delta the layer has for this target."""
    out = []
    if layer.weight is not None:
        # a base-dependent delta (OFT, BOFT, (IA)^3, GLoRA) has the tensor's own shape: checked in _base_fit
        out.append((DeltaKind.WEIGHT, "weight", -1 if layer.weight.needs_base else layer.weight.delta_numel()))
    bias = layer.delta_bias()
    if bias is not None:
        out.append((DeltaKind.BIAS, "bias", bias.numel()))
    renames = dict(target.param_map)
    out.extend((DeltaKind.PARAM, renames.get(p, p), t.numel()) for p, t in layer.params.items())
    return out


def _plan_entry(label: str, ckpt: Checkpoint, resolver: Resolver, layer: Layer, target: Target, routed: bool,
                strength: float, want: tuple[DeltaKind, str, int]) -> tuple[TensorInfo, PlanEntry]:
    """Check that one delta fits its checkpoint tensor; raise ShapeMismatchError naming both when it does not."""
    kind, param, numel = want
    info = module_tensors(ckpt, resolver, target).get(param)
    if info is None:
        raise ShapeMismatchError(
            f"{label}: layer {layer.name} has a {param} delta but {ckpt.path} has no tensor "
            f"{target.module}.{param}; the LoRA does not fit this checkpoint."
        )
    if kind is DeltaKind.WEIGHT and layer.weight.needs_base:
        _base_fit(label, layer, target, info)
    elif routed and kind is DeltaKind.WEIGHT:
        if layer.dora is not None and (target.src_rows or target.transform):
            raise ShapeMismatchError(
                f"{label}: {layer.name} is a DoRA layer on a fused projection that the checkpoint "
                f"stores split ({info.ref}); merge it into a checkpoint with the fused layout, or "
                "apply it to the loaded model with lorakit.apply"
            )
        why = _rows_fit(layer, target, info)
        if why:
            raise ShapeMismatchError(f"{label}: {why}; the LoRA was trained for another model size.")
    elif not routed and numel != math.prod(info.shape):
        raise ShapeMismatchError(
            f"{label}: layer {layer.name} gives a delta of {numel} elements for {info.ref} of shape "
            f"{info.shape}; the LoRA was trained for another model (or model size)."
        )
    return info, PlanEntry(strength, layer, kind, param, target, routed)


def _base_fit(label: str, layer: Layer, target: Target, info: TensorInfo) -> None:
    """Check a base-dependent delta against the checkpoint tensor's shape (run on a meta tensor: no data read)."""
    shape = list(info.shape)
    if target.dst_rows is not None:
        shape[0] = target.dst_rows[1] - target.dst_rows[0]
    try:
        layer.weight.delta_from_base(torch.empty(shape, device="meta"))
    except ShapeMismatchError as exc:
        raise ShapeMismatchError(f"{label}: layer {layer.name} does not fit {info.ref} {info.shape}: {exc}") from exc


def plan_merge(
    ckpt: Checkpoint, loras: Sequence[tuple[LoRA, float]], strict: bool = False
) -> tuple[Plan, list[MergeLoraReport]]:
    """Resolve every LoRA layer to checkpoint tensors and check shapes, before any output is written. Names
    the checkpoint does not have are routed through the model family (fused/split projections, original vs
    diffusers names: :class:`lorakit.families.Router`)."""
    resolver = checkpoint_resolver(ckpt, [lo for lo, _ in loras])
    plan: Plan = {}
    report = []
    for lora, strength in loras:
        label = lora.source or "LoRA"
        found = _match(resolver, lora)
        if not found.targets:
            some = ", ".join(found.unmatched[:3])
            raise MatchError(
                f"{label}: none of its {len(lora)} layers matches a module of {ckpt.path} (e.g. {some}). "
                "Is it a LoRA for another model family, or does the checkpoint use another naming scheme?"
            )
        if strict and found.unmatched:
            raise MatchError(f"{label}: {len(found.unmatched)} layers match no module of {ckpt.path}: "
                             f"{', '.join(found.unmatched[:10])}")
        for layer in lora:
            routed = layer.name in found.routed
            for target in found.targets.get(layer.name, ()):
                for want in _wanted(layer, target):
                    info, entry = _plan_entry(label, ckpt, resolver, layer, target, routed, strength, want)
                    plan.setdefault((info.component, info.key), []).append(entry)
        router = resolver.router if found.routed else None
        report.append(MergeLoraReport(label, strength, len(found.targets), len(found.routed),
                                      None if router is None else router.family, found.unmatched))
    return plan, report


def _patched(w: torch.Tensor, entries: list[PlanEntry], info: TensorInfo, out_dtype: torch.dtype) -> torch.Tensor:
    acc = w.to(torch.float32, copy=True)  # never write into the tensor read (a loaded .pt keeps it)
    for e in entries:
        # rows `src_rows` of the layer's delta (row order fixed by `transform`) onto rows `dst_rows`
        rows = e.target.dst_rows if e.kind is not DeltaKind.PARAM else None
        view = acc if rows is None else acc[rows[0]:rows[1]]
        view += e.strength * e.delta(w).reshape(view.shape)  # strengths and deltas in fp32, rounded once below
    check_finite(acc, f"merged tensor {info.ref}")
    return acc.to(out_dtype)


def _header_for(infos: list[TensorInfo], dtypes: dict[str, torch.dtype], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    sizes = []
    for info in infos:
        dt = dtypes[info.key]
        nbytes = math.prod(info.shape) * dt.itemsize
        header[info.key] = {"dtype": ST_NAMES[dt], "shape": list(info.shape), "data_offsets": [offset, offset + nbytes]}
        sizes.append(nbytes)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte aligned data start, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw, sizes


def _stream_file(ckpt: Checkpoint, file: Path, dest: Path, plan: Plan, out_dtype, progress, counter: list[int]) -> int:
    infos = [i for i in ckpt if i.file == file]
    if all(i.offsets is not None for i in infos):
        infos.sort(key=lambda i: i.offsets[0])  # keep the input's order, sequential reads
    dtypes = {i.key: (out_dtype if out_dtype is not None and i.dtype.is_floating_point else i.dtype) for i in infos}
    # safetensors input: keep its metadata
    meta = read_metadata(file) if infos and infos[0].offsets is not None else {}
    head, sizes = _header_for(infos, dtypes, meta)
    patched = 0
    with open(dest, "wb") as out:
        out.write(head)
        for info, size in zip(infos, sizes):
            ops = plan.get((info.component, info.key))
            if not ops and dtypes[info.key] == info.dtype and info.offsets is not None:
                out.write(ckpt.read_raw(info))  # untouched: copy the bytes, bit-identical
            else:
                w = ckpt.read(info)
                t = _patched(w, ops, info, dtypes[info.key]) if ops else w.to(dtypes[info.key])
                patched += bool(ops)
                data = t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
                if len(data) != size:
                    raise InternalError(f"{info.ref}: {len(data)} bytes to write where the header says {size}")
                out.write(memoryview(data))
                del w, t, data
            counter[0] += 1
            if progress:
                progress("merge", counter[0], len(ckpt))
    return patched


def _write_pt(ckpt: Checkpoint, out: Path, plan: Plan, out_dtype: torch.dtype | None) -> int:
    """The whole patched model as one weights-only pickle; the number of patched tensors."""
    state = {}
    patched = 0
    for info in ckpt:
        w = ckpt.read(info)
        ops = plan.get((info.component, info.key))
        dt = out_dtype if out_dtype is not None and w.is_floating_point() else w.dtype
        state[info.ref] = _patched(w, ops, info, dt) if ops else w.to(dt).clone()
        patched += bool(ops)
    with atomic_output(out) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)  # through a Python file, so a failed write is an OSError (ENOSPC ...), not a RuntimeError
    return patched


def _copy_folder(ckpt: Checkpoint, dest_root: Path, plan: Plan, out_dtype, progress, counter: list[int]) -> int:
    """The diffusers folder with its weight files streamed through the plan and everything else copied."""
    patched = 0
    st_files = set(ckpt.files)
    for src in sorted(ckpt.path.rglob("*")):
        dest = dest_root / src.relative_to(ckpt.path)
        if src.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        elif src in st_files:
            dest.parent.mkdir(parents=True, exist_ok=True)
            patched += _stream_file(ckpt, src, dest, plan, out_dtype, progress, counter)
        elif src.suffix != ".safetensors":  # configs, tokenizers; unused variant weights are left out
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
    return patched


def _write_folder(ckpt: Checkpoint, out: Path, plan: Plan, out_dtype, progress, counter: list[int]) -> int:
    """Write the patched folder next to ``out`` (absent or empty) and move it into place once it is complete."""
    with atomic_folder(out) as tmpdir:
        return _copy_folder(ckpt, tmpdir, plan, out_dtype, progress, counter)


def _check_merge_output(base, lora_paths, output, format: str) -> Path:
    """Every check of the output that needs no LoRA and no tensor data, so a bad ``-o`` fails before any work."""
    folder_out = format != "pt" and Path(base).expanduser().is_dir()
    out = check_output(output, [base, *lora_paths], folder=folder_out)
    if Path(base).expanduser().is_dir() and out.resolve() == Path(base).expanduser().resolve():
        raise OverwriteError(f"Output {output} is the input folder {base}; choose another output path.")
    if folder_out and out.is_dir() and any(out.iterdir()):
        raise OverwriteError(f"Output folder {output} exists and is not empty; remove it or choose another path.")
    return out


def merge(
    base: str | os.PathLike[str],
    loras: Sequence[tuple[str | os.PathLike[str] | LoRA, float]],
    output: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    format: str = "safetensors",
    strict: bool = False,
    progress: Progress | None = None,
) -> OpResult:
    """Write ``base + Σ sᵢ ΔWᵢ`` to ``output``. A folder ``base`` (diffusers) gives a folder ``output``.

    Every LoRA must match at least one module (``MatchError``) and every matched delta must fit its tensor
    (``ShapeMismatchError``), checked before anything is written; unmatched layers are reported
    (``strict=True`` makes them an error). ``format="pt"`` loads the whole model and writes a pickle."""
    if format not in ("safetensors", "pt"):
        raise ValueError(f"format must be 'safetensors' or 'pt', got {format!r}")
    out_dtype = parse_dtype(dtype)
    out = _check_merge_output(base, [src for src, _ in loras if not isinstance(src, LoRA)], output, format)
    ckpt = Checkpoint(base)
    parsed = [(load_lora(src), float(s)) for src, s in loras]
    plan, report = plan_merge(ckpt, parsed, strict)
    remove_stale_temps(out)  # hidden temp files of this output left by a killed run
    counter = [0]
    if format == "pt":
        patched = _write_pt(ckpt, out, plan, out_dtype)
    elif ckpt.path.is_dir():
        patched = _write_folder(ckpt, out, plan, out_dtype, progress, counter)
    else:
        with atomic_output(out) as tmp:
            patched = _stream_file(ckpt, ckpt.path, tmp, plan, out_dtype, progress, counter)
    summary = MergeSummary(len(ckpt), patched, report, None if out_dtype is None else str(out_dtype).replace("torch.", ""))
    return OpResult("merge", str(out), summary, [])
