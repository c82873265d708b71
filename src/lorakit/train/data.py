"""Training data: a folder of images (or, for video families, ``.mp4`` clips) with same-stem ``.txt`` captions,
a diffusers ``metadata.jsonl`` (``file_name`` + ``text``), or WebDataset ``.tar`` shards (``KEY.jpg|png|webp`` +
``KEY.txt`` per sample). Unreadable samples (and clips shorter than ``frames``) are skipped with one warning
naming the file; a data set with no usable sample raises :class:`DatasetError` before any training step."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import DatasetError

__all__ = ["IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "Sample", "load_samples", "to_pixels", "to_video_pixels"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One training example: where its image comes from (a path, or an in-memory PIL image) and its caption."""

    source: str
    caption: str
    image: Any = None  # a PIL image (or a list of frames) given in memory; None: read ``source``
    video: bool = False  # ``source`` is a clip: :meth:`open` gives its frames

    def open(self) -> Any:
        from PIL import Image

        if self.image is not None:
            return self.image
        if self.video:
            from ..media import read_video

            return read_video(self.source)
        with Image.open(self.source) as img:
            img.load()
            return img.copy()


def to_pixels(image: Any, resolution: int | tuple[int, int]) -> torch.Tensor:
    """``[3, H, W]`` float in [-1, 1]: resized (bicubic) so it covers ``resolution`` (``R`` or a bucket's
    ``(width, height)``), then centre-cropped to it."""
    from PIL import Image

    tw, th = (resolution, resolution) if isinstance(resolution, int) else resolution
    img = image.convert("RGB")
    w, h = img.size
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - tw) // 2, (nh - th) // 2
    img = img.crop((left, top, left + tw, top + th))
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(th, tw, 3)
    return data.permute(2, 0, 1).float().div(127.5).sub(1.0)


def size_of(image: Any) -> tuple[int, int]:
    """``(width, height)`` of a PIL image or of the first frame of a clip."""
    return (image[0] if isinstance(image, (list, tuple)) else image).size


def to_video_pixels(frames: Sequence[Any], resolution: int | tuple[int, int], count: int) -> torch.Tensor:
    """``[3, count, H, W]`` in [-1, 1]: the first ``count`` frames, each resized and centre-cropped as
    :func:`to_pixels` does."""
    return torch.stack([to_pixels(f, resolution) for f in list(frames)[:count]], dim=1)


def _readable_clip(path: Path, frames: int) -> str | None:
    """``None`` when ``path`` decodes (PyAV) to at least ``frames`` frames, else the reason."""
    from ..errors import MediaError
    from ..media import read_video

    try:
        got = len(read_video(path))
    except (MediaError, ImportError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if got < frames:
        return f"{got} frames, --frames {frames} needs at least that many"
    return None


def _readable(path: Path) -> str | None:
    """``None`` when ``path`` decodes as an image, else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
    except Exception as exc:  # PIL raises many types for broken files
        return f"{type(exc).__name__}: {exc}"
    return None


def _folder_pairs(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> tuple[list[tuple[Path, str]], list[str]]:
    pairs: list[tuple[Path, str]] = []
    problems: list[str] = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in suffixes:
            continue
        caption = path.with_suffix(".txt")
        if not caption.is_file():
            problems.append(f"{path}: no caption file {caption.name}")
            continue
        pairs.append((path, caption.read_text(encoding="utf-8").strip()))
    return pairs, problems


def _jsonl_pairs(listing: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    pairs: list[tuple[Path, str]] = []
    problems: list[str] = []
    for i, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row["text"]
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{listing}:{i}: not a {{'file_name', 'text'}} object ({exc})")
            continue
        pairs.append((listing.parent / str(name), str(text)))
    return pairs, problems


def _tar_samples(shards: list[Path]) -> tuple[list[Sample], list[str]]:
    """WebDataset shards: members grouped by key (the path up to the first dot of the file name); each sample is
    decoded here and kept in memory."""
    import io
    import tarfile

    from PIL import Image

    samples: list[Sample] = []
    problems: list[str] = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar.getmembers():
                if member.isfile():
                    head, _, name = member.name.rpartition("/")
                    key, _, ext = name.partition(".")
                    groups.setdefault(f"{head}/{key}" if head else key, {})[ext.lower()] = member
            for key, parts in groups.items():
                image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
                where = f"{shard}#{key}"
                if image is None or "txt" not in parts:
                    problems.append(f"{where}: needs an image (.jpg/.png/.webp) and a .txt caption, skipped")
                    continue
                try:
                    with Image.open(io.BytesIO(tar.extractfile(image).read())) as img:
                        img.load()
                        picture = img.copy()
                except Exception as exc:  # PIL raises many types for broken files
                    problems.append(f"{where}: unreadable image, skipped ({type(exc).__name__}: {exc})")
                    continue
                caption = tar.extractfile(parts["txt"]).read().decode("utf-8").strip()
                samples.append(Sample(where, caption, image=picture))
    return samples, problems


def _shards(data: Path) -> list[Path]:
    if data.is_file() and data.suffix == ".tar":
        return [data]
    if data.is_dir() and not (data / "metadata.jsonl").is_file():
        tars = sorted(data.glob("*.tar"))
        if tars and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in data.iterdir()):
            return tars
    return []


def _listing(data: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> tuple[list[tuple[Path, str]], list[str]]:
    if data.is_file() and data.suffix == ".jsonl":
        return _jsonl_pairs(data)
    if data.is_dir():
        if (data / "metadata.jsonl").is_file():
            return _jsonl_pairs(data / "metadata.jsonl")
        return _folder_pairs(data, suffixes)
    if not data.exists():
        raise DatasetError(f"{data}: no such data set; pass a folder of images with .txt captions, a metadata.jsonl or .tar shards")
    raise DatasetError(f"{data}: not a data set; pass a folder of images with .txt captions or a metadata.jsonl")


def load_samples(data: str | os.PathLike[str] | Iterable[Any], *, frames: int | None = None) -> list[Sample]:
    """The usable samples of ``data``: a folder, a ``metadata.jsonl``, ``.tar`` shards (a file or a folder of
    them), or ``(PIL image, caption)`` pairs. With ``frames`` (a video family): a folder of clips
    (``.mp4/.webm/.mov/.mkv``) with same-stem captions or a ``metadata.jsonl`` naming clips, or ``(list of PIL
    frames, caption)`` pairs; clips decode with PyAV and need at least ``frames`` frames.
    Each unreadable sample is skipped with a warning naming it; none usable raises :class:`DatasetError`."""
    if frames is not None:
        return _load_clips(data, frames)
    if isinstance(data, (str, os.PathLike)) and _shards(Path(data)):
        where = Path(data)
        samples, problems = _tar_samples(_shards(where))
    elif isinstance(data, (str, os.PathLike)):
        where = Path(data)
        pairs, problems = _listing(where)
        samples: list[Sample] = []
        for path, caption in pairs:
            reason = _readable(path) if path.is_file() else "file not found"
            if reason is None:
                samples.append(Sample(str(path), caption))
            else:
                problems.append(f"{path}: unreadable image, skipped ({reason})")
    else:
        where = Path("<memory>")
        samples, problems = [], []
        for i, (image, caption) in enumerate(data):
            samples.append(Sample(f"<memory:{i}>", str(caption), image=image))
    for problem in problems:
        warnings.warn(problem, stacklevel=2)
    if not samples:
        detail = f" ({len(problems)} skipped: {problems[0]}...)" if problems else ""
        raise DatasetError(
            f"{where}: no usable training sample{detail}; a sample is an image (.png/.jpg/.webp) with a "
            "same-stem .txt caption, or a metadata.jsonl row {\"file_name\": ..., \"text\": ...}"
        )
    return samples


def _load_clips(data: str | os.PathLike[str] | Iterable[Any], frames: int) -> list[Sample]:
    samples: list[Sample] = []
    problems: list[str] = []
    if isinstance(data, (str, os.PathLike)):
        where = Path(data)
        pairs, problems = _listing(where, VIDEO_SUFFIXES)
        for path, caption in pairs:
            reason = _readable_clip(path, frames) if path.is_file() else "file not found"
            if reason is None:
                samples.append(Sample(str(path), caption, video=True))
            else:
                problems.append(f"{path}: unusable clip, skipped ({reason})")
    else:
        where = Path("<memory>")
        for i, (clip, caption) in enumerate(data):
            if len(clip) < frames:
                problems.append(f"<memory:{i}>: {len(clip)} frames, --frames {frames} needs at least that many")
                continue
            samples.append(Sample(f"<memory:{i}>", str(caption), image=list(clip), video=True))
    for problem in problems:
        warnings.warn(problem, stacklevel=3)
    if not samples:
        detail = f" ({len(problems)} skipped: {problems[0]}...)" if problems else ""
        raise DatasetError(
            f"{where}: no usable training clip{detail}; a video family trains on clips (.mp4/.webm/.mov/.mkv, "
            f"at least --frames {frames} frames, decoded with PyAV) each with a same-stem .txt caption, or a "
            "metadata.jsonl row {\"file_name\": ..., \"text\": ...}"
        )
    return samples


def split(samples: Sequence[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """Every ``round(1/fraction)``-th sample held out for validation (deterministic, at least one left to train)."""
    if fraction <= 0 or len(samples) < 2:
        return list(samples), []
    every = max(2, round(1 / fraction))
    held = [s for i, s in enumerate(samples) if i % every == every - 1]
    kept = [s for i, s in enumerate(samples) if i % every != every - 1]
    return kept, held
