"""The tiny pipeline of every family: built offline from configs in code, same seed -> identical weights (other
seeds differ), and the standard diffusers call at 32x32 (5 frames for video, a PIL image where the task is
conditioned) gives finite outputs of the right shape that depend on the prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lorakit
from lorakit.pipelines import load_pipeline

diffusers = pytest.importorskip("diffusers")

# family -> (pipeline class name, denoiser attribute, video?, image-conditioned?)
FAMILIES = {
    "sd1": ("StableDiffusionPipeline", "unet", False, False),
    "sdxl": ("StableDiffusionXLPipeline", "unet", False, False),
    "sd3": ("StableDiffusion3Pipeline", "transformer", False, False),
    "flux": ("FluxPipeline", "transformer", False, False),
    "flux-kontext": ("FluxKontextPipeline", "transformer", False, True),
    "wan-t2v": ("WanPipeline", "transformer", True, False),
    "wan-i2v": ("WanImageToVideoPipeline", "transformer", True, True),
    "cosmos": ("Cosmos2VideoToWorldPipeline", "transformer", True, True),
    "ltx-video": ("LTXPipeline", "transformer", True, False),
    "hidream": ("HiDreamImagePipeline", "transformer", False, False),
    "lumina2": ("Lumina2Pipeline", "transformer", False, False),
    "z-image": ("ZImagePipeline", "transformer", False, False),
    "qwen-image": ("QwenImagePipeline", "transformer", False, False),
    "qwen-image-edit": ("QwenImageEditPipeline", "transformer", False, True),
    "hunyuanvideo": ("HunyuanVideoPipeline", "transformer", True, False),
    "flux2": ("Flux2Pipeline", "transformer", False, False),
    "krea2": ("Krea2Pipeline", "transformer", False, False),
    "ltx2": ("LTX2Pipeline", "transformer", True, False),
}


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models' ops are too small to gain from threads, and on a shared 2-core machine two threads per
    process can be 20x slower than one (measured: 10 s vs 0.45 s for the tiny Cosmos call under load 10)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def call_kwargs(family: str, prompt: str = "a red cat") -> dict:
    """The contract's call: 2 steps, seed 0, numpy output, 32x32 (+5 frames, +a PIL image)."""
    _, _, video, conditioned = FAMILIES[family]
    kwargs = {"prompt": prompt, "num_inference_steps": 2, "generator": torch.Generator().manual_seed(0),
              "output_type": "np", "height": 32, "width": 32}
    if video:
        kwargs["num_frames"] = 5
    if conditioned:
        pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        kwargs["image"] = Image.fromarray(pixels)
    return kwargs


def output_array(family: str, out) -> np.ndarray:
    return np.asarray(out.frames[0] if FAMILIES[family][2] else out.images[0])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_family_contract(family: str) -> None:
    cls_name, denoiser, video, _ = FAMILIES[family]
    pipe = lorakit.tiny_pipeline(family, seed=0)
    assert type(pipe).__name__ == cls_name
    again, other = load_pipeline(f"tiny-{family}"), lorakit.tiny_pipeline(family, seed=1)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module) and module.state_dict():
            same, diff = again.components[name].state_dict(), other.components[name].state_dict()
            assert all(torch.equal(v, same[k]) for k, v in module.state_dict().items()), name
            assert any(not torch.equal(v, diff[k]) for k, v in module.state_dict().items() if v.numel() > 1), name
    assert sum(p.numel() for p in getattr(pipe, denoiser).parameters()) < 1_000_000
    image = output_array(family, pipe(**call_kwargs(family)))
    assert image.shape == ((5, 32, 32, 3) if video else (32, 32, 3))
    assert np.isfinite(image).all()
    assert not np.allclose(image, output_array(family, pipe(**call_kwargs(family, "a blue dog"))), atol=1e-6)
