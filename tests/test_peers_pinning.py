"""The peer-version pin itself (tests/_peers.py): it runs a pinned test on the pinned version only, skips with
the version found on any other, and every pin in the suite names the version constraints/peers.txt installs."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

from _peers import CONSTRAINTS, constrained_versions, pinned_peer

TESTS = Path(__file__).resolve().parent


def _fake_versions(monkeypatch, **versions):
    real = importlib.metadata.version

    def version(name):
        key = name.lower().replace("_", "-")
        if key in versions:
            if versions[key] is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return versions[key]
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)


def test_runs_on_the_pinned_version(monkeypatch):
    _fake_versions(monkeypatch, diffusers="0.42.1")
    mark = pinned_peer("diffusers", "0.42.1").mark
    assert mark.name == "skipif" and mark.args == (False,)


def test_skips_with_the_found_version_on_any_other(monkeypatch):
    for other in ("0.43.0", "0.42.2", "0.42.1.post1", "1.0.0.dev0"):
        _fake_versions(monkeypatch, diffusers=other)
        mark = pinned_peer("diffusers", "0.42.1").mark
        assert mark.args == (True,), other
        assert mark.kwargs["reason"] == f"pins a diffusers 0.42.1 bug; re-check on diffusers {other}"


def test_skips_when_the_peer_is_missing(monkeypatch):
    _fake_versions(monkeypatch, diffusers=None)
    mark = pinned_peer("diffusers", "0.42.1").mark
    assert mark.args == (True,) and "not installed" in mark.kwargs["reason"]


def test_a_pinned_test_is_really_skipped_on_another_version(tmp_path):
    """End to end in a child pytest: with diffusers reported as 0.99.0 the pinned (failing) test is skipped and
    the unpinned one still runs; on the pinned version the pinned test runs (and fails, as written)."""
    for found, expect in (("0.99.0", r"1 passed, 1 skipped"), ("0.42.1", r"1 failed, 1 passed")):
        (tmp_path / "conftest.py").write_text(
            "import importlib.metadata\n"
            "_real = importlib.metadata.version\n"
            f"importlib.metadata.version = lambda n: {found!r} if n == 'diffusers' else _real(n)\n")
        (tmp_path / "test_child.py").write_text(
            "from _peers import pinned_peer\n\n"
            "@pinned_peer('diffusers', '0.42.1')\n"
            "def test_pinned():\n    assert False\n\n"
            "def test_unpinned():\n    assert True\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert re.search(expect, run.stdout), run.stdout + run.stderr
        if found != "0.42.1":
            assert "pins a diffusers 0.42.1 bug; re-check on diffusers 0.99.0" in run.stdout


def test_constraints_pin_the_four_peers_exactly():
    pins = constrained_versions()
    assert set(pins) == {"diffusers", "peft", "transformers", "lycoris-lora"}, CONSTRAINTS
    assert all(re.fullmatch(r"\d+(\.\d+)+", v) for v in pins.values()), pins


def test_every_pin_in_the_suite_names_the_constrained_version():
    """Bumping constraints/peers.txt without re-checking the pinned tests would skip them silently: this fails
    instead, naming each pin to re-check (and update or drop) on the new version."""
    pins = constrained_versions()
    uses = []
    for path in sorted(TESTS.glob("test_*.py")):
        for m in re.finditer(r"pinned_peer\(\s*[\"']([\w.-]+)[\"']\s*,\s*[\"']([^\"']+)[\"']\s*\)", path.read_text()):
            uses.append((path.name, m[1], m[2]))
    stale = [u for u in uses if pins.get(u[1].lower().replace("_", "-")) != u[2] and u[0] != Path(__file__).name]
    assert len([u for u in uses if u[0] != Path(__file__).name]) >= 10  # the suite's pins were found
    assert stale == [], f"re-check these on the versions in {CONSTRAINTS.name}: {stale}"

