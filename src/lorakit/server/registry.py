"""The server's LoRA registry: files in ``--lora-dir`` (names = file stems) and hub references, an LRU
cache of parsed LoRAs bounded by bytes, and validated atomic uploads.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import lorakit
from lorakit import io
from lorakit.errors import ApiError, LorakitError, SourceNotFoundError
from lorakit.model import LoRA

__all__ = ["ApiError", "Registry", "sanitise_name"]

# A local name: no separators, no leading dot, so it can never leave the LoRA folder.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def sanitise_name(name: str) -> str:
    """Return ``name`` if it is a safe local LoRA name, else raise a 400 ApiError (no path traversal)."""
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _NAME.match(name) or ".." in name:
        raise ApiError(
            400, "invalid_name",
            f"Invalid LoRA name {name!r}: use letters, digits, '.', '_' or '-' (no slashes, no leading dot).",
        )
    return name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _lora_bytes(lora: LoRA) -> int:
    return sum(t.numel() * t.element_size() for layer in lora for t in layer.tensors())


class Registry:
    """Thread-safe view of the LoRA folder plus a byte-bounded LRU of parsed LoRAs keyed by sha256."""

    def __init__(self, lora_dir: str | os.PathLike[str], cache_bytes: int = 512 << 20) -> None:
        self.lora_dir = Path(lora_dir).expanduser()
        self.lora_dir.mkdir(parents=True, exist_ok=True)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, tuple[LoRA, int]] = OrderedDict()
        self._info: dict[tuple[str, float, int], dict[str, Any]] = {}  # (path, mtime, size) -> info
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # ---- listing -------------------------------------------------------------------------------
    def _files(self) -> dict[str, Path]:
        return {p.stem: p for p in sorted(self.lora_dir.glob("*.safetensors")) if not p.name.startswith(".")}

    def info(self, path: Path, name: str) -> dict[str, Any]:
        """Name, sha256, format, adapter types, ranks and size of one file (memoised by mtime and size)."""
        stat = path.stat()
        key = (str(path), stat.st_mtime, stat.st_size)
        with self._lock:
            cached = self._info.get(key)
        if cached is not None:
            return cached
        sha = _sha256(path)
        lora = self._parsed(sha, path)
        ranks = sorted(set(lora.ranks().values()))
        info = {
            "name": name,
            "sha256": sha,
            "format": lora.format,
            "adapter_types": lora.adapter_types(),
            "ranks": ranks,
            "layers": len(lora),
            "parameters": lora.parameters(),
            "size_bytes": stat.st_size,
        }
        with self._lock:
            self._info[key] = info
        return info

    def list(self) -> list[dict[str, Any]]:
        out = []
        for name, path in self._files().items():
            try:
                out.append(self.info(path, name))
            except (LorakitError, OSError) as exc:
                # A broken file dropped in by hand must not take the listing down; show it as invalid.
                out.append({"name": name, "error": str(exc), "size_bytes": path.stat().st_size})
        return out

    # ---- resolution ------------------------------------------------------------------------------
    def resolve(self, name: str) -> tuple[str, Path]:
        """``name`` (a file stem in the folder, or a hub reference ``org/repo/file``) -> (sha256, path)."""
        files = self._files()
        path = files.get(name)
        if path is None and "/" in name:
            try:
                path = io.resolve_source(name)
            except SourceNotFoundError as exc:
                raise ApiError(404, "lora_not_found", f"Unknown LoRA {name!r}: {exc}") from exc
        if path is None:
            raise ApiError(
                404, "lora_not_found",
                f"Unknown LoRA {name!r}; available: {', '.join(files) or '(none)'}. See GET /v1/loras.",
            )
        return self.info(path, name)["sha256"], path

    def get(self, sha: str, path: Path) -> LoRA:
        """The parsed LoRA for ``sha`` (cached), loading ``path`` on a miss."""
        return self._parsed(sha, path)

    def _parsed(self, sha: str, path: Path) -> LoRA:
        with self._lock:
            hit = self._cache.get(sha)
            if hit is not None:
                self._cache.move_to_end(sha)
                self.hits += 1
                return hit[0]
            self.misses += 1
        lora = lorakit.load(path)
        size = _lora_bytes(lora)
        with self._lock:
            self._cache[sha] = (lora, size)
            self._cache.move_to_end(sha)
            # Evict least recently used until under budget, but always keep the newest entry.
            while sum(s for _, s in self._cache.values()) > self.cache_bytes and len(self._cache) > 1:
                self._cache.popitem(last=False)
                self.evictions += 1
        return lora

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(s for _, s in self._cache.values())

    # ---- uploads ---------------------------------------------------------------------------------
    def store_upload(self, name: str, data: bytes) -> dict[str, Any]:
        """Validate ``data`` (parses as a LoRA, all tensors finite) and store it atomically as ``name``."""
        name = sanitise_name(name)
        if len(data) < 8:
            raise ApiError(400, "invalid_lora", f"Upload {name!r} is not a safetensors file (too short).")
        header_len = int.from_bytes(data[:8], "little")
        if header_len <= 1 or header_len > len(data) - 8 or data[8:9] != b"{":
            raise ApiError(400, "invalid_lora", f"Upload {name!r} is not a safetensors file (bad header).")
        target = self.lora_dir / f"{name}.safetensors"
        # Validate from a temp file in the same folder; only a fully valid file is renamed into place.
        with io.atomic_output(target) as tmp:
            tmp.write_bytes(data)
            try:
                lora = lorakit.load(tmp)
            except (LorakitError, ValueError, OSError, RuntimeError) as exc:
                raise ApiError(400, "invalid_lora", f"Upload {name!r} is not a valid LoRA: {exc}") from exc
            if len(lora) == 0:
                raise ApiError(400, "invalid_lora", f"Upload {name!r} holds no adapter layers.")
            if not lora.report.ok:
                # Strict for uploads: a file with NaN, broken or unknown keys is refused as a whole.
                key, reason = next(iter(lora.report.problems().items()))
                raise ApiError(
                    400, "invalid_lora",
                    f"Upload {name!r} has {len(lora.report.problems())} bad key(s), e.g. {key}: {reason}",
                )
            for layer in lora:
                for t in layer.tensors():
                    if t.is_floating_point() and not bool(t.isfinite().all()):
                        raise ApiError(400, "invalid_lora", f"Upload {name!r}: layer {layer.name} has NaN/Inf values.")
        return self.info(target, name)

    def delete(self, name: str) -> None:
        name = sanitise_name(name)
        path = self._files().get(name)
        if path is None:
            raise ApiError(404, "lora_not_found", f"Unknown LoRA {name!r}; nothing deleted.")
        path.unlink()
