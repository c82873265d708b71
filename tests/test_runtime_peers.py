"""Peer equivalence for the runtime: diffusers/PEFT ``load_lora_adapter`` + ``fuse_lora`` vs ``lorakit.apply``
on a tiny UNet, lycoris-lora's own forward for LoCon/LoHa/LoKr/DoRA, and text-encoder LoRAs in a pipeline."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorakit

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]


@pytest.fixture(scope="module")
def unet():
    return lorakit.tiny_pipeline(0).unet


def _randomise(module: nn.Module, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_diffusers_peft_fuse_matches(unet, tmp_path) -> None:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    # a PEFT-format file; lora_alpha == r because PEFT keeps alpha in its config, not in the tensors
    maker = copy.deepcopy(unet)
    maker.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False), adapter_name="x")
    state = {f"unet.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(maker, adapter_name="x").items()}
    path = tmp_path / "peft.safetensors"
    save_file(state, str(path))
    theirs = copy.deepcopy(unet)
    theirs.load_lora_adapter(dict(state), prefix="unet", adapter_name="x")
    theirs.fuse_lora(lora_scale=0.75)
    theirs.unload_lora()
    ours = copy.deepcopy(unet)
    patch = lorakit.apply(ours, [(str(path), 0.75)], strict=True)
    reference = unet.state_dict()
    got, want = ours.state_dict(), theirs.state_dict()
    assert got.keys() == want.keys()
    changed = [k for k in want if not torch.equal(want[k], reference[k])]
    assert len(changed) >= len(patch.report.matched["0:peft.safetensors"]) > 10
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    patch.remove()
    assert all(torch.equal(v, reference[k]) for k, v in ours.state_dict().items())


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc2 = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc2(torch.relu(self.fc1(x))), self.conv(img)


@pytest.mark.parametrize(
    "algo,kwargs",
    [
        ("lora", {}),
        ("loha", {}),
        ("lokr", {"factor": 4}),
        ("lora", {"dora_wd": True}),
    ],
    ids=["locon", "loha", "lokr", "dora"],
)
@pytest.mark.parametrize("mode", ["fuse", "hook"])
def test_lycoris_forward_matches(algo: str, kwargs: dict, mode: str, tmp_path) -> None:
    from lycoris import create_lycoris

    torch.manual_seed(0)
    base = Small()
    x, img = torch.randn(4, 12), torch.randn(2, 3, 6, 6)
    y0 = base(x, img)
    peer_model = copy.deepcopy(base)
    net = create_lycoris(peer_model, 1.0, linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2, algo=algo, **kwargs)
    net.apply_to()
    _randomise(net, 3)
    for name, p in net.named_parameters():  # DoRA magnitudes must stay positive
        if "dora_scale" in name:
            with torch.no_grad():
                p.abs_().add_(0.5)
    with torch.no_grad():
        want = peer_model(x, img)
    path = tmp_path / f"{algo}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path))
    ours = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer must match
        patch = lorakit.apply(ours, [(str(path), 1.0)], mode=mode, strict=True)
    with torch.no_grad():
        got = ours(x, img)
    for g_, w_, b_ in zip(got, want, y0):
        assert not torch.allclose(w_, b_, atol=1e-3), "the peer LoRA changed nothing (vacuous)"
        torch.testing.assert_close(g_, w_, rtol=1e-4, atol=1e-4)
    patch.remove()
    assert all(torch.equal(a, b) for a, b in zip(ours(x, img), y0))


def test_text_encoder_lora_through_pipeline(tmp_path) -> None:
    pipe = lorakit.tiny_pipeline(0)
    te = pipe.text_encoder
    ids = pipe.tokenizer(["a red cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for name, mod in te.named_modules():
        if name.endswith(("q_proj", "out_proj", "fc1")):
            tensors[f"text_encoder.{name}.lora_A.weight"] = torch.randn(2, mod.in_features, generator=g)
            tensors[f"text_encoder.{name}.lora_B.weight"] = torch.randn(mod.out_features, 2, generator=g) * 0.1
    path = tmp_path / "te.safetensors"
    save_file(tensors, str(path))
    with torch.no_grad():
        y0 = te(ids)[0]
        with lorakit.apply(pipe, [(str(path), 1.0)], strict=True) as patch:
            fused = te(ids)[0]
            assert {v[0].split(":")[0] for v in patch.report.matched["0:te.safetensors"].values()} == {"text_encoder"}
        with lorakit.apply(pipe, [(str(path), 1.0)], mode="hook"):
            hooked = te(ids)[0]
        assert torch.equal(te(ids)[0], y0)
    assert not torch.allclose(fused, y0, atol=1e-3)
    torch.testing.assert_close(hooked, fused, rtol=1e-4, atol=1e-4)
