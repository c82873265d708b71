"""Attacks on ``lorakit serve`` (issue 16): every request names a LoRA only by its registry name, so no path,
traversal, symlink, FIFO or device is ever read; hub references only with --allow-hub; unusable LoRA files are
listed as invalid and refused with the layer named. Each attack gets a 4xx, nothing is read or written, and the
server keeps serving.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

import lorakit
import lorakit.server.registry as registry_mod
from lorakit.io import write_tensors
from lorakit.server.app import Settings, create_app
from test_server_api import assert_error, body, make_lora_dir, make_lora_tensors


@pytest.fixture(scope="module")
def pipe():
    return lorakit.tiny_pipeline(0)


@pytest.fixture(scope="module")
def outside(tmp_path_factory, pipe) -> Path:
    """A valid LoRA outside the LoRA folder: the server must never read it on a client's say-so."""
    folder = tmp_path_factory.mktemp("outside")
    write_tensors(make_lora_tensors(pipe, seed=1), folder / "secret.safetensors")
    return folder / "secret.safetensors"


def nan_layer_tensors(pipe) -> dict[str, torch.Tensor]:
    sd = make_lora_tensors(pipe, seed=3)
    first = next(iter(sd))
    sd[first] = sd[first].clone()
    sd[first][0, 0] = float("nan")
    return sd


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, pipe, outside) -> Path:
    folder = make_lora_dir(tmp_path_factory.mktemp("sec_loras"), pipe, names=("alpha", "beta"))
    write_tensors(nan_layer_tensors(pipe), folder / "nanlayer.safetensors")
    ints = {k: (v * 100).to(torch.int32) for k, v in make_lora_tensors(pipe, seed=4).items()}
    write_tensors(ints, folder / "intlora.safetensors")
    (folder / "junk.safetensors").write_bytes(b"\x00" * 64)
    os.symlink(outside, folder / "outlink.safetensors")
    os.symlink(folder / "alpha.safetensors", folder / "inlink.safetensors")
    os.symlink(folder / "missing.safetensors", folder / "dangling.safetensors")
    os.symlink(folder / "loop.safetensors", folder / "loop.safetensors")
    os.mkfifo(folder / "fifo.safetensors")
    (folder / "dir.safetensors").mkdir()
    os.symlink("/dev/zero", folder / "zero.safetensors")
    return folder


@pytest.fixture(scope="module")
def client(pipe, lora_dir):
    settings = Settings(lora_dir=str(lora_dir), pipe=pipe, allow_upload=True, max_upload_mb=0.5, max_batch=1)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def reads(monkeypatch, lora_dir):
    """Every file the registry hashes or parses, to assert nothing outside the folder is ever read."""
    seen: list[str] = []
    real_sha, real_load = registry_mod._sha256, lorakit.load

    def sha(path):
        seen.append(os.path.realpath(path))
        return real_sha(path)

    def load(path, *a, **kw):
        seen.append(os.path.realpath(path))
        return real_load(path, *a, **kw)

    monkeypatch.setattr(registry_mod, "_sha256", sha)
    monkeypatch.setattr(lorakit, "load", load)
    return seen


def assert_still_serves(client) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    resp = client.post("/v1/generate", json=body(seed=1, steps=1, loras=[{"name": "alpha"}]))
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"


def inside(lora_dir: Path, path: str) -> bool:
    root = os.path.realpath(lora_dir)
    return os.path.commonpath([root, path]) == root


BAD_NAMES = [
    "../alpha", "/etc/passwd", "/etc/no-such-file", "/dev/zero", "/dev/random", "..", ".", "~", "~/.bashrc",
    "%2e%2e/%2e%2e/etc/passwd", "..%2f..%2fetc%2fpasswd", "%2e%2e%2fsecret", "alpha\x00", "\x00", "alpha/../alpha",
    "./alpha", "alpha.safetensors", " alpha", "alpha/", "C:\\Windows\\win.ini", "\\\\host\\share\\x.safetensors",
    "file:///etc/passwd", "http://example.com/a.safetensors", "org/repo/file.safetensors", "org/../../etc/passwd",
    "outlink", "dangling", "loop", "fifo", "dir", "zero", "junk.safetensors", "nosuch", "x" * 300,
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_lora_names_are_404_and_read_nothing_outside(client, lora_dir, reads, name):
    resp = client.post("/v1/generate", json=body(steps=1, loras=[{"name": name}]))
    assert resp.status_code in (404, 422), resp.text
    assert resp.json()["error"]["code"] in ("lora_not_found", "invalid_request")
    assert not [p for p in reads if not inside(lora_dir, p)], reads


def test_absolute_paths_read_nothing_and_do_not_reveal_existence(client, outside, reads, lora_dir):
    existing = str(outside)
    missing = str(outside.parent / "nope.safetensors")
    a = client.post("/v1/generate", json=body(steps=1, loras=[{"name": existing}]))
    b = client.post("/v1/generate", json=body(steps=1, loras=[{"name": missing}]))
    assert a.status_code == b.status_code == 404
    assert a.json()["error"]["message"].replace(existing, "X") == b.json()["error"]["message"].replace(missing, "X")
    assert "--allow-hub" in a.json()["error"]["message"]
    assert not [p for p in reads if not inside(lora_dir, p)]
    assert_still_serves(client)


def test_listing_skips_special_entries_and_marks_bad_files_invalid(client, lora_dir):
    resp = client.get("/v1/loras")
    assert resp.status_code == 200, resp.text
    loras = {item["name"]: item for item in resp.json()["loras"]}
    assert set(loras) == {"alpha", "beta", "inlink", "nanlayer", "intlora", "junk"}
    assert loras["alpha"]["valid"] and loras["inlink"]["sha256"] == loras["alpha"]["sha256"]
    assert not loras["nanlayer"]["valid"] and "NaN" in loras["nanlayer"]["error"]
    assert not loras["intlora"]["valid"] and "int32" in loras["intlora"]["error"]
    assert not loras["junk"]["valid"]
    assert str(lora_dir) not in resp.text  # no server paths in the listing


def test_invalid_layers_are_refused_naming_the_layer(client, pipe):
    resp = client.post("/v1/generate", json=body(steps=1, loras=[{"name": "nanlayer"}]))
    first = next(iter(nan_layer_tensors(pipe))).removesuffix(".lora_A.weight")
    assert_error(resp, 400, "invalid_lora", "nanlayer", first, "NaN")
    resp = client.post("/v1/generate", json=body(steps=1, loras=[{"name": "intlora"}]))
    assert_error(resp, 400, "invalid_lora", "intlora", "layer ", "int32")
    assert_error(client.post("/v1/generate", json=body(steps=1, loras=[{"name": "junk"}])), 400, "invalid_lora")
    assert_still_serves(client)


def test_symlink_inside_the_folder_works(client):
    assert client.post("/v1/generate", json=body(steps=1, loras=[{"name": "inlink"}])).status_code == 200


def test_forty_requests_naming_a_fifo_do_not_block(client, lora_dir):
    results: list[int] = []

    def send(name: str) -> None:
        results.append(client.post("/v1/generate", json=body(steps=1, loras=[{"name": name}])).status_code)

    names = ["fifo", str(lora_dir / "fifo.safetensors"), "zero", "/dev/zero"] * 10
    threads = [threading.Thread(target=send, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert results == [404] * 40
    assert client.get("/healthz").status_code == 200
    assert_still_serves(client)


def _folder(lora_dir: Path) -> set[str]:
    return {p.name for p in lora_dir.iterdir()}


@pytest.mark.parametrize(
    ("label", "make", "fragment"),
    [
        ("int", lambda t: t.to(torch.int32), "int32"),
        ("bool", lambda t: t > 0, "bool"),
        ("rank0", lambda t: t.sum(), "lora"),
        ("empty", lambda t: t[:0], "empty"),
        ("nan", lambda t: t * float("nan"), "NaN"),
    ],
)
def test_uploads_refuse_non_float_empty_and_rank0_factors(client, lora_dir, pipe, tmp_path, label, make, fragment):
    sd = make_lora_tensors(pipe, seed=9)
    keys = list(sd)
    for k in keys[:2]:  # one lora_A/lora_B pair: the first layer only
        sd[k] = make(sd[k]).contiguous()
    path = tmp_path / f"{label}.safetensors"
    write_tensors(sd, path)
    before = _folder(lora_dir)
    resp = client.post("/v1/loras", files={"file": (f"{label}.safetensors", path.read_bytes())})
    assert_error(resp, 400, "invalid_lora")
    assert fragment.lower() in resp.json()["error"]["message"].lower()
    assert _folder(lora_dir) == before
    assert_still_serves(client)


# ---- hub references ------------------------------------------------------------------------------------------
def hub_app(pipe, lora_dir, allow_hub):
    return create_app(Settings(lora_dir=str(lora_dir), pipe=pipe, max_batch=1, allow_hub=allow_hub))


def test_hub_references_need_allow_hub(pipe, lora_dir, outside, monkeypatch):
    calls: list[tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str) -> str:
        calls.append((repo_id, filename))
        if filename != "secret.safetensors":
            raise FileNotFoundError(f"/home/me/.cache/{repo_id}/{filename}")
        return str(outside)

    monkeypatch.setattr(registry_mod, "hub_download", fake_download)
    ref = {"loras": [{"name": "good/repo/secret.safetensors"}]}
    with TestClient(hub_app(pipe, lora_dir, None)) as c:
        assert_error(c.post("/v1/generate", json=body(steps=1, **ref)), 404, "lora_not_found", "--allow-hub")
    assert calls == []
    with TestClient(hub_app(pipe, lora_dir, ["good"])) as c:
        assert c.post("/v1/generate", json=body(steps=1, **ref)).status_code == 200
        resp = c.post("/v1/generate", json=body(steps=1, loras=[{"name": "evil/repo/secret.safetensors"}]))
        assert_error(resp, 404, "lora_not_found", "--allow-hub")
        resp = c.post("/v1/generate", json=body(steps=1, loras=[{"name": "good/repo/gone.safetensors"}]))
        assert_error(resp, 404, "lora_not_found", "hub")
        assert ".cache" not in resp.text
        for bad in ("good/../../etc/passwd", "good/repo/../x.safetensors", "/good/repo/x.safetensors",
                    "good/repo/x.bin", "good//x.safetensors"):
            assert c.post("/v1/generate", json=body(steps=1, loras=[{"name": bad}])).status_code == 404
    assert [c[0] for c in calls] == ["good/repo", "good/repo"]
    with TestClient(hub_app(pipe, lora_dir, ())) as c:  # empty list: any org
        assert c.post("/v1/generate", json=body(steps=1, loras=[{"name": "any/repo/secret.safetensors"}])).status_code == 200
