"""lorakit.train on the tiny SD1 pipeline (32 px, synthetic coloured shapes): the loss falls, an ``--init`` file
continues exactly (step 0 == lorakit.apply of the file, unselected layers byte-identical), resume equals an
uninterrupted run tensor for tensor, and bad inputs fail before anything is written."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from _train_util import INIT_MODULES, make_init, make_shapes
from lorakit.errors import DatasetError, MatchError, RankMismatchError, UnsupportedAdapterError
from lorakit.model import Layer, LoRA
from lorakit.train import TrainConfig, train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the tiny models are faster on one thread, and CI machines are shared
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    return lorakit.tiny_pipeline()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"))


def _unet_out(pipe, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    e = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=e).sample


def _distance_to_data(pipe, data: Path, n: int = 4) -> list[float]:
    """Mean squared distance between the latents generated for each training caption and that image's latents."""
    from lorakit.train.data import load_samples, to_pixels

    samples = load_samples(data)[:n]
    with torch.no_grad():
        pixels = torch.stack([to_pixels(s.open(), 32) for s in samples])
        target = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        out = []
        for i, s in enumerate(samples):
            g = torch.Generator().manual_seed(i)
            lat = pipe(s.caption, num_inference_steps=8, height=32, width=32, generator=g, output_type="latent",
                       guidance_scale=1.0).images
            out.append(float((lat - target[i : i + 1]).pow(2).mean()))
    return out


def test_training_lowers_validation_loss_and_writes_a_working_lora(pipe, data, tmp_path):
    base = _unet_out(pipe)
    base_distance = _distance_to_data(pipe, data)
    grads = {p: p.requires_grad for p in pipe.unet.parameters()}
    out = tmp_path / "new.safetensors"
    config = TrainConfig(steps=40, lr=2e-3, resolution=32, batch_size=2, rank=4, validation_split=0.25,
                         output=out, cache_latents=True, lr_scheduler="cosine", warmup=4, seed=1)
    result = train(pipe, data, config)
    assert result.steps == 40 and len(result.loss) == 40 and all(math.isfinite(x) for x in result.loss)
    (s0, first), (s1, last) = result.validation_loss[0], result.validation_loss[-1]
    assert (s0, s1) == (0, 40)
    assert last < first * 0.97, result.validation_loss
    assert result.parameters["trainable"] > 0 and result.parameters["frozen_lora"] == 0
    # the pipeline is left as it was: no hooks, same weights, same grad flags
    assert torch.equal(_unet_out(pipe), base)
    assert {p: p.requires_grad for p in pipe.unet.parameters()} == grads
    lora = lorakit.load(out)
    assert lora.format == "kohya" and len(lora) == len(result.lora) > 0
    assert set(lora.ranks().values()) == {4}
    with lorakit.apply(pipe, out):
        changed = _unet_out(pipe)
        distance = _distance_to_data(pipe, data)
    assert not torch.allclose(changed, base, atol=1e-6)  # the LoRA does something
    # generations move toward the training images (in latent space: the tiny VAE is random)
    assert sum(distance) < 0.98 * sum(base_distance) and sum(d < b for d, b in zip(distance, base_distance)) >= 3


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_init_with_train_modules_keeps_other_layers_byte_identical(pipe, data, tmp_path):
    init = make_init(pipe, tmp_path / "init.safetensors")
    out = tmp_path / "cont.safetensors"
    result = train(pipe, data, TrainConfig(init=init, train_modules=("attn2",), steps=4, lr=1e-2, resolution=32,
                                           output=out, seed=0))
    assert result.start_difference is not None and result.start_difference < 1e-5
    before, after = load_file(init), load_file(out)
    assert list(before) == list(after)  # same keys, same order
    selected = [k for k in before if "attn2" in k and "alpha" not in k]
    assert len(selected) == 8
    for key in before:
        same = before[key].dtype == after[key].dtype and torch.equal(_bytes(before[key]), _bytes(after[key]))
        if key in selected:
            assert before[key].dtype == after[key].dtype and not same, key  # trained, dtype kept
        else:
            assert same, key  # frozen layers and every alpha: bit for bit
    assert result.parameters["frozen_lora"] > 0
    # both lorakit and diffusers read the result
    assert len(lorakit.load(out)) == len(INIT_MODULES)
    fresh = lorakit.tiny_pipeline()
    fresh.load_lora_weights(str(out))
    assert not torch.allclose(_unet_out(fresh), _unet_out(lorakit.tiny_pipeline()), atol=1e-6)


def test_resume_equals_uninterrupted_run(pipe, data, tmp_path):
    common = dict(steps=6, lr=5e-3, resolution=32, batch_size=2, grad_accum=2, rank=2, seed=5,
                  lr_scheduler="cosine", warmup=2, targets=("attn2",))
    whole = train(pipe, data, TrainConfig(output=tmp_path / "whole.safetensors", **common))

    class Stop(Exception):
        pass

    def stop_at_3(step: int, loss: float) -> None:
        if step == 3:
            raise Stop

    state = tmp_path / "state"
    with pytest.raises(Stop):
        train(pipe, data, TrainConfig(output=tmp_path / "part.safetensors", save_every=3, state_dir=state, **common),
              callback=stop_at_3)
    assert (state / "state.pt").is_file() and (tmp_path / "part.safetensors").is_file()
    resumed = train(pipe, data, TrainConfig(output=tmp_path / "resumed.safetensors", resume=state, **common))
    assert resumed.loss == whole.loss
    a, b = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_up" in k)  # it trained


def test_bad_inputs_fail_before_anything_is_written(pipe, data, tmp_path):
    out = tmp_path / "never.safetensors"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    (broken / "a.txt").write_text("a caption")
    with pytest.warns(UserWarning, match="a.png"), pytest.raises(DatasetError, match="no usable training sample"):
        train(pipe, broken, TrainConfig(steps=1, resolution=32, output=out))
    with pytest.raises(MatchError, match="attn3.*close names.*attn"):
        train(pipe, data, TrainConfig(steps=1, resolution=32, output=out, targets=("attn3",)))
    init = make_init(pipe, tmp_path / "init.safetensors")
    with pytest.raises(MatchError, match="--train-modules pattern 'atn2'.*attn2"):
        train(pipe, data, TrainConfig(init=init, train_modules=("atn2",), steps=1, resolution=32, output=out))
    with pytest.raises(RankMismatchError, match="--rank 8 .* rank 4"):
        train(pipe, data, TrainConfig(init=init, rank=8, steps=1, resolution=32, output=out))
    loha = tmp_path / "loha.safetensors"
    path_ = INIT_MODULES[2]
    w = dict(pipe.unet.named_modules())[path_].weight
    weight = lorakit.adapters.LoHaWeights(torch.randn(w.shape[0], 2), torch.randn(2, w.shape[1]),
                                          torch.randn(w.shape[0], 2), torch.randn(2, w.shape[1]), alpha=2.0)
    layer = Layer(name="unet." + path_, component="denoiser", path=path_, weight=weight)
    lorakit.save(LoRA(layers={layer.name: layer}), loha, "kohya")
    with pytest.raises(UnsupportedAdapterError, match="cannot train loha.*freeze"):
        train(pipe, data, TrainConfig(init=loha, steps=1, resolution=32, output=out))
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())
    assert torch.equal(_unet_out(pipe), _unet_out(lorakit.tiny_pipeline()))  # the pipeline is untouched


def test_metadata_jsonl_and_a_corrupt_sample_warns_once(tmp_path):
    from lorakit.train.data import load_samples

    folder = make_shapes(tmp_path / "d", n=3)
    (folder / "bad.png").write_bytes(b"\x89PNG broken")
    lines = [f'{{"file_name": "{i:02d}.png", "text": "shape {i}"}}' for i in range(3)]
    lines.append('{"file_name": "bad.png", "text": "broken"}')
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning) as record:
        samples = load_samples(folder)
    assert [s.caption for s in samples] == ["shape 0", "shape 1", "shape 2"]
    assert len(record) == 1 and "bad.png" in str(record[0].message)


def test_mismatch_report_and_strict(pipe, data, tmp_path):
    init = make_init(pipe, tmp_path / "init.safetensors")
    tensors = load_file(init)
    # a layer for a module the tiny UNet does not have, and one whose shape does not fit
    tensors["lora_unet_up_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 64, 1, 1)
    tensors["lora_unet_up_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.zeros(64, 4, 1, 1)
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors[f"{k}.lora_down.weight"] = torch.zeros(4, 48, dtype=torch.float16)
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    lines: list[str] = []
    with pytest.warns(UserWarning, match="2 layers do not fit"):
        result = train(pipe, data, TrainConfig(init=bad, steps=1, resolution=32, output=tmp_path / "o.safetensors"),
                       log=lines.append)
    assert any("up_blocks_7" in m and "unmatched" in m for m in result.mismatches)
    assert any("attn1_to_q" in m and "shape mismatch" in m for m in result.mismatches)
    assert sum(line.startswith("mismatch:") for line in lines) == 2
    out = load_file(tmp_path / "o.safetensors")
    assert torch.equal(out[f"{k}.lora_down.weight"], tensors[f"{k}.lora_down.weight"])  # kept as it was, not dropped
    with pytest.raises(lorakit.errors.ShapeMismatchError, match="strict"):
        train(pipe, data, TrainConfig(init=bad, steps=1, resolution=32, strict=True, output=tmp_path / "s.safetensors"))
    assert not (tmp_path / "s.safetensors").exists()


def test_a_run_killed_mid_save_leaves_the_previous_checkpoint(pipe, data, tmp_path, monkeypatch):
    state = tmp_path / "state"
    saved: dict[str, bytes] = {}
    real_save = torch.save

    def dying_save(obj, fh, *args, **kwargs):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed while writing

    def on_step(step: int, loss: float) -> None:
        if step == 2:
            saved["state"] = (state / "state.pt").read_bytes()
            monkeypatch.setattr(torch, "save", dying_save)

    with pytest.raises(KeyboardInterrupt):
        train(pipe, data, TrainConfig(steps=6, save_every=2, state_dir=state, resolution=32, rank=2, targets=("attn2",),
                                      output=tmp_path / "o.safetensors"), callback=on_step)
    monkeypatch.setattr(torch, "save", real_save)
    assert (state / "state.pt").read_bytes() == saved["state"]
    assert sorted(p.name for p in state.iterdir()) == ["state.pt"]  # no temp file left behind
    assert torch.load(state / "state.pt", weights_only=True)["step"] == 2


def test_webdataset_shards(tmp_path):
    import tarfile

    from lorakit.train.data import load_samples

    folder = make_shapes(tmp_path / "d", n=3)
    shard = tmp_path / "shards" / "000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            tar.add(folder / f"{i:02d}.png", arcname=f"s{i}.png")
            tar.add(folder / f"{i:02d}.txt", arcname=f"s{i}.txt")
        tar.add(folder / "00.txt", arcname="lonely.txt")  # a caption without an image: one warning
    with pytest.warns(UserWarning, match="lonely"):
        samples = load_samples(shard.parent)
    assert [s.caption for s in samples] == ["a red circle", "a red square", "a blue circle"]
    assert samples[0].open().size == (40, 48)


def test_fp16_uses_loss_scaling_and_resumes_exactly(pipe, data, tmp_path):
    """fp16 autocast trains with a dynamic loss scale (as Accelerate does); its state is checkpointed, so a resumed
    run still equals an uninterrupted one."""
    common = dict(steps=4, lr=5e-3, resolution=32, batch_size=2, rank=2, seed=3, targets=("attn2",),
                  mixed_precision="fp16")
    whole = train(pipe, data, TrainConfig(output=tmp_path / "whole.safetensors", **common))
    assert all(math.isfinite(x) for x in whole.loss)

    class Stop(Exception):
        pass

    def stop_at_2(step: int, loss: float) -> None:
        if step == 2:
            raise Stop

    state = tmp_path / "state"
    with pytest.raises(Stop):
        train(pipe, data, TrainConfig(output=tmp_path / "part.safetensors", save_every=2, state_dir=state, **common),
              callback=stop_at_2)
    saved = torch.load(state / "state.pt", weights_only=True)
    assert saved["grad_scaler"]["scale"] > 1.0  # a real loss scale, not 1
    resumed = train(pipe, data, TrainConfig(output=tmp_path / "resumed.safetensors", resume=state, **common))
    assert resumed.loss == whole.loss
    a, b = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_up" in k)  # it trained
