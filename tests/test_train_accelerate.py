"""lorakit.train goes through ``accelerate.Accelerator``: the run holds one (accumulation steps and mixed precision
from the config, the optimizer wrapped), gradients sync on the last micro-batch of a step only, two micro-batches of
one sample give the gradient of one batch of two, bf16 runs under ``accelerator.autocast()``, and a resumed run
still equals an uninterrupted one. fp16 on the CPU (which Accelerate would run in fp32) and a missing accelerate
package take lorakit's own loop. The two-process DDP side (one gradient all-reduce per optimizer step, not per
micro-batch) is checked in tests/test_train_dist.py."""

from __future__ import annotations

import builtins
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

import lorakit
from _train_util import make_shapes
from lorakit.train import TrainConfig, loop, train
from lorakit.train.data import load_samples
from lorakit.train.dist import AccelerateSteps, OwnSteps, World, steps_for

COMMON = dict(lr=5e-3, resolution=32, rank=2, targets=("attn2",))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    return lorakit.tiny_pipeline()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), n=4)


@pytest.fixture
def seen(monkeypatch):
    """Records the runs (their Accelerator and optimizer), ``sync_gradients`` at every backward, the autocast state
    inside every denoiser forward, and how often ``Accelerator.autocast`` was entered."""
    record = {"runs": [], "sync": [], "predict": [], "autocast": 0}
    setup, backward, autocast = loop._Run.setup, Accelerator.backward, Accelerator.autocast

    def spy_setup(self):
        setup(self)
        record["runs"].append((self.accelerator, self.optimizer, self.steps))
        if self.accelerator is not None:  # Accelerate's process-wide state is dropped when the run ends
            a = self.accelerator
            record["settings"] = (a.gradient_accumulation_steps, a.mixed_precision, a.native_amp)
        predict = self.denoiser.predict

        def spy_predict(*args, **kwargs):
            record["predict"].append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return predict(*args, **kwargs)

        self.denoiser.predict = spy_predict

    def spy_backward(self, loss, **kwargs):
        record["sync"].append(self.sync_gradients)
        return backward(self, loss, **kwargs)

    def spy_autocast(self, *args, **kwargs):
        record["autocast"] += 1
        return autocast(self, *args, **kwargs)

    monkeypatch.setattr(loop._Run, "setup", spy_setup)
    monkeypatch.setattr(Accelerator, "backward", spy_backward)
    monkeypatch.setattr(Accelerator, "autocast", spy_autocast)
    return record


def test_the_run_uses_an_accelerator_and_syncs_once_per_step(pipe, data, tmp_path, seen):
    result = train(pipe, data, TrainConfig(steps=3, batch_size=1, grad_accum=2, seed=1,
                                           output=tmp_path / "out.safetensors", **COMMON))
    [(accelerator, optimizer, steps)] = seen["runs"]
    assert isinstance(accelerator, Accelerator) and isinstance(steps, AccelerateSteps)
    assert isinstance(optimizer, AcceleratedOptimizer)
    assert seen["settings"] == (2, "no", False)
    assert seen["sync"] == [False, True] * 3  # accumulate(): no sync but on a step's last micro-batch
    assert not any(enabled for enabled, _ in seen["predict"])  # no autocast without mixed precision
    assert result.steps == 3 and all(math.isfinite(x) for x in result.loss)
    # the run leaves Accelerate's process-wide state as it found it: the next run may choose other settings
    assert not AcceleratorState._shared_state and not GradientState._shared_state
    out = load_file(tmp_path / "out.safetensors")
    assert any(v.abs().sum() > 0 for k, v in out.items() if "lora_up" in k)  # it trained


def _one_step_gradients(pipe, data, batch: int, k: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The run's gradients and updated factors after one optimizer step over the same two samples (fixed noise and
    timesteps), as ``k`` micro-batches of ``batch``, driven through the run's Accelerate steps."""
    config = TrainConfig(steps=1, batch_size=batch, grad_accum=k, seed=6, **COMMON)
    samples = load_samples(data)[:2]
    run = loop._Run(pipe, samples, config, lambda _: None)
    try:
        run.setup()
        steps, params = run.steps, run.built.network.trainable_parameters()
        assert isinstance(steps, AccelerateSteps)
        g = torch.Generator().manual_seed(0)
        mean, _, _ = run._encode(samples)
        noise, t = torch.randn(mean.shape, generator=g), torch.tensor([150, 750])
        for j in range(k):
            rows = slice(j * batch, (j + 1) * batch)
            with steps.micro_batch():
                x0, _, cond = run._encode(samples[rows])
                loss = steps.forward(run._loss, x0, noise[rows], t[rows], cond)
                steps.backward(loss * steps.weight(batch, batch))
        before = [p.detach().clone() for p in params]
        grads = [p.grad.clone() for p in params]
        steps.step(run.optimizer, params, config.max_grad_norm)
        assert all(p.grad is None for p in params)
        assert any(not torch.equal(a, p) for a, p in zip(before, params))  # the step changed the LoRA
        return grads, [p.detach().clone() for p in params]
    finally:
        run.close()


def test_two_micro_batches_of_one_equal_one_batch_of_two(pipe, data):
    grads_a, after_a = _one_step_gradients(pipe, data, batch=1, k=2)
    grads_b, after_b = _one_step_gradients(pipe, data, batch=2, k=1)
    assert any(g.abs().sum() > 0 for g in grads_a)  # the LoRA is in the graph
    scale = max(float(g.abs().max()) for g in grads_b)
    worst = max(float((a - b).abs().max()) for a, b in zip(grads_a, grads_b))
    assert worst <= 1e-4 * scale, (worst, scale)  # float32 sums over the batch in another order
    for a, b in zip(after_a, after_b):  # AdamW's first step is ~lr·g/|g|: gradients near its eps show at ~1e-6
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_runs_under_accelerator_autocast_and_resumes_exactly(pipe, data, tmp_path, seen):
    common = dict(steps=4, batch_size=1, grad_accum=2, seed=2, mixed_precision="bf16", **COMMON)
    whole = train(pipe, data, TrainConfig(output=tmp_path / "whole.safetensors", **common))
    assert seen["settings"] == (2, "bf16", True)
    assert seen["autocast"] >= 8  # one per micro-batch
    assert seen["predict"] and all(p == (True, torch.bfloat16) for p in seen["predict"])

    class Stop(Exception):
        pass

    def stop_at_2(step: int, loss: float) -> None:
        if step == 2:
            raise Stop

    state = tmp_path / "state"
    with pytest.raises(Stop):
        train(pipe, data, TrainConfig(output=tmp_path / "part.safetensors", save_every=2, state_dir=state, **common),
              callback=stop_at_2)
    resumed = train(pipe, data, TrainConfig(output=tmp_path / "resumed.safetensors", resume=state, **common))
    assert all(isinstance(a, Accelerator) for a, _, _ in seen["runs"])
    assert resumed.loss == whole.loss
    a, b = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_up" in k)  # it trained


def test_fp16_on_the_cpu_keeps_lorakits_own_loss_scaling():
    """Accelerate builds no GradScaler and no autocast for fp16 on the CPU (``Accelerator.__init__`` skips both
    when ``device.type == "cpu"``), so that case keeps lorakit's own (tests/test_train.py: it resumes exactly)."""
    notes: list[str] = []
    steps = steps_for(World(), torch.device("cpu"), 2, "fp16", notes.append)
    assert isinstance(steps, OwnSteps) and steps.accelerator is None
    assert isinstance(steps.scaler, torch.amp.GradScaler) and "fp16 on the CPU" in notes[0]
    with steps.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
    bf16 = steps_for(World(), torch.device("cpu"), 2, "bf16")
    try:
        assert isinstance(bf16, AccelerateSteps) and bf16.scaler is None
    finally:
        bf16.close()


def test_without_accelerate_the_own_loop_runs(monkeypatch):
    real_import = builtins.__import__

    def no_accelerate(name, *args, **kwargs):
        if name == "accelerate" or name.startswith("accelerate."):
            raise ImportError("No module named 'accelerate'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_accelerate)
    steps = steps_for(World(), torch.device("cpu"), 2, "no")
    assert isinstance(steps, OwnSteps) and steps.scaler is None
