"""One worker thread owns the pipeline: a bounded queue, a scheduler that groups requests by LoRA stack
(fewest swaps) and batches same-stack, same-shape requests into one pipeline call with per-request seeds.

With ``batching="auto"`` (the default) the scheduler also runs *mixed* batches: when the waiting requests want
different LoRAs and no stack is hot, up to ``max_batch`` of them run in one call, each row through its own adapter
slot (:func:`lorakit.slots`: padded buffers, per-row gather + bmm), with the base weights unfused. A hot stack (at
least ``max_batch`` requests waiting for it) keeps the fused path, which costs nothing per forward. Requests whose
stack has more than one LoRA, or whose LoRA does not fit a slot, and conditioned requests always go fused.
``batching="swap"`` is the wave-1 policy: fused only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io as _io
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

import numpy as np

from lorakit.generation import generate

from .metrics import Metrics
from .registry import ApiError

__all__ = ["Job", "Stack", "Worker"]

# A LoRA stack as the scheduler sees it: ((sha256 or name, strength), ...). Order matters for apply.
Stack = tuple[tuple[str, float], ...]


@dataclasses.dataclass
class Job:
    """One generate request waiting in the queue; ``future`` receives (PNG bytes, batch size)."""

    stack: Stack
    loras: list[tuple[Any, float]]  # (parsed LoRA, strength) in request order
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    sources: tuple[str, ...] = ()  # file of each LoRA, parallel to ``stack`` (for remote replicas)
    # What to answer: png for an image; mp4 / webp / gif for a video (see lorakit.media)
    fmt: str = "png"
    video_task: bool = False  # the pipeline makes videos: frames out, encoded as ``fmt``
    image: Any = None  # PIL image conditioning the call (i2v, i2i, Video2World)
    video: Any = None  # list of PIL frames (Video2World)
    num_frames: int | None = None
    fps: float = 16.0
    request_id: str | None = None  # for GET /v1/progress
    enqueued: float = dataclasses.field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() after which the job is dropped from the queue (504)
    future: Future = dataclasses.field(default_factory=Future)

    def shape_key(self) -> tuple[Any, ...]:
        # what rows of one call must share, whatever their LoRAs
        return (self.width, self.height, self.steps, self.guidance_scale, self.num_frames, self.video_task)

    def mixable(self) -> bool:
        """Whether this job can be one row of a mixed batch: at most one LoRA, no conditioning input."""
        return len(self.stack) <= 1 and self.image is None and self.video is None

    def batch_key(self) -> tuple[Any, ...]:
        # Requests may share one pipeline call only if everything but prompt/seed is equal; a conditioned
        # request (its own image or video) always runs alone.
        alone = id(self) if self.image is not None or self.video is not None else None
        return (self.stack, self.width, self.height, self.steps, self.guidance_scale, self.num_frames, alone)


def _fail(job: Job, exc: BaseException) -> None:
    """Set ``exc`` on a job's future unless its client already cancelled it (or it is done)."""
    with contextlib.suppress(InvalidStateError):
        job.future.set_exception(exc)


MEDIA_TYPES = {"png": "image/png", "mp4": "video/mp4", "webp": "image/webp", "gif": "image/gif"}


def to_png(image: np.ndarray) -> bytes:
    """Encode a float HxWx3 image in [0, 1] as PNG, quantising exactly as diffusers' ``numpy_to_pil``."""
    from PIL import Image

    arr = (image * 255).round().astype("uint8")
    buf = _io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class Worker:
    """Owns ``pipe``; only this thread ever touches it (diffusers' LoRA state is not thread-safe)."""

    def __init__(
        self,
        pipe: Any,
        metrics: Metrics,
        *,
        max_queue: int = 64,
        max_batch: int = 4,
        max_wait_s: float = 5.0,
        apply: Callable[..., Any] | None = None,
        progress: Any = None,
        batching: str = "auto",
        slots: int = 8,
        catalogue: Callable[[], list[Any]] | None = None,
    ) -> None:
        if batching not in ("auto", "swap"):
            raise ValueError(f"batching must be 'auto' or 'swap', got {batching!r}")
        self.pipe = pipe
        self.progress = progress
        self.batching = batching if slots > 0 else "swap"
        self.n_slots = slots
        #: the LoRAs the slots are prepared for (their targets and ranks), read when the first mixed batch runs
        self._catalogue = catalogue
        self._slots: Any = None
        self._slot_of: dict[tuple[str, float], int] = {}  # (sha, strength) -> slot, most recently used last
        self._unslottable: set[tuple[str, float]] = set()
        self.mixed_calls = 0
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_batch = max_batch
        # After this long a request is served next even if it forces a swap (no starvation).
        self.max_wait_s = max_wait_s
        self._apply = apply
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self.current: Stack = ()
        self._patch: Any = None
        self.swaps = 0
        self.calls = 0
        self._thread = threading.Thread(target=self._run, name="lorakit-worker", daemon=True)
        self._thread.start()

    # ---- producer side -------------------------------------------------------------------------
    def submit(self, job: Job) -> Future:
        with self._cond:
            self._purge()
            if len(self._queue) >= self.max_queue:
                raise ApiError(
                    503, "queue_full", f"Queue is full ({self.max_queue} waiting); retry shortly.",
                    headers={"Retry-After": "1"},
                )
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def position(self, request_id: str) -> int | None:
        """How many queued jobs are ahead of the one with ``request_id`` (``None``: not queued). The scheduler
        may still serve it earlier (same LoRA stack as the running one) or later (a starving job first)."""
        with self._cond:
            for i, j in enumerate(self._queue):
                if j.request_id == request_id:
                    return i
        return None

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        if self._patch is not None:
            self._patch.remove()
            self._patch = None
        if self._slots is not None:
            self._slots.close()
            self._slots = None

    # ---- scheduling ------------------------------------------------------------------------------
    def _purge(self) -> None:
        """Drop queued jobs whose client cancelled them (gone, or timed out) and jobs past their deadline
        (their future gets a 504); the caller holds the lock. Neither is ever generated."""
        now = time.monotonic()
        keep = []
        for j in self._queue:
            if j.future.cancelled():
                continue
            if j.deadline is not None and now > j.deadline:
                _fail(j, ApiError(504, "timeout", "The request waited in the queue past --request-timeout."))
                continue
            keep.append(j)
        self._queue[:] = keep

    def _mixed_batch(self, oldest: Job, starving: bool) -> list[Job] | None:
        """A mixed batch when the queue calls for one (caller holds the lock): no stack is hot (fewer than
        ``max_batch`` requests wait for any one stack) and at least two different slot-able stacks of one shape
        wait; led by the oldest such request. ``None``: use the fused path."""
        if self.batching != "auto":
            return None
        counts: dict[Stack, int] = {}
        for j in self._queue:
            counts[j.stack] = counts.get(j.stack, 0) + 1
        if max(counts.values()) >= self.max_batch and not starving:
            return None  # a hot stack: fused, zero overhead per forward
        ok = [j for j in self._queue if j.mixable() and not (j.stack and j.stack[0] in self._unslottable)]
        if not ok or (starving and oldest not in ok):
            return None
        lead = oldest if starving else ok[0]
        group = [j for j in ok if j.shape_key() == lead.shape_key()][: self.max_batch]
        if len({j.stack for j in group}) < 2:
            return None
        return group

    def _take_batch(self) -> list[Job]:
        """Pick the next batch (caller holds the lock and the queue is not empty)."""
        oldest = self._queue[0]
        starving = time.monotonic() - oldest.enqueued > self.max_wait_s
        mixed = self._mixed_batch(oldest, starving)
        if mixed is not None:
            for j in mixed:
                self._queue.remove(j)
            return [j for j in mixed if j.future.set_running_or_notify_cancel()]
        same = [j for j in self._queue if j.stack == self.current]
        if starving:
            lead = oldest
        elif same:
            lead = same[0]
        else:
            # A swap is unavoidable: go to the stack with most waiting requests (ties: oldest first),
            # so one swap serves as many requests as possible.
            counts: dict[Stack, int] = {}
            for j in self._queue:
                counts[j.stack] = counts.get(j.stack, 0) + 1
            lead = max(self._queue, key=lambda j: counts[j.stack])  # max keeps the first (oldest) on ties
        key = lead.batch_key()
        batch = [j for j in self._queue if j.batch_key() == key][: self.max_batch]
        for j in batch:
            self._queue.remove(j)
        # From here a job runs: its future can no longer be cancelled; one cancelled meanwhile is skipped.
        return [j for j in batch if j.future.set_running_or_notify_cancel()]

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop:
                    self._purge()
                    if self._queue:
                        break
                    self._cond.wait()
                if self._stop:
                    for j in self._queue:
                        _fail(j, ApiError(503, "shutting_down", "Server is shutting down."))
                    self._queue.clear()
                    return
                batch = self._take_batch()
            if not batch:
                continue
            try:
                images = self._generate(batch)
            except BaseException as exc:  # one failed call must not kill the worker
                for j in batch:
                    self._note(j, "failed", str(exc))
                    _fail(j, exc)
                continue
            for j, data in zip(batch, images):
                self._note(j, "done")
                # The batch size travels with the result: clients and tests can tell batched results apart.
                j.future.set_result((data, len(batch)))

    def _note(self, job: Job, state: str, *args: Any) -> None:
        if self.progress is not None and job.request_id is not None:
            getattr(self.progress, state)(job.request_id, *args)

    # ---- execution -------------------------------------------------------------------------------
    def _switch(self, job: Job) -> None:
        if job.stack == self.current:
            return
        import lorakit

        apply = self._apply or lorakit.apply
        # Restore the base bit-exactly before fusing the next stack, so swaps never accumulate drift.
        if self._patch is not None:
            self._patch.remove()
            self._patch = None
        self.current = ()
        if job.loras:
            self._patch = apply(self.pipe, job.loras, mode="fuse")
        self.current = job.stack
        self.swaps += 1
        self.metrics.observe_swap()

    def _unfuse(self) -> None:
        if self._patch is not None:
            self._patch.remove()
            self._patch = None
        self.current = ()

    def _ensure_slots(self) -> Any:
        if self._slots is None:
            import lorakit

            # plain low-rank LoRAs only: the other adapter types are served fused
            files = [lo for lo in (self._catalogue() if self._catalogue is not None else [])
                     if set(lo.adapter_types()) == {"lora"} and not any(layer.dora for layer in lo)]
            if not files:
                raise RuntimeError("no LoRA catalogue to prepare slots from")
            self._slots = lorakit.slots(self.pipe, k=self.n_slots, files=files)
        return self._slots

    def _rows(self, batch: list[Job]) -> list[int] | None:
        """The slot of each job of a mixed batch (loading LoRAs into free or least recently used slots), or
        ``None`` when one does not fit a slot: that stack is then served fused from now on."""
        slots = self._ensure_slots()
        wanted = {j.stack[0] for j in batch if j.stack}
        rows = []
        for j in batch:
            if not j.stack:
                rows.append(-1)
                continue
            key = j.stack[0]
            if key not in self._slot_of:
                used = set(self._slot_of.values())
                free = [i for i in range(self.n_slots) if i not in used]
                if free:
                    slot = free[0]
                else:  # evict the least recently used slot this batch does not need
                    old = next(k for k in self._slot_of if k not in wanted)
                    slot = self._slot_of.pop(old)
                try:
                    slots.load(slot, j.loras[0][0], strength=j.loras[0][1])
                except Exception:  # noqa: BLE001 - a LoRA slots cannot hold (type, rank, targets) goes fused
                    self._unslottable.add(key)
                    return None
                self._slot_of[key] = slot
            else:
                self._slot_of[key] = self._slot_of.pop(key)  # most recently used last
            rows.append(self._slot_of[key])
        return rows

    def _generate(self, batch: list[Job]) -> list[bytes]:
        first = batch[0]
        if len({j.stack for j in batch}) > 1:
            return self._generate_mixed(batch)
        self._switch(first)
        return self._call(batch)

    def _generate_mixed(self, batch: list[Job]) -> list[bytes]:
        self._unfuse()
        try:
            rows = self._rows(batch)
        except Exception:  # noqa: BLE001 - slots cannot be prepared on this model: fused only from now on
            self.batching, rows = "swap", None
        if rows is None:  # run each stack fused instead
            out: dict[int, bytes] = {}
            for stack in dict.fromkeys(j.stack for j in batch):
                part = [j for j in batch if j.stack == stack]
                self._switch(part[0])
                out.update(zip(map(id, part), self._call(part)))
            return [out[id(j)] for j in batch]
        with self._slots.rows(rows):
            result = self._call(batch)
        self.mixed_calls += 1
        return result

    def _call(self, batch: list[Job]) -> list[bytes]:
        first = batch[0]

        def on_step(step: int) -> None:
            for j in batch:
                if self.progress is not None and j.request_id is not None:
                    self.progress.step(j.request_id, step + 1, first.steps)

        extra: dict[str, Any] = {}
        if first.image is not None:
            extra["image"] = first.image
        if first.video is not None:
            extra["video"] = first.video
        if first.video_task:
            extra.update(num_frames=first.num_frames, fps=first.fps)
        # loras=None: the fused stack stays on across batches; _switch swaps it only when the stack changes.
        result = generate(
            self.pipe, [j.prompt for j in batch], negative_prompt=[j.negative_prompt for j in batch],
            width=first.width, height=first.height, steps=first.steps, guidance_scale=first.guidance_scale,
            seed=[j.seed for j in batch], output_type="np" if not first.video_task else "pil", on_step=on_step,
            **extra,
        )
        self.calls += 1
        self.metrics.observe_batch(len(batch), result.seconds)
        if first.video_task:
            from lorakit.media import encode_video

            frames = result.frames or [[img] for img in result.images]
            return [encode_video(f, j.fmt, j.fps) for j, f in zip(batch, frames)]
        return [to_png(img) for img in result.images]  # image models answer png (the route refuses the rest)
