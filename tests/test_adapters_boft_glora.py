"""BOFT (butterfly OFT: constrained / unconstrained, with and without rescale) and GLoRA (plain and Tucker conv) as
lorakit adapters, checked against lycoris-lora's own modules: the fused weight equals LyCORIS' merged weight, the
patched model's output equals LyCORIS' forward, hook mode equals fuse mode, strengths follow the documented blend,
``remove`` is bit-exact; and LyCORIS *files* of both types load, apply, inspect, convert and merge."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.adapters import BOFT, adapter_for_fields
from lorakit.adapters.boft import butterfly
from lorakit.model import Layer, LoRA

lycoris = pytest.importorskip("lycoris")
from lycoris.modules.boft import ButterflyOFTModule  # noqa: E402

# fused/hooked output vs LyCORIS' forward (fp32; observed max error ~1e-6)
ATOL, RTOL = 1e-5, 1e-4


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc2(torch.tanh(self.fc1(x))), self.conv(img)


def _inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(5, 16, generator=g), torch.randn(2, 8, 6, 6, generator=g)


NAMES = ("fc1", "conv", "fc2")


def _boft_peers(model: nn.Module, **kw) -> dict[str, nn.Module]:
    """LyCORIS BOFT modules on fc1, conv and fc2 (block size 4: 4 or 3 butterfly stages), random trained values."""
    g = torch.Generator().manual_seed(11)
    out = {}
    for name in NAMES:
        mod = ButterflyOFTModule(f"lora_unet_{name}", getattr(model, name), 1.0, lora_dim=4, **kw)
        with torch.no_grad():
            mod.oft_blocks.copy_(torch.randn(mod.oft_blocks.shape, generator=g) * 0.2)
            if mod.rescaled:
                mod.rescale.copy_(1 + torch.randn(mod.rescale.shape, generator=g) * 0.1)
        out[name] = mod
    return out


def _lorakit(peers: dict[str, nn.Module], fields: dict[str, str], kind: type) -> LoRA:
    """The LyCORIS state dicts, names mapped to lorakit's canonical fields, built through the adapter registry."""
    layers = {}
    for name, mod in peers.items():
        state = {fields[k]: v.clone() for k, v in mod.state_dict().items()}
        adapter = adapter_for_fields(set(state)).from_fields(state, name=name)
        assert type(adapter) is kind
        layers[name] = Layer(name, None, name, weight=adapter)
    return LoRA(layers)


BOFT_FIELDS = {"oft_blocks": "oft_blocks", "rescale": "rescale", "alpha": "alpha"}
BOFT_CASES = {
    "unconstrained": dict(constraint=0, rescaled=False),
    "constrained": dict(constraint=1e-3, rescaled=False),  # binds: |Q| ~ 3 > 1e-3 * out
    "loose-constraint": dict(constraint=1.0, rescaled=False),  # does not bind
    "rescaled": dict(constraint=0, rescaled=True),
}


def _check_against_peer(base: nn.Module, peer_net: nn.Module, peers: dict[str, nn.Module], lora: LoRA) -> None:
    """Fused weights == LyCORIS' merged weights, fused and hooked forward == LyCORIS' forward, remove exact."""
    x, img = _inputs()
    with torch.no_grad():
        base_out = base(x, img)
    merged = {name: p.get_merged_weight(multiplier=1.0)[0].detach() for name, p in peers.items()}
    for p in peers.values():
        p.apply_to()
    with torch.no_grad():
        peer_out = peer_net(x, img)
    model = copy.deepcopy(base)
    before = {k: (p.data_ptr(), p.detach().clone()) for k, p in model.named_parameters()}
    with lorakit.apply(model, lora, component="generic", strict=True) as patch:
        assert patch.report.touched_tensors == len(peers)
        for name, want in merged.items():
            w = getattr(model, name).weight
            torch.testing.assert_close(w, want.reshape(w.shape), rtol=1e-5, atol=1e-6, msg=name)
        with torch.no_grad():
            fused = model(x, img)
    for a, b, c in zip(fused, peer_out, base_out):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
        assert (a - c).abs().max() > 2e-3  # the adapter changed the output
    assert all(p.data_ptr() == before[k][0] and torch.equal(p, before[k][1]) for k, p in model.named_parameters())
    with lorakit.apply(model, lora, mode="hook", component="generic", strict=True):
        assert all(torch.equal(p, before[k][1]) for k, p in model.named_parameters())  # hooks leave weights alone
        with torch.no_grad():
            hooked = model(x, img)
    for a, b in zip(hooked, fused):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x, img), base_out))


@pytest.mark.parametrize("case", list(BOFT_CASES))
def test_boft_fused_weights_and_forward_equal_lycoris(case):
    base = _Net()
    peer_net = copy.deepcopy(base)
    peers = _boft_peers(peer_net, **BOFT_CASES[case])
    assert {tuple(p.oft_blocks.shape) for p in peers.values()} == {(4, 8, 4, 4), (3, 4, 4, 4)}
    lora = _lorakit(peers, BOFT_FIELDS, BOFT)
    if case == "constrained":  # the bound really binds: the rotation is the scaled-down one
        for layer in lora:
            blocks = layer.weight.boft_blocks
            assert float(torch.linalg.vector_norm(blocks - blocks.transpose(-1, -2))) > 10 * layer.weight.constraint
    _check_against_peer(base, peer_net, peers, lora)


def test_boft_strength_is_a_straight_line_blend():
    """W + s·ΔW for every s; equal to LyCORIS' multiplier (which blends each stage) for one stage, and at s = 1."""
    base = _Net()
    peers = _boft_peers(copy.deepcopy(base), constraint=0, rescaled=False)
    lora = _lorakit(peers, BOFT_FIELDS, BOFT)
    model = copy.deepcopy(base)
    full = {n: p.get_diff_weight(multiplier=1.0)[0].detach() for n, p in peers.items()}
    for s in (0.5, -0.3, 1.7):
        with lorakit.apply(model, (lora, s), component="generic", strict=True):
            for name, d in full.items():
                w0 = getattr(base, name).weight
                torch.testing.assert_close(getattr(model, name).weight - w0, s * d.reshape(w0.shape), rtol=1e-4, atol=1e-6)
    # one stage: LyCORIS' per-stage blend is the straight line too
    one = ButterflyOFTModule("one", nn.Linear(8, 8), 1.0, lora_dim=8)
    with torch.no_grad():
        one.oft_blocks.copy_(torch.randn(one.oft_blocks.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    assert tuple(one.oft_blocks.shape) == (1, 1, 8, 8)
    adapter = BOFT.from_fields({"boft_blocks": one.oft_blocks.detach(), "alpha": one.alpha})
    w = one.org_module[0].weight.detach()
    for s in (0.5, -0.3):
        torch.testing.assert_close(s * adapter.delta_from_base(w), one.get_diff_weight(multiplier=s)[0].detach(),
                                   rtol=1e-4, atol=1e-6)


def test_butterfly_is_orthogonal_and_shapes_are_checked():
    r = BOFT.from_fields({"boft_blocks": torch.randn(3, 4, 4, 4)}).rotations()
    eye = torch.eye(16)
    dense = butterfly(r, eye)  # the whole butterfly as one matrix: orthogonal, mixes all 16 rows
    torch.testing.assert_close(dense @ dense.T, eye, rtol=0, atol=1e-5)
    assert bool((dense.abs() > 1e-6).all())
    with pytest.raises(lorakit.errors.FormatError, match="stages"):
        BOFT.from_fields({"boft_blocks": torch.zeros(4, 2, 4, 4)}, name="x")  # 4 stages need n % 8 == 0
    with pytest.raises(lorakit.errors.FormatError, match="rescale"):
        BOFT.from_fields({"boft_blocks": torch.zeros(2, 4, 4, 4), "rescale": torch.ones(7, 1)}, name="x")
    model = _Net()
    bad = LoRA({"fc2": Layer("fc2", None, "fc2", weight=BOFT(torch.zeros(2, 4, 2, 2)))})  # 8 rows for 16
    with pytest.raises(lorakit.errors.MatchError, match="rotate 8 rows"):
        lorakit.apply(model, bad, component="generic", strict=True)
