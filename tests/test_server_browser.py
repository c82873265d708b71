"""The demo page in a real browser: headless Debian chromium driven by Playwright against a uvicorn server
on 127.0.0.1 (random port); pick a LoRA, click generate, see a decoded image.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

import uvicorn  # noqa: E402

import lorakit  # noqa: E402
from lorakit.server.app import Settings, create_app  # noqa: E402
from test_server_api import make_lora_dir  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    pipe = lorakit.tiny_pipeline(0)
    lora_dir = make_lora_dir(tmp_path_factory.mktemp("browser_loras"), pipe, names=("alpha", "beta"))
    yield from _serve(create_app(Settings(lora_dir=str(lora_dir), pipe=pipe)))


def _serve(app):
    """Run ``app`` with uvicorn on a free loopback port; yield its URL, stop it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_pick_lora_generate_and_see_image(server_url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(server_url + "/")
            page.wait_for_selector('.pick[data-name="alpha"]', timeout=15000)
            assert page.locator(".pick").count() == 2
            page.check('.pick[data-name="alpha"]')
            page.fill('.strength[data-name="alpha"]', "0.5")
            with page.expect_response("**/v1/generate") as info:
                page.click("#generate")
            response = info.value
            assert response.status == 200
            request = response.request.post_data_json
            assert request["loras"] == [{"name": "alpha", "strength": 0.5}]
            page.wait_for_function(
                "() => { const i = document.getElementById('image'); return i.complete && i.naturalWidth > 0; }",
                timeout=15000,
            )
            assert page.eval_on_selector("#image", "i => [i.naturalWidth, i.naturalHeight]") == [64, 64]
            assert page.inner_text("#status") == ""
        finally:
            browser.close()


@pytest.fixture(scope="module")
def i2v_url(tmp_path_factory):
    import torch

    from test_server_video import wan_lora

    torch.set_num_threads(1)
    pipe = lorakit.tiny_pipeline("wan-i2v")
    folder = tmp_path_factory.mktemp("browser_i2v_loras")
    from lorakit.io import write_tensors

    for i, name in enumerate(("motion", "style")):
        write_tensors(wan_lora(pipe, seed=10 + i), folder / f"{name}.safetensors")
    yield from _serve(create_app(Settings(lora_dir=str(folder), pipe=pipe, model="tiny-wan-i2v", max_frames=9)))


def test_i2v_page_every_control_upload_and_the_video_plays(i2v_url, tmp_path):
    from PIL import Image

    picture = tmp_path / "input.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(picture)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(i2v_url + "/")
            page.wait_for_selector('.pick[data-name="motion"]', timeout=15000)
            page.wait_for_function("() => document.getElementById('info').textContent.includes('i2v')")
            assert page.is_visible("#frames") and page.is_visible("#input")
            assert page.eval_on_selector("#frames", "e => e.max") == "9"
            assert "rank 2" in page.inner_text(".lora")  # the registry's metadata is shown
            # a required input that is missing is refused inline, before any request
            page.click("#generate")
            assert "needs an input image" in page.inner_text("#error")
            page.set_input_files("#input", str(picture))
            for sel, value in (("#prompt", "a fox"), ("#negative", "blurry"), ("#steps", "2"), ("#guidance", "3"),
                               ("#width", "32"), ("#height", "32"), ("#seed", "5"), ("#frames", "5"), ("#fps", "8")):
                page.fill(sel, value)
            page.select_option("#format", "mp4")
            page.check('.pick[data-name="motion"]')
            page.fill('.strengthnum[data-name="motion"]', "0.7")
            with page.expect_response("**/v1/generate") as info:
                page.click("#generate")
            assert info.value.status == 200 and info.value.headers["content-type"] == "video/mp4"
            page.wait_for_function(
                "() => { const v = document.getElementById('video'); return v.readyState >= 2 && v.videoWidth > 0; }",
                timeout=20000)
            assert page.eval_on_selector("#video", "v => [v.videoWidth, v.videoHeight]") == [32, 32]
            page.wait_for_function("() => document.getElementById('video').currentTime > 0", timeout=10000)
            assert page.inner_text("#error") == ""
            # the result is in this browser's history, with its parameters and a download link
            assert page.locator("#history .item").count() == 1
            assert "motion:0.7" in page.inner_text("#history .item")
            assert page.get_attribute("#history .item a.download", "download").endswith(".mp4")
            # a request the server refuses shows its message inline, and the page keeps working
            page.evaluate("document.getElementById('frames').max = 99")
            page.fill("#frames", "33")
            with page.expect_response("**/v1/generate") as info:
                page.click("#generate")
            assert info.value.status == 422
            page.wait_for_function("() => document.getElementById('error').textContent.includes('--max-frames')")
            page.reload()
            page.wait_for_selector("#history .item", timeout=10000)  # history survives a reload
        finally:
            browser.close()
