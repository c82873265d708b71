"""Shared plumbing of the offline tools: lazy checkpoint access (safetensors read tensor by tensor with
plain file reads, diffusers folders, weights_only pickles), LoRA file read/write, and name matching.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError, InternalError, NonFiniteError, SourceNotFoundError
from ..families import Resolver, Target, checkpoint_router
from ..families.offline import folder_denoiser
from ..formats.conventions import PEFT_COMPONENT
from ..io import (
    PICKLE_SUFFIXES,
    SAFETENSORS_DTYPES,
    SAFETENSORS_SUFFIXES,
    parse_dtype,
    read_tensors,
    scan_safetensors,
)
from ..model import LoRA

__all__ = [
    "ST_DTYPES",
    "ST_NAMES",
    "UNSET",
    "Checkpoint",
    "OpResult",
    "Progress",
    "Record",
    "TensorInfo",
    "checkpoint_resolver",
    "load_lora",
    "module_tensors",
    "parse_dtype",
    "save_lora",
]

#: ``progress(description, done, total)``; the CLI passes a rich progress bar, library callers may pass None.
Progress = Callable[[str, int, int], None]

#: safetensors dtype code -> torch dtype (the file format's own table; user spellings: lorakit.io.parse_dtype)
ST_DTYPES: dict[str, torch.dtype] = SAFETENSORS_DTYPES
#: torch dtype -> safetensors dtype code (for writing headers)
ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}

class _Unset:
    """The value of a record field a tool did not fill in for this row (today's JSON simply lacks the key)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


#: marks an unset :class:`Record` field: ``to_dict()`` and the dict-style view leave it out
UNSET: Any = _Unset()


def _plain(value: Any) -> Any:
    """``value`` with every nested :class:`Record` turned into its dict (for JSON)."""
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class Record:
    """Base of the typed summaries and per-layer stats of the offline tools (subclasses are dataclasses).

    Reads like the dict it replaces (``r["rank"]``, ``r.get("rank")``, ``"rank" in r``, ``keys()``);
    fields left at :data:`UNSET` are absent, as the key was. ``to_dict()`` gives the JSON of ``--json``."""

    def _pairs(self) -> Iterator[tuple[str, Any]]:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not UNSET:
                yield f.name, value

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self._pairs()}

    def keys(self) -> list[str]:
        return [k for k, _ in self._pairs()]

    def items(self) -> list[tuple[str, Any]]:
        return list(self._pairs())

    def __getitem__(self, key: str) -> Any:
        value = getattr(self, key, UNSET) if key in self._names() else UNSET
        if value is UNSET:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key, UNSET) is not UNSET

    @classmethod
    def _names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]


@dataclasses.dataclass
class OpResult:
    """What an offline operation did: a typed ``summary`` plus one stats record per layer."""

    op: str
    output: str | None
    summary: Record
    layers: Sequence[Record] = dataclasses.field(default_factory=list)
    #: the LoRA built in memory (extract/compose/resize), for library callers; not part of to_dict()
    lora: LoRA | None = dataclasses.field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "output": self.output, "summary": self.summary.to_dict(),
                "layers": [layer.to_dict() for layer in self.layers]}


# -- checkpoints -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lives. ``offsets`` are absolute byte offsets for safetensors."""

    component: str | None
    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offsets: tuple[int, int] | None = None

    @property
    def ref(self) -> str:
        return self.key if self.component is None else f"{self.component}/{self.key}"


class Checkpoint:
    """Lazy view of a model's tensors: a safetensors file, a .pt/.ckpt (loaded once, weights_only), a
    diffusers folder (every ``*.safetensors`` of each component folder) or a folder of shards.

    Safetensors tensors are read with a plain ``open/seek/readinto`` per tensor, never a long-lived mmap,
    so peak RSS stays near the largest tensor (TOOLS.md: one ``safe_open`` handle kept for a whole run
    counts every touched page of the file as resident)."""

    def __init__(self, source: str | os.PathLike[str]):
        self.path = Path(source).expanduser()
        if not self.path.exists():
            raise SourceNotFoundError(f"No such checkpoint: {source}")
        self.infos: dict[tuple[str | None, str], TensorInfo] = {}
        self._loaded: dict[str, torch.Tensor] | None = None
        self.metadata: dict[str, str] = {}
        self.files: list[Path] = []
        if self.path.is_dir():
            self._scan_folder()
        elif self._is_safetensors(self.path):
            self._add_safetensors(self.path, None)
        else:
            self._loaded, self.metadata = read_tensors(self.path)
            self.files = [self.path]
            for key, t in self._loaded.items():
                self.infos[(None, key)] = TensorInfo(None, key, self.path, t.dtype, tuple(t.shape))
        if not self.infos:
            raise FormatError(f"{self.path} holds no tensors (expected .safetensors, .pt/.ckpt or a diffusers folder)")

    @staticmethod
    def _is_safetensors(path: Path) -> bool:
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            return True
        if path.suffix.lower() in PICKLE_SUFFIXES:
            return False
        with open(path, "rb") as fh:
            head = fh.read(9)
        return len(head) == 9 and head[8:9] == b"{"

    def _scan_folder(self) -> None:
        top = sorted(self.path.glob("*.safetensors"))
        if top:
            for f in self._preferred(top):
                self._add_safetensors(f, None)
        for sub in sorted(p for p in self.path.iterdir() if p.is_dir()):
            files = sorted(sub.glob("*.safetensors"))
            if files:
                comp = PEFT_COMPONENT.get(sub.name, sub.name)
                for f in self._preferred(files):
                    self._add_safetensors(f, comp)

    @staticmethod
    def _preferred(files: list[Path]) -> list[Path]:
        # diffusers ships variants side by side (model.safetensors + model.fp16.safetensors): reading both
        # would duplicate every key, so variants are used only when no plain file exists.
        plain = [f for f in files if ".fp16." not in f.name and ".bf16." not in f.name]
        return plain or files

    def _add_safetensors(self, path: Path, component: str | None) -> None:
        # Every entry is checked against the file's size before any data is read (lorakit.io.validate_safetensors_header):
        # a damaged or crafted header is a FormatError here, not a short read or a huge allocation later.
        header, entries, start = scan_safetensors(path)
        self.files.append(path)
        if component is None and not self.metadata:
            self.metadata = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
        for entry in entries:
            ident = (component, entry.key)
            if ident in self.infos:
                raise FormatError(f"{path}: tensor {entry.key} also appears in {self.infos[ident].file}")
            self.infos[ident] = TensorInfo(component, entry.key, path, entry.dtype, entry.shape,
                                           (start + entry.start, start + entry.end))

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.infos.values())

    def __len__(self) -> int:
        return len(self.infos)

    def read(self, info: TensorInfo) -> torch.Tensor:
        """The tensor, freshly read (owned memory, no mmap)."""
        if self._loaded is not None:
            return self._loaded[info.key]
        if not math.prod(info.shape):
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(self.read_raw(info), dtype=info.dtype).reshape(info.shape)

    def keys(self) -> Iterator[tuple[str | None, str]]:
        """``(component, tensor key)`` of every tensor: what a :class:`~lorakit.families.Resolver` resolves over."""
        return iter(self.infos)

    def read_raw(self, info: TensorInfo) -> bytearray:
        """The stored bytes of a safetensors tensor (one ``seek`` + ``readinto``, no mapping)."""
        if info.offsets is None:
            raise InternalError(f"{info.file}: tensor {info.key} is not in a safetensors file; read it through Checkpoint.read")
        a, b = info.offsets
        buf = bytearray(b - a)
        with open(info.file, "rb") as fh:
            fh.seek(a)
            if fh.readinto(buf) != b - a:
                raise FormatError(f"{info.file}: tensor {info.key} is truncated; the file is incomplete")
        return buf


def check_finite(t: torch.Tensor, where: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{where} contains NaN or Inf; fix or re-export that file before running this tool.")


def select(name: str, include: Iterable[str] | None, exclude: Iterable[str] | None) -> bool:
    """Glob filter used by ``--include/--exclude`` (matched against the full key and its module path)."""
    names = (name, name.rsplit(".", 1)[0])
    if include and not any(fnmatch.fnmatchcase(n, p) for p in include for n in names):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(n, p) for p in exclude for n in names))


# -- name matching ---------------------------------------------------------------------------------------

def checkpoint_resolver(ckpt: Checkpoint, loras: Iterable[LoRA] = ()) -> Resolver:
    """The :class:`~lorakit.families.Resolver` over ``ckpt``'s tensor names. Layers whose names the checkpoint
    does not have are routed (on first need) through the family of the checkpoint, else of ``loras``: a
    diffusers folder's own ``config.json`` gives the exact meta-device model."""
    loras = list(loras)
    return Resolver.for_checkpoint(
        ckpt.keys(), route=lambda names: checkpoint_router(names, loras, folder_denoiser(ckpt.path))
    )


def module_tensors(ckpt: Checkpoint, resolver: Resolver, target: Target) -> dict[str, TensorInfo]:
    """``{param name: tensor}`` of the checkpoint module a target names."""
    params = resolver.checkpoint.params.get((target.component, target.module), {}) if resolver.checkpoint else {}
    return {p: ckpt.infos[(target.component, key)] for p, key in params.items()}


# -- LoRA files ------------------------------------------------------------------------------------------

def load_lora(source: str | os.PathLike[str] | LoRA) -> LoRA:
    """A LoRA object from a path / hub reference (through :func:`lorakit.load`), or the object itself."""
    if isinstance(source, LoRA):
        return source
    from ..formats import load

    return load(source)


def save_lora(
    lora: LoRA, path: str | os.PathLike[str], fmt: str = "kohya", *, dtype: torch.dtype | None = None,
    inputs: Iterable[str | os.PathLike[str] | None] = (), metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``lora`` atomically (temp file + rename) in kohya or PEFT spelling via :func:`lorakit.save` (PEFT
    names are resolved through the detected family's meta model, as ``lorakit.save`` does)."""
    from ..saving import save

    if fmt not in ("kohya", "peft"):
        raise FormatError(f"unknown output format {fmt!r}; use 'kohya' or 'peft'")
    meta = dict(lora.metadata)
    meta.update(metadata or {})
    return save(dataclasses.replace(lora, metadata=meta), path, fmt, dtype=dtype, inputs=inputs)

