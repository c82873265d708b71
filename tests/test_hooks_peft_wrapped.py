"""A model that already carries PEFT/diffusers LoRAs (its layers are PEFT ``LoraLayer`` wrappers with a
``base_layer``) takes lorakit LoRAs in both modes: lorakit patches the wrapper's ``base_layer``, PEFT's own adapter
keeps adding its output on top (``y = base(x) + peft(x) + lorakit(x)``), and ``remove()`` gives back the PEFT-only
model bit for bit with PEFT's adapter untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.adapters import LoRAWeights
from lorakit.model import Layer, LoRA

peft = pytest.importorskip("peft")
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402

MODES = ["fuse", "hook"]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc2(torch.relu(self.fc1(x))), self.conv(img)


def _peft_net() -> nn.Module:
    torch.manual_seed(0)
    # init_lora_weights=False: PEFT's lora_B is random, so its adapter really changes the output
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "conv", "fc2"], init_lora_weights=False)
    return inject_adapter_in_model(config, _Net())


def _lora() -> LoRA:
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    return LoRA({
        "fc1": Layer("fc1", None, "fc1", weight=LoRAWeights(r(2, 8), r(16, 2), 1.0)),
        "conv": Layer("conv", None, "conv", weight=LoRAWeights(r(3, 4, 3, 3), r(4, 3, 1, 1), 1.5)),
    })


def _objects(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {k: (p.data.data_ptr(), p.detach().clone()) for k, p in model.named_parameters()}


def _assert_objects(model: nn.Module, before: dict[str, tuple[int, torch.Tensor]]) -> None:
    for k, p in model.named_parameters():
        assert p.data.data_ptr() == before[k][0] and torch.equal(p, before[k][1]) and p.dtype == before[k][1].dtype, k


@pytest.mark.parametrize("mode", MODES)
def test_lorakit_on_peft_wrapped_layers_adds_to_peft_and_removes_exactly(mode):
    model = _peft_net()
    assert type(model.fc1).__module__.startswith("peft.") and hasattr(model.fc1, "base_layer")
    lora = _lora()
    x, img = torch.randn(3, 8), torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        peft_only = model(x, img)
        peft_fc1 = model.fc1(x)
        # reference: the same PEFT model whose base weights carry lorakit's ΔW (fp32, added by hand)
        ref = copy.deepcopy(model)
        for name in ("fc1", "conv"):
            base = getattr(ref, name).base_layer
            delta = lora.layers[name].delta_weight(shape=tuple(base.weight.shape))
            base.weight.copy_(base.weight.float() + delta)
        want = ref(x, img)
        delta_fc1 = F.linear(x, lora.layers["fc1"].delta_weight(shape=(16, 8)))
    before = _objects(model)
    patch = lorakit.apply(model, (lora, 1.0), mode=mode, component="generic", strict=True)
    assert patch.report.counts()["0:lora"] == {"matched": 2, "unmatched": 0, "shape_mismatches": 0}
    with torch.no_grad():
        got = model(x, img)
        # the wrapper's output is PEFT-only output + lorakit's own delta output, computed separately
        torch.testing.assert_close(model.fc1(x), peft_fc1 + delta_fc1, rtol=1e-5, atol=1e-5)
        for a, b, p0 in zip(got, want, peft_only):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert (a - p0).abs().max() > 1e-2  # lorakit's LoRA changed the output
        # PEFT's own adapter still runs: switching it off leaves base + lorakit, a different output
        model.fc1.enable_adapters(False)
        plain_fc1 = model.fc1(x)
        model.fc1.enable_adapters(True)
        torch.testing.assert_close(plain_fc1, model.fc1.base_layer(x), rtol=0, atol=0)
        assert (plain_fc1 - model.fc1(x)).abs().max() > 1e-2
    for name in ("fc1.lora_A.default.weight", "fc1.lora_B.default.weight", "conv.lora_B.default.weight"):
        assert torch.equal(dict(model.named_parameters())[name], before[name][1]), name  # PEFT's factors untouched
    if mode == "hook":
        patch.set_strengths([0.5])
        with torch.no_grad():
            half = model.fc1(x)
        torch.testing.assert_close(half, peft_fc1 + 0.5 * delta_fc1, rtol=1e-5, atol=1e-5)
    patch.remove()
    _assert_objects(model, before)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x, img), peft_only))


diffusers = pytest.importorskip("diffusers")


def _unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8).eval()


def _kohya_file(model: nn.Module) -> dict[str, torch.Tensor]:
    """A kohya-named SD1 LoRA on self-attention q, cross-attention k (both PEFT-wrapped), the conv proj_in
    (PEFT-wrapped) and the feed-forward out (not wrapped)."""
    g = torch.Generator().manual_seed(1)
    state = {}
    for name, mod in model.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_k", "proj_in", "ff.net.2")):
            w = mod.weight
            k = "lora_unet_" + name.replace(".", "_")
            state[k + ".lora_down.weight"] = torch.randn(2, *w.shape[1:], generator=g) * 0.3
            state[k + ".lora_up.weight"] = torch.randn(w.shape[0], 2, *([1] * (w.dim() - 2)), generator=g) * 0.3
            state[k + ".alpha"] = torch.tensor(2.0)
    return state


def test_diffusers_unet_with_a_peft_adapter_takes_a_kohya_lora_in_both_modes():
    plain = _unet()
    unet = copy.deepcopy(plain)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
                                init_lora_weights=False))
    lora = lorakit.load(_kohya_file(plain), strict=True)
    inputs = dict(sample=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)), timestep=torch.tensor([10]),
                  encoder_hidden_states=torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(3)))
    before = _objects(unet)
    with torch.no_grad():
        base_out = plain(**inputs).sample
        peft_out = unet(**inputs).sample
        assert (peft_out - base_out).abs().max() > 1e-3  # PEFT's adapter is live
        outs = {}
        for mode in MODES:
            patch = lorakit.apply(unet, (lora, 0.8), mode=mode, strict=True)
            assert sum(len(v) for v in patch.report.matched.values()) == len(lora)
            outs[mode] = unet(**inputs).sample
            patch.remove()
            _assert_objects(unet, before)
            assert torch.equal(unet(**inputs).sample, peft_out)
    torch.testing.assert_close(outs["hook"], outs["fuse"], rtol=1e-4, atol=1e-5)
    assert (outs["fuse"] - peft_out).abs().max() > 1e-2  # lorakit's LoRA changed the output
