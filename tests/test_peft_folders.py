"""PEFT adapter folders (adapter_config.json beside adapter_model.safetensors), modules_to_save replacements, and
transformers Conv1D targets (GPT-2, fan_in_fan_out) under ``base_model.model.``: lorakit's result equals PEFT's."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import lorakit

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _gpt2():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16, num_labels=3, pad_token_id=0,
                     bos_token_id=1, eos_token_id=1)
    return GPT2ForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def gpt2_adapter(tmp_path_factory):
    """A tiny GPT-2 classifier, a PEFT LoRA on its Conv1D layers (r=4, lora_alpha=16, one alpha_pattern entry)
    with the ``score`` head in modules_to_save, PEFT's logits, and the folder PEFT saved."""
    from peft import LoraConfig, get_peft_model

    base = _gpt2()
    pristine = copy.deepcopy(base)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                     task_type="SEQ_CLS", alpha_pattern={"h.1.attn.c_proj": 4})
    model = get_peft_model(base, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("gpt2lora")
    model.save_pretrained(folder)
    ids = torch.randint(1, 100, (2, 8))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        plain = pristine(input_ids=ids).logits
    return pristine, folder, ids, want, plain


def test_peft_folder_reads_alpha_patterns_and_modules_to_save(gpt2_adapter):
    _, folder, *_ = gpt2_adapter
    lora = lorakit.load(folder / "adapter_model.safetensors")
    cfg = json.loads(lora.metadata["lora_adapter_metadata"])
    assert cfg["lora_alpha"] == 16 and cfg["fan_in_fan_out"] is True and "score" in cfg["modules_to_save"]
    alphas = {layer.path: layer.alpha for layer in lora if layer.rank}
    assert alphas["transformer.h.0.attn.c_attn"] == 16
    assert alphas["transformer.h.1.attn.c_proj"] == 4  # alpha_pattern wins for that module
    assert lora.layers["base_model.model.score"].kinds == ("modules_to_save",)
    assert lora.report.ok, lora.report.problems()  # score.weight is classified, not "unknown key"


@pytest.mark.parametrize("mode", ["fuse", "hook"])
def test_gpt2_conv1d_apply_equals_peft(gpt2_adapter, mode):
    pristine, folder, ids, want, plain = gpt2_adapter
    model = copy.deepcopy(pristine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer, the score head included, must apply without a warning
        patch = lorakit.apply(model, folder / "adapter_model.safetensors", mode=mode)
    assert patch.report.counts()["0:adapter_model.safetensors"]["matched"] == 7
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert not torch.allclose(plain, want, atol=1e-3)  # non-vacuity: the adapter changes the logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)  # fp32; sums in another order than PEFT's
    patch.remove()
    for (n, a), b in zip(model.state_dict().items(), pristine.state_dict().values()):
        assert torch.equal(a, b), n


def test_half_strength_modules_to_save_interpolates(gpt2_adapter):
    pristine, folder, *_ = gpt2_adapter
    saved = lorakit.load(folder / "adapter_model.safetensors").layers["base_model.model.score"].weight.saved_weight
    model = copy.deepcopy(pristine)
    with lorakit.apply(model, [(folder / "adapter_model.safetensors", 0.5)]):
        expected = pristine.score.weight + 0.5 * (saved - pristine.score.weight)
        torch.testing.assert_close(model.score.weight, expected, atol=1e-6, rtol=0)
    assert torch.equal(model.score.weight, pristine.score.weight)


def test_missing_config_warns_alpha_assumed(gpt2_adapter, tmp_path):
    _, folder, *_ = gpt2_adapter
    lone = tmp_path / "adapter_model.safetensors"
    lone.write_bytes((folder / "adapter_model.safetensors").read_bytes())
    with pytest.warns(UserWarning, match="alpha = r"):
        lora = lorakit.load(lone)
    assert all(layer.alpha is None for layer in lora if layer.rank)
    assert "base_model.model.score.weight" in lora.report.unknown  # no config: nothing says it is a saved module


def test_gpt2_keys_are_not_read_as_a_diffusers_transformer(gpt2_adapter):
    _, folder, *_ = gpt2_adapter
    lora = lorakit.load(folder / "adapter_model.safetensors")
    layer = lora.layers["base_model.model.transformer.h.0.attn.c_attn"]
    assert layer.component is None and layer.path == "transformer.h.0.attn.c_attn"


def test_peft_folder_rslora(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file({"base_model.model.fc.lora_A.weight": torch.randn(4, 8), "base_model.model.fc.lora_B.weight": torch.randn(6, 4)},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": True}))
    layer = next(iter(lorakit.load(tmp_path / "adapter_model.safetensors")))
    assert layer.weight.scale == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
