"""GGUF through diffusers' own loader: a tiny FLUX transformer's weights written with the ``gguf`` package to a .gguf
file (2-D weights Q8_0 where the row length allows, the rest F32), loaded offline by
``FluxTransformer2DModel.from_single_file(path, config=<local folder>, quantization_config=GGUFQuantizationConfig(...))``
(diffusers-format keys, so no key conversion and no hub config), then a diffusers-format LoRA file on it:

* hook mode: the output equals a float model holding the dequantized weights with ``s·ΔW`` added (fp32), strengths
  change live, the GGUF blocks are untouched;
* fuse mode: each quantized layer's new blocks are ``gguf.quants.quantize(deq(W) + s·ΔW)`` byte for byte, the
  report's ``requant_error`` is that reference's error; the F32 layer in the same LoRA is fused as a plain weight;
* ``remove()`` leaves every GGUF block and float weight bit-identical.
Needs diffusers and gguf (skipped otherwise). Every check also asserts that the LoRA changed the output.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from test_quant import _has

pytestmark = pytest.mark.skipif(not (_has("gguf") and _has("diffusers")), reason="needs gguf and diffusers")

CONFIG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=32,
              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))
# diffusers module -> quantized in the file? x_embedder (in=4) cannot be Q8_0 (blocks of 32): F32, a plain Linear
TARGETS = {
    "transformer_blocks.0.attn.to_q": True,
    "transformer_blocks.0.attn.add_k_proj": True,
    "single_transformer_blocks.0.proj_out": True,
    "x_embedder": False,
}
RANK, STRENGTH = 4, 0.8


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import gguf
    from diffusers import FluxTransformer2DModel

    d = tmp_path_factory.mktemp("gguf_flux")
    torch.manual_seed(0)
    ref = FluxTransformer2DModel(**CONFIG).eval()
    ref.save_config(str(d))  # the local config folder from_single_file reads (no hub)
    qt = gguf.GGMLQuantizationType.Q8_0
    writer = gguf.GGUFWriter(str(d / "tiny.gguf.tmp"), "flux")
    for key, value in ref.state_dict().items():
        a = value.detach().float().numpy()
        if key.endswith(".weight") and value.dim() == 2 and value.shape[1] % 32 == 0:
            packed = gguf.quants.quantize(a, qt)
            writer.add_tensor(key, packed, raw_shape=packed.shape, raw_dtype=qt)
        else:
            writer.add_tensor(key, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (d / "tiny.gguf.tmp").rename(d / "tiny.gguf")
    g = torch.Generator().manual_seed(1)
    state = {}
    for name in TARGETS:
        lin = ref.get_submodule(name)
        state[f"transformer.{name}.lora_A.weight"] = 0.3 * torch.randn(RANK, lin.in_features, generator=g)
        state[f"transformer.{name}.lora_B.weight"] = 0.3 * torch.randn(lin.out_features, RANK, generator=g)
    save_file(state, str(d / "lora.safetensors"))
    return {"dir": d, "gguf": d / "tiny.gguf", "lora": d / "lora.safetensors", "state": state}


def _load(files: dict) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    return FluxTransformer2DModel.from_single_file(
        str(files["gguf"]), config=str(files["dir"]), local_files_only=True, torch_dtype=torch.float32,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32)).eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"hidden_states": torch.randn(1, 6, 4, generator=g),
            "encoder_hidden_states": torch.randn(1, 3, 32, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([0.5]),
            "img_ids": torch.zeros(6, 3), "txt_ids": torch.zeros(3, 3), "return_dict": False}


def _run(m: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return m(**_inputs())[0]


def _delta(files: dict, name: str) -> torch.Tensor:
    st = files["state"]
    return STRENGTH * st[f"transformer.{name}.lora_B.weight"] @ st[f"transformer.{name}.lora_A.weight"]


def _storage(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    from diffusers.quantizers.gguf.utils import GGUFParameter

    out = {}
    for k, v in m.state_dict().items():
        t = v.as_tensor() if isinstance(v, GGUFParameter) else v
        out[k] = t.detach().clone().reshape(-1).view(torch.uint8)
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _dense_reference(m: torch.nn.Module, files: dict) -> torch.Tensor:
    """A float FLUX with the GGUF model's dequantized weights and ``s·ΔW`` added in fp32."""
    from diffusers import FluxTransformer2DModel
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    dense = FluxTransformer2DModel(**CONFIG).eval()
    state = {k: dequantize_gguf_tensor(v).float() if isinstance(v, GGUFParameter) else v.float()
             for k, v in m.state_dict().items()}
    for name in TARGETS:
        state[f"{name}.weight"] = state[f"{name}.weight"] + _delta(files, name)
    dense.load_state_dict(state)
    return _run(dense)


def test_diffusers_gguf_loader_gives_gguf_layers(files: dict) -> None:
    from diffusers.quantizers.gguf.utils import GGUFLinear

    m = _load(files)
    for name, quantized in TARGETS.items():  # diffusers swaps in GGUFLinear only where the file holds GGUF blocks
        assert isinstance(m.get_submodule(name), GGUFLinear) == quantized, name
        assert (type(m.get_submodule(name).weight).__name__ == "GGUFParameter") == quantized, name


def test_hook_on_a_gguf_file_equals_the_dense_reference(files: dict) -> None:
    m = _load(files)
    raw0, base = _storage(m), _run(m)
    ref = _dense_reference(m, files)
    patch = lorakit.apply(m, [(str(files["lora"]), STRENGTH)], mode="hook", strict=True)
    assert {k for k in patch.report.quant} == {f"denoiser:{n}" for n, q in TARGETS.items() if q}
    assert all(q["scheme"] == "GGUFParameter Q8_0" for q in patch.report.quant.values())
    y = _run(m)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    assert float((y - base).norm() / base.norm()) > 0.05, "the LoRA changed nothing (vacuous)"
    assert _same(raw0, _storage(m)), "hook mode touched the GGUF blocks"
    patch.set_strengths([0.0])
    assert torch.equal(_run(m), base)
    patch.remove()
    assert _same(raw0, _storage(m)) and torch.equal(_run(m), base)


def test_fuse_on_a_gguf_file_requantizes_like_gguf_and_remove_is_exact(files: dict) -> None:
    import gguf
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    m = _load(files)
    raw0, base = _storage(m), _run(m)
    with lorakit.apply(m, [(str(files["lora"]), STRENGTH)], mode="hook"):
        hooked = _run(m)
    expected = {}
    for name, quantized in TARGETS.items():
        if not quantized:
            continue
        w = m.get_submodule(name).weight
        w0 = dequantize_gguf_tensor(w).float()
        d = _delta(files, name)
        packed = gguf.quants.quantize((w0 + d).numpy(), w.quant_type)
        expected[name] = (torch.from_numpy(packed).reshape(-1).view(torch.uint8), w0, d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = lorakit.apply(m, [(str(files["lora"]), STRENGTH)], mode="fuse", strict=True)
    for name, (blocks, w0, d) in expected.items():
        w = m.get_submodule(name).weight
        assert torch.equal(w.as_tensor().reshape(-1).view(torch.uint8), blocks), f"{name}: != gguf.quants.quantize"
        err = float((dequantize_gguf_tensor(w).float() - w0 - d).norm() / d.norm())
        assert patch.report.quant[f"denoiser:{name}"]["requant_error"] == pytest.approx(err, rel=1e-4)
        assert err < 0.1
    fused = _run(m)
    assert float((fused - base).norm() / base.norm()) > 0.05
    assert float((fused - hooked).norm() / (hooked - base).norm()) < 0.05  # hook == fuse up to the Q8_0 rounding
    patch.remove()
    assert _same(raw0, _storage(m)), "remove() after fuse is not bit-exact"
    assert torch.equal(_run(m), base)
