"""Two CPU processes (gloo; the environment ``accelerate launch`` / ``torchrun`` give each process: RANK,
WORLD_SIZE, MASTER_ADDR/PORT) with batch 1 each equal one process with batch 2, within float tolerance. The
processes are forked from the test so they need not import diffusers again."""

from __future__ import annotations

import multiprocessing
import os
import socket

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from _train_util import make_shapes
from lorakit.train import TrainConfig, train

OPTIONS = dict(steps=3, lr=5e-3, resolution=32, rank=2, seed=4, targets=("attn2",), grad_accum=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, data: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        train(lorakit.tiny_pipeline(), data, TrainConfig(**OPTIONS, batch_size=1, output=out))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_with_the_global_batch(tmp_path):
    data = make_shapes(tmp_path / "d", n=5)  # 5: the last global batch of an epoch is short
    out2 = tmp_path / "two.safetensors"
    torch.set_num_threads(1)
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(data), str(out2))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    one = train(lorakit.tiny_pipeline(), data, TrainConfig(**OPTIONS, batch_size=2, output=tmp_path / "one.safetensors"))
    a, b = load_file(tmp_path / "one.safetensors"), load_file(out2)
    assert list(a) == list(b) and one.steps == 3
    for key in a:  # AdamW divides by sqrt(v): float summation order shows at ~1e-6 on the smallest entries
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-3), key
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_up" in k)
