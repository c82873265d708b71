"""``lorakit serve --ray``: 2 Ray Serve replicas of the tiny model behind the same HTTP API; every LoRA stack
gives the same image as the single-process server, and stack-keyed multiplexing keeps swaps low.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[serve]')")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'ray[serve]')")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import lorakit  # noqa: E402
from lorakit.server.app import Settings, create_app  # noqa: E402
from lorakit.server.ray_app import build_ray_app  # noqa: E402
from test_server_api import body, decode, make_lora_dir  # noqa: E402

STACKS = [
    [],
    [{"name": "alpha", "strength": 1.0}],
    [{"name": "beta", "strength": 0.8}, {"name": "gamma", "strength": -0.6}],
    [{"name": "delta", "strength": 1.5}],
]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return make_lora_dir(tmp_path_factory.mktemp("ray_loras"), lorakit.tiny_pipeline(0))


@pytest.fixture(scope="module")
def ray_url(lora_dir):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # max_batch=1 so replicas run one request per call: their images must then be bit-identical.
        serve.run(build_ray_app(Settings(lora_dir=str(lora_dir), max_batch=1), replicas=2), name="lorakit",
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_every_stack_matches_single_process_server(ray_url, lora_dir):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replicas run with OMP_NUM_THREADS=1; same reduction order here
    try:
        with TestClient(create_app(Settings(lora_dir=str(lora_dir), pipe=lorakit.tiny_pipeline(0), max_batch=1))) as c:
            reference = [decode(c.post("/v1/generate", json=body(loras=st)).content) for st in STACKS]
    finally:
        torch.set_num_threads(threads)
    assert all((reference[0] != ref).mean() > 0.5 for ref in reference[1:])  # the stacks matter
    with httpx.Client(base_url=ray_url, timeout=60) as client:
        assert client.get("/healthz").json()["status"] == "ok"
        assert {x["name"] for x in client.get("/v1/loras").json()["loras"]} == {"alpha", "beta", "gamma", "delta"}
        for round_ in range(2):
            for st, ref in zip(STACKS, reference):
                resp = client.post("/v1/generate", json=body(loras=st))
                assert resp.status_code == 200, resp.text
                assert np.array_equal(decode(resp.content), ref), f"stack {st} differs on Ray (round {round_})"
        bad = client.post("/v1/generate", json=body(loras=[{"name": "nosuch"}]))
        assert bad.status_code == 404 and "'nosuch'" in bad.json()["error"]["message"]
