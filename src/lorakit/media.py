"""Images and videos in and out of ``lorakit generate`` and the server: the output kind of a file suffix, encoders
(PNG/JPEG through Pillow, H.264 MP4 through PyAV, animated WebP/GIF through Pillow), decoders, and atomic writes.

Suffixes: ``.png``, ``.jpg``/``.jpeg`` are images; ``.mp4`` is a video; ``.webp`` and ``.gif`` are always
*animations* (a video output), never a single still image. Checking an output against what a pipeline makes
(:func:`check_output`) happens before any work, so a video is never generated only to be refused by ``.png``.

Limits, said once here:

* MP4 is H.264 in ``yuv420p``, which needs even widths and heights: an odd size is padded by one row / column
  (a copy of the last one) on the right / bottom, so the decoded video is that much larger.
* GIF stores frame times in 1/100 s: 16 fps is written as 60 ms frames (16.7 fps); 10, 20, 25 and 50 fps are exact.
  WebP stores whole milliseconds (16 fps: 62 ms). Both encoders merge identical consecutive frames into one longer
  frame, so a still video decodes to fewer frames (the same duration).
"""

from __future__ import annotations

import io as _io
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from .errors import MediaError, OutputFormatError
from .io import atomic_output

__all__ = [
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "check_output",
    "encode_image",
    "encode_video",
    "output_kind",
    "probe",
    "read_image",
    "read_video",
    "write_atomic",
]

IMAGE_SUFFIXES: dict[str, str] = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
VIDEO_SUFFIXES: dict[str, str] = {".mp4": "mp4", ".webp": "webp", ".gif": "gif"}
KINDS = ("image", "video")

Source = str | os.PathLike[str] | bytes


def _suffix(path: str | os.PathLike[str]) -> str:
    return Path(path).suffix.lower()


def output_kind(path: str | os.PathLike[str]) -> str:
    """``"image"`` for ``.png`` / ``.jpg`` / ``.jpeg``, ``"video"`` for ``.mp4`` / ``.webp`` / ``.gif`` (animations);
    any other suffix raises :class:`OutputFormatError` listing the known ones."""
    suffix = _suffix(path)
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    raise OutputFormatError(
        f"{os.fspath(path)}: unknown output suffix {suffix or '(none)'!r}; use .png or .jpg for an image, "
        ".mp4, .webp or .gif for a video"
    )


def output_format(path: str | os.PathLike[str]) -> str:
    """The encoder name of ``path``'s suffix: ``png``, ``jpeg``, ``mp4``, ``webp`` or ``gif``."""
    output_kind(path)  # raises on an unknown suffix
    suffix = _suffix(path)
    return IMAGE_SUFFIXES.get(suffix) or VIDEO_SUFFIXES[suffix]


def check_output(kind: str, path: str | os.PathLike[str]) -> str:
    """Raise :class:`OutputFormatError` when ``path``'s suffix cannot hold ``kind`` (``"image"`` or ``"video"``):
    a video to ``.png``, an image to ``.mp4``. Call it before any work. Returns the encoder name (``"mp4"``...)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
    got = output_kind(path)
    if got != kind:
        hint = ".mp4, .webp or .gif" if kind == "video" else ".png or .jpg"
        raise OutputFormatError(
            f"{os.fspath(path)}: this pipeline makes {'a video' if kind == 'video' else 'an image'}, but "
            f"{_suffix(path)} holds {'a video' if got == 'video' else 'an image'}; use an output ending in {hint}"
        )
    return output_format(path)


def _pil() -> Any:
    from PIL import Image

    return Image


def encode_image(image: Any, fmt: str = "png") -> bytes:
    """A PIL image as ``png`` or ``jpeg`` bytes."""
    fmt = fmt.lower()
    if fmt not in ("png", "jpeg", "jpg"):
        raise OutputFormatError(f"unknown image format {fmt!r}; use 'png' or 'jpeg'")
    buf = _io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG" if fmt in ("jpeg", "jpg") else "PNG")
    return buf.getvalue()


def _even(image: Any) -> Any:
    """Pad an odd width / height by one copy of the last column / row: yuv420p needs even sizes."""
    w, h = image.size
    if w % 2 == 0 and h % 2 == 0:
        return image
    out = _pil().new("RGB", (w + w % 2, h + h % 2))
    out.paste(image, (0, 0))
    if w % 2:
        out.paste(image.crop((w - 1, 0, w, h)), (w, 0))
    if h % 2:
        out.paste(out.crop((0, h - 1, w + w % 2, h)), (0, h))
    return out


def _av() -> Any:
    try:
        import av
    except ImportError as exc:
        raise ImportError("MP4 needs PyAV: pip install av (or pip install 'lorakit[diffusers]')") from exc
    return av


def _encode_mp4(frames: Sequence[Any], fps: float) -> bytes:
    av = _av()

    rate = Fraction(fps).limit_denominator(1001)
    buf = _io.BytesIO()
    frames = [_even(f.convert("RGB")) for f in frames]
    codec = "libx264" if "libx264" in av.codecs_available else "h264"
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def encode_video(frames: Sequence[Any], fmt: str, fps: float) -> bytes:
    """``frames`` (PIL images of one size) as ``mp4`` (H.264, yuv420p, PyAV), ``webp`` or ``gif`` (looping
    animations, Pillow) at ``fps`` frames per second. See the module docstring for odd sizes and timing limits."""
    fmt = fmt.lower()
    if fmt not in ("mp4", "webp", "gif"):
        raise OutputFormatError(f"unknown video format {fmt!r}; use 'mp4', 'webp' or 'gif'")
    if not frames:
        raise ValueError("no frames to encode")
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    sizes = {f.size for f in frames}
    if len(sizes) != 1:
        raise ValueError(f"frames of different sizes {sorted(sizes)}; every frame of a video needs one size")
    if fmt == "mp4":
        return _encode_mp4(frames, fps)
    rgb = [f.convert("RGB") for f in frames]
    buf = _io.BytesIO()
    extra = {"lossless": True} if fmt == "webp" else {}
    rgb[0].save(buf, format=fmt.upper(), save_all=True, append_images=rgb[1:], duration=1000.0 / fps, loop=0,
                **extra)
    return buf.getvalue()


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temp file next to ``path`` and rename it into place (no partial file on error)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _load(source: Source) -> tuple[bytes, str]:
    """(bytes, name for messages) of a path or bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<bytes>"
    try:
        return Path(source).expanduser().read_bytes(), os.fspath(source)
    except OSError as exc:
        raise MediaError(f"cannot read {os.fspath(source)}: {exc.strerror or exc}") from exc


def read_image(source: Source) -> Any:
    """A path or bytes -> an RGB PIL image; :class:`MediaError` naming the file if it does not decode."""
    data, name = _load(source)
    try:
        image = _pil().open(_io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... for broken files
        raise MediaError(f"{name} is not an image lorakit can decode ({exc}); pass a PNG, JPEG or WebP file") from exc
    return image.convert("RGB")


def _is_mp4(data: bytes) -> bool:
    return data[4:8] == b"ftyp"


def _read_av(data: bytes, name: str) -> tuple[list[Any], float]:
    av = _av()

    try:
        with av.open(_io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            frames = [frame.to_image() for frame in container.decode(stream)]
            rate = stream.average_rate or stream.guessed_rate
    except (av.error.FFmpegError, IndexError, ValueError) as exc:
        raise MediaError(f"{name} is not a video lorakit can decode ({exc}); pass an MP4, WebP or GIF file") from exc
    return frames, float(rate) if rate else 0.0


def _read_pil(data: bytes, name: str) -> tuple[list[Any], float]:
    from PIL import ImageSequence

    try:
        image = _pil().open(_io.BytesIO(data))
        frames, durations = [], []
        for frame in ImageSequence.Iterator(image):
            frames.append(frame.convert("RGB"))  # loads the frame: WebP sets its duration only then
            durations.append(frame.info.get("duration") or 0)
    except Exception as exc:  # PIL's decode errors are of many types
        raise MediaError(f"{name} is not a video lorakit can decode ({exc}); pass an MP4, WebP or GIF file") from exc
    mean = sum(durations) / len(durations) if durations else 0
    return frames, 1000.0 / mean if mean else 0.0


def _read(source: Source) -> tuple[list[Any], float]:
    data, name = _load(source)
    if _is_mp4(data):
        return _read_av(data, name)
    try:
        return _read_pil(data, name)
    except MediaError as pil_error:
        try:  # other containers (MKV, WebM, MOV...) through PyAV
            return _read_av(data, name)
        except MediaError:
            raise pil_error from None


def read_video(source: Source) -> list[Any]:
    """A video (MP4 and other containers through PyAV; animated WebP / GIF through Pillow), a path or bytes ->
    its frames as RGB PIL images. A still image gives one frame. :class:`MediaError` names a file that does not
    decode."""
    frames, _ = _read(source)
    if not frames:
        raise MediaError(f"{source if not isinstance(source, bytes) else '<bytes>'} holds no video frames")
    return frames


def probe(source: Source) -> tuple[int, tuple[int, int], float]:
    """``(frame count, (width, height), fps)`` of a video file or bytes, by decoding it (for tests and checks)."""
    frames, fps = _read(source)
    if not frames:
        raise MediaError("no video frames to probe")
    return len(frames), frames[0].size, fps
