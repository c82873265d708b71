"""The Guard middleware of ``lorakit serve`` (issue 16): the API key is checked before a body byte is read,
bodies are capped while they stream (413), uploads are refused before spooling, non-ASCII keys compare as bytes,
metrics are labelled by route template, and no bad request of a long list gets a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import lorakit
from lorakit.server.app import Settings, create_app
from test_server_api import assert_error, body, make_lora_dir

KEY = "s3cret-ключ-🔑"  # non-ASCII on purpose: compared as UTF-8 bytes
AUTH = [(b"authorization", b"Bearer " + KEY.encode("utf-8"))]


@pytest.fixture(scope="module")
def pipe():
    return lorakit.tiny_pipeline(0)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, pipe) -> Path:
    return make_lora_dir(tmp_path_factory.mktemp("guard_loras"), pipe, names=("alpha",))


@pytest.fixture
def app(pipe, lora_dir):
    app = create_app(Settings(lora_dir=str(lora_dir), pipe=pipe, api_key=KEY, allow_upload=True,
                              max_upload_mb=0.5, max_body_kb=64, max_input_mb=0.25, max_batch=1))
    yield app
    app.state.worker.close()


class Body:
    """An ASGI ``receive`` that streams ``total`` bytes in chunks and counts how many the app pulled."""

    def __init__(self, total: int, chunk: int = 16 << 10, data: bytes | None = None, prefix: bytes = b"") -> None:
        self.data, self.total, self.chunk, self.pulled, self.prefix = data, total, chunk, 0, prefix

    async def __call__(self) -> dict:
        if self.data is not None:
            self.pulled += len(self.data)
            data, self.data, self.total = self.data, None, 0
            return {"type": "http.request", "body": data, "more_body": False}
        if self.pulled >= self.total:
            await asyncio.sleep(3600)  # the client stays connected and sends nothing more
        n = min(self.chunk, self.total - self.pulled)
        self.pulled += n
        data = (self.prefix + b"{" * n)[:n] if self.pulled == n else b"{" * n
        return {"type": "http.request", "body": data, "more_body": self.pulled < self.total}


def call(app, method: str, path: str, headers: list[tuple[bytes, bytes]], receive: Body) -> tuple[int, dict, dict]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(payload), {k.decode(): v.decode() for k, v in start["headers"]}


BIG = 300 << 20


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/generate"), ("POST", "/v1/loras"),
                                              ("DELETE", "/v1/loras/alpha"), ("GET", "/v1/loras")])
def test_no_key_is_401_before_the_body_is_read(app, method, path):
    headers = [(b"content-length", str(BIG).encode()), (b"content-type", b"application/json")]
    for auth in ([], [(b"authorization", b"Bearer wrong")], [(b"authorization", KEY.encode())]):
        receive = Body(BIG)
        status, payload, resp_headers = call(app, method, path, headers + auth, receive)
        assert status == 401 and payload["error"]["code"] == "unauthorized"
        assert resp_headers["www-authenticate"] == "Bearer"
        assert receive.pulled == 0


def test_declared_length_over_the_cap_is_413_before_reading(app):
    receive = Body(BIG)
    headers = AUTH + [(b"content-length", str(BIG).encode()), (b"content-type", b"application/json")]
    status, payload, _ = call(app, "POST", "/v1/generate", headers, receive)
    assert status == 413 and payload["error"]["code"] == "too_large" and receive.pulled == 0
    status, payload, _ = call(app, "POST", "/v1/loras", headers, Body(BIG))
    assert status == 413 and "0.5 MB" in payload["error"]["message"]
    status, _, _ = call(app, "POST", "/v1/generate", AUTH + [(b"content-length", b"12x")], Body(0, data=b"{}"))
    assert status == 400


@pytest.mark.parametrize(("path", "ctype", "cap"), [
    # a generate body may carry one base64 conditioning input of --max-input-mb (0.25 MB here)
    ("/v1/generate", b"application/json", int(0.25 * (1 << 20) * 4 / 3) + (64 << 10)),
    ("/v1/loras", b"multipart/form-data; boundary=xyz", (512 << 10) + (64 << 10)),
])
def test_streamed_body_is_cut_at_the_cap(app, lora_dir, path, ctype, cap):
    before = sorted(p.name for p in lora_dir.iterdir())
    # A well-formed start (a multipart file part), then bytes without end: only the cap can stop it.
    part = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.safetensors"\r\n\r\n'
    receive = Body(BIG, prefix=part if b"multipart" in ctype else b"")
    status, payload, _ = call(app, "POST", path, AUTH + [(b"content-type", ctype)], receive)
    assert status == 413 and payload["error"]["code"] == "too_large"
    assert receive.pulled <= cap + receive.chunk  # stopped at the cap, not at 300 MB
    assert sorted(p.name for p in lora_dir.iterdir()) == before


def test_uploads_disabled_is_403_before_the_body(pipe, lora_dir):
    app = create_app(Settings(lora_dir=str(lora_dir), pipe=pipe))
    try:
        receive = Body(BIG)
        status, payload, _ = call(app, "POST", "/v1/loras", [(b"content-type", b"multipart/form-data; boundary=x")],
                                  receive)
        assert status == 403 and payload["error"]["code"] == "uploads_disabled" and receive.pulled == 0
    finally:
        app.state.worker.close()


def test_non_ascii_key_and_open_paths(app):
    with TestClient(app) as c:
        good = {"Authorization": b"Bearer " + KEY.encode("utf-8")}
        assert c.get("/v1/loras", headers=good).status_code == 200
        assert c.post("/v1/generate", json=body(steps=1), headers=good).status_code == 200
        assert_error(c.get("/v1/loras", headers={"Authorization": b"Bearer " + KEY.encode("latin-1", "replace")}),
                     401, "unauthorized")
        assert_error(c.get("/v1/loras"), 401, "unauthorized", "Bearer")
        for open_path in ("/", "/healthz", "/metrics", "/docs", "/openapi.json"):
            assert c.get(open_path).status_code == 200, open_path
        assert_error(c.get("/nowhere"), 401, "unauthorized")  # unknown paths do not reveal the route table


def test_metrics_use_route_templates(pipe, lora_dir):
    app = create_app(Settings(lora_dir=str(lora_dir), pipe=pipe, allow_upload=True))
    rng = random.Random(0)
    with TestClient(app) as c:
        c.get("/v1/loras")
        c.delete("/v1/loras/warmup")
        c.get("/no/such/path")
        c.put("/v1/generate")
        before = c.get("/metrics").text.count("\n")
        for _ in range(200):
            name = "".join(rng.choices(string.ascii_letters, k=12))
            assert c.delete(f"/v1/loras/{name}").status_code == 404
            c.get(f"/x/{name}")
        text = c.get("/metrics").text
    assert text.count("\n") - before <= 4
    for line in ('endpoint="/v1/loras/{name}",status="404"', 'endpoint="/v1/loras",status="200"',
                 'endpoint="other",status="404"', 'endpoint="/v1/generate",status="405"'):
        assert line in text, line


BAD_BODIES: list[tuple[str, str, dict]] = [
    ("POST", "/v1/generate", {"content": b"not json"}),
    ("POST", "/v1/generate", {"content": b"\xff\xfe\x00garbage"}),
    ("POST", "/v1/generate", {"content": b"[" * 5000 + b"]" * 5000}),
    ("POST", "/v1/generate", {"content": b'{"prompt": "a", "steps": 1e999}'}),
    ("POST", "/v1/generate", {"content": b'{"prompt": "a", "guidance_scale": NaN}'}),
    ("POST", "/v1/generate", {"content": b""}),
    ("POST", "/v1/generate", {"json": None}),
    ("POST", "/v1/generate", {"json": []}),
    ("POST", "/v1/generate", {"json": "prompt"}),
    ("POST", "/v1/generate", {"json": {"prompt": ["a"]}}),
    ("POST", "/v1/generate", {"json": body(steps=10**100)}),
    ("POST", "/v1/generate", {"json": body(width=2**40, height=2**40)}),
    ("POST", "/v1/generate", {"json": body(seed=-1)}),
    ("POST", "/v1/generate", {"json": body(loras="alpha")}),
    ("POST", "/v1/generate", {"json": body(loras=[{"name": 5}])}),
    ("POST", "/v1/generate", {"json": body(loras=[{"name": "alpha", "strength": "inf"}])}),
    ("POST", "/v1/generate", {"json": body(loras=[{"name": "alpha"}] * 9)}),
    ("POST", "/v1/generate", {"json": body(loras=[{"name": "\x00../../etc/passwd"}])}),
    ("POST", "/v1/generate", {"json": body(prompt="x" * 5000)}),
    ("POST", "/v1/generate", {"data": {"prompt": "a"}}),
    ("POST", "/v1/generate", {"files": {"file": ("a.safetensors", b"x")}}),
    ("POST", "/v1/loras", {"content": b"junk", "headers": {"content-type": "multipart/form-data; boundary=zz"}}),
    ("POST", "/v1/loras", {"data": {"name": "x"}}),
    ("POST", "/v1/loras", {"files": {"file": ("", b"x")}}),
    ("POST", "/v1/loras", {"files": {"file": ("a\x00.safetensors", b"x" * 100)}}),
    ("POST", "/v1/loras", {"files": {"file": ("/etc/passwd.safetensors", b"x" * 100)}}),
    ("POST", "/v1/loras", {"files": {"file": ("a.safetensors", b"\x00" * 100)}, "params": {"name": "../x"}}),
    ("POST", "/v1/loras", {"files": {"file": ("a.safetensors", b"\xff" * 8 + b"{" * 100)}}),
    ("POST", "/v1/loras", {"json": {"file": "x"}}),
    ("DELETE", "/v1/loras/%2e%2e", {}),
    ("DELETE", "/v1/loras/..%2f..%2fetc%2fpasswd", {}),
    ("DELETE", "/v1/loras/%00", {}),
    ("DELETE", "/v1/loras/" + "a" * 5000, {}),
    ("GET", "/v1/loras/../../etc/passwd", {}),
    ("GET", "/%2e%2e/%2e%2e/etc/passwd", {}),
    ("PATCH", "/v1/loras", {}),
]


def test_no_bad_request_gets_a_5xx(pipe, lora_dir):
    before = sorted(p.name for p in lora_dir.iterdir())
    app = create_app(Settings(lora_dir=str(lora_dir), pipe=pipe, allow_upload=True, max_upload_mb=0.5, max_batch=1))
    with TestClient(app, raise_server_exceptions=False) as c:
        for method, path, kw in BAD_BODIES:
            resp = c.request(method, path, **kw)
            assert 400 <= resp.status_code < 500, (method, path, kw, resp.status_code, resp.text[:300])
            assert "error" in resp.json()
        assert c.get("/healthz").status_code == 200
        assert c.post("/v1/generate", json=body(steps=1, loras=[{"name": "alpha"}])).status_code == 200
        assert 'status="5' not in c.get("/metrics").text
    assert sorted(p.name for p in lora_dir.iterdir()) == before
