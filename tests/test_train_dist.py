"""Two CPU processes (gloo; the environment ``accelerate launch`` / ``torchrun`` give each process: RANK,
WORLD_SIZE, MASTER_ADDR/PORT) with batch 1 each equal one process with batch 2, within float tolerance, and their
gradients go through Accelerate's DDP wrapper once per optimizer step (``accumulate``: ``no_sync`` else). The
processes are forked from the test so they need not import diffusers again. The same through the real
``accelerate launch`` binary is opt-in (``LORAKIT_TEST_ACCELERATE=1``): its two fresh interpreters take ~95 s on
a busy 2-core machine."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
from pathlib import Path

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


def _worker(rank: int, port: int, data: str, out: str, counts: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    seen = {"ddp": 0, "syncs": 0, "no_sync": 0}
    ddp = torch.nn.parallel.DistributedDataParallel
    init, no_sync = ddp.__init__, ddp.no_sync

    def counting_init(self, *args, **kwargs):  # the DDP wrapper accelerator.prepare builds: count its all-reduces
        init(self, *args, **kwargs)
        seen["ddp"] += 1
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            seen["syncs"] += bucket.index() == 0  # one per synced backward, however many buckets
            return allreduce_hook(state, bucket)

        self.register_comm_hook(None, hook)

    def counting_no_sync(self):
        seen["no_sync"] += 1
        return no_sync(self)

    ddp.__init__, ddp.no_sync = counting_init, counting_no_sync  # this forked process only
    try:
        train(lorakit.tiny_pipeline(), data, TrainConfig(**OPTIONS, batch_size=1, output=out))
        Path(f"{counts}.{rank}").write_text(json.dumps(seen))
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
    counts = tmp_path / "counts"
    procs = [ctx.Process(target=_worker, args=(r, port, str(data), str(out2), str(counts))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    # accelerator.accumulate: the gradients are all-reduced once per optimizer step (3), not per micro-batch (6);
    # the other micro-batch of each step runs under DDP no_sync (rank 1 gets no sample of the short last batch of
    # each epoch and still joins the all-reduce, with zeros)
    for rank in range(2):
        assert json.loads(Path(f"{counts}.{rank}").read_text()) == {"ddp": 1, "syncs": 3, "no_sync": 3}, rank
    one = train(lorakit.tiny_pipeline(), data, TrainConfig(**OPTIONS, batch_size=2, output=tmp_path / "one.safetensors"))
    a, b = load_file(tmp_path / "one.safetensors"), load_file(out2)
    assert list(a) == list(b) and one.steps == 3
    for key in a:  # AdamW divides by sqrt(v): float summation order shows at ~1e-6 on the smallest entries
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-3), key
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_up" in k)


ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_processes: 2
num_machines: 1
machine_rank: 0
gpu_ids: all
main_process_ip: 127.0.0.1
main_process_port: {port}
mixed_precision: 'no'
rdzv_backend: static
same_network: true
"""


@pytest.mark.skipif(os.environ.get("LORAKIT_TEST_ACCELERATE") != "1" or shutil.which("accelerate") is None,
                    reason="opt-in (LORAKIT_TEST_ACCELERATE=1): two fresh interpreters take ~95 s on a busy 2-core CPU")
def test_accelerate_launch_two_cpu_processes_equal_one_with_the_global_batch(tmp_path):
    """The ``accelerate launch`` binary with a local config. Accelerate's own MULTI_CPU type starts one process
    unless it is given an mpirun hostfile, so the config says MULTI_GPU (torchrun underneath) and ``--device cpu``
    keeps the run on gloo even where CUDA exists."""
    data = make_shapes(tmp_path / "d", n=5)
    config = tmp_path / "accelerate.yaml"
    config.write_text(ACCELERATE_CONFIG.format(port=_free_port()))
    out2 = tmp_path / "two.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(lorakit.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = ["accelerate", "launch", "--config_file", str(config), "-m", "lorakit.cli", "train", "--model", "tiny",
           "--data", str(data), "-o", str(out2), "--steps", "3", "--lr", "5e-3", "--resolution", "32", "--rank", "2",
           "--seed", "4", "--targets", "attn2", "--grad-accum", "2", "--batch-size", "1", "--device", "cpu",
           "--json", "--no-report"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1 and results[0]["steps"] == 3  # rank 0 alone reports
    torch.set_num_threads(1)
    train(lorakit.tiny_pipeline(), data, TrainConfig(**OPTIONS, batch_size=2, output=tmp_path / "one.safetensors"))
    a, b = load_file(tmp_path / "one.safetensors"), load_file(out2)
    assert list(a) == list(b)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-3), key
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_up" in k)
