"""--train-text-encoder (LoRA on CLIP, kohya lora_te_/lora_te1_/lora_te2_ names, diffusers applies it), aspect
buckets (images of different aspect land in the right sizes, batches hold one bucket), min-SNR-γ and noise offset."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import lorakit
from _train_util import (
    make_shapes,
    one_thread,  # noqa: E402,F401  (autouse: one torch thread per module)
)
from lorakit.train import TrainConfig, train
from lorakit.train.buckets import assign, bucket_sizes
from lorakit.train.objective import denoiser_for


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), n=4)


def _te_out(pipe, encoder: str = "text_encoder") -> torch.Tensor:
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return getattr(pipe, encoder)(ids)[0]


def test_sd1_text_encoder_lora_trains_saves_as_lora_te_and_diffusers_applies_it(data, tmp_path):
    pipe = lorakit.tiny_pipeline()
    base = _te_out(pipe)
    out = tmp_path / "te.safetensors"
    result = train(pipe, data, TrainConfig(steps=4, lr=1e-2, resolution=32, batch_size=2, rank=2, targets=("attn2",),
                                           train_text_encoder=True, text_encoder_lr=5e-3, output=out, cache_latents=True))
    assert all(math.isfinite(x) for x in result.loss)
    te = {n: ly for n, ly in result.lora.layers.items() if ly.component == "text_encoder"}
    assert te and any(ly.weight.up.abs().sum() > 0 for ly in te.values())  # the TE LoRA changed
    assert any(ly.component == "denoiser" for ly in result.lora.layers.values())
    assert torch.equal(_te_out(pipe), base)  # hooks gone
    keys = list(load_file(out))
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    assert not any(k.startswith("lora_te1_") for k in keys)
    assert len(lorakit.load(out)) == len(result.lora)
    fresh = lorakit.tiny_pipeline()
    fresh.load_lora_weights(str(out))
    assert not torch.allclose(_te_out(fresh), base, atol=1e-6)  # diffusers applies the text-encoder part
    with lorakit.apply(pipe, out):
        assert torch.allclose(_te_out(pipe), _te_out(fresh), atol=1e-5)


def test_sdxl_trains_both_text_encoders_and_a_te_free_init_stays_unet_only(data, tmp_path):
    pipe = lorakit.tiny_pipeline("sdxl")
    out = tmp_path / "xl.safetensors"
    result = train(pipe, data, TrainConfig(steps=2, lr=1e-2, resolution=32, rank=2, targets=("attn2",),
                                           train_text_encoder=True, output=out))
    components = {ly.component for ly in result.lora.layers.values()}
    assert components == {"denoiser", "text_encoder", "text_encoder_2"}
    keys = list(load_file(out))
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    # continued without --train-text-encoder: the text-encoder layers stay frozen and are written back unchanged
    again = train(pipe, data, TrainConfig(steps=1, lr=1e-2, resolution=32, init=out, output=tmp_path / "b.safetensors"))
    a, b = load_file(out), load_file(tmp_path / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("lora_te"))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("lora_unet_") and "lora_up" in k)
    assert again.parameters["frozen_lora"] > 0


def test_text_encoder_training_on_a_pipeline_without_clip_is_refused():
    from lorakit.errors import UnsupportedAdapterError
    from lorakit.train.build import text_encoders

    with pytest.raises(UnsupportedAdapterError, match="CLIP"):
        text_encoders({"denoiser": torch.nn.Linear(1, 1), "text_encoder": torch.nn.Linear(1, 1)})


def test_bucket_list_and_assignment():
    sizes = bucket_sizes(512, 64)
    assert (512, 512) in sizes and (256, 1024) in sizes and (1024, 256) in sizes and (640, 384) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in sizes)
    # nearest aspect ratio: 16:9 (1.78) -> 640x384 (1.67, not 704x320 at 2.2); 3:2 (1.5) -> 640x384 (not 576x448)
    assert assign([(1024, 1024), (1920, 1080), (1080, 1920), (600, 400), (300, 1200)], 512, 64) == [
        (512, 512), (640, 384), (384, 640), (640, 384), (256, 1024)]


def _aspects(folder: Path) -> Path:
    """Two wide, two tall and two square images."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate([(64, 24), (70, 26), (24, 64), (26, 70), (40, 40), (48, 48)]):
        img = Image.new("RGB", (w, h), (245, 245, 245))
        ImageDraw.Draw(img).ellipse((2, 2, w - 2, h - 2), fill=(200, 40 * i, 40))
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"shape {i}")
    return folder


def test_buckets_group_images_by_aspect_and_training_runs(tmp_path):
    pipe = lorakit.tiny_pipeline()
    seen: list[tuple[int, ...]] = []
    d = denoiser_for(pipe, torch.device("cpu"))
    lines: list[str] = []
    original = type(d).encode_images  # wrapped to record the pixel sizes the run encodes

    def spy(self, pixels):
        seen.append(tuple(pixels.shape[-2:]))
        return original(self, pixels)

    type(d).encode_images = spy
    try:
        result = train(pipe, _aspects(tmp_path / "a"), TrainConfig(steps=6, lr=1e-2, resolution=32, batch_size=2, rank=2,
                                                                   targets=("attn2",), buckets=True, bucket_step=8,
                                                                   cache_latents=True), log=lines.append)
    finally:
        type(d).encode_images = original
    assert all(math.isfinite(x) for x in result.loss)
    # (height, width): 64x24 and 70x26 (aspect 2.7) -> 48x16 (3.0, nearer than 40x24 at 1.67), tall ones 16x48
    assert set(seen) == {(16, 48), (48, 16), (32, 32)}, seen
    assert any(line.startswith("buckets: ") and "48x16: 2" in line and "16x48: 2" in line and "32x32: 2" in line
               for line in lines), lines
    with pytest.raises(ValueError, match="bucket-step 10 is not a multiple of 4"):
        train(pipe, _aspects(tmp_path / "b"), TrainConfig(steps=1, resolution=32, buckets=True, bucket_step=10))


def test_min_snr_weights_and_noise_offset_train():
    sd = denoiser_for(lorakit.tiny_pipeline(), torch.device("cpu"))
    t = torch.tensor([10, 500, 990])
    snr = sd.snr(t)
    w = sd.min_snr_weight(t, 5.0)
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[0] < 1 and torch.allclose(w[2], torch.tensor(1.0))  # clipped at low noise, 1 at high noise
    flux = denoiser_for(lorakit.tiny_pipeline("flux"), torch.device("cpu"))
    sigma = torch.tensor([0.1, 0.5, 0.9])
    snr = ((1 - sigma) / sigma) ** 2
    assert torch.allclose(flux.min_snr_weight(sigma, 5.0), torch.minimum(snr, torch.tensor(5.0)) * sigma**2)


def test_min_snr_and_noise_offset_runs_change_the_loss(data):
    pipe = lorakit.tiny_pipeline()
    opts = dict(steps=3, lr=1e-2, resolution=32, rank=2, targets=("attn2",), cache_latents=True, seed=2)
    plain = train(pipe, data, TrainConfig(**opts))
    snr = train(pipe, data, TrainConfig(**opts, min_snr_gamma=0.5))  # bites wherever SNR > 0.5
    offset = train(pipe, data, TrainConfig(**opts, noise_offset=0.1))
    for r in (snr, offset):
        assert all(math.isfinite(x) for x in r.loss) and r.loss != plain.loss
    assert any(ly.weight.up.abs().sum() > 0 for ly in offset.lora.layers.values())


def test_bucketed_text_encoder_run_resumes_exactly(tmp_path):
    """Buckets (data order = shuffled per-bucket batches), TE param group, min-SNR and noise offset all survive a
    checkpoint: the resumed run's losses and file equal an uninterrupted run's."""
    pipe = lorakit.tiny_pipeline()
    data = _aspects(tmp_path / "a")
    common = dict(steps=4, lr=5e-3, resolution=32, batch_size=2, rank=2, seed=5, targets=("attn2",), buckets=True,
                  bucket_step=8, train_text_encoder=True, text_encoder_lr=1e-3, min_snr_gamma=1.0, noise_offset=0.1)
    whole = train(pipe, data, TrainConfig(output=tmp_path / "whole.safetensors", **common))

    class Stop(Exception):
        pass

    def stop_at_2(step: int, loss: float) -> None:
        if step == 2:
            raise Stop

    state = tmp_path / "state"
    with pytest.raises(Stop):
        train(pipe, data, TrainConfig(output=tmp_path / "part.safetensors", save_every=2, state_dir=state, **common),
              callback=stop_at_2)
    resumed = train(pipe, data, TrainConfig(output=tmp_path / "resumed.safetensors", resume=state, **common))
    assert resumed.loss == whole.loss
    a, b = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.startswith("lora_te_") and "lora_up" in k)
