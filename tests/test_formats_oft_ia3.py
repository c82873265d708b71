"""Reading LyCORIS diag-OFT and (IA)³ *files*: networks built and trained (random non-zero values) with
lycoris-lora's own ``create_lycoris``, saved from ``LycorisNetwork.state_dict()`` to .safetensors, then loaded with
``lorakit.load`` and applied to a fresh copy of the base model. The output equals LyCORIS' own forward, fuse and hook
agree, ``remove`` is bit-exact. A T-LoRA file is reported unsupported (not unknown), and a bare ``.weight``
is (IA)³ only beside its ``.on_input`` flag."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import lorakit
from lorakit.cli import cli
from lorakit.errors import FormatError, UnsupportedAdapterError

lycoris = pytest.importorskip("lycoris")
from lycoris.wrapper import LycorisNetwork  # noqa: E402

# fused/hooked output vs LyCORIS' forward (fp32; observed max error ~1e-6)
ATOL, RTOL = 1e-5, 1e-4


from _oft_util import _inputs, _Net  # noqa: E402  (shared with the other OFT/IA3 tests)


@pytest.fixture(autouse=True)
def _lycoris_class_state():
    """``create_lycoris`` keeps its preset in class attributes: restore them after each test."""
    saved = {k: copy.copy(getattr(LycorisNetwork, k)) for k in ("NAME_ALGO_MAP", "TARGET_REPLACE_NAME", "LORA_PREFIX")}
    yield
    for k, v in saved.items():
        setattr(LycorisNetwork, k, v)


def _network(model: nn.Module, algo: str, seed: int = 3, *, input_side: tuple[str, ...] = (), **kw):
    """A LyCORIS network on every Linear/Conv2d of ``model``, applied (it hooks ``model``), with random trained
    values; (IA)³ layers named in ``input_side`` scale their inputs (LyCORIS ``train_on_input``)."""
    if input_side:
        LycorisNetwork.NAME_ALGO_MAP = {name: {"train_on_input": True} for name in input_side}
    net = lycoris.create_lycoris(model, 1.0, linear_dim=4, algo=algo, warn_on_unmatched=False, **kw)
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("rescale"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


def _state(net) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


CASES = {
    "oft": ("diag-oft", {}, {}),
    "oft-constrained-rescaled": ("diag-oft", {"constraint": 1e-3, "rescaled": True}, {}),  # binds: |Q| ~ 3 > 0.03
    "ia3-output": ("ia3", {}, {}),
    "ia3-input-fc2": ("ia3", {}, {"input_side": ("fc2",)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_file_loads_and_applies_like_lycoris(case, tmp_path):
    algo, kw, extra = CASES[case]
    base = _Net()
    x, img = _inputs()
    with torch.no_grad():
        base_out = base(x, img)
    peer = copy.deepcopy(base)
    net = _network(peer, algo, **kw, **extra)
    merged = {m.lora_name: m.get_merged_weight(multiplier=1.0)[0].detach() for m in net.loras}
    with torch.no_grad():
        peer_out = peer(x, img)
    state = _state(net)
    if "input_side" in extra:
        assert int(state["lycoris_fc2.on_input"]) == 1 and int(state["lycoris_fc1.on_input"]) == 0
    path = tmp_path / f"{case}.safetensors"
    save_file(state, str(path))

    lora = lorakit.load(path)
    assert lora.report.ok, lora.report.problems()
    assert not lora.report.unknown and not lora.report.unsupported and not lora.report.invalid
    assert set(lora.report.consumed) == set(state)
    assert lora.format == "lycoris"
    kind = "oft" if algo == "diag-oft" else "ia3"
    assert {layer.weight.kind for layer in lora} == {kind} and len(lora.layers) == 3

    model = copy.deepcopy(base)
    before = {k: (p.data_ptr(), p.detach().clone()) for k, p in model.named_parameters()}
    patch = lorakit.apply(model, [(path, 1.0)], strict=True)
    for name, want in merged.items():
        w = getattr(model, name.removeprefix("lycoris_")).weight
        torch.testing.assert_close(w, want.reshape(w.shape), rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        fused = model(x, img)
    for a, b, c in zip(fused, peer_out, base_out):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
        assert (a - c).abs().max() > 1e-2  # the adapter changed the output
    patch.remove()
    assert all(p.data_ptr() == before[k][0] and torch.equal(p, before[k][1]) for k, p in model.named_parameters())

    patch = lorakit.apply(model, [(path, 1.0)], mode="hook", strict=True)
    with torch.no_grad():
        hooked = model(x, img)
    for a, b in zip(hooked, peer_out):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    patch.remove()
    assert all(torch.equal(p, before[k][1]) for k, p in model.named_parameters())
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x, img), base_out))


def test_inspect_json_shows_the_adapter_types(tmp_path):
    oft = tmp_path / "oft.safetensors"
    ia3 = tmp_path / "ia3.safetensors"
    save_file(_state(_network(_Net(), "diag-oft", rescaled=True)), str(oft))
    save_file(_state(_network(_Net(), "ia3")), str(ia3))
    for path, kind in ((oft, "oft"), (ia3, "ia3")):
        result = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
        assert result.exit_code == 0, result.output
        info = json.loads(result.output)
        assert info["adapter_types"] == {kind: 3}
        assert info["layers"] == 3
        assert not info["report"]["unsupported"] and not info["report"]["unknown"]


def test_tlora_is_reported_unsupported_not_unknown(tmp_path):
    """A recognised adapter lorakit cannot compute (T-LoRA) is unsupported, not unknown. (BOFT and GLoRA, once
    listed here, are adapters now: tests/test_adapters_boft_glora.py.)"""
    other = {"lycoris_other_fc1.q_layer.weight": torch.randn(4, 16), "lycoris_other_fc1.p_layer.weight": torch.randn(32, 4),
             "lycoris_other_fc1.lambda_layer": torch.randn(1, 4)}
    good = _state(_network(_Net(), "diag-oft"))
    lora = lorakit.load({**good, **other})
    assert set(lora.report.consumed) == set(good)
    assert set(lora.report.unsupported) == set(other)
    assert all("T-LoRA" in why and "not supported" in why for why in lora.report.unsupported.values())
    assert not lora.report.unknown and not lora.report.invalid
    path = tmp_path / "tlora.safetensors"
    save_file(other, str(path))
    with pytest.raises(UnsupportedAdapterError, match="T-LoRA"):
        lorakit.load(path)


def test_bare_weight_is_ia3_only_beside_on_input():
    state = _state(_network(_Net(), "ia3"))
    lone = {"lycoris_fc1.weight": state.pop("lycoris_fc1.weight"), "fc9.weight": torch.randn(4, 4)}
    state.pop("lycoris_fc1.on_input")
    lora = lorakit.load({**state, **lone})
    assert sorted(lora.report.unknown) == sorted(lone)
    assert set(lora.layers) == {"lycoris_conv", "lycoris_fc2"}


@pytest.mark.parametrize("flag", [torch.tensor(2), torch.tensor([0, 1]), torch.tensor(float("nan"))])
def test_corrupt_on_input_flag_is_a_typed_error(flag):
    state = _state(_network(_Net(), "ia3"))
    state["lycoris_fc1.on_input"] = flag
    lora = lorakit.load(state)
    assert set(lora.report.invalid) == {"lycoris_fc1.weight", "lycoris_fc1.on_input"}
    assert "on_input" in lora.report.invalid["lycoris_fc1.on_input"]
    with pytest.raises(FormatError, match="lycoris_fc1"):
        lorakit.load(state, strict=True)


def test_kohya_save_round_trips_oft_and_ia3(tmp_path):
    """lorakit.save(format="kohya") writes diag-OFT (oft_blocks, alpha) and (IA)^3 (bare .weight + .on_input) so
    that they read back as the same adapters, flag included (the (IA)^3 vector once came out as ``ia3_weight``
    without its flag: unreadable)."""
    g = torch.Generator().manual_seed(3)
    state = {"lycoris_fc1.oft_blocks": torch.randn(8, 4, 4, generator=g) * 0.01, "lycoris_fc1.alpha": torch.tensor(0.0),
             "lycoris_fc2.weight": torch.randn(32, generator=g) * 0.1, "lycoris_fc2.on_input": torch.tensor(1)}
    lora = lorakit.load(state, strict=True)
    path = lorakit.save(lora, tmp_path / "k.safetensors", format="kohya")
    back = lorakit.load(path, strict=True)
    assert back.report.ok and back.adapter_types() == lora.adapter_types() == {"ia3": 1, "oft": 1}
    ours, theirs = ({x.path: x.weight for x in f.layers.values()} for f in (lora, back))
    for p, w in ours.items():
        assert all(torch.equal(t, theirs[p].tensors()[k]) for k, t in w.tensors().items())
        assert w.alpha == theirs[p].alpha
    assert int(theirs["fc2"].on_input) == 1
