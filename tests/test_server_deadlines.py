"""Deadlines and cancellation in ``lorakit serve`` (issue 16): a request past --request-timeout gets 504 and
its queued job is never generated; a client that disconnects while queued cancels its job; --max-pixel-steps caps
work per request; upload validation is time-bounded and a refused upload leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import lorakit
from lorakit.errors import ApiError
from lorakit.server.app import Settings, create_app
from lorakit.server.worker import Job
from test_server_api import assert_error, body, make_lora_dir, make_lora_tensors


@pytest.fixture(scope="module")
def pipe():
    return lorakit.tiny_pipeline(0)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, pipe) -> Path:
    return make_lora_dir(tmp_path_factory.mktemp("deadline_loras"), pipe, names=("alpha",))


def held_app(pipe, lora_dir, **kw):
    """An app whose worker records every prompt it generates and holds its first call until ``gate`` is set."""
    app = create_app(Settings(lora_dir=str(lora_dir), pipe=pipe, max_batch=1, **kw))
    worker = app.state.worker
    started, gate = threading.Event(), threading.Event()
    generated: list[str] = []
    real = worker._generate

    def held(batch):
        generated.extend(j.prompt for j in batch)
        started.set()
        gate.wait(30)
        return real(batch)

    worker._generate = held
    return app, started, gate, generated


def test_queued_request_past_its_deadline_is_504_and_never_generated(pipe, lora_dir):
    app, started, gate, generated = held_app(pipe, lora_dir, request_timeout=1.0)
    with TestClient(app) as c:
        first: list = []
        t = threading.Thread(target=lambda: first.append(c.post("/v1/generate", json=body(prompt="A", steps=1))))
        t.start()
        assert started.wait(10)
        t0 = time.monotonic()
        resp = c.post("/v1/generate", json=body(prompt="B", steps=1))
        assert_error(resp, 504, "timeout", "--request-timeout")
        assert time.monotonic() - t0 < 5
        gate.set()
        t.join(30)
        assert first[0].status_code in (200, 504)  # A ran past the deadline too; it was not dropped, it ran
        app.state.settings.request_timeout = 120.0  # C must not race a 1 s deadline on a loaded machine
        assert c.post("/v1/generate", json=body(prompt="C", steps=1)).status_code == 200
        assert c.get("/healthz").json()["queue_depth"] == 0
    assert generated == ["A", "C"]


def test_worker_drops_a_job_whose_deadline_passed_in_the_queue(pipe, lora_dir):
    app, started, gate, generated = held_app(pipe, lora_dir)
    worker = app.state.worker
    try:
        kw = dict(stack=(), loras=[], negative_prompt="", width=64, height=64, steps=1, guidance_scale=5.0, seed=0)
        first = worker.submit(Job(prompt="A", **kw))
        assert started.wait(10)
        late = worker.submit(Job(prompt="late", deadline=time.monotonic() + 0.05, **kw))
        time.sleep(0.1)
        gate.set()
        assert first.result(30)[0]
        with pytest.raises(ApiError) as info:
            late.result(30)
        assert info.value.status == 504
    finally:
        gate.set()
        worker.close()
    assert generated == ["A"]


def test_client_gone_while_queued_cancels_the_job(pipe, lora_dir):
    app, started, gate, generated = held_app(pipe, lora_dir)
    with TestClient(app) as c:
        first: list = []
        t = threading.Thread(target=lambda: first.append(c.post("/v1/generate", json=body(prompt="A", steps=1))))
        t.start()
        assert started.wait(10)
        status = asyncio.run(_disconnecting_request(app, body(prompt="B", steps=1)))
        assert status == 499
        gate.set()
        t.join(30)
        assert first[0].status_code == 200
        assert c.post("/v1/generate", json=body(prompt="C", steps=1)).status_code == 200
    assert generated == ["A", "C"]


async def _disconnecting_request(app, payload: dict) -> int:
    """POST /v1/generate over raw ASGI; the client hangs up 0.3 s after sending the body."""
    data = json.dumps(payload).encode()
    messages = [{"type": "http.request", "body": data, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await asyncio.sleep(0.3)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/generate", "raw_path": b"/v1/generate", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
    await asyncio.wait_for(app(scope, receive, send), 20)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_max_pixel_steps(pipe, lora_dir):
    app = create_app(Settings(lora_dir=str(lora_dir), pipe=pipe, max_batch=1, max_pixel_steps=2 * 64 * 64))
    with TestClient(app) as c:
        assert_error(c.post("/v1/generate", json=body(steps=3)), 422, "invalid_request", "--max-pixel-steps")
        assert_error(c.post("/v1/generate", json=body(steps=2, width=128)), 422, "invalid_request", "16384")
        assert c.post("/v1/generate", json=body(steps=2)).status_code == 200


def test_default_pixel_step_cap_is_the_old_limits():
    s = Settings(lora_dir=".")
    assert s.max_pixel_steps is None and s.max_steps * s.max_size**2 == 50 * 1024 * 1024


def test_slow_upload_validation_is_refused_and_stores_nothing(pipe, lora_dir, tmp_path, monkeypatch):
    from lorakit.io import write_tensors

    src = tmp_path / "slow.safetensors"
    write_tensors(make_lora_tensors(pipe, seed=11), src)
    real_load = lorakit.load

    def slow_load(path, *a, **kw):  # stands in for a pathological file (e.g. a regex that backtracks)
        time.sleep(1.5)
        return real_load(path, *a, **kw)

    before = sorted(p.name for p in lora_dir.iterdir())
    app = create_app(Settings(lora_dir=str(lora_dir), pipe=pipe, allow_upload=True, upload_timeout_s=0.3))
    with TestClient(app) as c:
        monkeypatch.setattr(lorakit, "load", slow_load)
        resp = c.post("/v1/loras", files={"file": ("slow.safetensors", src.read_bytes())})
        assert_error(resp, 422, "validation_timeout", "0.3 s")
        assert c.get("/healthz").status_code == 200
        time.sleep(2.0)  # the abandoned validation ends: its temp file must go, nothing renamed into place
        assert sorted(p.name for p in lora_dir.iterdir()) == before
        monkeypatch.setattr(lorakit, "load", real_load)
        assert c.post("/v1/generate", json=body(steps=1, loras=[{"name": "alpha"}])).status_code == 200
