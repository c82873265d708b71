"""The writer spells resolved names from the convention tables; dtype names are parsed in one place
(``lorakit.io.parse_dtype``); ``formats/`` imports nothing from the layers above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.errors import FormatError, MatchError
from lorakit.formats import conventions, to_state_dict
from lorakit.io import parse_dtype

SRC = Path(lorakit.__file__).parent


def _lora(*stems: str) -> lorakit.LoRA:
    g = torch.Generator().manual_seed(0)
    state = {}
    for stem in stems:
        state[f"{stem}.lora_down.weight"] = torch.randn(2, 8, generator=g)
        state[f"{stem}.lora_up.weight"] = torch.randn(8, 2, generator=g)
        state[f"{stem}.alpha"] = torch.tensor(1.0)
    return lorakit.load(state)


def test_save_parses_dtype_names(tmp_path):
    lora = _lora("lora_unet_mid_block_attentions_0_proj_in")
    for name in ("float16", "fp16", "HALF"):
        out = lorakit.save(lora, tmp_path / f"{name}.safetensors", dtype=name)
        sd = load_file(out)
        assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].dtype == torch.float16
    with pytest.raises(FormatError, match="nonsense"):
        lorakit.save(lora, tmp_path / "bad.safetensors", dtype="nonsense")
    assert not (tmp_path / "bad.safetensors").exists()


def test_parse_dtype_accepts_every_spelling_and_names_the_choices():
    assert parse_dtype(None) is None
    assert parse_dtype(torch.bfloat16) is torch.bfloat16
    for names, dtype in ((("fp32", "float32", "float"), torch.float32), (("fp16", "float16", "half"), torch.float16),
                         (("bf16", "bfloat16", "BF16"), torch.bfloat16)):
        assert all(parse_dtype(n) is dtype for n in names)
    with pytest.raises(FormatError, match=r"'int8'.*fp32.*bf16"):
        parse_dtype("int8")


def test_kohya_writer_numbers_text_encoders_only_when_there_are_two():
    te, te2 = "text_model_encoder_layers_0_mlp_fc1", "text_model_encoder_layers_0_mlp_fc2"
    single = to_state_dict(_lora(f"lora_te1_{te}"), "kohya")[0]
    assert {k.split(".")[0] for k in single} == {conventions.KOHYA_SINGLE_TE + te}
    assert conventions.KOHYA_SINGLE_TE == "lora_te_"
    both = to_state_dict(_lora(f"lora_te_{te}", f"lora_te2_{te2}"), "kohya")[0]
    assert {k.split(".")[0] for k in both} == {
        conventions.KOHYA_PREFIX["text_encoder"] + te, conventions.KOHYA_PREFIX["text_encoder_2"] + te2,
    }
    assert (conventions.KOHYA_PREFIX["text_encoder"], conventions.KOHYA_PREFIX["text_encoder_2"]) == (
        "lora_te1_", "lora_te2_")


def test_peft_writer_does_not_resolve_flat_names_and_takes_the_denoiser_prefix():
    flat = _lora("lora_unet_mid_block_attentions_0_proj_in")
    with pytest.raises(MatchError, match="pass the model"):
        to_state_dict(flat, "peft")
    dotted = _lora("unet.mid_block.attentions.0.proj_in")
    assert "unet.mid_block.attentions.0.proj_in.lora_A.weight" in to_state_dict(dotted, "peft")[0]
    tensors, meta = to_state_dict(dotted, "peft", denoiser_prefix=conventions.PEFT_TRANSFORMER)
    assert "transformer.mid_block.attentions.0.proj_in.lora_A.weight" in tensors
    assert '"transformer.r": 2' in meta["lora_adapter_metadata"]


def _lorakit_modules(tree: ast.AST) -> list[str]:
    """The ``lorakit`` submodules a module inside ``lorakit/formats/`` imports (``..families`` -> ``families``)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("lorakit.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lorakit."):
            out.append(node.module.split(".", 1)[1])
        elif isinstance(node, ast.ImportFrom) and node.level >= 2:  # relative to the lorakit package
            out += [node.module] if node.module else [a.name for a in node.names]
    return out


def test_formats_imports_nothing_from_the_layers_above():
    above = {"families", "placement", "runtime", "ops", "pipelines", "cli", "server", "inspection", "saving"}
    for path in sorted((SRC / "formats").glob("*.py")):
        for module in _lorakit_modules(ast.parse(path.read_text())):
            assert module.split(".")[0] not in above, f"formats/{path.name} imports lorakit.{module}"
