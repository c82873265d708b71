"""The format layer through the public API: every key accounted for (real published key lists), exact
round trips, typed errors for broken files, safe pickle loading, hub references from an offline cache."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit import errors

REALKEYS = sorted(glob.glob(str(Path(__file__).parent / "fixtures" / "realkeys" / "*.json")))


def _shape_for(key: str, shape):
    if shape is not None:
        return shape
    if key.endswith("alpha"):
        return []
    return [4, 16] if ("down" in key or "lora_A" in key) else [16, 4]


@pytest.mark.parametrize("fixture", REALKEYS, ids=lambda p: Path(p).stem[:40])
def test_every_key_of_real_files_is_accounted_for(fixture):
    data = json.loads(Path(fixture).read_text())
    state = {k: torch.randn(_shape_for(k, v)) * 0.01 for k, v in data["keys"].items()}
    lora = lorakit.load(state)
    report = lora.report
    buckets = [set(report.consumed), set(report.unsupported), set(report.invalid), set(report.unknown),
               set(report.base_weights)]
    accounted = set().union(*buckets)
    assert accounted == set(state), set(state) - accounted
    # each key in exactly one bucket
    assert sum(len(b) for b in buckets) == len(state)
    # real files are valid: nothing invalid or unknown; what is not loaded is a recognised, named type
    assert not report.invalid and not report.unknown, report.problems()
    assert len(report.consumed) >= 0.85 * len(state)
    for reason in report.unsupported.values():
        assert "not supported" in reason


def _kohya_file():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": r(4, 8, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": r(16, 4, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": r(2, 8, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": r(8, 2, 1, 1),
        "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(1.0),
        "lora_unet_down_blocks_0_resnets_0_conv1.dora_scale": r(8, 1, 1, 1).abs(),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": r(16, 2),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_b": r(2, 8),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w2_a": r(16, 2),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w2_b": r(2, 8),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc2.lokr_w1": r(2, 2),
        "lora_te_text_model_encoder_layers_0_mlp_fc2.lokr_w2_a": r(4, 2),
        "lora_te_text_model_encoder_layers_0_mlp_fc2.lokr_w2_b": r(2, 8),
        "lora_te_text_model_encoder_layers_0_mlp_fc2.alpha": torch.tensor(2.0),
        "lora_unet_conv_in.diff": r(8, 4, 3, 3),
        "lora_unet_conv_in.diff_b": r(8),
        "lora_unet_blocks_0.diff_m": r(1, 6, 8),
        "lora_unet_norm_out.w_norm": r(8),
        "lora_unet_norm_out.b_norm": r(8),
    }


def _same(a: lorakit.LoRA, b: lorakit.LoRA) -> None:
    assert len(a) == len(b)
    by_path = {(ly.component, ly.path.replace(".", "_")): ly for ly in b}
    for layer in a:
        other = by_path[(layer.component, layer.path.replace(".", "_"))]
        assert layer.kinds == other.kinds
        if layer.weight is not None:
            assert layer.weight.scale == other.weight.scale
            for field, t in layer.weight.tensors().items():
                assert torch.equal(t, other.weight.tensors()[field]), (layer.name, field)
        for x, y in zip(layer.tensors(), other.tensors()):
            assert torch.equal(x.flatten(), y.flatten())


def test_kohya_round_trip_is_exact(tmp_path):
    lora = lorakit.load(_kohya_file(), strict=True)
    assert lora.adapter_types() == {"diff_b": 1, "diff_m": 1, "b_norm": 1, "dora": 1, "full": 1, "loha": 1,
                                    "lokr": 1, "lora": 2, "norm": 1}
    out = lorakit.save(lora, tmp_path / "k.safetensors", format="kohya")
    again = lorakit.load(out, strict=True)
    _same(lora, again)
    # and the math survives: identical deltas
    for layer in lora:
        other = again.layers[layer.name] if layer.name in again.layers else None
        if other is not None and layer.weight is not None and layer.dora is None:
            assert torch.equal(layer.delta_weight(), other.delta_weight())


def test_peft_round_trip_is_exact(tmp_path):
    state = {
        "unet.down.0.to_q.lora_A.weight": torch.randn(4, 8),
        "unet.down.0.to_q.lora_B.weight": torch.randn(16, 4),
        "unet.down.0.to_k.lora_A.weight": torch.randn(2, 8),
        "unet.down.0.to_k.lora_B.weight": torch.randn(16, 2),
        "unet.down.0.to_k.lora_B.bias": torch.randn(16),
        "text_encoder.layers.0.q_proj.lora_A.weight": torch.randn(4, 8),
        "text_encoder.layers.0.q_proj.lora_B.weight": torch.randn(8, 4),
        "text_encoder.layers.0.q_proj.lora_magnitude_vector": torch.rand(8) + 0.5,
    }
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"down.0.to_k": 1},
                                                 "text_encoder.r": 4, "text_encoder.lora_alpha": 4})}
    src = tmp_path / "p.safetensors"
    save_file(state, str(src), metadata=meta)
    lora = lorakit.load(src, strict=True)
    scales = {ly.path: ly.weight.scale for ly in lora}
    assert scales == {"down.0.to_q": 2.0, "down.0.to_k": 0.5, "layers.0.q_proj": 1.0}
    out = lorakit.save(lora, tmp_path / "p2.safetensors", format="peft")
    again = lorakit.load(out, strict=True)
    _same(lora, again)
    # a kohya round trip of the same LoRA keeps every delta identical too
    via_kohya = lorakit.load(lorakit.save(lora, tmp_path / "k.safetensors", format="kohya"))
    for layer in lora:
        other = next(o for o in via_kohya if o.path.replace(".", "_") == layer.path.replace(".", "_"))
        base = torch.randn(layer.weight.delta_weight().shape)  # DoRA deltas depend on the base weight
        assert torch.equal(layer.delta_weight(base), other.delta_weight(base))
        assert torch.equal(layer.delta_bias() if layer.delta_bias() is not None else torch.zeros(1),
                           other.delta_bias() if other.delta_bias() is not None else torch.zeros(1))


def test_peft_writer_refuses_what_it_cannot_express(tmp_path):
    lora = lorakit.load(_kohya_file())
    with pytest.raises(errors.UnsupportedAdapterError, match="format='kohya'"):
        lorakit.save(lora, tmp_path / "x.safetensors", format="peft", model=torch.nn.Linear(2, 2))
    assert not (tmp_path / "x.safetensors").exists()


def test_save_refuses_to_overwrite_input(tmp_path):
    src = tmp_path / "in.safetensors"
    save_file(_kohya_file(), str(src))
    before = src.read_bytes()
    lora = lorakit.load(src)
    with pytest.raises(errors.OverwriteError):
        lorakit.save(lora, src, format="kohya")
    assert src.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["in.safetensors"]  # no temp file left


@pytest.mark.parametrize(
    "broken, error",
    [
        ({"a.lora_down.weight": torch.randn(2, 4)}, errors.IncompleteAdapterError),
        ({"a.lora_down.weight": torch.randn(2, 4), "a.lora_up.weight": torch.randn(4, 3)}, errors.RankMismatchError),
        ({"a.lora_down.weight": torch.full((2, 4), float("nan")), "a.lora_up.weight": torch.randn(4, 2)}, errors.NonFiniteError),
    ],
    ids=["incomplete", "rank-mismatch", "nan"],
)
def test_broken_layers_are_typed_errors_or_reported(broken, error):
    good = {"b.lora_down.weight": torch.randn(2, 4), "b.lora_up.weight": torch.randn(4, 2)}
    with pytest.raises(error, match=r"\ba\b"):
        lorakit.load({**good, **broken}, strict=True)
    lora = lorakit.load({**good, **broken})
    assert list(lora.layers) == ["b"]
    assert set(lora.report.invalid) == set(broken)


def test_unknown_and_unsupported_keys_are_reported_not_dropped():
    state = {
        "b.lora_down.weight": torch.randn(2, 4), "b.lora_up.weight": torch.randn(4, 2),
        "c.set_weight": torch.randn(2, 2), "c.alpha": torch.tensor(1.0),  # ComfyUI set_weight
        "d.q_layer.weight": torch.randn(4, 2), "d.p_layer.weight": torch.randn(2, 4),  # T-LoRA
        "random_tensor": torch.randn(3),
    }
    lora = lorakit.load(state)
    assert set(lora.report.unsupported) == {"c.set_weight", "c.alpha", "d.q_layer.weight", "d.p_layer.weight"}
    assert "set_weight" in lora.report.unsupported["c.set_weight"]
    assert "T-LoRA" in lora.report.unsupported["d.q_layer.weight"]
    assert lora.report.unknown == ["random_tensor"]
    assert "keys not loaded" in repr(lora)


def test_nothing_recognised_is_unknown_format():
    with pytest.raises(errors.UnknownFormatError, match="model.weight"):
        lorakit.load({"model.weight": torch.randn(3, 3)})


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"a.lora_down.weight": torch.randn(2, 2), "payload": Evil()}, path)
    with pytest.raises(errors.UnsafeFileError, match="evil.ckpt"):
        lorakit.load(path)
    assert not marker.exists()


def test_plain_pickle_loads_with_weights_only(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"a.lora_down.weight": torch.randn(2, 4), "a.lora_up.weight": torch.randn(4, 2), "a.alpha": 1.0}, path)
    lora = lorakit.load(path)
    assert lora.layers["a"].weight.scale == 0.5


def test_hub_reference_resolves_from_offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--someorg--style-lora" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    save_file(_kohya_file(), str(snap / "style.safetensors"))
    (cache / "models--someorg--style-lora" / "refs").mkdir()
    (cache / "models--someorg--style-lora" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        lora = lorakit.load("someorg/style-lora/style.safetensors")
        assert len(lora) == 7
        with pytest.raises(errors.SourceNotFoundError, match="missing.safetensors"):
            lorakit.load("someorg/style-lora/missing.safetensors")
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(errors.SourceNotFoundError, match="nope.safetensors"):
        lorakit.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(errors.FormatError, match="bad.safetensors"):
        lorakit.load(bad)
