"""Reading and writing tensor files: safetensors (memory-mapped), pickles only via ``weights_only``,
hub references through the local huggingface_hub cache, and atomic writes that never touch an input.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .errors import (
    FormatError,
    LorakitError,
    OverwriteError,
    SourceNotFoundError,
    UnsafeFileError,
    UnsupportedAdapterError,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, stale temp files are removed unconditionally
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "PICKLE_SUFFIXES",
    "QUANT_META_KEY",
    "QUANT_SCHEMES",
    "SAFETENSORS_DTYPES",
    "SAFETENSORS_SUFFIXES",
    "SafetensorsEntry",
    "atomic_folder",
    "atomic_output",
    "check_not_input",
    "check_output",
    "dequantize_tensors",
    "hub_file",
    "parse_dtype",
    "parse_lora_spec",
    "quantize_tensors",
    "read_metadata",
    "read_safetensors_header",
    "read_tensors",
    "remove_stale_temps",
    "resolve_source",
    "scan_safetensors",
    "temp_lock",
    "validate_safetensors_header",
    "write_tensors",
]

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

# org/repo/path/inside/repo.safetensors, optionally with @revision after the repo.
_HUB_REF = re.compile(r"^(?P<org>[\w.-]+)/(?P<repo>[\w.-]+)(@(?P<rev>[\w./-]+?))?/(?P<file>.+\.\w+)$")


_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` / ``"float16"`` / ``torch.float32`` -> a torch dtype (names are case-insensitive); ``None``
    stays ``None``. Anything else raises :class:`~lorakit.errors.FormatError` naming the value and the choices."""
    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = _DTYPES.get(name.lower()) if isinstance(name, str) else None
    if dtype is None:
        raise FormatError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}")
    return dtype


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``"style.safetensors:0.8"`` -> ``("style.safetensors", 0.8)``. The tail counts as a strength only if it
    parses as a number (``C:\\x`` stays a path); no strength means 1."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """Return a local path for ``source``: an existing file, or a hub reference ``org/repo/file``.

    ``org/repo/file`` is taken as a hub reference only when no leading folder of it exists locally (no
    ``./org``): a mistyped local path such as ``lib/typo/missing.safetensors`` (with ``lib/`` present) is a
    :class:`SourceNotFoundError` at once, with no network. Absolute paths and ``./``, ``../``, ``~`` paths
    are always local. Hub references go through ``huggingface_hub.hf_hub_download``; with
    ``HF_HUB_OFFLINE=1`` only its cache (``HF_HOME`` / ``HF_HUB_CACHE``) is looked at, so a miss fails fast.
    """
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            raise SourceNotFoundError(f"{path} is a folder; pass the LoRA file inside it")
        return path
    text = os.fspath(source)
    match = _HUB_REF.match(text)
    local = _existing_parent(path)
    if match is None or local is not None or _explicitly_local(text):
        where = f" (folder {local} exists, {path.parent} does not)" if local is not None and local != path.parent else ""
        raise SourceNotFoundError(
            f"No such file: {source}{where}. Pass a local path or a hub reference 'org/repo/file.safetensors' "
            "(taken as a hub reference only when no folder of that name exists here)."
        )
    return _hub_download(text, match)


def _explicitly_local(text: str) -> bool:
    """An absolute path, or one starting with ``~``, ``./`` or ``../``: never a hub reference."""
    return os.path.isabs(text) or text.startswith(("~", "./", "../", ".\\", "..\\"))


def _existing_parent(path: Path) -> Path | None:
    """The deepest existing folder among the leading parts of a relative ``path`` (``None``: not even the first)."""
    found = None
    for parent in reversed(path.parents[:-1]):  # "lib", "lib/typo", ... (without ".")
        if not parent.is_dir():
            break
        found = parent
    return found


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """``filename`` of hub repo ``repo_id`` through ``hf_hub_download`` (only its cache with ``HF_HUB_OFFLINE=1``).
    Raises what huggingface_hub raises (ImportError without it)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=_hub_offline()))


def _hub_download(source: str, match: re.Match[str]) -> Path:
    """``hf_hub_download`` of a hub reference (cache only when offline); every failure a SourceNotFoundError."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with the diffusers extra
        raise SourceNotFoundError(
            f"{source} is not a local file, and looks like a hub reference but huggingface_hub is not installed: "
            "pip install 'lorakit[diffusers]'"
        ) from exc
    repo_id = f"{match['org']}/{match['repo']}"
    offline = _hub_offline()
    try:
        return hub_file(repo_id, match["file"], match["rev"])
    except Exception as exc:  # hub errors are many types; all mean "not available"
        raise SourceNotFoundError(
            f"Could not resolve {source}: it was tried as a hub reference (repo {repo_id}, file {match['file']}) "
            f"because no local folder {match['org']!r} exists here ({type(exc).__name__}: {exc}). "
            + ("HF_HUB_OFFLINE=1: only the huggingface_hub cache was looked at. " if offline else "")
            + "For a local file, check the path."
        ) from exc


def read_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the string metadata of a weights file.

    ``.safetensors`` is memory-mapped (zero-copy on CPU). ``.pt/.pth/.ckpt/.bin`` go through
    ``torch.load(weights_only=True)``: a pickle that needs to run code is refused with
    :class:`UnsafeFileError` and nothing from it is executed.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path), {}
    # Sniff: safetensors starts with an 8-byte little-endian header length then '{'.
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return _read_safetensors(path)
    return _read_pickle(path), {}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        metadata = read_metadata(path)
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path} is not a readable safetensors file: {exc}") from exc
    if QUANT_META_KEY in metadata:  # a LoRA saved with dtype="fp8"/"int8": back to floats, transparently
        tensors = dequantize_tensors(tensors, metadata, path)
        # the LoRA in memory is float again: a later float save must not claim quantized storage
        metadata = {k: v for k, v in metadata.items() if k != QUANT_META_KEY}
        metadata["lorakit_dequantized_from"] = json.loads(read_metadata(path)[QUANT_META_KEY])["scheme"]
    return tensors, metadata


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """``(header dict, byte offset where the tensor data starts)`` of a safetensors file, read without mapping it."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise FormatError(f"{path} is too short to be a safetensors file")
            size = int.from_bytes(raw, "little")
            if size <= 0 or size > 100 * 1024 * 1024:
                raise FormatError(f"{path} has an implausible safetensors header size ({size} bytes)")
            header = json.loads(fh.read(size))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path} is not a readable safetensors file: {exc}") from exc
    if not isinstance(header, dict):
        raise FormatError(f"{path} is not a readable safetensors file: its header is not a JSON object")
    return header, 8 + size


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` string table of a safetensors file (empty for other files)."""
    header, _ = read_safetensors_header(path)
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


#: safetensors dtype code -> torch dtype (the file format's own table; user spellings: :func:`parse_dtype`)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsEntry(NamedTuple):
    """One checked tensor entry of a safetensors header; ``start``/``end`` are relative to the data section."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_entry(key: str, spec: object, data_len: int, path: object) -> SafetensorsEntry:
    where = f"{path}: tensor {key!r}"
    if not isinstance(spec, dict):
        raise FormatError(f"{where}: its header entry is not a JSON object; the file is damaged")
    code = spec.get("dtype")
    if code is None:
        raise FormatError(f"{where} has no dtype in the header; the file is damaged")
    dtype = SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise FormatError(f"{where} has dtype {code!r}, which lorakit cannot read (known: {', '.join(SAFETENSORS_DTYPES)})")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise FormatError(f"{where} has shape {shape!r}; a shape must be a list of non-negative integers")
    offsets = spec.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise FormatError(f"{where} has data_offsets {offsets!r}; expected [start, end], two non-negative integers")
    start, end = offsets
    if end < start:
        raise FormatError(f"{where} has reversed data_offsets [{start}, {end}]; the file is damaged")
    nbytes = math.prod(shape) * dtype.itemsize  # python ints: a claim of 10**12 elements allocates nothing
    if end - start != nbytes:
        raise FormatError(f"{where}: shape {shape} of {code} needs {nbytes} bytes, but its data_offsets span "
                          f"{end - start}; the header is damaged")
    if end > data_len:
        raise FormatError(f"{where} ends at data byte {end}, but the file holds only {data_len} data bytes; "
                          "the file is truncated or its header is damaged")
    return SafetensorsEntry(key, dtype, tuple(shape), start, end)


def validate_safetensors_header(header: Mapping[str, Any], data_len: int, path: object) -> list[SafetensorsEntry]:
    """Check every tensor entry of a safetensors ``header`` against the ``data_len`` bytes that follow it in the
    file, before any data is read: known dtype, a shape of non-negative integers, ``[start, end]`` offsets in
    range with ``end - start = numel * itemsize``, and no two tensors sharing bytes. Any violation raises
    :class:`FormatError` naming ``path`` and the tensor. Returns the entries in file order."""
    if not isinstance(header, Mapping):
        raise FormatError(f"{path} is not a readable safetensors file: its header is not a JSON object")
    if data_len < 0:
        raise FormatError(f"{path}: its header runs {-data_len} bytes past the end of the file; the file is truncated")
    meta = header.get("__metadata__")
    if meta is not None and not isinstance(meta, dict):
        raise FormatError(f"{path}: its __metadata__ is not a JSON object; the file is damaged")
    entries = [_header_entry(k, v, data_len, path) for k, v in header.items() if k != "__metadata__"]
    entries.sort(key=lambda e: (e.start, e.end))
    previous: SafetensorsEntry | None = None
    for entry in entries:
        if entry.end == entry.start:
            continue
        if previous is not None and entry.start < previous.end:
            raise FormatError(f"{path}: tensors {previous.key!r} and {entry.key!r} overlap in the file "
                              f"([{previous.start}, {previous.end}] and [{entry.start}, {entry.end}]); the header is damaged")
        previous = entry
    return entries


def scan_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[SafetensorsEntry], int]:
    """``(header, checked entries, byte offset of the data section)`` of a safetensors file: the header read by
    :func:`read_safetensors_header` and checked by :func:`validate_safetensors_header` against the file's size."""
    header, start = read_safetensors_header(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise FormatError(f"{path} is not a readable safetensors file: {exc}") from exc
    return header, validate_safetensors_header(header, size - start, path), start


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_globals(path, exc)
        raise UnsafeFileError(
            f"Refused to load {path}: it is a pickle that needs code execution to load "
            f"(it refers to {refused}). Nothing from it was run. "
            "Convert it to .safetensors with a tool you trust, or ask its author for a safetensors file."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise FormatError(f"{path} is not a readable PyTorch weights file: {exc}") from exc
    return _flatten_state_dict(obj, path)


def _refused_globals(path: Path, exc: BaseException) -> str:
    """The globals a refused pickle names (``peft.utils.peft_types.PeftType``), read without running it."""
    names: list[str] = []
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - best effort: fall back to torch's message
        names = []
    if not names:
        found = re.findall(r"(?:Unsupported global: GLOBAL|global) ([\w.]+)", str(exc))
        names = list(dict.fromkeys(found))
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return f"the global{'s' if len(names) > 1 else ''} {shown}, which weights_only loading refuses"
    text = str(exc).strip()
    return text.splitlines()[-1] if text else "an unsafe global"


def _flatten_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    # Checkpoints often nest the weights under "state_dict" / "model" / "module".
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        out = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        # Scalars saved as python numbers (e.g. alpha) are kept as 0-d tensors.
        for k, v in obj.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[str(k)] = torch.tensor(float(v))
        return out
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(v, torch.Tensor) for v in obj):
        raise UnsupportedAdapterError(
            f"{path} holds a list of {len(obj)} tensors with no names: a cloneofsimo/lora positional file "
            "(`save_lora_weight`), not supported. Convert it with cloneofsimo/lora's own tools (e.g. `lora_add` to "
            "merge it into its base model), then `lorakit extract` a LoRA from the result."
        )
    raise FormatError(f"{path} does not hold a state dict (found {type(obj).__name__})")


def check_not_input(output: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None]) -> None:
    """Raise :class:`OverwriteError` when ``output`` names the same file as one of ``inputs``, or an existing
    file inside an input folder (a diffusers model folder, say)."""
    out = Path(output).expanduser().resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).expanduser()
        if not src.exists():
            continue
        if src.resolve() == out or (out.exists() and os.path.samefile(src, out)):
            raise OverwriteError(f"Output {output} is the same file as input {item}; choose another output path.")
        if src.is_dir() and out.exists() and out.is_relative_to(src.resolve()):
            raise OverwriteError(f"Output {output} is a file of the input folder {item}; choose another output path.")


def _writable_ancestor(target: Path) -> Path:
    """The nearest existing folder above ``target`` (where the missing ones will be created)."""
    anc = target.parent
    while not anc.exists() and anc.parent != anc:
        anc = anc.parent
    return anc


def check_output(
    output: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None] = (), *, folder: bool = False
) -> Path:
    """Check an output path before any work starts: not one of ``inputs`` (:class:`OverwriteError`), not an
    existing folder for a file output (or an existing file for a ``folder`` output: :class:`OverwriteError`),
    and a parent folder this process may create files in (:class:`PermissionError` / :class:`NotADirectoryError`,
    the ``OSError`` a write would raise, with ``filename`` the output). Returns the output as a Path."""
    target = Path(output).expanduser()
    check_not_input(target, inputs)
    if not folder and target.is_dir():
        raise OverwriteError(f"Output {output} is a folder; pass a file path such as {target / 'out.safetensors'}.")
    if folder and target.exists() and not target.is_dir():
        raise OverwriteError(f"Output {output} is a file, but this output is a folder; choose another output path.")
    anc = _writable_ancestor(target)
    if not anc.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{anc} is a file, not a folder", str(output))
    if not os.access(anc, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"Permission denied: cannot create files in {anc}", str(output))
    return target


def _about_output(name: object, target: Path, tmp: Path | None) -> bool:
    """Whether an OSError's ``filename`` is the output, its temp file, or a folder on the way to it."""
    if name is None:
        return True
    if not isinstance(name, (str, bytes, os.PathLike)):
        return False
    path, target = Path(os.path.abspath(os.fsdecode(name))), Path(os.path.abspath(target))
    tmp = None if tmp is None else Path(os.path.abspath(tmp))
    if path == target or path == tmp or (tmp is not None and tmp in path.parents) or path in target.parents:
        return True
    return path.parent == target.parent and path.name.startswith(f".{target.name}.")


def _output_error(exc: BaseException, target: Path, tmp: Path | None) -> OSError | None:
    """The OSError a failed write of ``target`` should raise (naming ``target``, not its temp file), or None when
    ``exc`` is not a write error of this output (an input that failed to read keeps its own error)."""
    if isinstance(exc, LorakitError):
        return None
    cause = exc.__context__
    if not isinstance(exc, OSError) and isinstance(cause, OSError):
        exc = cause  # torch.save's zip writer hides a failed write behind a RuntimeError raised while closing
    if isinstance(exc, OSError):
        code = exc.errno if _about_output(exc.filename, target, tmp) else None
    else:  # safetensors' writer reports I/O failures as SafetensorError("... (os error 28) ...")
        found = re.search(r"\(os error (\d+)\)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
        code = int(found.group(1)) if found else None
    if code is None:
        return None
    return OSError(code, os.strerror(code), str(target))


def _lock(fd: int) -> None:
    """Mark a temp file (or folder) as in use, so :func:`remove_stale_temps` of another run leaves it alone."""
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


@contextlib.contextmanager
def temp_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the in-use mark of a temp file or folder (see :func:`remove_stale_temps`) for the ``with`` block."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _lock(fd)
        yield
    finally:
        os.close(fd)


def _in_use(path: Path) -> bool:
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock
    return False


def remove_stale_temps(output: str | os.PathLike[str]) -> list[Path]:
    """Remove the temp files / folders (``.{name}.XXXXXXXX.tmp``) that earlier, killed writes of ``output`` left
    next to it; those of a write still running (it holds a lock on them) are kept. Returns what was removed."""
    target = Path(output).expanduser()
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp$")
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in sorted(target.parent.iterdir()):
        if not pattern.match(path.name) or _in_use(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target folder; rename it onto ``path`` only on success.

    On any error the temporary file is removed, so no partial output is ever left behind. A ``path`` that is
    a folder raises :class:`OverwriteError` before the body runs; an ``OSError`` while writing (no space left,
    permission denied) is raised again as an ``OSError`` of the same errno whose ``filename`` is ``path``.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise OverwriteError(f"Output {path} is a folder; pass a file path such as {target / 'out.safetensors'}.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise (_output_error(exc, target, None) or exc) from exc
    tmp = Path(tmp_name)
    if fcntl is None:  # pragma: no cover - Windows cannot rename a file that is still open
        os.close(fd)
        fd = -1
    try:
        _lock(fd)
        yield tmp
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        better = _output_error(exc, target, tmp) if isinstance(exc, Exception) else None
        if better is not None:
            raise better from exc
        raise
    finally:
        if fd >= 0:
            os.close(fd)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Like :func:`atomic_output` for a folder output: yield a temporary folder next to ``path`` (absent or an
    empty folder) and move it into place only on success; on any error it is removed. Write errors (``OSError``) are
    raised again naming ``path``."""
    target = Path(path).expanduser()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise (_output_error(exc, target, None) or exc) from exc
    try:
        with temp_lock(tmp):
            yield tmp
            if target.exists():
                target.rmdir()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output is an ordinary folder
            os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        better = _output_error(exc, target, tmp) if isinstance(exc, Exception) else None
        if better is not None:
            raise better from exc
        raise


def write_tensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> Path:
    """Write ``tensors`` atomically as safetensors (or a ``weights_only``-loadable pickle for .pt/.ckpt/.bin)."""
    target = check_output(path, inputs)
    clean: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        # safetensors refuses tensors that share storage; copy the second and later sharers.
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen and value.numel() > 0:
            value = value.clone()
        seen.add(ptr)
        clean[key] = value
    with atomic_output(target) as tmp:
        if target.suffix.lower() in PICKLE_SUFFIXES:
            with open(tmp, "wb") as fh:  # through a Python file, so a failed write is an OSError (ENOSPC ...)
                torch.save(clean, fh)
        else:
            from safetensors.torch import save_file

            save_file(clean, str(tmp), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    return target


# ---- quantized LoRA files: ``lorakit.save(..., dtype="fp8"|"int8")`` -------------------------------------------
#: metadata key marking a file whose factors are stored quantized (a JSON object: scheme, scale suffix, dtype)
QUANT_META_KEY = "lorakit_quant"
#: user spelling -> scheme written in the metadata
QUANT_SCHEMES = {"fp8": "fp8_e4m3fn-rowwise", "int8": "int8-rowwise"}
_QUANT_STORAGE = {"fp8_e4m3fn-rowwise": torch.float8_e4m3fn, "int8-rowwise": torch.int8}
_SCALE_SUFFIX = ".scale"
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _quantizable(t: torch.Tensor) -> bool:
    """LoRA factors: float tensors of two or more dims whose rows hold at least two values (alphas, biases and
    (out, 1) DoRA magnitudes stay as they are: a float32 scale per single value would only grow the file)."""
    return t.is_floating_point() and t.dim() >= 2 and t.shape[0] > 0 and t.numel() // t.shape[0] >= 2


def quantize_tensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], scheme: str,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store every LoRA factor of ``tensors`` quantized per output row (``scheme``: ``"fp8"`` or ``"int8"``).

    Each quantized ``key`` gets a float32 ``key + ".scale"`` of shape ``(rows,)``, with ``W = q.float() *
    scale[:, None, ...]``. fp8 is e4m3fn with ``scale = absmax / 448`` per row; int8 is symmetric, ``round(W /
    scale)`` with ``scale = absmax / 127``. The metadata key :data:`QUANT_META_KEY` names the scheme, so readers
    (:func:`read_tensors`, and other tools) can tell; all other tensors are written unchanged."""
    name = QUANT_SCHEMES.get(scheme, scheme)
    storage = _QUANT_STORAGE.get(name)
    if storage is None:
        raise FormatError(f"unknown LoRA quantization {scheme!r}; use one of {', '.join(QUANT_SCHEMES)}")
    out: dict[str, torch.Tensor] = {}
    dtypes: set[str] = set()
    for key, t in tensors.items():
        if key.endswith(_SCALE_SUFFIX) and key[: -len(_SCALE_SUFFIX)] in tensors:
            raise FormatError(f"{key}: a tensor named like a quantization scale; rename it before quantizing")
        if not _quantizable(t):
            out[key] = t
            continue
        dtypes.add(_DTYPE_NAMES.get(t.dtype, "fp32"))
        rows = t.detach().float().reshape(t.shape[0], -1)
        top = 448.0 if storage is not torch.int8 else 127.0
        scale = rows.abs().amax(dim=1) / top
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = rows / scale[:, None]
        q = q.round().clamp(-127, 127).to(torch.int8) if storage is torch.int8 else q.clamp(-448, 448).to(storage)
        out[key] = q.reshape(t.shape)
        out[key + _SCALE_SUFFIX] = scale
    meta = dict(metadata)
    dtype = "bf16" if dtypes <= {"bf16"} else ("fp16" if dtypes <= {"fp16"} else "fp32")
    meta[QUANT_META_KEY] = json.dumps({
        "scheme": name, "scale_suffix": _SCALE_SUFFIX, "scale_axis": 0, "dtype": dtype,
        "dequantize": "W = q.float() * scale.reshape(-1, *[1] * (q.dim() - 1))",
    })
    return out, meta


def dequantize_tensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: object = "<tensors>",
) -> dict[str, torch.Tensor]:
    """The float tensors of a file written by :func:`quantize_tensors` (in the dtype the factors had before, as
    recorded in the metadata); ``.scale`` companions are consumed. Strict: an unknown scheme, a quantized tensor
    without its scale or a scale of the wrong shape raises :class:`FormatError` naming the key."""
    try:
        info = json.loads(metadata[QUANT_META_KEY])
        name, suffix = info["scheme"], info.get("scale_suffix", _SCALE_SUFFIX)
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{path}: unreadable {QUANT_META_KEY} metadata ({exc}); re-save the LoRA") from exc
    storage = _QUANT_STORAGE.get(name)
    if storage is None:
        raise FormatError(f"{path}: unknown LoRA quantization scheme {name!r} (known: {', '.join(_QUANT_STORAGE)}); "
                          "a newer lorakit may read it")
    dtype = parse_dtype(info.get("dtype", "fp32"))
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.endswith(suffix) and key[: -len(suffix)] in tensors:
            continue
        if t.dtype != storage:
            out[key] = t
            continue
        scale = tensors.get(key + suffix)
        if scale is None or scale.dim() != 1 or scale.shape[0] != t.shape[0]:
            got = "missing" if scale is None else f"shape {tuple(scale.shape)}"
            raise FormatError(f"{path}: {key} is stored {name} but its scale {key + suffix} is {got} (want "
                              f"({t.shape[0]},)); the file is damaged, re-save it")
        w = t.float() * scale.float().reshape(-1, *[1] * (t.dim() - 1))
        out[key] = w.to(dtype)
    return out
