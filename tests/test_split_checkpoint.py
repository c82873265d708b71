"""A model checkpoint with LoRA layers inside (Cosmos Predict2 post-training ``iter_*.pt``: PEFT-injected
``x.base_layer.weight`` + ``x.lora_A.default.weight`` next to the model's other weights): ``load`` counts the model
weights as ``base_weights`` (not unknown), ``apply`` takes the LoRA part and equals PEFT's own forward, and
``lorakit split`` writes the LoRA (alpha from --alpha, a config, or alpha = rank) and the loadable base.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import lorakit
from lorakit.cli import cli as main
from lorakit.errors import FormatError, OverwriteError
from lorakit.io import read_tensors

peft = pytest.importorskip("peft")

RANK = 2


class Block(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.self_attn = nn.ModuleDict({"q_proj": nn.Linear(dim, dim), "k_proj": nn.Linear(dim, dim)})
        self.mlp = nn.ModuleDict({"layer1": nn.Linear(dim, 2 * dim), "layer2": nn.Linear(2 * dim, dim)})
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = x + self.self_attn["q_proj"](x) * torch.sigmoid(self.self_attn["k_proj"](x))
        return x + self.mlp["layer2"](torch.relu(self.mlp["layer1"](self.norm(x))))


class Net(nn.Module):
    """Cosmos-like module names: net.blocks.N.self_attn.q_proj, net.blocks.N.mlp.layer1."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Module()
        self.net.blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        for block in self.net.blocks:
            x = block(x)
        return x


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    base = Net()
    trained = peft.inject_adapter_in_model(
        peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj", "k_proj"]), copy.deepcopy(base))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained LoRA: B is not zero
    return base, trained


@pytest.fixture
def ckpt(models, tmp_path):
    path = tmp_path / "iter_000002000.pt"
    torch.save({"model": models[1].state_dict(), "iteration": 2000}, path)
    return path


def test_load_counts_the_model_weights_as_base_weights(ckpt, models):
    lora = lorakit.load(ckpt)
    rep = lora.report
    assert len(lora) == 4 and rep.ok and rep.unknown == []
    base_keys = [k for k in models[1].state_dict() if "lora_" not in k]
    assert sorted(rep.base_weights) == sorted(base_keys)
    assert rep.base_parameters == sum(models[1].state_dict()[k].numel() for k in base_keys)
    assert lorakit.load(ckpt, strict=True).report.base_weights  # expected keys: strict does not refuse them


@pytest.mark.parametrize("mode", ["fuse", "hook"])
def test_apply_takes_the_lora_part_and_equals_peft(ckpt, models, mode):
    base, trained = models
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    model = copy.deepcopy(base)
    with torch.no_grad():
        ref, before = trained(x), model(x)
        patch = lorakit.apply(model, ckpt, mode=mode, strict=True)
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - before).abs().max() > 1e-2  # the LoRA changed the output
    patch.remove()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))


def test_split_writes_lora_and_a_loadable_base(ckpt, models, tmp_path):
    base, trained = models
    lora_out, base_out = tmp_path / "lora.safetensors", tmp_path / "base.safetensors"
    res = CliRunner().invoke(main, ["split", str(ckpt), "--lora-out", str(lora_out), "--base-out", str(base_out),
                                    "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)["summary"]
    assert summary["lora_layers"] == 4 and summary["rank"] == RANK and summary["alpha"] == RANK
    assert summary["alpha_source"].startswith("alpha = rank")
    assert 0 < summary["lora_ratio"] < 0.5
    tensors, _ = read_tensors(base_out)
    plain = copy.deepcopy(base)
    plain.load_state_dict(tensors, strict=True)  # the base part is the model's own state dict
    assert all(torch.equal(tensors[k], v) for k, v in base.state_dict().items())
    lora = lorakit.load(lora_out)
    assert len(lora) == 4 and lora.report.ok
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in read_tensors(lora_out)[0])
    x = torch.randn(2, 16)
    model = copy.deepcopy(base)
    with torch.no_grad():
        lorakit.apply(model, lora, strict=True)
        torch.testing.assert_close(model(x), trained(x), rtol=1e-5, atol=1e-5)


def test_split_alpha_from_argument_or_config_scales_the_delta(ckpt, models, tmp_path):
    base, _ = models
    x = torch.randn(2, 16)

    def delta(path):
        model = copy.deepcopy(base)
        with torch.no_grad():
            before = model(x)
            lorakit.apply(model, path, strict=True)
            return model(x) - before

    one, two, cfg = tmp_path / "a1.safetensors", tmp_path / "a2.safetensors", tmp_path / "a3.safetensors"
    lorakit.split(ckpt, one)
    lorakit.split(ckpt, two, alpha=2 * RANK)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": {"config": {"lora_rank": RANK, "lora_alpha": 2 * RANK}}}))
    res = lorakit.split(ckpt, cfg, config=config)
    assert res.summary.alpha == 2 * RANK and str(config) in res.summary.alpha_source
    # one linear layer: doubling alpha doubles the first layer's delta exactly; the whole net only moves further
    w1 = lorakit.load(one).layers["net.blocks.0.self_attn.q_proj"].delta_weight()
    w2 = lorakit.load(two).layers["net.blocks.0.self_attn.q_proj"].delta_weight()
    torch.testing.assert_close(w2, 2 * w1)
    torch.testing.assert_close(delta(cfg), delta(two))
    config.write_text(json.dumps({"lora_rank": 8}))
    with pytest.raises(FormatError, match="does not match"):
        lorakit.split(ckpt, tmp_path / "bad.safetensors", config=config)
    assert not (tmp_path / "bad.safetensors").exists()


def test_split_refuses_a_plain_lora_and_its_own_input(ckpt, tmp_path):
    plain = tmp_path / "plain.safetensors"
    lorakit.split(ckpt, plain)
    with pytest.raises(FormatError, match="not a checkpoint with a LoRA inside"):
        lorakit.split(plain, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(OverwriteError):
        lorakit.split(ckpt, ckpt)


def test_inspect_prints_cosmos_parameter_statistics(ckpt):
    res = CliRunner().invoke(main, ["inspect", str(ckpt)])
    assert res.exit_code == 0, res.output
    assert "LoRA parameter ratio" in res.output and "lorakit split" in res.output
    assert "keys not loaded" not in res.output
