"""Training the video families (tiny Wan 2.1 T2V and Cosmos Predict2 Video2World) on a synthetic clip set: moving
coloured squares written as .mp4 with lorakit.media, decoded with PyAV."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import lorakit
from lorakit.errors import DatasetError
from lorakit.media import encode_video
from lorakit.train import TrainConfig, train
from lorakit.train.data import load_samples
from lorakit.train.objective import denoiser_for

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}


from _train_util import one_thread  # noqa: E402,F401  (autouse: one torch thread per module)


def make_clips(folder: Path, n: int = 4, frames: int = 5, size: int = 32) -> Path:
    """``n`` clips of a coloured square moving right on white (``frames`` frames, 40x32 so the crop runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, color) in enumerate(list(COLORS.items())[:n]):
        clip = []
        for f in range(frames):
            img = Image.new("RGB", (size + 8, size), (245, 245, 245))
            x = 2 + 5 * f
            ImageDraw.Draw(img).rectangle((x, 8 + 2 * i, x + 12, 20 + 2 * i), fill=color)
            clip.append(img)
        (folder / f"{i:02d}.mp4").write_bytes(encode_video(clip, "mp4", fps=8))
        (folder / f"{i:02d}.txt").write_text(f"a {name} square moving right")
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return make_clips(tmp_path_factory.mktemp("clips"))


def _wan_out(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe.transformer(hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g), timestep=torch.tensor([500.0]),
                                encoder_hidden_states=torch.randn(1, 16, 32, generator=g), return_dict=False)[0]


def test_clip_folder_loads_and_a_corrupt_clip_is_skipped_with_one_warning(clips, tmp_path):
    data = make_clips(tmp_path / "d", n=2)
    (data / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    (data / "bad.txt").write_text("broken")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = load_samples(data, frames=5)
    assert [Path(s.source).name for s in samples] == ["00.mp4", "01.mp4"] and all(s.video for s in samples)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "bad.mp4" in messages[0]
    with pytest.warns(UserWarning, match="01.mp4.*frames"):  # too short for --frames 9: skipped, named
        with pytest.raises(DatasetError, match="no usable training clip"):
            load_samples(data, frames=9)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no usable training clip"):
        train("tiny-wan-t2v", empty, TrainConfig(steps=1, resolution=32))


def test_tiny_wan_trains_and_diffusers_loads_the_file(clips, tmp_path):
    pipe = lorakit.tiny_pipeline("wan-t2v")
    base = _wan_out(pipe)
    out = tmp_path / "wan.safetensors"
    result = train(pipe, clips, TrainConfig(steps=12, lr=1e-2, resolution=32, batch_size=2, rank=4, preset="attn",
                                            output=out, cache_latents=True, validation_split=0.25, seed=1))
    assert len(result.loss) == 12 and all(math.isfinite(x) for x in result.loss)
    (_, first), (_, last) = result.validation_loss[0], result.validation_loss[-1]
    assert last < first, result.validation_loss  # measured: 1.79 -> 1.47 (CPU, seed 1)
    assert all(layer.weight.up.abs().sum() > 0 for layer in result.lora.layers.values())  # every layer moved
    assert torch.equal(_wan_out(pipe), base)  # hooks gone
    lora = lorakit.load(out)
    assert lora.format == "peft" and len(lora) == len(result.lora) > 0
    fresh = lorakit.tiny_pipeline("wan-t2v")
    fresh.load_lora_weights(str(out))
    assert not torch.allclose(_wan_out(fresh), base, atol=1e-6)  # diffusers applies the trained LoRA
    with lorakit.apply(lorakit.tiny_pipeline("wan-t2v"), out) as patch:
        assert not patch.report.all_unmatched()


def test_tiny_cosmos_trains(clips, tmp_path):
    pipe = lorakit.tiny_pipeline("cosmos")
    d = denoiser_for(pipe, torch.device("cpu"))
    x0, noise = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 16, 2, 4, 4)
    noisy, target = d.noisy_and_target(x0, noise, torch.tensor([0.5]))
    assert torch.equal(noisy[:, :, :1], x0[:, :, :1])  # the conditioning frame is clean
    assert torch.allclose(noisy[:, :, 1:], 0.5 * x0[:, :, 1:] + 0.5 * noise[:, :, 1:])
    out = tmp_path / "cosmos.safetensors"
    result = train(pipe, clips, TrainConfig(steps=6, lr=1e-2, resolution=32, batch_size=2, rank=2, output=out))
    assert len(result.loss) == 6 and all(math.isfinite(x) for x in result.loss)
    assert any(layer.weight.up.abs().sum() > 0 for layer in result.lora.layers.values())
    lora = lorakit.load(out)
    assert len(lora) == len(result.lora) > 0
    with lorakit.apply(lorakit.tiny_pipeline("cosmos"), out) as patch:
        assert not patch.report.all_unmatched()


def test_cli_trains_tiny_wan_with_frames_and_refuses_a_frame_count_the_vae_cannot_take(clips, tmp_path):
    from click.testing import CliRunner

    from lorakit.cli import cli

    out = tmp_path / "cli.safetensors"
    args = ["train", "--model", "tiny-wan-t2v", "--data", str(clips), "-o", str(out), "--steps", "2", "--resolution",
            "32", "--rank", "2", "--frames", "5", "--json", "--no-report", "--min-snr-gamma", "5", "--noise-offset", "0.05"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["steps"] == 2 and all(math.isfinite(x) for x in info["loss"]) and out.is_file()
    bad = CliRunner().invoke(cli, [*args[:-6], "--frames", "4", "-o", str(tmp_path / "bad.safetensors")])
    assert bad.exit_code != 0 and "--frames 4" in str(bad.exception or bad.output) and "4k+1" in str(bad.exception or bad.output)
    assert not (tmp_path / "bad.safetensors").exists()
