"""HTTP API of ``lorakit serve`` against the tiny pipeline: every endpoint, every bad input (status, code and
message, and that the server keeps serving), atomic uploads, and a base model that never drifts under swaps.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import lorakit
from lorakit.io import write_tensors
from lorakit.server.app import Settings, create_app

STEPS = 2  # enough denoising steps for a LoRA to change the image, cheap on CPU


def make_lora_tensors(pipe, seed: int, rank: int = 4, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """A PEFT-style LoRA on every attention projection of the tiny UNet (random but seeded factors)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in pipe.unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".attn" in name:
            sd[f"unet.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * scale
            sd[f"unet.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * scale
    return sd


def make_lora_dir(folder: Path, pipe, names: tuple[str, ...] = ("alpha", "beta", "gamma", "delta")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        write_tensors(make_lora_tensors(pipe, seed=100 + i), folder / f"{name}.safetensors")
    return folder


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def body(**kw) -> dict:
    req = {"prompt": "a cat", "steps": STEPS, "seed": 7, "width": 64, "height": 64}
    req.update(kw)
    return req


@pytest.fixture(scope="module")
def pipe():
    return lorakit.tiny_pipeline(0)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, pipe) -> Path:
    return make_lora_dir(tmp_path_factory.mktemp("loras"), pipe)


@pytest.fixture(scope="module")
def client(pipe, lora_dir):
    settings = Settings(lora_dir=str(lora_dir), pipe=pipe, allow_upload=True, max_upload_mb=0.5, max_batch=1)
    with TestClient(create_app(settings)) as c:
        yield c


def assert_error(resp, status: int, code: str, *fragments: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code, err
    for frag in fragments:
        assert frag in err["message"], err["message"]


def assert_still_serves(client) -> None:
    resp = client.post("/v1/generate", json=body(seed=1))
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"


def test_healthz_metrics_index_and_docs(client):
    assert client.get("/healthz").json()["status"] == "ok"
    client.post("/v1/generate", json=body())
    text = client.get("/metrics").text
    for metric in ("lorakit_queue_depth", "lorakit_lora_swaps_total", "lorakit_request_latency_seconds_bucket",
                   "lorakit_lora_cache_hits_total", 'lorakit_requests_total{endpoint="/v1/generate",status="200"}'):
        assert metric in text
    page = client.get("/")
    assert page.status_code == 200 and "/v1/loras" in page.text and "generate" in page.text
    assert client.get("/docs").status_code == 200
    assert "/v1/generate" in client.get("/openapi.json").json()["paths"]


def test_list_loras_reports_inspect_fields(client, lora_dir):
    loras = {item["name"]: item for item in client.get("/v1/loras").json()["loras"]}
    assert set(loras) >= {"alpha", "beta", "gamma", "delta"}
    alpha = loras["alpha"]
    assert alpha["format"] == "peft" and alpha["adapter_types"] == {"lora": 32} and alpha["ranks"] == [4]
    assert len(alpha["sha256"]) == 64 and alpha["size_bytes"] == (lora_dir / "alpha.safetensors").stat().st_size


def test_generate_png_and_b64_are_the_same_image_and_lora_changes_it(client):
    import base64

    png = client.post("/v1/generate", json=body()).content
    again = client.post("/v1/generate", json=body()).content
    b64 = client.post("/v1/generate", json=body(response_format="b64_json")).json()["b64_json"]
    assert png == again == base64.b64decode(b64)  # unbatched: bit-identical
    base = decode(png)
    assert base.shape == (64, 64, 3)
    styled = decode(client.post("/v1/generate", json=body(loras=[{"name": "alpha", "strength": 1.0}])).content)
    # Non-vacuity: the LoRA changes most pixels, and strength 0 is the identity.
    assert (styled != base).mean() > 0.5
    zero = client.post("/v1/generate", json=body(loras=[{"name": "alpha", "strength": 0.0}])).content
    assert np.array_equal(decode(zero), base)
    other_seed = decode(client.post("/v1/generate", json=body(seed=8)).content)
    assert (other_seed != base).mean() > 0.5


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 51}, "steps: at most 50"),
        ({"width": 60}, "width: must be a multiple of 8"),
        ({"height": 2048}, "height: at most 1024"),
        ({"loras": [{"name": "alpha", "strength": 4.5}]}, "loras.0.strength"),
        ({"loras": [{"name": "alpha", "strength": -5}]}, "loras.0.strength"),
        ({"response_format": "jpeg"}, "response_format"),
        ({"prompt": None}, "prompt"),
    ],
)
def test_invalid_params_are_422_in_envelope(client, override, fragment):
    assert_error(client.post("/v1/generate", json=body(**override)), 422, "invalid_request", fragment)
    assert_still_serves(client)


def test_unknown_lora_is_404_naming_it(client):
    resp = client.post("/v1/generate", json=body(loras=[{"name": "nosuch", "strength": 1}]))
    assert_error(resp, 404, "lora_not_found", "'nosuch'", "alpha")
    resp = client.post("/v1/generate", json=body(loras=[{"name": "org/repo/missing.safetensors"}]))
    assert_error(resp, 404, "lora_not_found", "org/repo/missing.safetensors")
    assert_still_serves(client)


def test_upload_then_generate_then_delete(client, pipe, tmp_path):
    src = tmp_path / "up.safetensors"
    write_tensors(make_lora_tensors(pipe, seed=999), src)
    resp = client.post("/v1/loras", files={"file": ("uploaded.safetensors", src.read_bytes())})
    assert resp.status_code == 201, resp.text
    assert resp.json()["name"] == "uploaded" and resp.json()["format"] == "peft"
    assert "uploaded" in [x["name"] for x in client.get("/v1/loras").json()["loras"]]
    out = client.post("/v1/generate", json=body(loras=[{"name": "uploaded", "strength": 1}]))
    assert out.status_code == 200
    assert client.delete("/v1/loras/uploaded").json() == {"deleted": "uploaded"}
    assert_error(client.delete("/v1/loras/uploaded"), 404, "lora_not_found", "uploaded")
    assert_error(client.post("/v1/generate", json=body(loras=[{"name": "uploaded"}])), 404, "lora_not_found", "uploaded")


def _folder(lora_dir: Path) -> set[str]:
    return {p.name for p in lora_dir.iterdir()}


@pytest.mark.parametrize(
    ("filename", "data", "status", "code", "fragment"),
    [
        ("notes.txt", b"hello", 400, "invalid_lora", "must be a .safetensors file"),
        ("junk.safetensors", b"\x00" * 64, 400, "invalid_lora", "not a safetensors file"),
        ("trunc.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":", 400, "invalid_lora", "not a safetensors"),
        ("big.safetensors", b"\x00" * (600 * 1024), 413, "too_large", "0.5 MB"),
        ("../evil.safetensors", None, 400, "invalid_name", "Invalid LoRA name"),
        ("..safetensors", None, 400, "invalid_name", "Invalid LoRA name"),
    ],
)
def test_bad_uploads_store_nothing(client, lora_dir, filename, data, status, code, fragment):
    before = _folder(lora_dir)
    if data is None:
        data = (lora_dir / "alpha.safetensors").read_bytes()
    assert_error(client.post("/v1/loras", files={"file": (filename, data)}), status, code, fragment)
    assert _folder(lora_dir) == before  # nothing stored, no temp file left behind
    assert_still_serves(client)


def test_upload_with_nan_or_no_adapter_keys_is_rejected(client, lora_dir, pipe, tmp_path):
    before = _folder(lora_dir)
    sd = make_lora_tensors(pipe, seed=5)
    first = next(iter(sd))
    sd[first] = sd[first].clone()
    sd[first][0, 0] = float("nan")
    nan_file = tmp_path / "nan.safetensors"
    write_tensors(sd, nan_file)
    assert_error(client.post("/v1/loras", files={"file": ("nan.safetensors", nan_file.read_bytes())}),
                 400, "invalid_lora", "nan")
    other = tmp_path / "other.safetensors"
    write_tensors({"model.some.weight": torch.ones(2, 2)}, other)
    assert_error(client.post("/v1/loras", files={"file": ("other.safetensors", other.read_bytes())}),
                 400, "invalid_lora")
    assert _folder(lora_dir) == before
    assert_still_serves(client)


def test_traversal_in_delete_and_query_name_rejected(client, lora_dir):
    assert_error(client.delete("/v1/loras/..evil"), 400, "invalid_name", "Invalid LoRA name")
    data = (lora_dir / "alpha.safetensors").read_bytes()
    resp = client.post("/v1/loras", params={"name": "../../etc/x"}, files={"file": ("a.safetensors", data)})
    assert_error(resp, 400, "invalid_name", "no slashes")
    assert (lora_dir / "alpha.safetensors").exists()


def test_uploads_disabled_and_api_key(pipe, lora_dir):
    settings = Settings(lora_dir=str(lora_dir), pipe=pipe, api_key="s3cret")
    with TestClient(create_app(settings)) as c:
        assert_error(c.get("/v1/loras"), 401, "unauthorized", "Bearer")
        assert_error(c.get("/v1/loras", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
        assert_error(c.post("/v1/generate", json=body()), 401, "unauthorized")
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/loras", headers=ok).status_code == 200
        assert c.post("/v1/generate", json=body(), headers=ok).status_code == 200
        data = (lora_dir / "alpha.safetensors").read_bytes()
        resp = c.post("/v1/loras", files={"file": ("x.safetensors", data)}, headers=ok)
        assert_error(resp, 403, "uploads_disabled", "--allow-upload")
        assert_error(c.delete("/v1/loras/alpha", headers=ok), 403, "uploads_disabled")
        assert (lora_dir / "alpha.safetensors").exists()
        assert c.get("/healthz").status_code == 200  # health stays open for load balancers


def test_queue_full_is_503_with_retry_after(pipe, lora_dir):
    import threading
    import time

    settings = Settings(lora_dir=str(lora_dir), pipe=pipe, max_queue=1, max_batch=1)
    app = create_app(settings)
    worker = app.state.worker
    started, gate = threading.Event(), threading.Event()
    real = worker._generate

    def held(batch):  # hold the worker busy on the first request so the queue fills deterministically
        started.set()
        gate.wait(30)
        return real(batch)

    worker._generate = held
    with TestClient(app) as c:
        results: list = []

        def send(seed: int) -> None:
            results.append(c.post("/v1/generate", json=body(seed=seed)))

        threads = [threading.Thread(target=send, args=(0,))]
        threads[0].start()
        assert started.wait(10)
        threads.append(threading.Thread(target=send, args=(1,)))
        threads[1].start()
        deadline = time.monotonic() + 10
        while worker.depth() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        resp = c.post("/v1/generate", json=body(seed=99))
        gate.set()
        for t in threads:
            t.join(30)
        assert_error(resp, 503, "queue_full", "Queue is full")
        assert resp.headers["Retry-After"] == "1"
        assert [r.status_code for r in results] == [200, 200]
        assert c.post("/v1/generate", json=body()).status_code == 200
        assert 'status="503"' in c.get("/metrics").text


def test_base_weights_unchanged_after_many_swaps(pipe, lora_dir):
    originals = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    settings = Settings(lora_dir=str(lora_dir), pipe=pipe, max_batch=1)
    app = create_app(settings)
    with TestClient(app) as c:
        stacks = [[{"name": "alpha", "strength": 0.7}], [{"name": "beta", "strength": -1.3}],
                  [{"name": "gamma", "strength": 1.0}, {"name": "delta", "strength": 0.5}], []]
        for i in range(12):
            resp = c.post("/v1/generate", json=body(steps=1, loras=stacks[i % 4]))
            assert resp.status_code == 200
        swaps = app.state.worker.swaps
        assert swaps >= 11
        # The worker still holds the last (empty) stack fused: weights equal the originals exactly.
        assert all(torch.equal(originals[n], p) for n, p in pipe.unet.named_parameters())
        c.post("/v1/generate", json=body(steps=1, loras=stacks[0]))
        assert not all(torch.equal(originals[n], p) for n, p in pipe.unet.named_parameters())
    # Shutdown removes the patch: bit-exact again.
    assert all(torch.equal(originals[n], p) for n, p in pipe.unet.named_parameters())


@pytest.mark.parametrize(("kw", "needle"), [
    ({"response_format": "mp4"}, "makes images"),
    ({"num_frames": 5}, "makes images"),
    ({"image": "aGVsbG8="}, "takes no image"),
])
def test_image_model_refuses_video_fields(client, kw, needle):
    res = client.post("/v1/generate", json=body(**kw))
    assert res.status_code == 422 and needle in res.json()["error"]["message"], res.text


def test_info_and_progress_on_the_image_model(client):
    info = client.get("/v1/info").json()
    assert info["task"] == "t2i" and info["kind"] == "image" and info["formats"] == ["png"]
    assert info["limits"]["max_frames"] is None
    res = client.post("/v1/generate", json=body(request_id="img-1"))
    assert res.status_code == 200 and res.headers["content-type"] == "image/png"
    state = client.get("/v1/progress/img-1").json()
    assert state["state"] == "done" and state["step"] == state["steps"] == STEPS
