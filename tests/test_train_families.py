"""The flow-matching path (tiny FLUX.1 and SD3): the objective's math, a few real steps, files diffusers reads."""

from __future__ import annotations

import math

import pytest
import torch

import lorakit
from _train_util import (
    make_shapes,
    one_thread,  # noqa: E402,F401  (autouse: one torch thread per module)
)
from lorakit.train import TrainConfig, train
from lorakit.train.objective import denoiser_for


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), n=4)


def test_objective_is_read_from_the_scheduler():
    sd = denoiser_for(lorakit.tiny_pipeline(), torch.device("cpu"))
    assert not sd.flow and sd.prediction == "epsilon"
    flux = denoiser_for(lorakit.tiny_pipeline("flux"), torch.device("cpu"))
    assert flux.flow
    x0, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    sigma = torch.tensor([0.25, 0.9])
    noisy, target = flux.noisy_and_target(x0, noise, sigma)
    assert torch.allclose(noisy[0], 0.75 * x0[0] + 0.25 * noise[0]) and torch.allclose(noisy[1], 0.1 * x0[1] + 0.9 * noise[1])
    assert torch.equal(target, noise - x0)
    noisy, target = sd.noisy_and_target(x0[:, :4], noise[:, :4], torch.tensor([10, 900]))
    a = sd.noise_scheduler.alphas_cumprod[torch.tensor([10, 900])].reshape(-1, 1, 1, 1)
    assert torch.allclose(noisy, a.sqrt() * x0[:, :4] + (1 - a).sqrt() * noise[:, :4], atol=1e-6)
    assert torch.equal(target, noise[:, :4])


def _flux_out(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 16, 16, generator=g)
    with torch.no_grad():
        return pipe.transformer(
            hidden_states=hidden, timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]),
            pooled_projections=torch.randn(1, 32, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
            txt_ids=torch.zeros(8, 3), img_ids=torch.zeros(16, 3), return_dict=False,
        )[0]


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_tiny_flux_trains_with_flow_matching(data, tmp_path, fmt):
    pipe = lorakit.tiny_pipeline("flux")
    base = _flux_out(pipe)
    out = tmp_path / f"flux-{fmt}.safetensors"
    result = train(pipe, data, TrainConfig(steps=3, lr=5e-3, resolution=32, batch_size=2, rank=4, preset="attn-mlp",
                                           output=out, format=None if fmt == "peft" else fmt))  # DiT default: peft
    assert len(result.loss) == 3 and all(math.isfinite(x) for x in result.loss)
    assert torch.equal(_flux_out(pipe), base)  # hooks gone
    assert any("single_transformer_blocks" in name for name in result.lora.layers)
    if fmt == "peft":  # diffusers reads kohya FLUX files only in BFL names (lora_unet_double_blocks_...)
        fresh = lorakit.tiny_pipeline("flux")
        fresh.load_lora_weights(str(out))
        assert not torch.allclose(_flux_out(fresh), base, atol=1e-7)
    with lorakit.apply(lorakit.tiny_pipeline("flux"), out) as patch:
        assert not patch.report.all_unmatched() and not patch.report.shape_mismatches.get(next(iter(patch.report.matched)))
        assert len(next(iter(patch.report.matched.values()))) == len(result.lora)


def test_tiny_sd3_trains(data, tmp_path):
    result = train(lorakit.tiny_pipeline("sd3"), data, TrainConfig(steps=2, resolution=32, rank=2, output=tmp_path / "o.safetensors"))
    assert len(result.loss) == 2 and all(math.isfinite(x) for x in result.loss)
    lora = lorakit.load(tmp_path / "o.safetensors")
    assert lora.format == "peft" and len(lora) == len(result.lora) > 0


def test_tiny_sdxl_and_v_prediction_train(data, tmp_path):
    from diffusers import DDIMScheduler

    result = train(lorakit.tiny_pipeline("sdxl"), data, TrainConfig(steps=2, resolution=32, rank=2, targets=("attn2",)))
    assert len(result.loss) == 2 and all(math.isfinite(x) for x in result.loss) and len(result.lora) > 0
    pipe = lorakit.tiny_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    d = denoiser_for(pipe, torch.device("cpu"))
    x0, noise, t = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), torch.tensor([300])
    _, target = d.noisy_and_target(x0, noise, t)
    a = d.noise_scheduler.alphas_cumprod[300]
    assert torch.allclose(target, a.sqrt() * noise - (1 - a).sqrt() * x0, atol=1e-6)
    result = train(pipe, data, TrainConfig(steps=2, resolution=32, rank=2, targets=("attn2",)))
    assert all(math.isfinite(x) for x in result.loss)
