"""The server's LoRA registry: files in ``--lora-dir`` (names = file stems) and, only when the server allows
the hub, hub references ``org/repo/file``; an LRU cache of parsed LoRAs bounded by bytes; validated atomic uploads.

A request names a LoRA only by its registry name. Nothing a client sends is ever turned into a path: names are
looked up in the folder listing, whose entries are checked on their real path (inside the folder, symlinks
resolved) and opened only when they are regular files (never a FIFO or a device).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import stat as _stat
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lorakit
from lorakit import io
from lorakit.errors import ApiError, LorakitError
from lorakit.model import LoRA

__all__ = ["ApiError", "Registry", "hub_download", "lora_problem", "sanitise_name"]

# A local name: no separators, no leading dot, so it can never leave the LoRA folder.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SEG = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
# A hub reference as the server accepts it: org/repo/[sub/...]file.safetensors, plain segments only.
_HUB = re.compile(rf"^(?P<org>{_SEG})/(?P<repo>{_SEG})/(?P<file>(?:{_SEG}/){{0,4}}{_SEG}\.safetensors)$")
_MAX_LISTED = 20


def sanitise_name(name: str) -> str:
    """Return ``name`` if it is a safe local LoRA name, else raise a 400 ApiError (no path traversal)."""
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _NAME.match(name) or ".." in name:
        raise ApiError(
            400, "invalid_name",
            f"Invalid LoRA name {name[:200]!r}: use letters, digits, '.', '_' or '-' (no slashes, no leading dot).",
        )
    return name


def hub_download(repo_id: str, filename: str) -> str:
    """Fetch ``filename`` of hub repo ``repo_id`` (from the huggingface_hub cache when offline)."""
    return str(io.hub_file(repo_id, filename))


def _regular(path: str | os.PathLike[str]) -> os.stat_result | None:
    """stat of ``path`` if it is a regular file (following symlinks), else None; never opens it."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # missing, dangling or looping symlink, NUL in the name
        return None
    return st if _stat.S_ISREG(st.st_mode) else None


def _sha256(path: Path) -> str:
    # O_NONBLOCK: if the entry was swapped for a FIFO after the stat check, open() does not wait for a writer;
    # fstat on the open descriptor then refuses anything but a regular file.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        if not _stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(f"{path.name} is not a regular file")
        digest = hashlib.sha256()
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _family(lora: Any) -> str | None:
    """The model family the file is for (``None``: unknown or ambiguous); never fails a listing."""
    try:
        from lorakit.families import detect_family

        return detect_family(lora)
    except Exception:  # noqa: BLE001 - detection is advisory here
        return None


def _lora_bytes(lora: LoRA) -> int:
    return sum(t.numel() * t.element_size() for layer in lora for t in layer.tensors())


def lora_problem(lora: LoRA) -> str | None:
    """Why a parsed LoRA cannot be used (a broken or NaN key, a non-float, empty or 0-dim factor, NaN/Inf
    values or alpha), naming the layer; None when every layer is usable."""
    for key, reason in sorted(lora.report.invalid.items()):
        return f"key {key}: {reason}"
    for layer in lora:
        alpha = layer.alpha
        if alpha is not None and not math.isfinite(float(alpha)):
            return f"layer {layer.name} has a NaN/Inf alpha"
        for t in layer.tensors():
            if not t.is_floating_point():
                return f"layer {layer.name} has a {str(t.dtype).removeprefix('torch.')} factor (must be floating point)"
            if t.dim() == 0 or t.numel() == 0:
                return f"layer {layer.name} has an empty or 0-dim factor of shape {tuple(t.shape)}"
            if not bool(t.isfinite().all()):
                return f"layer {layer.name} has NaN/Inf values"
    return None


def _scrub(message: str, paths: Iterable[object], name: str) -> str:
    """``message`` without the server's file paths (a client sees registry names only)."""
    for p in paths:
        message = message.replace(str(p), repr(name))
    return message


class Registry:
    """Thread-safe view of the LoRA folder plus a byte-bounded LRU of parsed LoRAs keyed by sha256.

    ``allow_hub``: None = hub references are refused; an empty sequence = any org; else the allowed orgs.
    """

    def __init__(self, lora_dir: str | os.PathLike[str], cache_bytes: int = 512 << 20,
                 allow_hub: Iterable[str] | None = None) -> None:
        self.lora_dir = Path(lora_dir).expanduser()
        self.lora_dir.mkdir(parents=True, exist_ok=True)
        self.root = os.path.realpath(self.lora_dir)
        self.allow_hub = None if allow_hub is None else frozenset(allow_hub)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, tuple[LoRA, int]] = OrderedDict()
        self._info: dict[tuple[str, float, int], dict[str, Any]] = {}  # (path, mtime, size) -> info
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._validator: ThreadPoolExecutor | None = None  # made on the first upload

    def close(self) -> None:
        """Stop the upload-validation pool (a validation still running is left to finish on its own)."""
        if self._validator is not None:
            self._validator.shutdown(wait=False, cancel_futures=True)

    # ---- listing -------------------------------------------------------------------------------
    def _entries(self) -> dict[str, tuple[Path, Path]]:
        """name -> (folder entry, real file) of every usable entry: a regular file whose real path is inside
        the folder. Dangling, looping or outward symlinks, FIFOs, devices and folders are skipped."""
        out: dict[str, tuple[Path, Path]] = {}
        try:
            entries = sorted(self.lora_dir.glob("*.safetensors"))
        except OSError:
            return out
        for entry in entries:
            if entry.name.startswith("."):
                continue
            real = os.path.realpath(entry)
            if os.path.commonpath([self.root, real]) != self.root or _regular(real) is None:
                continue
            out[entry.stem] = (entry, Path(real))
        return out

    def _files(self) -> dict[str, Path]:
        return {name: real for name, (_, real) in self._entries().items()}

    def info(self, path: Path, name: str) -> dict[str, Any]:
        """Name, sha256, format, adapter types, ranks and size of one regular file (memoised by mtime and
        size); a file that does not parse or has an unusable layer gets ``valid: False`` and an ``error``."""
        st = _regular(path)
        if st is None:
            raise ApiError(404, "lora_not_found", f"Unknown LoRA {name!r}. See GET /v1/loras.")
        key = (str(path), st.st_mtime, st.st_size)
        with self._lock:
            cached = self._info.get(key)
        if cached is not None:
            return dict(cached, name=name)
        try:
            sha = _sha256(path)
            lora = self._parsed(sha, path)
        except (LorakitError, OSError, ValueError, RuntimeError) as exc:
            info: dict[str, Any] = {"name": name, "valid": False, "size_bytes": st.st_size,
                                    "error": _scrub(f"not a valid LoRA file: {exc}", (path, self.root), name)}
        else:
            problem = lora_problem(lora)
            info = {
                "name": name, "valid": problem is None, "sha256": sha, "format": lora.format,
                "adapter_types": lora.adapter_types(), "ranks": sorted(set(lora.ranks().values())),
                "layers": len(lora), "parameters": lora.parameters(), "size_bytes": st.st_size,
                "family": _family(lora),
            }
            if problem is not None:
                info["error"] = problem
        with self._lock:
            self._info[key] = info
        return dict(info)

    def list(self) -> list[dict[str, Any]]:
        out = []
        for name, path in self._files().items():
            try:
                out.append(self.info(path, name))
            except ApiError:
                continue  # removed or replaced between the listing and the stat: skip it
        return out

    # ---- resolution ------------------------------------------------------------------------------
    def _unknown(self, name: str, files: Iterable[str]) -> ApiError:
        names = list(files)
        shown = ", ".join(names[:_MAX_LISTED]) + (", ..." if len(names) > _MAX_LISTED else "")
        return ApiError(404, "lora_not_found",
                        f"Unknown LoRA {name[:300]!r}; available: {shown or '(none)'}. See GET /v1/loras.")

    def _hub(self, name: str) -> Path:
        """A hub reference, only when the server allows it; every refusal is the same 404 shape."""
        if self.allow_hub is None:
            raise ApiError(404, "lora_not_found", f"Unknown LoRA {name[:300]!r}: hub references are disabled on "
                           "this server (start it with --allow-hub [ORG,...]).")
        match = _HUB.match(name)
        if match is None or ".." in name:
            raise self._unknown(name, self._files())
        if self.allow_hub and match["org"] not in self.allow_hub:
            raise ApiError(404, "lora_not_found", f"Unknown LoRA {name!r}: org {match['org']!r} is not allowed "
                           "by this server's --allow-hub list.")
        try:
            path = Path(os.path.realpath(hub_download(f"{match['org']}/{match['repo']}", match["file"])))
        except Exception as exc:  # hub errors are many types; all mean "not available", none is shown
            raise ApiError(404, "lora_not_found", f"Unknown LoRA {name!r}: it could not be fetched from the "
                           "hub.") from exc
        if _regular(path) is None:
            raise ApiError(404, "lora_not_found", f"Unknown LoRA {name!r}: it could not be fetched from the hub.")
        return path

    def resolve(self, name: str) -> tuple[str, Path]:
        """A registry name (a file stem in the folder, or a hub reference ``org/repo/file`` when the server
        allows the hub) -> (sha256, path). Unknown names are a 404, unusable files a 400 naming the layer."""
        files = self._files()
        path = files.get(name)
        if path is None:
            if "/" not in name:
                raise self._unknown(name, files)
            path = self._hub(name)
        info = self.info(path, name)
        if not info["valid"]:
            raise ApiError(400, "invalid_lora", f"LoRA {name!r} cannot be used: {info['error']}")
        return info["sha256"], path

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
    def stage_upload(self, name: str, data: bytes) -> tuple[str, Path]:
        """Validate ``data`` (a LoRA whose every layer is usable, no bad key) into a hidden temp file in the
        folder; return ``(name, temp file)`` for :meth:`commit_upload` (or :meth:`discard`). Nothing is visible
        in the folder listing until the commit."""
        name = sanitise_name(name)
        if len(data) < 8:
            raise ApiError(400, "invalid_lora", f"Upload {name!r} is not a safetensors file (too short).")
        header_len = int.from_bytes(data[:8], "little")
        if header_len <= 1 or header_len > len(data) - 8 or data[8:9] != b"{":
            raise ApiError(400, "invalid_lora", f"Upload {name!r} is not a safetensors file (bad header).")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".upload", dir=self.lora_dir)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            self._validate_upload(name, tmp)
        except BaseException:
            self.discard(tmp)
            raise
        return name, tmp

    def _validate_upload(self, name: str, tmp: Path) -> None:
        try:
            sha = _sha256(tmp)
            lora = self._parsed(sha, tmp)
        except (LorakitError, ValueError, OSError, RuntimeError) as exc:
            raise ApiError(400, "invalid_lora", _scrub(f"Upload {name!r} is not a valid LoRA: {exc}",
                                                       (tmp, self.root), name)) from exc
        if len(lora) == 0:
            raise ApiError(400, "invalid_lora", f"Upload {name!r} holds no adapter layers.")
        if not lora.report.ok:
            # Strict for uploads: a file with NaN, broken or unknown keys is refused as a whole.
            key, reason = next(iter(lora.report.problems().items()))
            raise ApiError(400, "invalid_lora",
                           f"Upload {name!r} has {len(lora.report.problems())} bad key(s), e.g. {key}: {reason}")
        problem = lora_problem(lora)
        if problem is not None:
            raise ApiError(400, "invalid_lora", f"Upload {name!r}: {problem}.")

    def stage_in_pool(self, name: str, data: bytes) -> Future:
        """:meth:`stage_upload` on a small pool of its own, so a caller can bound its time (a slow or stuck
        validation then occupies this pool, never the server's request threads). If the caller gives up, it
        calls :meth:`abandon` and the temp file is removed whenever the validation ends."""
        with self._lock:
            if self._validator is None:
                self._validator = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lorakit-validate")
            return self._validator.submit(self.stage_upload, name, data)

    def abandon(self, future: Future) -> None:
        def drop(f: Future) -> None:
            if not f.cancelled() and f.exception() is None:
                self.discard(f.result()[1])

        future.cancel()
        future.add_done_callback(drop)

    def commit_upload(self, name: str, tmp: Path) -> dict[str, Any]:
        """Rename a staged upload onto ``<name>.safetensors`` (atomic) and return its listing entry."""
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give it the permissions open() would
        target = self.lora_dir / f"{name}.safetensors"
        os.replace(tmp, target)
        return self.info(target, name)

    @staticmethod
    def discard(tmp: Path) -> None:
        with contextlib.suppress(OSError):
            tmp.unlink()

    def store_upload(self, name: str, data: bytes) -> dict[str, Any]:
        """Validate ``data`` and store it atomically as ``name`` (stage + commit, no time bound)."""
        name, tmp = self.stage_upload(name, data)
        try:
            return self.commit_upload(name, tmp)
        except BaseException:
            self.discard(tmp)
            raise

    def delete(self, name: str) -> None:
        name = sanitise_name(name)
        entry = self._entries().get(name)
        if entry is None:
            raise ApiError(404, "lora_not_found", f"Unknown LoRA {name!r}; nothing deleted.")
        entry[0].unlink()  # the folder entry (a symlink itself, never its target)
