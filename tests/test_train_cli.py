"""``lorakit train`` and ``lorakit inspect --layer-names`` end to end through the command line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import lorakit
from _train_util import (
    INIT_MODULES,
    make_init,
    make_shapes,
    one_thread,  # noqa: E402,F401  (autouse: one torch thread per module)
)
from lorakit.cli import cli, main


def test_train_json_and_report(tmp_path):
    data = make_shapes(tmp_path / "d", n=4)
    out = tmp_path / "o.safetensors"
    args = ["train", "--model", "tiny", "--data", str(data), "-o", str(out), "--steps", "3", "--resolution", "32",
            "--rank", "2", "--targets", "attn1,attn2", "--validation-split", "0.25", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["steps"] == 3 and len(info["loss"]) == 3 and info["output"] == str(out)
    assert [s for s, _ in info["validation_loss"]] == [0, 3]
    assert set(info["parameters"]) == {"total", "trainable", "frozen_lora"} and info["parameters"]["trainable"] > 0
    assert "Trainable LoRA parameters" in result.stderr and "LoRA parameter ratio" in result.stderr
    report = tmp_path / "o.train_report.html"
    assert info["report"] == str(report) and "<svg" in report.read_text()
    assert all("attn1" in k or "attn2" in k for k in lorakit.load(out).layers)


def test_inspect_layer_names_and_a_bad_pattern_is_one_line(tmp_path, capsys):
    init = make_init(lorakit.tiny_pipeline(), tmp_path / "init.safetensors")
    result = CliRunner().invoke(cli, ["inspect", str(init), "--layer-names"])
    assert result.exit_code == 0, result.output
    names = result.stdout.split()
    assert len(names) == len(INIT_MODULES) and all(n.startswith("lora_unet_") for n in names)
    data = make_shapes(tmp_path / "d", n=2)
    out = tmp_path / "o.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "tiny", "--data", str(data), "-o", str(out), "--init", str(init),
              "--train-modules", "attn9", "--steps", "1", "--resolution", "32"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Error: --train-modules pattern 'attn9' matches no layer" in err and "Traceback" not in err
    assert not out.exists()
