"""diag-OFT (constrained / unconstrained, with and without rescale) and (IA)³ (input / output side, Linear and conv)
as lorakit adapters, checked against lycoris-lora's own modules: the fused weight equals LyCORIS' merged weight, the
patched model's output equals LyCORIS' forward, hook mode equals fuse mode, strengths follow the documented blend,
remove is bit-exact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.adapters import IA3, DiagOFT, adapter_for_fields
from lorakit.adapters.oft import cayley
from lorakit.model import Layer, LoRA

lycoris = pytest.importorskip("lycoris")
from lycoris.modules.diag_oft import DiagOFTModule  # noqa: E402
from lycoris.modules.ia3 import IA3Module  # noqa: E402

FIELDS = {"oft": {"oft_blocks": "oft_blocks", "rescale": "rescale", "alpha": "alpha"},
          "ia3": {"weight": "ia3_weight", "on_input": "on_input"}}


from _oft_util import _inputs, _Net  # noqa: E402  (shared with the other OFT/IA3 tests)


def _peer_modules(model: nn.Module, algo: str, **kw) -> dict[str, nn.Module]:
    """LyCORIS modules on fc1, conv and fc2, with random (non-zero) trained values."""
    g = torch.Generator().manual_seed(11)
    out = {}
    for name in ("fc1", "conv", "fc2"):
        org = getattr(model, name)
        if algo == "oft":
            mod = DiagOFTModule(f"lora_unet_{name}", org, 1.0, lora_dim=4, **kw)
            with torch.no_grad():
                mod.oft_blocks.copy_(torch.randn(mod.oft_blocks.shape, generator=g) * 0.2)
                if mod.rescaled:
                    mod.rescale.copy_(1 + torch.randn(mod.rescale.shape, generator=g) * 0.1)
        else:
            mod = IA3Module(f"lora_unet_{name}", org, 1.0, **kw)
            with torch.no_grad():
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.3)
        out[name] = mod
    return out


def _lorakit(peers: dict[str, nn.Module], algo: str) -> LoRA:
    """The LyCORIS state dicts, field names mapped to lorakit's canonical ones, built through the adapter registry."""
    layers = {}
    for name, mod in peers.items():
        fields = {FIELDS[algo][k]: v.clone() for k, v in mod.state_dict().items()}
        cls = adapter_for_fields(set(fields))
        assert cls is (DiagOFT if algo == "oft" else IA3)
        layers[name] = Layer(name, None, name, weight=cls.from_fields(fields, name=name))
    return LoRA(layers)


OFT_CASES = {
    "unconstrained": dict(constraint=0, rescaled=False),
    "constrained": dict(constraint=1e-3, rescaled=False),  # binds: |Q| ~ 1 > 1e-3 * out
    "loose-constraint": dict(constraint=1.0, rescaled=False),  # does not bind
    "rescaled": dict(constraint=0, rescaled=True),
}
IA3_CASES = {"output": dict(train_on_input=False), "input": dict(train_on_input=True)}
CASES = [("oft", k, v) for k, v in OFT_CASES.items()] + [("ia3", k, v) for k, v in IA3_CASES.items()]


@pytest.mark.parametrize(("algo", "case", "kw"), CASES, ids=[f"{a}-{c}" for a, c, _ in CASES])
def test_fused_weights_and_forward_equal_lycoris(algo, case, kw):
    base = _Net()
    x, img = _inputs()
    with torch.no_grad():
        base_out = base(x, img)
    # LyCORIS' own merged weights and forward (its modules hook a copy of the model)
    peer_net = copy.deepcopy(base)
    peers = _peer_modules(peer_net, algo, **kw)
    merged = {name: p.get_merged_weight(multiplier=1.0)[0].detach() for name, p in peers.items()}
    for p in peers.values():
        p.apply_to()
    with torch.no_grad():
        peer_out = peer_net(x, img)
    lora = _lorakit(peers, algo)
    model = copy.deepcopy(base)
    before = {k: (p.data.data_ptr(), p.detach().clone()) for k, p in model.named_parameters()}
    with lorakit.apply(model, lora, component="generic", strict=True) as patch:
        assert patch.report.touched_tensors == 3
        for name, want in merged.items():
            torch.testing.assert_close(getattr(model, name).weight, want.reshape(getattr(model, name).weight.shape),
                                       rtol=1e-5, atol=1e-6, msg=name)
        with torch.no_grad():
            fused_out = model(x, img)
    for a, b, c in zip(fused_out, peer_out, base_out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert (a - c).abs().max() > 2e-3  # the adapter changed the output
    if case == "constrained":  # the bound really binds: the rotation is the scaled-down one
        for layer in lora:
            blocks = layer.weight.oft_blocks
            assert float(torch.linalg.vector_norm(blocks - blocks.transpose(1, 2))) > 10 * layer.weight.constraint
    assert all(p.data.data_ptr() == before[k][0] and torch.equal(p, before[k][1]) for k, p in model.named_parameters())
    with lorakit.apply(model, lora, mode="hook", component="generic", strict=True):
        assert all(torch.equal(p, before[k][1]) for k, p in model.named_parameters())  # hooks leave weights alone
        with torch.no_grad():
            hooked = model(x, img)
    for a, b in zip(hooked, fused_out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x, img), base_out))


@pytest.mark.parametrize(("algo", "case", "kw"), [c for c in CASES if c[1] != "rescaled"],
                         ids=[f"{a}-{c}" for a, c, _ in CASES if c != "rescaled"])
def test_strength_is_lycoris_multiplier(algo, case, kw):
    """W + s·ΔW: LyCORIS' diff weight at multiplier s, for OFT a blend I + s(R − I) (not a partial rotation)."""
    base = _Net()
    peers = _peer_modules(copy.deepcopy(base), algo, **kw)
    lora = _lorakit(peers, algo)
    model = copy.deepcopy(base)
    for s in (0.5, -0.3, 1.7):
        want = {n: p.get_diff_weight(multiplier=s)[0].detach() for n, p in peers.items()}
        with lorakit.apply(model, (lora, s), component="generic", strict=True):
            for name, d in want.items():
                w0 = getattr(base, name).weight
                torch.testing.assert_close(getattr(model, name).weight - w0, d.reshape(w0.shape), rtol=1e-4, atol=1e-6)
        assert any(d.abs().max() > 1e-3 for d in want.values())


def test_oft_rescale_strength_blends_the_whole_change_and_rotation_is_orthogonal():
    base = _Net()
    peers = _peer_modules(copy.deepcopy(base), "oft", constraint=0, rescaled=True)
    lora = _lorakit(peers, "oft")
    adapter = lora.layers["fc1"].weight
    r = adapter.rotation()
    eye = torch.eye(r.shape[-1]).expand_as(r)
    torch.testing.assert_close(r @ r.transpose(-1, -2), eye, rtol=0, atol=1e-5)  # Cayley: orthogonal
    full = peers["fc1"].get_diff_weight(multiplier=1.0)[0].detach()
    model = copy.deepcopy(base)
    with lorakit.apply(model, (lora, 0.5), component="generic"):
        torch.testing.assert_close(model.fc1.weight - base.fc1.weight, 0.5 * full, rtol=1e-4, atol=1e-6)


def test_cayley_constraint_bounds_q():
    blocks = torch.randn(4, 3, 3)
    q = blocks - blocks.transpose(1, 2)
    assert torch.equal(cayley(blocks, 0.0), cayley(blocks, 1e9))  # a bound that does not bind changes nothing
    small = cayley(blocks, 1e-2)
    # R ≈ I + 2Q' for small Q' with |Q'| = bound
    assert abs(float(torch.linalg.vector_norm(small - torch.eye(3))) - 2e-2) < 1e-3
    assert float(torch.linalg.vector_norm(q)) > 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("algo", ["oft", "ia3"])
def test_low_precision_fuse_is_rounded_once_and_remove_is_exact(dtype, algo):
    base = _Net()
    peers = _peer_modules(copy.deepcopy(base), algo, **({"constraint": 0} if algo == "oft" else {}))
    lora = _lorakit(peers, algo)
    model = copy.deepcopy(base).to(dtype)
    w0 = model.fc1.weight.detach().clone()
    ptr = model.fc1.weight.data_ptr()
    with lorakit.apply(model, (lora, 0.8), component="generic"):
        delta = lora.layers["fc1"].weight.delta_from_base(w0)
        assert torch.equal(model.fc1.weight, (w0.float() + 0.8 * delta).to(dtype))
        assert not torch.equal(model.fc1.weight, w0)
    assert model.fc1.weight.data_ptr() == ptr and torch.equal(model.fc1.weight, w0) and model.fc1.weight.dtype == dtype


def test_boft_blocks_become_boft_and_shapes_are_checked():
    assert DiagOFT.from_fields({"oft_blocks": torch.zeros(2, 4, 4, 4)}, name="x").kind == "boft"
    with pytest.raises(lorakit.errors.FormatError, match="rescale"):
        DiagOFT.from_fields({"oft_blocks": torch.zeros(2, 4, 4), "rescale": torch.ones(7, 1)}, name="x")
    model = _Net()
    bad = LoRA({"fc1": Layer("fc1", None, "fc1", weight=IA3(torch.ones(5), torch.tensor(0)))})
    with pytest.raises(lorakit.errors.MatchError, match="does not fit"):
        lorakit.apply(model, bad, component="generic", strict=True)
