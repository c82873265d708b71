"""Training Wan 2.1 image-to-video (the clip's first frame as the condition, built as WanImageToVideoPipeline builds
it) and Wan 2.2 A14B one expert at a time (``--expert high|low``) on the tiny pipelines, 5-frame 32x32 clips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import lorakit
from _train_util import one_thread  # noqa: F401  (autouse: one torch thread per module)
from lorakit.cli import cli
from lorakit.errors import TaskInputError, UnsupportedAdapterError
from lorakit.generation import apply_loras
from lorakit.train import TrainConfig, train
from lorakit.train.data import load_samples, to_video_pixels
from lorakit.train.objective import VIDEO_FAMILIES, denoiser_for
from test_train_video import make_clips

CPU = torch.device("cpu")
BOUNDARY = 875.0  # tiny-wan22's boundary_ratio 0.875 x 1000 train timesteps


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return make_clips(tmp_path_factory.mktemp("clips"))


def _first_clip(clips: Path) -> torch.Tensor:
    """``[1, 3, 5, 32, 32]``: the first clip as training reads it."""
    return to_video_pixels(load_samples(clips, frames=5)[0].open(), 32, 5)[None]


def _pil(first: torch.Tensor) -> Image.Image:
    return Image.fromarray(((first[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


# -- Wan 2.1 I2V ----------------------------------------------------------------------------------------------------


def test_i2v_conditioning_is_the_pipelines_own(clips):
    """The transformer input training builds for a clip (noisy latents + mask + first-frame latents, CLIP features)
    equals what WanImageToVideoPipeline gives its transformer for the same first frame."""
    pipe = lorakit.tiny_pipeline("wan-i2v")
    d = denoiser_for(pipe, CPU)
    pixels = _first_clip(clips)
    mean, std = d.encode_images(pixels)
    assert d.width == 36 and mean.shape == (1, 36 + 5, 2, 4, 4)  # + 17 CLIP tokens x 8 packed in 5 channels
    assert torch.equal(std[:, 16:], torch.zeros_like(std[:, 16:])) and (std[:, :16] > 0).all()
    # 1) prepare_latents on the same first-frame tensor: the mask + latent_condition, exactly
    _, condition = pipe.prepare_latents(pixels[:, :, 0], 1, 16, 32, 32, 5, torch.float32, CPU,
                                        torch.Generator().manual_seed(0))
    assert condition.shape == (1, 20, 2, 4, 4)
    assert torch.equal(mean[:, 16:36], condition)
    assert torch.equal(condition[:, :4, 0], torch.ones(1, 4, 4, 4)) and not condition[:, :4, 1:].any()
    # 2) the pipeline's own call with the first frame as a PIL image: record what its transformer receives
    seen = {}

    def record(_module, _args, kwargs):
        seen.update({k: kwargs[k].detach().clone() for k in ("hidden_states", "encoder_hidden_states_image")})
        seen["timestep"] = kwargs["timestep"].clone()
        seen["text"] = kwargs["encoder_hidden_states"].clone()

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe(image=_pil(pixels[:, :, 0]), prompt="a red square moving right", height=32, width=32, num_frames=5,
             num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    finally:
        handle.remove()
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([seen["timestep"].item() / 1000])
    noisy, target = d.noisy_and_target(mean, noise, t)
    hidden, image = d.model_inputs(noisy)
    assert target.shape == (1, 16, 2, 4, 4) and torch.equal(hidden[:, 16:], mean[:, 16:36])
    # the pipeline preprocesses the PIL image itself (/255*2-1 vs our /127.5-1): equal up to float rounding
    torch.testing.assert_close(seen["hidden_states"][:, 16:], hidden[:, 16:], atol=1e-5, rtol=0)
    assert torch.equal(seen["encoder_hidden_states_image"], image)  # CLIP hidden_states[-2] of the first frame
    # 3) the whole conditioned call: training's prediction is the pipeline transformer's output on those inputs
    cond = d.encode_text(["a red square moving right"])
    ours = d.predict(noisy, t, cond)
    with torch.no_grad():
        ref = pipe.transformer(hidden_states=torch.cat([noisy[:, :16], seen["hidden_states"][:, 16:]], 1),
                               timestep=seen["timestep"], encoder_hidden_states=seen["text"],
                               encoder_hidden_states_image=seen["encoder_hidden_states_image"], return_dict=False)[0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref, pipe.transformer(  # non-vacuity: the condition matters
        hidden_states=torch.cat([noisy[:, :16], torch.zeros_like(hidden[:, 16:])], 1), timestep=seen["timestep"],
        encoder_hidden_states=seen["text"], encoder_hidden_states_image=image, return_dict=False)[0].detach(),
        atol=1e-4)


def _i2v_out(pipe, hidden, image) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe.transformer(hidden_states=hidden, timestep=torch.tensor([500.0]), encoder_hidden_states_image=image,
                                encoder_hidden_states=torch.randn(1, 16, 32, generator=g), return_dict=False)[0]


def test_tiny_i2v_trains_and_diffusers_loads_the_file(clips, tmp_path):
    pipe = lorakit.tiny_pipeline("wan-i2v")
    d = denoiser_for(pipe, CPU)
    mean, _ = d.encode_images(_first_clip(clips))
    hidden, image = d.model_inputs(mean)
    base = _i2v_out(pipe, hidden, image)
    out = tmp_path / "i2v.safetensors"
    result = train(pipe, clips, TrainConfig(steps=3, lr=1e-2, resolution=32, batch_size=2, rank=2, preset="attn",
                                            output=out, cache_latents=True, validation_split=0.25, validate_every=2,
                                            seed=1))
    assert len(result.loss) == 3 and all(math.isfinite(x) for x in result.loss)
    assert [s for s, _ in result.validation_loss] == [0, 2, 3]
    assert all(math.isfinite(v) for _, v in result.validation_loss)
    assert result.validation_loss[-1][1] < result.validation_loss[0][1]  # measured: 1.582 -> 1.558 -> 1.541 (CPU)
    assert all(layer.weight.up.abs().sum() > 0 for layer in result.lora.layers.values())  # every layer moved
    assert torch.equal(_i2v_out(pipe, hidden, image), base)  # hooks gone
    fresh = lorakit.tiny_pipeline("wan-i2v")
    fresh.load_lora_weights(str(out))
    by_diffusers = _i2v_out(fresh, hidden, image)
    assert not torch.allclose(by_diffusers, base, atol=1e-6)  # non-vacuity: the trained LoRA changes the prediction
    ours = lorakit.tiny_pipeline("wan-i2v")
    with lorakit.apply(ours, out) as patch:
        assert not patch.report.all_unmatched()
        by_lorakit = _i2v_out(ours, hidden, image)
    torch.testing.assert_close(by_lorakit, by_diffusers, atol=1e-5, rtol=1e-5)


# -- Wan 2.2 A14B: one expert at a time -------------------------------------------------------------------------------


def _expert_out(module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return module(hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g), timestep=torch.tensor([500.0]),
                      encoder_hidden_states=torch.randn(1, 16, 32, generator=g), return_dict=False)[0]


def test_expert_timesteps_come_from_the_experts_range_only():
    pipe = lorakit.tiny_pipeline("wan22")
    g = torch.Generator().manual_seed(0)
    high = denoiser_for(pipe, CPU, "high").draw_time(4000, g).float() * 1000
    low = denoiser_for(pipe, CPU, "low").draw_time(4000, g).float() * 1000
    assert (high >= BOUNDARY).all() and (low < BOUNDARY).all()
    assert high.min() < BOUNDARY + 5 and high.max() > 995 and low.min() < 5 and low.max() > BOUNDARY - 5
    # the restriction of the shifted (shift 3) distribution: P(σ >= 0.875) = 1 - u_b with u_b = b/(s-(s-1)b)
    whole = denoiser_for(lorakit.tiny_pipeline("wan-t2v"), CPU).draw_time(20000, g)
    u_b = 0.875 / (3 - 2 * 0.875)
    assert abs(float((whole >= 0.875).float().mean()) - (1 - u_b)) < 0.01
    assert abs(float(high.mean()) / 1000 - float(whole[whole >= 0.875].mean())) < 0.002
    assert abs(float(low.mean()) / 1000 - float(whole[whole < 0.875].mean())) < 0.01
    with pytest.raises(TaskInputError, match="--expert high.*--expert low"):
        denoiser_for(pipe, CPU)
    with pytest.raises(TaskInputError, match="one transformer"):
        denoiser_for(lorakit.tiny_pipeline("wan-t2v"), CPU, "high")


def _record_calls(pipe) -> tuple[dict[str, list[float]], list]:
    calls: dict[str, list[float]] = {"transformer": [], "transformer_2": []}
    handles = []
    for name in calls:
        def hook(_m, _a, kwargs, name=name):
            calls[name].extend(kwargs["timestep"].flatten().tolist())
        handles.append(getattr(pipe, name).register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles


@pytest.mark.parametrize("expert", ["high", "low"])
def test_wan22_trains_only_the_named_expert_and_both_loaders_put_it_there(clips, tmp_path, monkeypatch, expert):
    pipe = lorakit.tiny_pipeline("wan22")
    mine, other = ("transformer", "transformer_2") if expert == "high" else ("transformer_2", "transformer")
    base = {n: _expert_out(getattr(pipe, n)) for n in (mine, other)}
    other_state = {k: v.clone() for k, v in getattr(pipe, other).state_dict().items()}
    calls, handles = _record_calls(pipe)
    out = tmp_path / f"wan22_{expert}_noise.safetensors"
    try:
        if expert == "high":
            result = train(pipe, clips, TrainConfig(steps=2, lr=1e-2, resolution=32, batch_size=2, rank=2,
                                                    output=out, expert="high", validation_split=0.25))
            assert len(result.loss) == 2 and all(math.isfinite(x) for x in result.loss)
            assert len(result.validation_loss) == 2
        else:  # the CLI, on this pipeline
            monkeypatch.setattr("lorakit.train.loop.load_pipeline", lambda model: pipe)
            ran = CliRunner().invoke(cli, [
                "train", "--model", "tiny-wan22", "--data", str(clips), "-o", str(out), "--steps", "2",
                "--resolution", "32", "--rank", "2", "--lr", "1e-2", "--batch-size", "2", "--expert", "low",
                "--json", "--no-report"])
            assert ran.exit_code == 0, (ran.output, ran.exception)
            assert json.loads(ran.stdout)["steps"] == 2
    finally:
        for h in handles:
            h.remove()
    # only the named expert ran, at timesteps of its range; the other is untouched
    assert calls[mine] and not calls[other]
    assert all((t >= BOUNDARY) if expert == "high" else (t < BOUNDARY) for t in calls[mine]), calls[mine]
    assert all(torch.equal(other_state[k], v) for k, v in getattr(pipe, other).state_dict().items())
    assert torch.equal(_expert_out(getattr(pipe, mine)), base[mine])  # hooks gone after the run
    lora = lorakit.load(out)
    assert lora.format == "peft" and all(n.startswith("transformer.blocks.") for n in lora.layers)
    # diffusers: high -> transformer, low -> load_into_transformer_2=True (the same key names)
    fresh = lorakit.tiny_pipeline("wan22")
    fresh.load_lora_weights(str(out), **({"load_into_transformer_2": True} if expert == "low" else {}))
    by_diffusers = _expert_out(getattr(fresh, mine))
    assert not torch.allclose(by_diffusers, base[mine], atol=1e-6)  # non-vacuity: the LoRA changes the expert
    assert torch.equal(_expert_out(getattr(fresh, other)), base[other])
    # lorakit: the expert's spelling of lorakit generate (--lora FILE@low_noise)
    ours = lorakit.tiny_pipeline("wan22")
    patches = apply_loras(ours, [(str(out), 1.0, f"{expert}_noise")])
    try:
        by_lorakit = _expert_out(getattr(ours, mine))
        assert torch.equal(_expert_out(getattr(ours, other)), base[other])
    finally:
        patches.remove()
    torch.testing.assert_close(by_lorakit, by_diffusers, atol=1e-5, rtol=1e-5)
    # continuing the file trains the same expert: step 0 equals lorakit.apply of it on that expert
    again = train(pipe, clips, TrainConfig(steps=1, resolution=32, init=out, expert=expert, validation_split=0.25))
    assert again.start_difference is not None and again.start_difference < 1e-5


def test_wan22_image_to_video_a14b_trains_an_expert_without_clip_features(clips):
    """Wan 2.2 I2V A14B: WanImageToVideoPipeline with two 36-channel experts and no image encoder (no image_dim):
    the same mask + first-frame latents, no CLIP features, timesteps below boundary 0.9 for --expert low."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    from lorakit.pipelines.wan import TINY_TRANSFORMER

    i2v = lorakit.tiny_pipeline("wan-i2v")
    parts = {k: v for k, v in i2v.components.items() if k not in ("transformer", "transformer_2", "image_encoder", "image_processor")}
    torch.manual_seed(5)
    experts = [WanTransformer3DModel(**(TINY_TRANSFORMER | {"in_channels": 36})) for _ in range(2)]
    pipe = WanImageToVideoPipeline(**parts, transformer=experts[0], transformer_2=experts[1], boundary_ratio=0.9)
    d = denoiser_for(pipe, CPU, "low")
    pixels = _first_clip(clips)
    mean, _ = d.encode_images(pixels)
    _, condition = pipe.prepare_latents(pixels[:, :, 0], 1, 16, 32, 32, 5, torch.float32, CPU,
                                        torch.Generator().manual_seed(0))
    assert mean.shape[1] == 36 and torch.equal(mean[:, 16:], condition) and d.model_inputs(mean)[1] is None
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    calls, handles = _record_calls(pipe)
    try:
        result = train(pipe, clips, TrainConfig(steps=2, lr=1e-2, resolution=32, batch_size=2, rank=2, expert="low"))
    finally:
        for h in handles:
            h.remove()
    assert all(math.isfinite(x) for x in result.loss) and not calls["transformer"]
    assert calls["transformer_2"] and all(t < 900.0 for t in calls["transformer_2"])
    assert all(layer.weight.up.abs().sum() > 0 for layer in result.lora.layers.values())
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())


def test_cli_refuses_a_two_expert_model_without_expert_and_other_video_families(clips, tmp_path):
    out = tmp_path / "none.safetensors"
    args = ["train", "--model", "tiny-wan22", "--data", str(clips), "-o", str(out), "--steps", "1", "--resolution",
            "32", "--no-report"]
    ran = CliRunner().invoke(cli, args)
    assert isinstance(ran.exception, TaskInputError) and "--expert high" in str(ran.exception)
    assert "--expert low" in str(ran.exception) and not out.exists()
    ran = CliRunner().invoke(cli, [*args[:2], "tiny-wan-t2v", *args[3:], "--expert", "low"])
    assert isinstance(ran.exception, TaskInputError) and "drop it" in str(ran.exception) and not out.exists()
    bad = CliRunner().invoke(cli, [*args, "--expert", "middle"])
    assert bad.exit_code == 2 and "middle" in bad.output
    assert TrainConfig(expert="low_noise").expert == "low"  # lorakit generate's spelling
    with pytest.raises(ValueError, match="expert must be high or low"):
        TrainConfig(expert="middle")
    # HunyuanVideo and LTX stay refused, and the message names the video families that train
    for family in ("hunyuanvideo", "ltx-video"):
        with pytest.raises(UnsupportedAdapterError) as info:
            denoiser_for(lorakit.tiny_pipeline(family), CPU)
        message = str(info.value)
        assert VIDEO_FAMILIES in message and "image-to-video" in message and "Wan 2.2 A14B" in message


def test_tiny_wan22_generates_with_both_experts():
    """The tiny pipeline's contract call: 2 steps, the first on transformer (t=1000), the second on transformer_2."""
    pipe = lorakit.tiny_pipeline("wan22")
    calls, handles = _record_calls(pipe)
    try:
        video = pipe("a red cat", num_inference_steps=2, height=32, width=32, num_frames=5, output_type="np",
                     guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).frames
    finally:
        for h in handles:
            h.remove()
    assert video.shape == (1, 5, 32, 32, 3) and np.isfinite(video).all()
    assert calls["transformer"] == [1000.0] and len(calls["transformer_2"]) == 1 and calls["transformer_2"][0] < BOUNDARY
