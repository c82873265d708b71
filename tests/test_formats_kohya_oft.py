"""kohya sd-scripts' own OFT files (``networks/oft.py``): keys ``oft_unet_<module>.oft_blocks [num_blocks, b, b]`` and
``oft_unet_<module>.alpha`` (the constraint), metadata ``ss_network_module=networks.oft``. Files are built to that
layout and checked against a reference written here from sd-scripts' formula (``OFTModule.get_weight``/``forward``):
kohya always rescales ``Q`` by ``(min(|Q|, alpha·out) + 1e-8) / (|Q| + 1e-8)``, so unlike LyCORIS ``alpha = 0`` means
no rotation, not an unconstrained one."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.adapters import DiagOFT, KohyaOFT
from lorakit.cli import cli
from lorakit.formats.reader import parse_state_dict

ATOL, RTOL = 1e-5, 1e-4
META = {"ss_network_module": "networks.oft", "ss_network_dim": "8", "ss_network_alpha": "0.001"}


from _oft_util import _inputs, _Net  # noqa: E402  (shared with the other OFT/IA3 tests)


def kohya_weight(w: torch.Tensor, blocks: torch.Tensor, alpha: float, multiplier: float = 1.0) -> torch.Tensor:
    """sd-scripts ``OFTModule``: the weight its forward runs with (reference, written from kohya's formula)."""
    num, b, _ = blocks.shape
    constraint = alpha * w.shape[0]
    q = blocks - blocks.transpose(1, 2)
    norm_q = torch.norm(q.flatten())
    new_norm_q = torch.clamp(norm_q, max=constraint)
    q = q * ((new_norm_q + 1e-8) / (norm_q + 1e-8))
    eye = torch.eye(b).unsqueeze(0).repeat(num, 1, 1)
    r = torch.matmul(eye + q, (eye - q).float().inverse())
    r = multiplier * (r - eye) + eye
    rw = torch.einsum("k n m, k n ... -> k m ...", r, w.float().reshape(num, b, *w.shape[1:]))
    return rw.reshape(w.shape)


def _kohya_state(model: nn.Module, alpha: float, *, num_blocks: int = 4, prefix: str = "oft_unet_", seed: int = 5):
    """A state dict in sd-scripts' OFT layout (what ``OFTNetwork.state_dict()`` saves) with trained values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("fc1", "conv", "fc2"):
        rows = getattr(model, name).weight.shape[0]
        out[f"{prefix}{name}.oft_blocks"] = 0.2 * torch.randn(num_blocks, rows // num_blocks, rows // num_blocks, generator=g)
        out[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
    return out


# alpha 1e-3: |Q| ~ 3 > 1e-3·out, the bound binds; alpha 1: it does not (kohya == LyCORIS then)
CASES = {"binding": 1e-3, "loose": 1.0}


@pytest.mark.parametrize("case", list(CASES))
def test_kohya_oft_file_applies_per_kohya_math(case, tmp_path):
    alpha = CASES[case]
    base = _Net()
    x, img = _inputs()
    state = _kohya_state(base, alpha)
    path = tmp_path / "oft.safetensors"
    save_file(state, str(path), metadata=META)
    lora = lorakit.load(path, strict=True)
    assert lora.report.ok and set(lora.report.consumed) == set(state)
    assert lora.format == "kohya" and lora.adapter_types() == {"oft_kohya": 3}
    assert all(isinstance(layer.weight, KohyaOFT) and layer.component == "denoiser" for layer in lora)

    with torch.no_grad():
        base_out = base(x, img)
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name in ("fc1", "conv", "fc2"):
            m = getattr(ref, name)
            m.weight.copy_(kohya_weight(m.weight, state[f"oft_unet_{name}.oft_blocks"], alpha))
        ref_out = ref(x, img)
    model = copy.deepcopy(base)
    for mode in ("fuse", "hook"):
        with lorakit.apply(model, [(path, 1.0)], mode=mode, strict=True), torch.no_grad():
            if mode == "fuse":
                for name in ("fc1", "conv", "fc2"):
                    torch.testing.assert_close(getattr(model, name).weight, getattr(ref, name).weight,
                                               rtol=1e-5, atol=1e-6)
            out = model(x, img)
        for a, b, c in zip(out, ref_out, base_out):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
            assert (a - c).abs().max() > 2e-3  # the adapter changed the output (a binding bound keeps it small)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x, img), base_out))  # remove is exact
    # strength is kohya's multiplier: I + s(R − I)
    for s in (0.5, -0.3):
        with lorakit.apply(model, [(path, s)], strict=True):
            w = base.fc1.weight
            torch.testing.assert_close(model.fc1.weight, kohya_weight(w, state["oft_unet_fc1.oft_blocks"], alpha, s),
                                       rtol=1e-5, atol=1e-6)


def test_kohya_alpha_zero_is_no_rotation_and_lycoris_reading_differs():
    """The same tensors read as LyCORIS diag-OFT (``lora_unet_``, no kohya metadata) rotate fully when alpha = 0;
    kohya's formula scales Q to ~1e-8: no rotation. The prefix or the metadata selects kohya's math."""
    base = _Net()
    kohya = _kohya_state(base, 0.0)
    lyco = {k.replace("oft_unet_", "lora_unet_"): v for k, v in kohya.items()}
    by_prefix, by_meta = lorakit.load(kohya), parse_state_dict(lyco, META)
    plain = lorakit.load(lyco)
    assert by_prefix.adapter_types() == by_meta.adapter_types() == {"oft_kohya": 3}
    assert plain.adapter_types() == {"oft": 3} and isinstance(plain.layers["lora_unet_fc1"].weight, DiagOFT)
    w = base.fc1.weight.detach()
    kohya_delta = by_prefix.layers["oft_unet_fc1"].weight.delta_from_base(w)
    assert float(kohya_delta.abs().max()) < 1e-6
    torch.testing.assert_close(w + kohya_delta, kohya_weight(w, kohya["oft_unet_fc1.oft_blocks"], 0.0), rtol=0, atol=1e-6)
    assert float(plain.layers["lora_unet_fc1"].weight.delta_from_base(w).abs().max()) > 1e-2


def test_kohya_oft_inspect_convert_merge(tmp_path):
    base = _Net()
    state = _kohya_state(base, 1e-3)
    path = tmp_path / "oft.safetensors"
    save_file(state, str(path), metadata=META)
    runner = CliRunner()
    result = runner.invoke(cli, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["adapter_types"] == {"oft_kohya": 3} and info["format"] == "kohya"
    # convert --to kohya keeps sd-scripts' own layout (oft_unet_ names, oft_blocks, alpha) and reads back the same
    out = tmp_path / "k.safetensors"
    result = runner.invoke(cli, ["convert", str(path), str(out), "--to", "kohya"])
    assert result.exit_code == 0, result.output
    written = load_file(str(out))
    assert set(written) == set(state) and all(torch.equal(written[k], v) for k, v in state.items())
    with safe_open(str(out), "pt") as fh:
        assert fh.metadata()["ss_network_module"] == "networks.oft"
    assert lorakit.load(out, strict=True).adapter_types() == {"oft_kohya": 3}
    # merge into a checkpoint: fp32 W + s·ΔW(W) per kohya's formula, rounded once
    ckpt = tmp_path / "base.safetensors"
    save_file({k: v.detach().clone() for k, v in base.state_dict().items()}, str(ckpt))
    merged_path = tmp_path / "merged.safetensors"
    result = runner.invoke(cli, ["merge", str(ckpt), f"{path}:1.0", "-o", str(merged_path)])
    assert result.exit_code == 0, result.output
    merged = load_file(str(merged_path))
    for name in ("fc1", "conv", "fc2"):
        w = getattr(base, name).weight.detach()
        torch.testing.assert_close(merged[f"{name}.weight"], kohya_weight(w, state[f"oft_unet_{name}.oft_blocks"], 1e-3),
                                   rtol=1e-5, atol=1e-6)
        assert not torch.equal(merged[f"{name}.weight"], w)
        assert torch.equal(merged[f"{name}.bias"], getattr(base, name).bias)
