"""Version pins for the tests that document a peer's bug or quirk (issue 16).

Such a test asserts what one release of diffusers (or peft, transformers, lycoris-lora) gets wrong or does
oddly; a release that fixes it would fail the test for no fault of lorakit. ``pinned_peer`` marks it to run
only on the version it was written against (the one constraints/peers.txt installs) and to skip, with the
version found, anywhere else. Tests that check lorakit against a peer's *correct* behaviour (equivalence
tests) are not marked: they should hold on every version.

When constraints/peers.txt is bumped, re-run the marked tests on the new version, then update or drop each pin
(test_peers_pinning checks that every pin names the constrained version).
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.version import InvalidVersion, Version

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints" / "peers.txt"


def installed_version(package: str) -> str | None:
    """The installed distribution's version, or None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _same(found: str, pinned: str) -> bool:
    try:
        return Version(found) == Version(pinned)
    except InvalidVersion:
        return found == pinned


def pinned_peer(package: str, version: str) -> pytest.MarkDecorator:
    """``skipif`` the installed ``package`` is not ``version``: the marked test pins that release's behaviour."""
    found = installed_version(package)
    if found is None:
        return pytest.mark.skipif(True, reason=f"pins a {package} {version} bug; {package} is not installed")
    return pytest.mark.skipif(not _same(found, version),
                              reason=f"pins a {package} {version} bug; re-check on {package} {found}")


def constrained_versions(path: Path = CONSTRAINTS) -> dict[str, str]:
    """``name==version`` lines of constraints/peers.txt (names normalised: lower case, ``_`` -> ``-``)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*==\s*(\S+)", line)
            assert m, f"not a name==version pin: {line!r}"
            out[m[1].lower().replace("_", "-")] = m[2]
    return out
