"""The tiny pipeline (deterministic, offline), local folder loading, and ``lorakit generate`` end to end
with a LoRA file that changes the image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import lorakit
from lorakit.cli import cli
from lorakit.cli.generate_cmd import parse_lora_spec
from lorakit.pipelines import load_pipeline


@pytest.fixture(scope="module")
def pipe():
    return lorakit.tiny_pipeline(0)


def _kohya_file(path, pipe, seed: int = 0, scale: float = 1.0) -> str:
    """A kohya-style LoRA on every attention projection of the tiny UNet and text encoder."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    # kohya writes text-encoder keys as text_model_encoder_...; transformers 5 has no text_model level
    for prefix, root in (("lora_unet", pipe.unet), ("lora_te_text_model", pipe.text_encoder)):
        for name, mod in root.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in ("to_q", "to_k", "to_v", "q_proj", "v_proj"):
                key = f"{prefix}_{name.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"] = torch.randn(4, mod.in_features, generator=g) * scale
                tensors[f"{key}.lora_up.weight"] = torch.randn(mod.out_features, 4, generator=g) * scale
                tensors[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))
    return str(path)


def test_tiny_pipeline_is_deterministic_and_small(pipe) -> None:
    other = lorakit.tiny_pipeline(0)
    for a, b in ((pipe.unet, other.unet), (pipe.vae, other.vae), (pipe.text_encoder, other.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    third = lorakit.tiny_pipeline(1)
    assert not torch.equal(third.unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert sum(p.numel() for p in pipe.unet.parameters()) < 2_000_000
    assert lorakit.tiny_pipeline(0, dtype=torch.bfloat16).unet.dtype == torch.bfloat16


def test_generation_and_lora_changes_image(pipe, tmp_path) -> None:
    def gen():
        return np.asarray(pipe("a cat", num_inference_steps=2, height=64, width=64,
                               generator=torch.Generator().manual_seed(0)).images[0])

    base = gen()
    assert base.shape == (64, 64, 3) and np.array_equal(base, gen())
    path = _kohya_file(tmp_path / "style.safetensors", pipe)
    patch = lorakit.apply(pipe, [(path, 1.0)])
    assert {c.split(":")[0] for m in patch.report.matched.values() for v in m.values() for c in v} == {"denoiser", "text_encoder"}
    assert sum(patch.report.counts()[k]["unmatched"] for k in patch.report.counts()) == 0
    assert not np.array_equal(gen(), base)
    patch.remove()
    assert np.array_equal(gen(), base)


def test_load_pipeline_local_folder(pipe, tmp_path) -> None:
    pipe.save_pretrained(tmp_path / "tiny")
    loaded = load_pipeline(str(tmp_path / "tiny"))
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert loaded.tokenizer("a cat").input_ids == pipe.tokenizer("a cat").input_ids
    with pytest.raises(lorakit.SourceNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path))


def test_parse_lora_spec() -> None:
    assert parse_lora_spec("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_lora_spec("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_spec(r"C:\x\a.safetensors") == (r"C:\x\a.safetensors", 1.0)


def test_generate_cli_end_to_end(pipe, tmp_path) -> None:
    lora = _kohya_file(tmp_path / "style.safetensors", pipe)
    runner = CliRunner()
    common = ["generate", "--model", "tiny", "--prompt", "a cat", "--steps", "3", "--seed", "1", "--width", "64", "--height", "64"]
    r0 = runner.invoke(cli, [*common, "-o", str(tmp_path / "plain.png")])
    assert r0.exit_code == 0, r0.output
    r1 = runner.invoke(cli, [*common, "--lora", f"{lora}:0.9", "-o", str(tmp_path / "lora.png")])
    assert r1.exit_code == 0, r1.output
    assert "layers matched" in r1.output
    plain, styled = (np.asarray(Image.open(tmp_path / n)) for n in ("plain.png", "lora.png"))
    assert plain.shape == (64, 64, 3) and not np.array_equal(plain, styled)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model": "tiny", "prompt": "a cat", "infer_steps": 3, "seed": 1, "width": 64, "height": 64,
                               "lora_configs": [{"path": lora, "strength": 0.9}]}))
    r2 = runner.invoke(cli, ["generate", "--config", str(job), "--json", "-o", str(tmp_path / "job.png")])
    assert r2.exit_code == 0, r2.output
    assert json.loads(r2.output.strip().splitlines()[-1])["loras"] == [{"path": lora, "strength": 0.9}]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "job.png")), styled)
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"
