"""Reading and writing tensor files: safetensors (memory-mapped), pickles only via ``weights_only``,
hub references through the local huggingface_hub cache, and atomic writes that never touch an input.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import FormatError, OverwriteError, SourceNotFoundError, UnsafeFileError

__all__ = [
    "PICKLE_SUFFIXES",
    "SAFETENSORS_SUFFIXES",
    "atomic_output",
    "check_not_input",
    "parse_dtype",
    "parse_lora_spec",
    "read_metadata",
    "read_safetensors_header",
    "read_tensors",
    "resolve_source",
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


def _hub_download(source: str, match: re.Match[str]) -> Path:
    """``hf_hub_download`` of a hub reference (cache only when offline); every failure a SourceNotFoundError."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with the diffusers extra
        raise SourceNotFoundError(
            f"{source} is not a local file, and looks like a hub reference but huggingface_hub is not installed: "
            "pip install 'lorakit[diffusers]'"
        ) from exc
    repo_id = f"{match['org']}/{match['repo']}"
    offline = _hub_offline()
    try:
        return Path(hf_hub_download(repo_id, match["file"], revision=match["rev"], local_files_only=offline))
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


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"Refused to load {path}: it is a pickle that needs code execution to load "
            f"({str(exc).splitlines()[-1] if str(exc) else 'unsafe global'}). Nothing from it was run. "
            "Convert it to .safetensors with a tool you trust, or ask its author for a safetensors file."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise FormatError(f"{path} is not a readable PyTorch weights file: {exc}") from exc
    return _flatten_state_dict(obj, path)


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
    raise FormatError(f"{path} does not hold a state dict (found {type(obj).__name__})")


def check_not_input(output: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None]) -> None:
    """Raise :class:`OverwriteError` when ``output`` names the same file as one of ``inputs``."""
    out = Path(output).expanduser().resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).expanduser()
        if not src.exists():
            continue
        if src.resolve() == out or (out.exists() and os.path.samefile(src, out)):
            raise OverwriteError(f"Output {output} is the same file as input {item}; choose another output path.")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target folder; rename it onto ``path`` only on success.

    On any error the temporary file is removed, so no partial output is ever left behind.
    """
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_tensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> Path:
    """Write ``tensors`` atomically as safetensors (or a ``weights_only``-loadable pickle for .pt/.ckpt/.bin)."""
    target = Path(path).expanduser()
    check_not_input(target, inputs)
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
            torch.save(clean, tmp)
        else:
            from safetensors.torch import save_file

            save_file(clean, str(tmp), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    return target
