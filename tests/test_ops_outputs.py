"""Outputs of the offline tools and ``generate`` (issue 16): no writer replaces an input, a bad ``-o`` (a folder,
an unwritable folder) fails before any work, write errors (ENOSPC, EACCES) are one line naming the output, and
SIGTERM / killed runs leave no hidden temp file behind."""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorakit.io as lio
from lorakit.cli import main
from lorakit.errors import OverwriteError
from lorakit.ops import compose, extract, merge, resize, validate

# lorakit.ops re-exports the function merge under the module's name
merge_mod = importlib.import_module("lorakit.ops.merge")
SRC = Path(__file__).resolve().parents[1] / "src"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"m.a.weight": torch.randn(8, 6, generator=g), "m.b.weight": torch.randn(8, 8, generator=g)}
    tuned = dict(base)
    tuned["m.a.weight"] = base["m.a.weight"] + torch.randn(8, 2, generator=g) @ torch.randn(2, 6, generator=g)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    save_file({"lora_unet_m_a.lora_down.weight": torch.randn(2, 6, generator=g),
               "lora_unet_m_a.lora_up.weight": torch.randn(8, 2, generator=g),
               "lora_unet_m_a.alpha": torch.tensor(2.0)}, tmp_path / "a.safetensors")
    return tmp_path


def _snapshot(tmp: Path) -> dict[str, str]:
    return {str(p.relative_to(tmp)): _sha(p) for p in sorted(tmp.rglob("*")) if p.is_file()}


def _cli_fails(capsys, argv, *needles):
    """Run the console entry point; it must exit 1 with exactly one line on stderr and no traceback."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# -- inputs are never replaced -----------------------------------------------------------------------------

def test_validate_report_and_layer_names_never_replace_an_input(files, capsys):
    before = _snapshot(files)
    b, t, a = (str(files / n) for n in ("base.safetensors", "tuned.safetensors", "a.safetensors"))
    for target in (b, t, a):
        _cli_fails(capsys, ["validate", a, "--base", b, "--tuned", t, "--report", target], "same file")
        _cli_fails(capsys, ["validate", a, "--base", b, "--tuned", t, "--layer-names", target], "same file")
    with pytest.raises(OverwriteError):
        validate(a, b, t, report=b)
    # checked before the work: the report named alongside a bad --layer-names is not written either
    _cli_fails(capsys, ["validate", a, "--base", b, "--tuned", t, "--report", str(files / "r.html"),
                        "--layer-names", a], "same file")
    assert _snapshot(files) == before
    assert not list(files.glob(".*.tmp"))


def test_generate_output_never_replaces_a_lora_job_file_or_model_file(files, capsys):
    a = files / "a.safetensors"
    job = files / "job.json"
    job.write_text(json.dumps({"model": "tiny", "lora_configs": [{"path": str(a), "strength": 0.5}]}))
    model = files / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    save_file({"w": torch.ones(2)}, model / "unet" / "diffusion_pytorch_model.safetensors")
    before = _snapshot(files)
    _cli_fails(capsys, ["generate", "--model", "tiny", "--lora", f"{a}:0.8", "-o", str(a)], "same file")
    _cli_fails(capsys, ["generate", "--config", str(job), "-o", str(a)], "same file")
    _cli_fails(capsys, ["generate", "--config", str(job), "-o", str(job)], "same file")
    _cli_fails(capsys, ["generate", "--model", str(model), "-o", str(model / "model_index.json")], "input folder")
    assert _snapshot(files) == before


# -- -o checked before the work --------------------------------------------------------------------------------

def test_output_folder_is_refused_before_the_work(files, monkeypatch, capsys):
    out = files / "outdir"
    out.mkdir()
    b, t, a = files / "base.safetensors", files / "tuned.safetensors", files / "a.safetensors"

    def no_work(*_a, **_k):
        pytest.fail("the work started before -o was checked")

    monkeypatch.setattr(merge_mod, "Checkpoint", no_work)
    with pytest.raises(OverwriteError, match="is a folder"):
        merge(b, [(a, 1.0)], out)
    _cli_fails(capsys, ["merge", str(b), str(a), "-o", str(out)], "is a folder")
    monkeypatch.undo()
    with pytest.raises(OverwriteError, match="is a folder"):
        extract(b, t, out, rank=2)
    with pytest.raises(OverwriteError, match="is a folder"):
        compose([(a, 0.5)], out)
    with pytest.raises(OverwriteError, match="is a folder"):
        resize(a, out, rank=1)
    with pytest.raises(OverwriteError, match="is a folder"):
        validate(a, b, t, report=out)
    with pytest.raises(OverwriteError, match="is a folder"), lio.atomic_output(out):
        pytest.fail("atomic_output ran its body for a folder target")
    assert list(out.iterdir()) == []


def test_folder_base_with_a_file_output_is_typed(files):
    (files / "model" / "unet").mkdir(parents=True)
    save_file({"m.a.weight": torch.ones(8, 6)}, files / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(OverwriteError, match="is a file"):
        merge(files / "model", [(files / "a.safetensors", 1.0)], files / "tuned.safetensors")


def _read_only(folder: Path):
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):
        folder.chmod(0o700)
        pytest.skip("running as root: chmod does not make a folder read-only")


def test_unwritable_output_folder_is_one_line_before_the_work(files, capsys):
    ro = files / "ro"
    ro.mkdir()
    _read_only(ro)
    try:
        out = ro / "m.safetensors"
        with pytest.raises(PermissionError) as info:
            merge(files / "base.safetensors", [(files / "a.safetensors", 1.0)], out)
        assert info.value.filename == str(out)
        _cli_fails(capsys, ["merge", str(files / "base.safetensors"), str(files / "a.safetensors"), "-o", str(out)],
                   str(out), "Permission denied")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_unwritable_output_folder_as_root_via_access(files, monkeypatch, capsys):
    """The same check where chmod cannot bite (root): os.access says no."""
    monkeypatch.setattr(lio.os, "access", lambda *_a, **_k: False)
    out = files / "sub" / "m.safetensors"
    err = _cli_fails(capsys, ["merge", str(files / "base.safetensors"), str(files / "a.safetensors"), "-o", str(out)],
                     "Permission denied")
    assert err.startswith(f"Error: {out}: ")
    with pytest.raises(PermissionError):
        extract(files / "base.safetensors", files / "tuned.safetensors", out, rank=2)
    assert not (files / "sub").exists()


# -- write errors ---------------------------------------------------------------------------------------------

class _FullDisk:
    """A file object whose first write works and the next ones fail with ENOSPC."""

    def __init__(self, path, mode):
        self._fh = open(path, mode)  # noqa: SIM115 - closed in __exit__
        self._writes = 0

    def write(self, data):
        self._writes += 1
        if self._writes > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._fh.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def test_merge_enospc_is_one_line_and_leaves_nothing(files, monkeypatch, capsys):
    before = _snapshot(files)
    monkeypatch.setattr(merge_mod, "open", _FullDisk, raising=False)
    out = files / "m.safetensors"
    with pytest.raises(OSError) as info:
        merge(files / "base.safetensors", [(files / "a.safetensors", 1.0)], out)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out)
    err = _cli_fails(capsys, ["merge", str(files / "base.safetensors"), str(files / "a.safetensors"), "-o", str(out)])
    assert err == f"Error: {out}: {os.strerror(errno.ENOSPC)}"
    assert _snapshot(files) == before
    assert not list(files.glob(".*.tmp"))


def test_write_tensors_enospc_and_eacces(files, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(_tensors, filename, metadata=None):
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path "{filename}"')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = files / "l.safetensors"
    with pytest.raises(OSError) as info:
        lio.write_tensors({"x": torch.ones(2)}, out)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out)
    _cli_fails(capsys, ["extract", str(files / "base.safetensors"), str(files / "tuned.safetensors"), "-o", str(out),
                        "--rank", "2", "--json"], str(out), os.strerror(errno.ENOSPC))
    monkeypatch.undo()

    def denied(*_a, **_k):
        raise PermissionError(errno.EACCES, "Permission denied", str(files / ".l.safetensors.abcdefgh.tmp"))

    monkeypatch.setattr(lio.tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError) as info:
        lio.write_tensors({"x": torch.ones(2)}, out)
    assert info.value.filename == str(out)
    assert not out.exists() and not list(files.glob(".*.tmp"))


def test_input_read_errors_keep_their_own_name(files):
    """An OSError about another file inside the body (an input) is not reported as the output's."""
    out = files / "o.bin"
    with pytest.raises(FileNotFoundError) as info, lio.atomic_output(out):
        open(files / "missing.safetensors", "rb")  # noqa: SIM115
    assert info.value.filename == str(files / "missing.safetensors")
    assert not out.exists() and not list(files.glob(".*.tmp"))


# -- SIGTERM and stale temp files -----------------------------------------------------------------------------

_SLOW_MERGE = """
import sys, time
import importlib
m = importlib.import_module('lorakit.ops.merge')
real = m._patched
def slow(*a, **k):
    time.sleep(60)
    return real(*a, **k)
m._patched = slow
from lorakit.cli import main
main(sys.argv[1:])
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_during_merge_removes_the_temp_file(files):
    out = files / "m.safetensors"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_SLOW_MERGE), "merge", str(files / "base.safetensors"),
                             str(files / "a.safetensors"), "-o", str(out), "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list(files.glob(".m.safetensors.*.tmp")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the merge never started writing"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert b"Traceback" not in err
    assert not out.exists()
    assert not list(files.glob(".*.tmp"))


def test_main_restores_the_previous_sigterm_handler(files, capsys):
    def mine(*_a):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(SystemExit):
            main(["merge", str(files / "base.safetensors"), str(files / "a.safetensors"), "-o", str(files)])
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
    capsys.readouterr()


def test_merge_removes_stale_temp_files_of_its_output(files):
    import fcntl

    out = files / "m.safetensors"
    stale_file = files / ".m.safetensors.abcd_123.tmp"
    stale_file.write_bytes(b"partial")
    stale_dir = files / ".m.safetensors.zzzzzzzz.tmp"
    (stale_dir / "unet").mkdir(parents=True)
    live = files / ".m.safetensors.live0000.tmp"
    live.write_bytes(b"another run is writing this")
    others = [files / ".other.safetensors.abcd1234.tmp", files / ".m.safetensors.x.abcd1234.tmp"]
    for p in others:
        p.write_bytes(b"not ours")
    with open(live, "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        merge(files / "base.safetensors", [(files / "a.safetensors", 1.0)], out)
        assert live.exists()
    assert out.exists()
    assert not stale_file.exists() and not stale_dir.exists()
    assert all(p.exists() for p in others)
    assert sorted(p.name for p in lio.remove_stale_temps(out)) == [live.name]


def test_pickle_outputs_enospc_is_an_os_error(files, monkeypatch):
    """torch.save writes through a Python file, so a full disk is an OSError naming the output, not a RuntimeError."""
    monkeypatch.setattr(merge_mod, "open", _FullDisk, raising=False)
    out = files / "m.pt"
    with pytest.raises(OSError) as info:
        merge(files / "base.safetensors", [(files / "a.safetensors", 1.0)], out, format="pt")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out)
    monkeypatch.setattr(lio, "open", _FullDisk, raising=False)
    with pytest.raises(OSError) as info:
        lio.write_tensors({"x": torch.ones(64)}, files / "l.pt")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(files / "l.pt")
    assert not out.exists() and not (files / "l.pt").exists() and not list(files.glob(".*.tmp"))
