"""Crafted and damaged checkpoints (issue 16): every safetensors header entry is checked against the file's
size before any data is read, so merge/extract/validate fail with a typed FormatError and write nothing."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from lorakit.errors import FormatError
from lorakit.io import read_safetensors_header, scan_safetensors, validate_safetensors_header
from lorakit.ops import extract, merge, validate
from lorakit.ops.common import Checkpoint

F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


def _craft(path, header, data: bytes = b"", size: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if size is None else size) + raw + data)
    return path


@pytest.fixture
def lora_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "l.safetensors"
    save_file({"lora_unet_m_a.lora_down.weight": torch.randn(2, 4, generator=g),
               "lora_unet_m_a.lora_up.weight": torch.randn(4, 2, generator=g), "lora_unet_m_a.alpha": torch.tensor(2.0)},
              path)
    return path


def _nothing_written(tmp_path, out):
    assert not out.exists()
    assert not list(tmp_path.glob(".*.tmp"))


CRAFTED = {
    "missing dtype": ({"w": {"shape": [2, 2], "data_offsets": [0, 16]}}, 16, "no dtype"),
    "unknown dtype": ({"w": {"dtype": "F42", "shape": [2, 2], "data_offsets": [0, 16]}}, 16, "F42"),
    "dtype not a string": ({"w": {"dtype": ["F32"], "shape": [2, 2], "data_offsets": [0, 16]}}, 16, "cannot read"),
    "reversed offsets": ({"w": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}}, 16, "reversed"),
    "overlapping offsets": ({"a": F32_2x2, "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}, 24,
                            "overlap"),
    "same bytes twice": ({"a": F32_2x2, "b": F32_2x2}, 16, "overlap"),
    "negative shape": ({"w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, 16, "shape"),
    "float shape": ({"w": {"dtype": "F32", "shape": [2.0, 2], "data_offsets": [0, 16]}}, 16, "shape"),
    "bool shape": ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4, "shape"),
    "shape not a list": ({"w": {"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}}, 16, "shape"),
    "shape vs offsets": ({"w": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 16]}}, 16, "needs 36 bytes"),
    "dtype vs offsets": ({"w": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 16]}}, 16, "needs 8 bytes"),
    "three offsets": ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8, 16]}}, 16, "data_offsets"),
    "negative offsets": ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, 16, "data_offsets"),
    "entry not an object": ({"w": [1, 2, 3]}, 16, "not a JSON object"),
    "metadata a list": ({"__metadata__": ["x"], "w": F32_2x2}, 16, "__metadata__"),
    "2 GiB claim in a tiny file": ({"w": {"dtype": "F32", "shape": [2**29], "data_offsets": [0, 2**31]}}, 16,
                                   "truncated"),
    "10**12 elements": ({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}, 16, "needs"),
    "10**12 elements, offsets agree": (
        {"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}, 16, "truncated"),
    "header is a list": ([{"w": F32_2x2}], 16, "not a JSON object"),
}


@pytest.mark.parametrize("case", list(CRAFTED), ids=list(CRAFTED))
def test_crafted_header_is_a_format_error_at_open(tmp_path, case):
    header, data_len, message = CRAFTED[case]
    path = _craft(tmp_path / "base.safetensors", header, bytes(data_len))
    with pytest.raises(FormatError, match=message) as info:
        Checkpoint(path)
    assert "base.safetensors" in str(info.value)


def test_header_length_beyond_the_file(tmp_path):
    raw = json.dumps({"w": F32_2x2}).encode()
    # the JSON is complete, but the length prefix claims more header than the file holds
    path = _craft(tmp_path / "base.safetensors", raw, size=len(raw) + 64)
    with pytest.raises(FormatError, match="past the end of the file|not a readable"):
        Checkpoint(path)
    path = _craft(tmp_path / "short.safetensors", raw[:10], size=len(raw))
    with pytest.raises(FormatError, match="not a readable"):
        Checkpoint(path)


def test_truncated_base_fails_before_any_output(tmp_path, lora_file):
    base = tmp_path / "base.safetensors"
    save_file({"m.a.weight": torch.ones(4, 4), "m.b.weight": torch.ones(64, 64)}, base)
    base.write_bytes(base.read_bytes()[:-100])
    out = tmp_path / "out.safetensors"
    with pytest.raises(FormatError, match="truncated"):
        merge(base, [(lora_file, 1.0)], out)
    _nothing_written(tmp_path, out)
    with pytest.raises(FormatError, match="truncated"):
        extract(base, base, tmp_path / "x.safetensors", rank=2)
    _nothing_written(tmp_path, tmp_path / "x.safetensors")
    report = tmp_path / "r.html"
    with pytest.raises(FormatError, match="truncated"):
        validate(lora_file, base, base, report=report)
    _nothing_written(tmp_path, report)


def test_damaged_shard_of_a_folder(tmp_path, lora_file):
    folder = tmp_path / "model" / "unet"
    folder.mkdir(parents=True)
    _craft(folder / "diffusion_pytorch_model.safetensors",
           {"m.a.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, bytes(32))
    with pytest.raises(FormatError, match="diffusion_pytorch_model.safetensors"):
        merge(tmp_path / "model", [(lora_file, 1.0)], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_valid_files_still_open(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.ones(3, 2), "empty": torch.ones(0, 5), "b": torch.zeros(7, dtype=torch.bfloat16)}, path,
              metadata={"k": "v"})
    ckpt = Checkpoint(path)
    assert ckpt.read(ckpt.infos[(None, "a")]).sum() == 6
    assert ckpt.read(ckpt.infos[(None, "empty")]).shape == (0, 5)
    assert ckpt.metadata == {"k": "v"}


def test_validate_safetensors_header_is_reusable():
    entries = validate_safetensors_header(
        {"__metadata__": {"a": "b"}, "y": {"dtype": "F16", "shape": [2], "data_offsets": [16, 20]}, "x": F32_2x2},
        20, "f.safetensors")
    assert [(e.key, e.start, e.end, e.shape) for e in entries] == [("x", 0, 16, (2, 2)), ("y", 16, 20, (2,))]
    assert entries[1].dtype is torch.float16
    with pytest.raises(FormatError, match="f.safetensors"):
        validate_safetensors_header({"x": F32_2x2}, 15, "f.safetensors")
    with pytest.raises(FormatError, match="not a JSON object"):
        validate_safetensors_header([], 0, "f.safetensors")  # type: ignore[arg-type]


def test_read_safetensors_header_rejects_a_list(tmp_path):
    path = _craft(tmp_path / "l.safetensors", [1, 2])
    with pytest.raises(FormatError, match="not a JSON object"):
        read_safetensors_header(path)
    with pytest.raises(FormatError):
        scan_safetensors(path)
