"""``lorakit extract | merge | compose | resize | validate``: --json output, files written, and user errors
that exit 1 with one sentence and leave no output."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lorakit.cli import cli, main


@pytest.fixture
def pair(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"m.a.weight": torch.randn(32, 24, generator=g), "m.a.bias": torch.zeros(32),
            "m.conv.weight": torch.randn(16, 8, 3, 3, generator=g)}
    tuned = dict(base)
    tuned["m.a.weight"] = base["m.a.weight"] + torch.randn(32, 3, generator=g) @ torch.randn(3, 24, generator=g)
    tuned["m.conv.weight"] = base["m.conv.weight"] + 0.1 * torch.randn(16, 8, 3, 3, generator=g)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return tmp_path, base, tuned


def _run(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def test_all_commands_with_json(pair):
    tmp, base, tuned = pair
    b, t = str(tmp / "base.safetensors"), str(tmp / "tuned.safetensors")
    out = _run(["extract", b, t, "-o", str(tmp / "l.safetensors"), "--rank", "4", "--conv-rank", "8", "--json"])
    assert out["op"] == "extract" and out["summary"]["lora_layers"] == 2
    assert load_file(tmp / "l.safetensors")["lora_unet_m_conv.lora_down.weight"].shape == (8, 8, 3, 3)
    out = _run(["merge", b, f"{tmp / 'l.safetensors'}:1.0", "-o", str(tmp / "merged.safetensors"), "--json"])
    assert out["summary"]["patched_tensors"] == 2
    merged = load_file(tmp / "merged.safetensors")
    assert torch.allclose(merged["m.a.weight"], tuned["m.a.weight"], atol=1e-4)
    assert not torch.equal(merged["m.a.weight"], base["m.a.weight"])
    out = _run(["compose", f"{tmp / 'l.safetensors'}:0.5", f"{tmp / 'l.safetensors'}:0.5", "-o", str(tmp / "c.safetensors"), "--json"])
    assert out["summary"]["exact"] is True
    out = _run(["resize", str(tmp / "c.safetensors"), "-o", str(tmp / "r.safetensors"), "--max-error", "0.05", "--json"])
    assert all(layer["rel_error"] <= 0.05 for layer in out["layers"])
    report = tmp / "rep.html"
    out = _run(["validate", str(tmp / "r.safetensors"), "--base", b, "--tuned", t, "--report", str(report),
                "--layer-names", str(tmp / "names.txt"), "--json"])
    assert out["summary"]["coverage"] == 1.0
    assert "<img" in report.read_text()
    assert (tmp / "names.txt").read_text().split() == ["lora_unet_m_a", "lora_unet_m_conv"]


def test_human_output_and_usage_errors(pair):
    tmp, _, _ = pair
    b, t = str(tmp / "base.safetensors"), str(tmp / "tuned.safetensors")
    result = CliRunner().invoke(cli, ["extract", b, t, "-o", str(tmp / "h.safetensors"), "--rank", "2"])
    assert result.exit_code == 0 and "Wrote" in result.output and "lora_layers" in result.output
    result = CliRunner().invoke(cli, ["resize", str(tmp / "h.safetensors"), "-o", str(tmp / "x.safetensors")])
    assert result.exit_code != 0 and "--rank" in result.output
    result = CliRunner().invoke(cli, ["extract", b, t, "-o", "x", "--energy", "0.9", "--max-error", "0.1"])
    assert result.exit_code != 0 and "mutually exclusive" in result.output


def test_library_errors_exit_1_without_output(pair, capsys):
    tmp, _, _ = pair
    b = str(tmp / "base.safetensors")
    before = (tmp / "base.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(["extract", b, str(tmp / "tuned.safetensors"), "-o", b])
    assert exc.value.code == 1
    assert "same file" in capsys.readouterr().err
    assert (tmp / "base.safetensors").read_bytes() == before
    save_file({"lora_unet_zzz.lora_down.weight": torch.ones(1, 4), "lora_unet_zzz.lora_up.weight": torch.ones(4, 1)},
              tmp / "z.safetensors")
    with pytest.raises(SystemExit) as exc:
        main(["merge", b, str(tmp / "z.safetensors"), "-o", str(tmp / "o.safetensors")])
    assert exc.value.code == 1 and "matches a module" in capsys.readouterr().err.replace("none of its 1 layers ", "")
    assert not (tmp / "o.safetensors").exists()
