"""``lorakit serve`` options of issue 16: the API key from env or a file (``--api-key`` warns about ``ps``),
``--allow-hub``, deadlines and caps reach Settings, and uvicorn gets keep-alive, header-size and concurrency limits.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import lorakit.server.app as app_mod
from lorakit.cli.serve_cmd import serve_cmd


@pytest.fixture
def captured(monkeypatch):
    import uvicorn

    seen: dict = {}
    monkeypatch.setattr(app_mod, "create_app", lambda settings: ("app", settings))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(settings=app[1], uvicorn=kw))
    monkeypatch.delenv("LORAKIT_API_KEY", raising=False)
    return seen


def run(args, env=None):
    return CliRunner().invoke(serve_cmd, args, env=env, catch_exceptions=False)


def test_key_from_env_or_file_and_warning_for_flag(captured, tmp_path):
    lora_dir = str(tmp_path / "loras")
    res = run(["--lora-dir", lora_dir], env={"LORAKIT_API_KEY": "from-env"})
    assert res.exit_code == 0 and captured["settings"].api_key == "from-env" and "ps" not in res.output
    key_file = tmp_path / "key"
    key_file.write_text("ключ-from-file\n", encoding="utf-8")
    res = run(["--lora-dir", lora_dir, "--api-key-file", str(key_file)])
    assert res.exit_code == 0 and captured["settings"].api_key == "ключ-from-file"
    res = run(["--lora-dir", lora_dir, "--api-key", "on-cmdline"])
    assert res.exit_code == 0 and captured["settings"].api_key == "on-cmdline" and "`ps`" in res.output
    assert run(["--lora-dir", lora_dir, "--api-key", "a", "--api-key-file", str(key_file)]).exit_code != 0
    (tmp_path / "empty").write_text("\n")
    assert run(["--lora-dir", lora_dir, "--api-key-file", str(tmp_path / "empty")]).exit_code != 0
    res = run(["--lora-dir", lora_dir])
    assert res.exit_code == 0 and captured["settings"].api_key is None


def test_limits_and_hub_reach_settings_and_uvicorn(captured, tmp_path):
    lora_dir = str(tmp_path / "loras")
    assert run(["--lora-dir", lora_dir]).exit_code == 0
    s, kw = captured["settings"], captured["uvicorn"]
    assert s.allow_hub is None and s.request_timeout == 300 and s.max_pixel_steps is None and s.max_body_kb == 1024
    assert kw["timeout_keep_alive"] == 5 and kw["h11_max_incomplete_event_size"] == 16 * 1024
    assert kw["limit_concurrency"] == 256
    assert run(["--lora-dir", lora_dir, "--allow-hub"]).exit_code == 0
    assert captured["settings"].allow_hub == ()
    res = run(["--lora-dir", lora_dir, "--allow-hub", "org1,org2", "--request-timeout", "9",
               "--max-pixel-steps", "1000", "--keep-alive-s", "2", "--limit-concurrency", "8"])
    assert res.exit_code == 0, res.output
    s, kw = captured["settings"], captured["uvicorn"]
    assert s.allow_hub == ("org1", "org2") and s.request_timeout == 9 and s.max_pixel_steps == 1000
    assert kw["timeout_keep_alive"] == 2 and kw["limit_concurrency"] == 8


def test_device_and_video_options_reach_settings(captured, tmp_path):
    lora_dir = str(tmp_path / "loras")
    assert run(["--lora-dir", lora_dir]).exit_code == 0
    s = captured["settings"]
    assert (s.device, s.dtype, s.offload, s.max_frames, s.default_frames, s.max_input_mb) == (
        "auto", "auto", "none", 129, None, 16.0)
    res = run(["--lora-dir", lora_dir, "--model", "tiny-wan-t2v", "--device", "cpu", "--dtype", "bf16",
               "--offload", "model", "--max-frames", "9", "--default-frames", "5", "--max-input-mb", "2"])
    assert res.exit_code == 0, res.output
    s = captured["settings"]
    assert (s.model, s.device, s.dtype, s.offload, s.max_frames, s.default_frames, s.max_input_mb) == (
        "tiny-wan-t2v", "cpu", "bf16", "model", 9, 5, 2.0)
    assert run(["--lora-dir", lora_dir, "--dtype", "fp8"]).exit_code != 0
