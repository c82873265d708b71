"""BOFT (butterfly OFT: constrained / unconstrained, with and without rescale) and GLoRA (plain and Tucker conv) as
lorakit adapters, checked against lycoris-lora's own modules: the fused weight equals LyCORIS' merged weight, the
patched model's output equals LyCORIS' forward, hook mode equals fuse mode, strengths follow the documented blend,
``remove`` is bit-exact; and LyCORIS *files* of both types load, apply, inspect, convert and merge."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.adapters import BOFT, GLoRA, adapter_for_fields
from lorakit.adapters.boft import butterfly
from lorakit.cli import cli, main
from lorakit.model import Layer, LoRA

lycoris = pytest.importorskip("lycoris")
from lycoris.modules.boft import ButterflyOFTModule  # noqa: E402
from lycoris.modules.glora import GLoRAModule, _glora_weight  # noqa: E402
from lycoris.wrapper import LycorisNetwork  # noqa: E402

# fused/hooked output vs LyCORIS' forward (fp32; observed max error ~1e-6)
ATOL, RTOL = 1e-5, 1e-4


from _oft_util import _inputs, _Net  # noqa: E402  (shared with the other OFT/IA3 tests)

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


# -- GLoRA ---------------------------------------------------------------------------------------------------------

GLORA_FIELDS = {"a1.weight": "glora_a1", "a2.weight": "glora_a2", "b1.weight": "glora_b1", "b2.weight": "glora_b2",
                "bm.weight": "glora_bm", "alpha": "alpha"}
GLORA_CASES = {"alpha-1": dict(alpha=1), "alpha-6": dict(alpha=6), "alpha-0-means-rank": dict(alpha=0)}


def _glora_peers(model: nn.Module, **kw) -> dict[str, nn.Module]:
    g = torch.Generator().manual_seed(13)
    out = {}
    for name in NAMES:
        mod = GLoRAModule(f"lora_unet_{name}", getattr(model, name), 1.0, lora_dim=4, **kw)
        with torch.no_grad():
            for p in mod.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        out[name] = mod
    return out


@pytest.mark.parametrize("case", list(GLORA_CASES))
def test_glora_fused_weights_and_forward_equal_lycoris(case):
    base = _Net()
    peer_net = copy.deepcopy(base)
    peers = _glora_peers(peer_net, **GLORA_CASES[case])
    lora = _lorakit(peers, GLORA_FIELDS, GLoRA)
    want_scale = {"alpha-1": 0.25, "alpha-6": 1.5, "alpha-0-means-rank": 1.0}[case]
    assert all(layer.weight.scale == want_scale == peers[layer.name].scale for layer in lora)
    _check_against_peer(base, peer_net, peers, lora)


def test_glora_strength_is_lycoris_multiplier_and_tucker_follows_lycoris_math():
    base = _Net()
    peers = _glora_peers(copy.deepcopy(base))
    lora = _lorakit(peers, GLORA_FIELDS, GLoRA)
    model = copy.deepcopy(base)
    for s in (0.5, -0.3, 1.7):
        want = {n: p.get_diff_weight(multiplier=s)[0].detach() for n, p in peers.items()}
        with lorakit.apply(model, (lora, s), component="generic", strict=True):
            for name, d in want.items():
                w0 = getattr(base, name).weight
                torch.testing.assert_close(getattr(model, name).weight - w0, d.reshape(w0.shape), rtol=1e-4, atol=1e-6)
    # Tucker b-half (LyCORIS 4.1.3's constructor never builds one, but its math reads bm): lycoris' own formula
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 8, 3, 3, generator=g)
    t = {"glora_a1": torch.randn(8, 4, 1, 1, generator=g), "glora_a2": torch.randn(4, 8, 1, 1, generator=g),
         "glora_b1": torch.randn(16, 4, 1, 1, generator=g), "glora_b2": torch.randn(4, 8, 1, 1, generator=g),
         "glora_bm": torch.randn(4, 4, 3, 3, generator=g), "alpha": torch.tensor(2.0)}
    adapter = GLoRA.from_fields(t, name="tucker")
    want = _glora_weight(w, t["glora_a1"], t["glora_a2"], t["glora_b1"], t["glora_b2"], t["glora_bm"], 0.5)
    torch.testing.assert_close(adapter.delta_from_base(w), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(lorakit.errors.RankMismatchError, match="a1"):
        GLoRA.from_fields({**t, "glora_a2": torch.randn(3, 8, 1, 1)}, name="bad")


# -- LyCORIS files: load, apply, inspect, convert, merge --------------------------------------------------------------


@pytest.fixture(autouse=True)
def _lycoris_class_state():
    """``create_lycoris`` keeps its preset in class attributes: restore them after each test."""
    saved = {k: copy.copy(getattr(LycorisNetwork, k)) for k in ("NAME_ALGO_MAP", "TARGET_REPLACE_NAME", "LORA_PREFIX")}
    yield
    for k, v in saved.items():
        setattr(LycorisNetwork, k, v)


def _network_file(model: nn.Module, algo: str, path, **kw) -> dict[str, torch.Tensor]:
    """A LyCORIS network on every Linear/Conv2d of ``model`` (applied: it hooks ``model``), random trained values,
    saved from ``LycorisNetwork.state_dict()``."""
    net = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo=algo, warn_on_unmatched=False, **kw)
    net.apply_to()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("rescale")
                    else 0.2 * torch.randn(p.shape, generator=g))
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path))
    return state


FILE_CASES = {"boft": ("boft", {"constraint": 1e-3, "rescaled": True}), "glora": ("glora", {})}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_lycoris_file_loads_applies_converts_and_merges(case, tmp_path, capsys):
    algo, kw = FILE_CASES[case]
    base = _Net()
    x, img = _inputs()
    with torch.no_grad():
        base_out = base(x, img)
    peer = copy.deepcopy(base)
    path = tmp_path / f"{case}.safetensors"
    state = _network_file(peer, algo, path, **kw)
    with torch.no_grad():
        peer_out = peer(x, img)
    if algo == "boft":
        assert all(v.dim() == 4 for k, v in state.items() if k.endswith(".oft_blocks"))

    lora = lorakit.load(path, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(state)
    assert lora.format == "lycoris" and lora.adapter_types() == {algo: 3}
    model = copy.deepcopy(base)
    for mode in ("fuse", "hook"):
        with lorakit.apply(model, [(path, 1.0)], mode=mode, strict=True), torch.no_grad():
            out = model(x, img)
        for a, b, c in zip(out, peer_out, base_out):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
            assert (a - c).abs().max() > 1e-2  # the adapter changed the output
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x, img), base_out))

    runner = CliRunner()
    info = json.loads(runner.invoke(cli, ["inspect", str(path), "--json"]).output)
    assert info["adapter_types"] == {algo: 3} and not info["report"]["unsupported"]
    # convert --to kohya keeps the type and every tensor (LyCORIS' own spelling reads back the same)
    out = tmp_path / "kohya.safetensors"
    result = runner.invoke(cli, ["convert", str(path), str(out), "--to", "kohya"])
    assert result.exit_code == 0, result.output
    written = load_file(str(out))
    renamed = {k.replace("lycoris_", "lora_unet_", 1): v for k, v in state.items()}  # kohya's denoiser prefix
    assert set(written) == set(renamed)
    assert all(torch.equal(written[k], v.to(written[k].dtype)) for k, v in renamed.items())
    assert lorakit.load(out, strict=True).adapter_types() == {algo: 3}
    # convert --to peft refuses with a typed, one-line error
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(path), str(tmp_path / "peft.safetensors"), "--to", "peft"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "cannot express" in err and algo in err and "format='kohya'" in err
    assert not (tmp_path / "peft.safetensors").exists()
    # merge into a checkpoint: the same weights as fusing into the model
    ckpt = tmp_path / "base.safetensors"
    save_file({k: v.detach().clone() for k, v in base.state_dict().items()}, str(ckpt))
    merged_path = tmp_path / "merged.safetensors"
    result = runner.invoke(cli, ["merge", str(ckpt), f"{path}:0.7", "-o", str(merged_path)])
    assert result.exit_code == 0, result.output
    merged = load_file(str(merged_path))
    lora_07 = {layer.path: layer.weight for layer in lorakit.load(merged_path.with_name(path.name))}
    for k, v in base.state_dict().items():
        module = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and module in lora_07:  # merge's arithmetic: fp32 W + s·ΔW(W), rounded once
            assert torch.equal(merged[k], (v.float() + 0.7 * lora_07[module].delta_from_base(v)).to(v.dtype)), k
        else:
            assert torch.equal(merged[k], v), k
    with lorakit.apply(model, [(path, 0.7)], strict=True):  # fuse: the same up to fuse's fused multiply-add
        for k, v in model.state_dict().items():
            torch.testing.assert_close(merged[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert not torch.equal(merged["fc1.weight"], base.fc1.weight)
