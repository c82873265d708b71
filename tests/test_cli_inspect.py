"""``lorakit inspect`` and ``lorakit convert`` end to end through the console entry point."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.cli import cli


@pytest.fixture
def kohya_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32, 1, 1, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4, 1, 1, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(8, 32, generator=g),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(64, 8, generator=g),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0),
        "x.lambda_layer": torch.randn(1, 4, generator=g),  # T-LoRA: recognised, unsupported
    }
    path = tmp_path / "style.safetensors"
    save_file(state, str(path), metadata={"ss_network_dim": "4"})
    return path


def test_inspect_json_has_the_documented_keys(kohya_file):
    result = CliRunner().invoke(cli, ["inspect", str(kohya_file), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["format"] == "kohya"
    assert info["adapter_types"] == {"lora": 2}
    assert info["layers"] == 2
    assert info["ranks"] == {"lora_unet_down_blocks_0_attentions_0_proj_in": 4,
                             "lora_te_text_model_encoder_layers_0_mlp_fc1": 8}
    assert info["parameters"] == 4 * 32 + 32 * 4 + 8 * 32 + 64 * 8
    assert info["metadata"] == {"ss_network_dim": "4"}
    assert info["keys"] == 7
    assert "x.lambda_layer" in info["report"]["unsupported"]


def test_inspect_human_table_lists_unloaded_keys(kohya_file):
    result = CliRunner().invoke(cli, ["inspect", str(kohya_file)])
    assert result.exit_code == 0, result.output
    assert "kohya" in result.output and "lora=2" in result.output
    assert "x.lambda_layer: T-LoRA" in result.output


def test_convert_kohya_to_peft_and_back_keeps_every_delta(kohya_file, tmp_path):
    peft_path, back = tmp_path / "p.safetensors", tmp_path / "k.safetensors"
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", str(kohya_file), str(peft_path), "--to", "peft", "--model", "tiny"])
    assert result.exit_code == 0, result.output
    keys = set(load_file(peft_path))
    assert "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight" in keys or \
        "text_encoder.encoder.layers.0.mlp.fc1.lora_B.weight" in keys
    result = runner.invoke(cli, ["convert", str(peft_path), str(back), "--to", "kohya", "--dtype", "fp16"])
    assert result.exit_code == 0, result.output
    original, converted = lorakit.load(kohya_file), lorakit.load(back)
    assert {t.dtype for t in load_file(back).values() if t.dim() > 0} == {torch.float16}
    for layer in original:
        other = next(o for o in converted if o.component == layer.component)
        torch.testing.assert_close(other.delta_weight(), layer.delta_weight(), rtol=2e-3, atol=2e-3)
        assert other.weight.scale == layer.weight.scale


def test_user_errors_are_one_line_and_exit_1(kohya_file, capsys):
    from lorakit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["convert", str(kohya_file), str(kohya_file), "--to", "kohya"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: Output") and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["inspect", str(kohya_file.parent / "missing.safetensors")])
    assert exc.value.code == 1
    assert "No such file" in capsys.readouterr().err
