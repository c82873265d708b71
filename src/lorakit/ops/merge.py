"""Bake LoRAs into a checkpoint, streaming: each tensor is read, patched in fp32 (``W + Σ sᵢ ΔWᵢ``, rounded
once) and written before the next is read, so peak memory is about the largest tensor plus the LoRAs.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import MatchError, OverwriteError, ShapeMismatchError
from ..io import (
    atomic_output,
    check_not_input,
    parse_lora_spec,  # re-exported: the CLI and the library share one parser
)
from ..model import LoRA
from .common import (
    ST_NAMES,
    Checkpoint,
    ModuleIndex,
    OpResult,
    Progress,
    TensorInfo,
    check_finite,
    load_lora,
    parse_dtype,
    read_st_header,
    shape_numel,
)

__all__ = ["merge", "parse_lora_spec"]


def _delta_numel(layer) -> int | None:
    """Elements of the layer's weight delta without computing it (None when only computing tells)."""
    w = layer.weight
    if w is None:
        return None
    if w.kind == "lora":
        if w.mid is not None:
            return int(w.up.shape[0]) * int(w.down.shape[1]) * shape_numel(w.mid.shape[2:])
        return int(w.up.shape[0]) * shape_numel(w.down.shape[1:])
    if w.kind in ("full", "norm"):
        return next(iter(w.tensors().values())).numel()
    return w.natural_delta().numel()


# key -> list of (strength, layer, what) where what is "weight", "bias" or a param name
Plan = dict[tuple[str | None, str], list[tuple[float, object, str, object]]]


def _rows_fit(layer, target, info: TensorInfo) -> str | None:
    """Why a routed delta does not fit its checkpoint tensor rows (None when it does)."""
    w = layer.weight
    if w is None:
        return None
    rows_src = (target.src_rows[1] - target.src_rows[0]) if target.src_rows else w.out_features()
    rows_dst = (target.dst_rows[1] - target.dst_rows[0]) if target.dst_rows else info.shape[0]
    numel = _delta_numel(layer)
    cols = shape_numel(info.shape[1:])
    if rows_src != rows_dst or (numel is not None and numel != w.out_features() * cols):
        return (f"layer {layer.name} gives {rows_src} rows of {numel // max(1, w.out_features()) if numel else '?'} "
                f"values for {rows_dst} rows of {info.ref} {info.shape}")
    return None


def plan_merge(ckpt: Checkpoint, loras: Sequence[tuple[LoRA, float]], strict: bool = False) -> tuple[Plan, list[dict]]:
    """Resolve every LoRA layer to checkpoint tensors and check shapes, before any output is written. Names
    the checkpoint does not have are routed through the model family (fused/split projections, original vs
    diffusers names: :mod:`lorakit.ops.routing`)."""
    index = ModuleIndex(ckpt)
    plan: Plan = {}
    report = []
    router = None
    router_done = False
    for lora, strength in loras:
        label = lora.source or "LoRA"
        matches: dict[str, tuple[str | None, str]] = {}
        routed: dict[str, list] = {}
        unmatched: list[str] = []
        for layer in lora:
            hit = index.resolve(layer)
            if hit is not None:
                matches[layer.name] = hit
                continue
            if not router_done:
                from .routing import router_for

                router, router_done = router_for(ckpt, index, [lo for lo, _ in loras]), True
            targets = router.route(layer) if router is not None else None
            if targets:
                routed[layer.name] = targets
            else:
                unmatched.append(layer.name)
        unmatched.sort()
        if not matches and not routed:
            some = ", ".join(unmatched[:3])
            raise MatchError(
                f"{label}: none of its {len(lora)} layers matches a module of {ckpt.path} (e.g. {some}). "
                "Is it a LoRA for another model family, or does the checkpoint use another naming scheme?"
            )
        if strict and unmatched:
            raise MatchError(f"{label}: {len(unmatched)} layers match no module of {ckpt.path}: {', '.join(unmatched[:10])}")
        for layer in lora:
            hits = [(matches[layer.name], None)] if layer.name in matches else [
                ((t.component, t.module), t) for t in routed.get(layer.name, ())]
            for hit, target in hits:
                params = index.params[hit]
                wanted = []
                if layer.weight is not None:
                    wanted.append(("weight", _delta_numel(layer)))
                if layer.delta_bias() is not None:
                    wanted.append(("bias", layer.delta_bias().numel()))
                renames = dict(target.param_map) if target is not None else {}
                for p, t in layer.params.items():
                    wanted.append((renames.get(p, p), t.numel()))
                for what, numel in wanted:
                    info = params.get(what)
                    if info is None:
                        raise ShapeMismatchError(
                            f"{label}: layer {layer.name} has a {what} delta but {ckpt.path} has no tensor "
                            f"{hit[1]}.{what}; the LoRA does not fit this checkpoint."
                        )
                    if target is not None and what == "weight":
                        if layer.dora is not None and (target.src_rows or target.transform):
                            raise ShapeMismatchError(
                                f"{label}: {layer.name} is a DoRA layer on a fused projection that the checkpoint "
                                f"stores split ({info.ref}); merge it into a checkpoint with the fused layout, or "
                                "apply it to the loaded model with lorakit.apply"
                            )
                        why = _rows_fit(layer, target, info)
                        if why:
                            raise ShapeMismatchError(f"{label}: {why}; the LoRA was trained for another model size.")
                    elif target is None and numel is not None and numel != shape_numel(info.shape):
                        raise ShapeMismatchError(
                            f"{label}: layer {layer.name} gives a delta of {numel} elements for {info.ref} of shape "
                            f"{info.shape}; the LoRA was trained for another model (or model size)."
                        )
                    plan.setdefault((info.component, info.key), []).append((strength, layer, what, target))
        report.append({"lora": label, "strength": strength, "matched": len(matches) + len(routed),
                       "routed": len(routed), "family": router.family if router is not None and routed else None,
                       "unmatched": unmatched})
    return plan, report


def _patched(w: torch.Tensor, ops: list, info: TensorInfo, out_dtype: torch.dtype) -> torch.Tensor:
    from ..placement import bias_delta, weight_delta

    acc = w.to(torch.float32, copy=True)  # never write into the tensor read (a loaded .pt keeps it)
    for strength, layer, what, target in ops:
        if target is not None:
            # routed: rows `src_rows` of the layer's delta (row order fixed by `transform`) onto rows `dst_rows`
            if what == "weight":
                delta = weight_delta(layer, target, w)
            elif what == "bias":
                delta = bias_delta(layer, target)
            else:
                inverse = {b: a for a, b in target.param_map}
                delta = layer.params[inverse.get(what, what)].float()
            view = acc if target.dst_rows is None or what not in ("weight", "bias") else acc[target.dst_rows[0]:target.dst_rows[1]]
            view += strength * delta.reshape(view.shape)
            continue
        if what == "weight":
            delta = layer.delta_weight(base=w) if layer.dora is not None else layer.delta_weight(shape=tuple(w.shape))
        elif what == "bias":
            delta = layer.delta_bias()
        else:
            delta = layer.params[what].float()
        acc = acc + strength * delta.reshape(acc.shape)  # strengths and deltas in fp32, rounded once below
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
        nbytes = shape_numel(info.shape) * dt.itemsize
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
    meta: dict[str, str] = {}
    if infos and infos[0].offsets is not None:  # safetensors input: keep its metadata
        header, _ = read_st_header(file)
        meta = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
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
                assert len(data) == size
                out.write(memoryview(data))
                del w, t, data
            counter[0] += 1
            if progress:
                progress("merge", counter[0], len(ckpt))
    return patched


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
    lora_paths = [src for src, _ in loras if not isinstance(src, LoRA)]
    check_not_input(output, [base, *lora_paths])
    ckpt = Checkpoint(base)
    out = Path(output).expanduser()
    if ckpt.path.is_dir() and out.resolve() == ckpt.path.resolve():
        raise OverwriteError(f"Output {output} is the input folder {base}; choose another output path.")
    parsed = [(load_lora(src), float(s)) for src, s in loras]
    plan, report = plan_merge(ckpt, parsed, strict)
    counter = [0]
    patched = 0
    if format == "pt":
        state = {}
        for info in ckpt:
            w = ckpt.read(info)
            ops = plan.get((info.component, info.key))
            dt = out_dtype if out_dtype is not None and w.is_floating_point() else w.dtype
            state[info.ref] = _patched(w, ops, info, dt) if ops else w.to(dt).clone()
            patched += bool(ops)
        with atomic_output(out) as tmp:
            torch.save(state, tmp)
    elif ckpt.path.is_dir():
        if out.exists() and any(out.iterdir()):
            raise OverwriteError(f"Output folder {output} exists and is not empty; remove it or choose another path.")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            st_files = set(ckpt.files)
            for src in sorted(ckpt.path.rglob("*")):
                rel = src.relative_to(ckpt.path)
                dest = tmpdir / rel
                if src.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                elif src in st_files:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    patched += _stream_file(ckpt, src, dest, plan, out_dtype, progress, counter)
                elif src.suffix != ".safetensors":  # configs, tokenizers; unused variant weights are left out
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dest)
            if out.exists():
                out.rmdir()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmpdir, 0o777 & ~umask)  # mkdtemp makes 0700; the output is an ordinary folder
            os.replace(tmpdir, out)
        except BaseException:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
    else:
        with atomic_output(out) as tmp:
            patched = _stream_file(ckpt, ckpt.path, tmp, plan, out_dtype, progress, counter)
    summary = {"tensors": len(ckpt), "patched_tensors": patched, "loras": report,
               "dtype": None if out_dtype is None else str(out_dtype).replace("torch.", "")}
    return OpResult("merge", str(out), summary, [])

