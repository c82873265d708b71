"""The server on video and image-conditioned models: a text-to-video request in, an MP4 out that decodes to N
frames; WebP/GIF/base64; an image-to-video model with the image as base64 JSON or a multipart upload; the errors
(missing image 422, undecodable image 400, too many frames 422, format mismatch 422); /v1/info and progress.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av", reason="PyAV is not installed (pip install av)")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import lorakit  # noqa: E402
from lorakit.io import write_tensors  # noqa: E402
from lorakit.media import probe, read_video  # noqa: E402
from lorakit.server.app import Settings, create_app  # noqa: E402

STEPS = 2


def wan_lora(pipe, seed: int = 3, rank: int = 2, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """A PEFT-named LoRA on every attention projection of the tiny Wan transformer."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in pipe.transformer.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".attn" in name:
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * scale
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * scale
    return sd


def body(**kw) -> dict:
    req = {"prompt": "a fox running", "steps": STEPS, "seed": 3, "width": 32, "height": 32, "num_frames": 5}
    req.update(kw)
    return req


def png_bytes(size=(32, 32), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def frames_of(data: bytes) -> np.ndarray:
    return np.stack([np.asarray(f.convert("RGB"), dtype=np.int16) for f in read_video(data)])


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    torch.set_num_threads(1)
    pipe = lorakit.tiny_pipeline("wan-t2v")
    folder: Path = tmp_path_factory.mktemp("wan_loras")
    write_tensors(wan_lora(pipe), folder / "motion.safetensors")
    settings = Settings(lora_dir=str(folder), pipe=pipe, model="tiny-wan-t2v", max_batch=1, max_frames=9)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    pipe = lorakit.tiny_pipeline("wan-i2v")
    settings = Settings(lora_dir=str(tmp_path_factory.mktemp("i2v_loras")), pipe=pipe, model="tiny-wan-i2v",
                        max_batch=1, max_input_mb=0.5)
    with TestClient(create_app(settings)) as c:
        yield c


def test_info_describes_a_video_model(t2v, i2v):
    info = t2v.get("/v1/info").json()
    assert info["task"] == "t2v" and info["kind"] == "video" and info["formats"] == ["mp4", "webp", "gif"]
    assert info["limits"]["max_frames"] == 9 and info["needs"] == [] and info["takes"] == []
    info = i2v.get("/v1/info").json()
    assert info["task"] == "i2v" and info["needs"] == ["image"] and info["limits"]["max_input_mb"] == 0.5


def test_t2v_request_gives_an_mp4_of_n_frames_and_the_lora_changes_it(t2v):
    res = t2v.post("/v1/generate", json=body(fps=8, request_id="job-1"))
    assert res.status_code == 200, res.text
    assert res.headers["content-type"] == "video/mp4"
    n, size, fps = probe(res.content)
    assert (n, size, fps) == (5, (32, 32), 8)
    progress = t2v.get("/v1/progress/job-1").json()
    assert progress["state"] == "done" and progress["step"] == STEPS and progress["steps"] == STEPS
    assert t2v.get("/v1/progress/never-sent").json()["state"] == "unknown"
    again = t2v.post("/v1/generate", json=body(fps=8))
    np.testing.assert_array_equal(frames_of(again.content), frames_of(res.content))  # same seed, same frames
    lora = t2v.post("/v1/generate", json=body(fps=8, loras=[{"name": "motion", "strength": 1.0}]))
    assert lora.status_code == 200, lora.text
    assert np.abs(frames_of(lora.content) - frames_of(res.content)).max() > 8  # the LoRA changed the video


@pytest.mark.parametrize(("fmt", "media_type"), [("webp", "image/webp"), ("gif", "image/gif")])
def test_t2v_animated_formats_decode_to_n_frames(t2v, fmt, media_type):
    res = t2v.post("/v1/generate", json=body(response_format=fmt))
    assert res.status_code == 200, res.text
    assert res.headers["content-type"] == media_type
    n, size, _ = probe(res.content)
    assert (n, size) == (5, (32, 32))


def test_t2v_base64_json_names_its_media_type(t2v):
    res = t2v.post("/v1/generate", json=body(response_format="b64_json"))
    assert res.status_code == 200, res.text
    payload = res.json()
    assert payload["media_type"] == "video/mp4"
    assert probe(base64.b64decode(payload["b64_json"]))[0] == 5


@pytest.mark.parametrize(("kw", "status", "needle"), [
    ({"num_frames": 33}, 422, "--max-frames"),
    ({"response_format": "png"}, 422, "makes videos"),
    ({"image": base64.b64encode(png_bytes()).decode()}, 422, "takes no image"),
])
def test_t2v_bad_requests_are_clear_and_the_server_stays_up(t2v, kw, status, needle):
    res = t2v.post("/v1/generate", json=body(**kw))
    assert res.status_code == status and needle in res.json()["error"]["message"], res.text
    assert t2v.get("/healthz").status_code == 200


def test_i2v_needs_an_image(i2v):
    res = i2v.post("/v1/generate", json=body())
    assert res.status_code == 422 and res.json()["error"]["code"] == "missing_input"
    assert "image" in res.json()["error"]["message"]


@pytest.mark.parametrize("image", ["not base64 !!", base64.b64encode(b"\x89PNG\r\n\x1a\n broken").decode()])
def test_i2v_undecodable_image_is_400(i2v, image):
    res = i2v.post("/v1/generate", json=body(image=image))
    assert res.status_code == 400 and res.json()["error"]["code"] == "invalid_input", res.text
    assert i2v.get("/healthz").status_code == 200


def test_i2v_input_over_the_cap_is_413(i2v):
    big = base64.b64encode(b"\0" * (600 << 10)).decode()
    res = i2v.post("/v1/generate", json=body(image=big))
    assert res.status_code == 413


def test_i2v_image_as_json_or_multipart_gives_the_same_video(i2v):
    red, blue = png_bytes(), png_bytes(color=(20, 40, 220))
    res = i2v.post("/v1/generate", json=body(image="data:image/png;base64," + base64.b64encode(red).decode()))
    assert res.status_code == 200, res.text
    assert probe(res.content)[:2] == (5, (32, 32))
    form = {k: str(v) for k, v in body().items()}
    form["loras"] = "[]"
    multi = i2v.post("/v1/generate", data=form, files={"image": ("red.png", red, "image/png")})
    assert multi.status_code == 200, multi.text
    np.testing.assert_array_equal(frames_of(multi.content), frames_of(res.content))
    other = i2v.post("/v1/generate", data=form, files={"image": ("blue.png", blue, "image/png")})
    assert np.abs(frames_of(other.content) - frames_of(res.content)).max() > 0  # the image conditions the video
