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
    app = create_app(Settings(lora_dir=str(lora_dir), pipe=pipe))
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
