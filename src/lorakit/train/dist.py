"""Data parallelism, gradient accumulation and mixed precision of a training run.

Under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE`` > 1) each process takes its slice of every global batch,
draws the global batch's noise from the shared seed and keeps its slice; gradients are averaged once per optimizer
step. So N processes with batch B equal one process with batch N·B, up to float summation order.

:class:`AccelerateSteps` does the per-step mechanics through ``accelerate.Accelerator``: ``accumulate`` (DDP
``no_sync`` on all but the last micro-batch of a step), ``backward`` (loss / k, fp16 loss scaling), ``autocast``,
``clip_grad_norm_`` (unscales first), and the DDP wrapper ``prepare`` builds. :class:`OwnSteps` is the same
arithmetic written out (one all-reduce of the gradients, ``torch.autocast``, ``torch.amp.GradScaler``): used where
Accelerate is not installed and for fp16 on the CPU, which Accelerate runs in fp32 without a loss scale."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["AccelerateSteps", "OwnSteps", "World", "steps_for", "world"]


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

    def total(self, value: float, device: torch.device | None = None) -> float:
        """``value`` summed over the processes (``device``: where the backend wants the tensor; NCCL needs CUDA)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t)

    def device(self, requested: str | None) -> torch.device:
        """``requested``, else this process's GPU (``LOCAL_RANK``), else the CPU. A bare ``cuda`` with more than one
        process means this process's GPU too (DDP wants the module on the device of its rank)."""
        if requested is not None:
            chosen = torch.device(requested)
            if chosen.type == "cuda" and chosen.index is None and self.size > 1:
                return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            return chosen
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


class _Closure(torch.nn.Module):
    """The trainable LoRA network as a module whose forward runs a closure (the micro-batch's loss). DDP syncs a
    backward only when the forward went through its wrapper; the LoRA layers themselves run from hooks inside the
    frozen model, so the wrapper's forward is the whole loss computation."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        return fn(*args)


class OwnSteps:
    """Accumulation, mixed precision and gradient averaging written out: loss·(share of the global batch)/k,
    ``torch.autocast``, a ``torch.amp.GradScaler`` for fp16, one SUM all-reduce per step (``World``)."""

    accelerator: Any = None

    def __init__(self, world: World, device: torch.device, grad_accum: int, mixed_precision: str) -> None:
        self.world, self.device, self.k, self.mixed_precision = world, device, grad_accum, mixed_precision
        # fp16: dynamic loss scaling (as Accelerate does on GPUs), so small activation gradients do not flush to zero
        self.scaler = torch.amp.GradScaler(device.type) if mixed_precision == "fp16" else None

    def prepare(self, network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
        return optimizer

    def micro_batch(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def forward(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        return fn(*args)

    def weight(self, local: int, n: int) -> float:
        """The factor on this process's mean loss: its share of the global batch (the shares sum to 1)."""
        return local / n

    def backward(self, loss: torch.Tensor) -> None:
        scaled = loss / self.k
        (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.mixed_precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def step(self, optimizer: Any, params: list[torch.nn.Parameter], max_norm: float) -> None:
        """Average, unscale, clip, step (skipped by the scaler on inf/NaN), zero the gradients."""
        self.world.average_gradients(params)
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def total(self, value: float) -> float:
        return self.world.total(value, self.device)

    def close(self) -> None:
        pass


class AccelerateSteps:
    """The same through one ``accelerate.Accelerator`` per run. The LR scheduler stays outside it: Accelerate's
    scheduler wrapper steps ``num_processes`` times per optimizer step (it assumes the dataloader was split), which
    would make N processes differ from one; ours steps once per optimizer step, as on one process."""

    def __init__(self, world: World, device: torch.device, grad_accum: int, mixed_precision: str) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType

        cpu = device.type == "cpu"
        self._created = _own_state(world.size, cpu)
        self.device = device
        # find_unused_parameters: a target module off the forward path of some batch must not hang the all-reduce
        self.accelerator = Accelerator(
            gradient_accumulation_steps=grad_accum, mixed_precision=mixed_precision, cpu=cpu,
            device_placement=False, step_scheduler_with_optimizer=False, dynamo_backend="no",
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        kind = self.accelerator.distributed_type
        if kind not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
            self.close()
            raise ValueError(
                f"lorakit train runs data-parallel (DDP) only; the accelerate config asks for {kind.value}: "
                "use a MULTI_GPU (or MULTI_CPU) config, e.g. `accelerate config` without FSDP/DeepSpeed"
            )
        if self.accelerator.num_processes != world.size:
            self.close()
            from ..errors import InternalError

            raise InternalError(
                f"Accelerate sees {self.accelerator.num_processes} processes, the process group {world.size}; "
                "this is a lorakit bug, please report it"
            )
        self.scaler = self.accelerator.scaler  # fp16 on CUDA: Accelerate's GradScaler (checkpointed by the run)
        self.model: Any = None

    def prepare(self, network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
        """The optimizer wrapped by Accelerate; the network wrapped in DDP with more than one process."""
        model, optimizer = self.accelerator.prepare(_Closure(network), optimizer)
        # prepare wraps the forward (here: the whole loss) in autocast; undo that so autocast covers the denoiser's
        # forward only (``autocast()`` around it), as on one process without Accelerate
        self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        self.model = model
        return optimizer

    def micro_batch(self) -> contextlib.AbstractContextManager:
        """``accumulate``: gradients sync across processes on the last micro-batch of a step only."""
        return self.accelerator.accumulate(self.model)

    def forward(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        return self.model(fn, *args)

    def weight(self, local: int, n: int) -> float:
        """DDP averages the processes' gradients (divides their sum by the world size), so each process's share of
        the global batch is multiplied by that size: the sum over processes of local·N/n divided by N is 1."""
        return local * self.accelerator.num_processes / n

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)  # divides by gradient_accumulation_steps; scales the fp16 loss

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def step(self, optimizer: Any, params: list[torch.nn.Parameter], max_norm: float) -> None:
        if not self.accelerator.sync_gradients:
            from ..errors import InternalError

            raise InternalError("an optimizer step before the last micro-batch; this is a lorakit bug, please report it")
        self.accelerator.clip_grad_norm_(params, max_norm)  # unscales the fp16 gradients first
        optimizer.step()  # the scaler skips it on inf/NaN gradients and updates its scale
        optimizer.zero_grad(set_to_none=True)

    def total(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum"))

    def close(self) -> None:
        """Forget Accelerate's process-wide state, so the next run in this process may use other settings."""
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state()
        GradientState._reset_state()
        if self._created:
            PartialState._reset_state()


def _own_state(size: int, cpu: bool) -> bool:
    """Make Accelerate's process-wide state fit this run: the mixed precision and accumulation are the run's own
    (set again by its Accelerator), and a process state left by an earlier run (or inherited by a forked process)
    that sees another world size or device type is dropped. Returns whether the process state is new (then the
    run drops it again at the end)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    state = PartialState._shared_state
    if state and (state.get("num_processes") != size or (getattr(state.get("device"), "type", None) == "cpu") != cpu):
        PartialState._reset_state()
    return not PartialState._shared_state


def steps_for(world: World, device: torch.device, grad_accum: int, mixed_precision: str,
              log: Callable[[str], None] | None = None) -> AccelerateSteps | OwnSteps:
    """Accelerate's when it is installed, else lorakit's own; lorakit's own for fp16 on the CPU (Accelerate runs
    fp16 on the CPU without autocast or loss scaling, i.e. silently in fp32)."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")  # what `accelerate launch --mixed_precision` set
    if launcher and launcher.lower() != mixed_precision and log is not None:
        log(f"accelerate launch asks for mixed precision {launcher}; lorakit uses --mixed-precision {mixed_precision}")
    if mixed_precision == "fp16" and device.type == "cpu":
        if log is not None:
            log("fp16 on the CPU: lorakit's own autocast and loss scaling (Accelerate would run it in fp32)")
        return OwnSteps(world, device, grad_accum, mixed_precision)
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return OwnSteps(world, device, grad_accum, mixed_precision)
    return AccelerateSteps(world, device, grad_accum, mixed_precision)
