"""``lorakit.generation.generate`` on the tiny pipeline: seeds are reproducible, a LoRA changes the image
only for the call (the pipeline's weights are bit-identical afterwards), per-prompt seeds, step callbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from lorakit.generation import GenerateResult, generate

STEPS = 2
SIZE = 32


@pytest.fixture(scope="module")
def pipe():
    return lorakit.tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def base(pipe) -> np.ndarray:
    """The image of ``_run(pipe)`` (seed 3) without LoRAs, computed once for the module."""
    return _run(pipe).images[0]


def _lora(pipe, seed: int = 0, scale: float = 0.5) -> lorakit.LoRA:
    """A PEFT-style LoRA with random non-zero factors on the q/k/v projections of the UNet's attention."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in pipe.unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in ("to_q", "to_k", "to_v"):
            sd[f"unet.{name}.lora_A.weight"] = torch.randn(4, mod.in_features, generator=g) * scale
            sd[f"unet.{name}.lora_B.weight"] = torch.randn(mod.out_features, 4, generator=g) * scale
    assert sd, "the tiny UNet has no attention projections"
    return lorakit.load(sd)


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.detach().clone() for part in ("unet", "text_encoder", "vae")
            for k, v in getattr(pipe, part).state_dict().items()}


def _run(pipe, **kw) -> GenerateResult:
    args = {"steps": STEPS, "guidance_scale": 5.0, "seed": 3, "width": SIZE, "height": SIZE, "output_type": "np"}
    args.update(kw)
    return generate(pipe, "a cat", **args)


def test_same_seed_same_image_and_matches_a_direct_pipeline_call(pipe, base) -> None:
    again = _run(pipe)
    assert base.shape == (SIZE, SIZE, 3) and again.report is None and again.report_counts is None
    assert np.array_equal(again.images[0], base)
    direct = pipe("a cat", num_inference_steps=STEPS, guidance_scale=5.0, width=SIZE, height=SIZE,
                  generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    assert np.array_equal(direct, base)


@pytest.mark.parametrize("mode", ["fuse", "hook"])
def test_lora_changes_the_image_and_is_removed_after(pipe, base, mode: str) -> None:
    before = _weights(pipe)
    styled = _run(pipe, loras=[(_lora(pipe), 1.0)], mode=mode)
    assert not np.array_equal(styled.images[0], base)  # non-vacuity: the LoRA reached the UNet
    (counts,) = styled.report_counts.values()
    assert counts["matched"] > 0 and counts["unmatched"] == 0
    after = _weights(pipe)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    if mode == "hook":  # equal weights do not show that the hooks are gone; the image does
        assert np.array_equal(_run(pipe).images[0], base)


def test_lora_is_removed_when_the_pipeline_fails(pipe) -> None:
    before = _weights(pipe)
    with pytest.raises(ValueError):
        _run(pipe, width=SIZE + 3, loras=[(_lora(pipe), 1.0)])  # diffusers rejects sizes not divisible by 8
    after = _weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_per_prompt_seeds_and_step_callback(pipe, base) -> None:
    steps: list[int] = []
    batch = generate(pipe, ["a cat", "a cat"], steps=STEPS, guidance_scale=5.0, seed=[3, 4], width=SIZE,
                     height=SIZE, output_type="np", on_step=steps.append)
    assert steps == list(range(STEPS))
    assert len(batch.images) == 2 and not np.array_equal(batch.images[0], batch.images[1])
    # The row seeded 3 equals the single-image call with seed 3 (within batched-matmul rounding).
    np.testing.assert_allclose(batch.images[0], base, atol=1e-4)
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(pipe, ["a", "b"], steps=STEPS, guidance_scale=5.0, seed=[1])


def test_pil_output_by_default(pipe) -> None:
    image = generate(pipe, "a cat", steps=1, guidance_scale=1.0, seed=0, width=SIZE, height=SIZE).images[0]
    assert image.size == (SIZE, SIZE)


def _with_a_nan_layer(pipe) -> lorakit.LoRA:
    """The LoRA of ``_lora`` with one layer's factors poisoned: loaded leniently, the layer is reported invalid."""
    lora = _lora(pipe)
    sd = {}
    for layer in lora:
        sd[f"{layer.name}.lora_A.weight"] = layer.weight.down
        sd[f"{layer.name}.lora_B.weight"] = layer.weight.up
    first = next(iter(lora)).name
    sd[f"{first}.lora_B.weight"] = torch.full_like(sd[f"{first}.lora_B.weight"], float("nan"))
    bad = lorakit.load(sd)
    assert bad.report.invalid and len(bad) == len(lora) - 1
    return bad


def test_a_lora_with_a_broken_layer_is_refused_by_default_and_skipped_on_request(pipe, base) -> None:
    bad = _with_a_nan_layer(pipe)
    before = _weights(pipe)
    with pytest.raises(lorakit.FormatError, match="lora_B"):
        _run(pipe, loras=[(bad, 1.0)])
    assert all(torch.equal(before[k], v) for k, v in _weights(pipe).items())  # nothing half-applied
    with pytest.warns(UserWarning, match="lora_B"):
        result = _run(pipe, loras=[(bad, 1.0)], strict=False)
    out = result.images[0]
    assert np.isfinite(out).all() and not np.allclose(out, base)  # the valid layers did change the image
    # the skipped keys stay on the record, not only in the warning
    (skipped,) = result.report.invalid.values()
    assert set(skipped) == set(bad.report.invalid) and "broken key(s) skipped" in result.report.summary()
    assert result.report.to_dict()["invalid"] == result.report.invalid


def test_cli_generate_refuses_a_broken_file_unless_skip_invalid(pipe, tmp_path) -> None:
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from lorakit.cli import cli

    bad = _with_a_nan_layer(pipe)
    sd = {}
    for layer in bad:
        sd[f"{layer.name}.lora_A.weight"] = layer.weight.down.contiguous()
        sd[f"{layer.name}.lora_B.weight"] = layer.weight.up.contiguous()
    sd["unet.broken.lora_A.weight"] = torch.ones(4, 8)
    sd["unet.broken.lora_B.weight"] = torch.full((8, 4), float("nan"))
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    args = ["generate", "--model", "tiny", "--lora", str(path), "--prompt", "x", "--steps", "1",
            "--width", "32", "--height", "32"]
    refused = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "a.png")])
    assert refused.exit_code != 0 and "broken" in str(refused.exception or refused.output)
    assert not (tmp_path / "a.png").exists()
    ok = CliRunner().invoke(cli, [*args, "--skip-invalid", "-o", str(tmp_path / "b.png")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "b.png").stat().st_size > 0
