"""Video and image-conditioned generation: lorakit.media's encoders decoded back (frame count, size, fps), output
suffix checks before any work, tasks and their required inputs, device selection, and ``lorakit generate`` on the
tiny Wan pipelines (formats, --batch-input, LightX2V --config with expert routing)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lorakit import media
from lorakit.errors import MediaError, OutputFormatError


def _frames(n: int = 5, size: tuple[int, int] = (32, 32), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize(("fmt", "fps", "want_fps"), [("mp4", 16, 16.0), ("mp4", 23.976, 23.976),
                                                      ("webp", 20, 20.0), ("gif", 20, 20.0), ("gif", 16, 100 / 6)])
def test_encode_video_decodes_back(fmt, fps, want_fps, tmp_path) -> None:
    frames = _frames()
    data = media.encode_video(frames, fmt, fps)
    n, size, got_fps = media.probe(data)
    assert (n, size) == (5, (32, 32)) and got_fps == pytest.approx(want_fps, rel=1e-3)
    path = media.write_atomic(tmp_path / f"out.{fmt}", data)
    assert media.output_kind(path) == "video" and len(media.read_video(path)) == 5
    if fmt != "mp4":  # lossless WebP / 256 colours of GIF: close to the input; MP4 is lossy H.264
        decoded = np.asarray(media.read_video(data)[2], dtype=float)
        assert np.abs(decoded - np.asarray(frames[2], dtype=float)).mean() < (1 if fmt == "webp" else 40)


def test_mp4_pads_odd_sizes_to_even() -> None:
    n, size, _ = media.probe(media.encode_video(_frames(3, (31, 33)), "mp4", 8))
    assert (n, size) == (3, (32, 34))


def test_output_kinds_and_mismatch() -> None:
    assert [media.output_kind(p) for p in ("a.png", "b.JPG", "c.mp4", "d.webp", "e.gif")] == \
        ["image", "image", "video", "video", "video"]
    assert media.check_output("video", "x.mp4") == "mp4" and media.check_output("image", "x.jpg") == "jpeg"
    with pytest.raises(OutputFormatError, match=r"x\.png.*video.*\.mp4"):
        media.check_output("video", "x.png")
    with pytest.raises(OutputFormatError, match="an image"):
        media.check_output("image", "x.gif")
    with pytest.raises(OutputFormatError, match="unknown output suffix '.txt'"):
        media.output_kind("x.txt")


def test_read_errors_name_the_file(tmp_path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(MediaError, match="broken.png"):
        media.read_image(bad)
    with pytest.raises(MediaError, match="broken.png"):
        media.read_video(bad)
    with pytest.raises(MediaError, match="missing.png"):
        media.read_image(tmp_path / "missing.png")
    image = _frames(1)[0]
    assert np.array_equal(np.asarray(media.read_image(media.encode_image(image))), np.asarray(image))
