"""Issue 16: a mistyped relative path must not be taken for a hub reference (26 s on the network); hub
look-ups are cache-only and fast when offline, and a failed one says why it was tried on the hub."""

from __future__ import annotations

import time

import pytest

from lorakit import errors, io


@pytest.fixture
def hub_calls(monkeypatch):
    """Replace hf_hub_download by a recorder that fails like a cache miss."""
    import huggingface_hub

    calls: list[tuple[tuple, dict]] = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        raise FileNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return calls


def test_typo_under_an_existing_folder_is_local_and_never_hits_the_hub(tmp_path, monkeypatch, hub_calls):
    (tmp_path / "lib").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(errors.SourceNotFoundError, match=r"lib/typo/missing\.safetensors.*folder lib exists"):
        io.resolve_source("lib/typo/missing.safetensors")
    assert time.perf_counter() - start < 0.5
    assert hub_calls == []
    (tmp_path / "lib" / "typo").mkdir()
    with pytest.raises(errors.SourceNotFoundError, match="No such file"):
        io.resolve_source("lib/typo/missing.safetensors")
    assert hub_calls == []


@pytest.mark.parametrize("spec", ["./org/repo/x.safetensors", "../org/repo/x.safetensors", "~/org/repo/x.safetensors"])
def test_explicitly_local_paths_never_hit_the_hub(tmp_path, monkeypatch, hub_calls, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.SourceNotFoundError):
        io.resolve_source(spec)
    assert hub_calls == []


def test_absolute_path_never_hits_the_hub(tmp_path, hub_calls):
    with pytest.raises(errors.SourceNotFoundError):
        io.resolve_source(str(tmp_path / "org" / "repo" / "x.safetensors"))
    assert hub_calls == []


@pytest.mark.parametrize(("offline", "cache_only"), [("1", True), ("0", False)])
def test_hub_reference_when_no_local_folder(tmp_path, monkeypatch, hub_calls, offline, cache_only):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    with pytest.raises(errors.SourceNotFoundError, match="tried as a hub reference.*no local folder 'someorg'") as info:
        io.resolve_source("someorg/style-lora/style.safetensors")
    assert len(hub_calls) == 1
    args, kwargs = hub_calls[0]
    assert args == ("someorg/style-lora", "style.safetensors")
    assert kwargs["local_files_only"] is cache_only
    assert ("HF_HUB_OFFLINE=1" in str(info.value)) is cache_only


def test_hub_reference_returns_the_downloaded_path(tmp_path, monkeypatch):
    import huggingface_hub

    target = tmp_path / "cached.safetensors"
    target.write_bytes(b"x")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(target))
    monkeypatch.chdir(tmp_path)
    assert io.resolve_source("someorg/style-lora@v1/style.safetensors") == target
