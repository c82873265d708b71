"""The scheduler's mixed-LoRA batches: requests with different single-LoRA stacks share one pipeline call through
adapter slots (each row equals its request run alone, fused); a hot stack keeps the fused path; multi-LoRA stacks
and LoRAs that do not fit a slot are served fused; ``batching="swap"`` never mixes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from lorakit.server.metrics import Metrics
from lorakit.server.registry import Registry
from lorakit.server.routes.generate import build_job
from lorakit.server.settings import GenerateRequest, Settings
from lorakit.server.worker import Worker
from test_server_api import decode, make_lora_dir

NAMES = ("alpha", "beta", "gamma", "delta")


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return lorakit.tiny_pipeline(0)


@pytest.fixture(scope="module")
def env(tmp_path_factory, pipe):
    folder = make_lora_dir(tmp_path_factory.mktemp("mixed_loras"), pipe, names=NAMES)
    settings = Settings(lora_dir=str(folder), pipe=pipe)
    return settings, Registry(str(folder))


def job(env, seed, loras):
    settings, registry = env
    req = GenerateRequest(prompt=f"prompt {seed % 3}", seed=seed, steps=2, width=64, height=64,
                          loras=[{"name": n, "strength": s} for n, s in loras])
    return build_job(req, settings, registry)


def run(pipe, env, specs, **kw):
    """Submit every job while the worker is held, so it sees them all at once; return images and the worker."""
    settings, registry = env
    from lorakit.server.app import _catalogue

    worker = Worker(pipe, Metrics(), max_batch=4, catalogue=_catalogue(registry), **kw)
    try:
        jobs = [job(env, i, spec) for i, spec in enumerate(specs)]
        with worker._cond:
            futures = [worker.submit(j) for j in jobs]
        results = [f.result(timeout=300) for f in futures]
    finally:
        worker.close()
    return [decode(data) for data, _ in results], [size for _, size in results], worker


@pytest.fixture(scope="module")
def alone(pipe, env):
    """Each request run by itself on the fused path (swap policy, max one per call)."""
    specs = [[], [("alpha", 1.0)], [("beta", 0.7)], [("gamma", -0.5)]]
    images, sizes, _ = run(pipe, env, [specs[0]], batching="swap")
    out = [images[0]]
    for i, spec in enumerate(specs[1:], start=1):
        worker = Worker(pipe, Metrics(), max_batch=1, batching="swap")
        try:
            f = worker.submit(job(env, i, spec))
            out.append(decode(f.result(timeout=300)[0]))
        finally:
            worker.close()
    return specs, out


def test_mixed_batch_rows_equal_each_request_alone(pipe, env, alone):
    specs, want = alone
    images, sizes, worker = run(pipe, env, specs)
    assert worker.mixed_calls == 1 and sizes == [4, 4, 4, 4] and worker.swaps == 0
    for i, (got, ref) in enumerate(zip(images, want)):
        diff = np.abs(got - ref)
        # hook-path rows vs fused weights: float summation order only (as batching in test_server_isolation)
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.005, f"row {i}: {diff.max()} / {(diff > 0).mean():.4%}"
    for i in range(1, 4):  # every LoRA changed its row: no row got the base or another row's LoRA
        assert (np.abs(images[i] - want[0]) > 1).mean() > 0.3
    before = [p.detach().clone() for p in pipe.unet.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, pipe.unet.parameters()))


def test_hot_stack_and_multi_lora_stacks_stay_fused(pipe, env):
    _, sizes, worker = run(pipe, env, [[("alpha", 1.0)]] * 4)
    assert worker.mixed_calls == 0 and worker.swaps == 1 and sizes == [4] * 4
    _, _, worker = run(pipe, env, [[("alpha", 1.0), ("beta", 0.5)], [("gamma", 1.0), ("delta", 0.5)]])
    assert worker.mixed_calls == 0 and worker.swaps == 2


def test_swap_policy_never_mixes(pipe, env):
    _, _, worker = run(pipe, env, [[], [("alpha", 1.0)], [("beta", 0.7)]], batching="swap")
    assert worker.mixed_calls == 0 and worker.swaps >= 2


def test_slots_are_reused_and_evicted(pipe, env):
    specs = [[(n, 1.0)] for n in NAMES] + [[(n, 0.5)] for n in NAMES]
    images, _, worker = run(pipe, env, specs, slots=4)
    assert worker.mixed_calls == 2 and len(worker._slot_of) == 4  # 8 (LoRA, strength) pairs through 4 slots
    assert not np.array_equal(images[0], images[4])  # strength 1.0 and 0.5 of alpha differ
