"""Data-parallel training without a wrapper: under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE`` > 1) each
process takes its slice of every global batch, draws the global batch's noise from the shared seed and keeps
its slice, and gradients are averaged with one all-reduce before the (identical) optimizer step. So N processes
with batch B equal one process with batch N·B, up to float summation order."""

from __future__ import annotations

import dataclasses
import os

import torch

__all__ = ["World", "world"]


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, n: int, per_rank: int) -> slice:
        """This process's part of a global batch of ``n`` (the last one may be short or empty)."""
        start = min(n, self.rank * per_rank)
        return slice(start, min(n, start + per_rank))

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every process's gradient (each already scaled by its share of the global batch)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def total(self, value: float) -> float:
        if self.size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t)

    def device(self, requested: str | None) -> torch.device:
        if requested is not None:
            return torch.device(requested)
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if self.size > 1 else 0)
        return torch.device("cpu")


def world(requested: str | None = None) -> World:
    """The process group the launcher set up (initialised here from the environment when it is not yet): NCCL
    when the run uses CUDA, else gloo (``--device cpu`` on a GPU machine stays on gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and (requested is None or torch.device(requested).type == "cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size())
