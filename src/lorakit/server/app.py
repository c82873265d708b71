"""The HTTP service: a thin FastAPI layer over the registry and the single pipeline worker.
``create_app(settings)`` builds it; ``lorakit serve`` runs it with uvicorn.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from .guard import Guard
from .handlers import install_error_handlers
from .metrics import Metrics
from .progress import Progress
from .registry import Registry
from .routes import generate_router, loras_router, service_router
from .settings import GenerateRequest, LoraRef, Settings
from .worker import Stack, Worker

__all__ = ["GenerateRequest", "LoraRef", "Settings", "create_app"]


def _load_pipeline(settings: Settings) -> Any:
    """The served pipeline: ``--model`` (tiny, tiny-FAMILY or a local diffusers folder) on ``--device`` in
    ``--dtype``, with ``--offload`` as in ``lorakit generate``."""
    from lorakit.generation.device import place_pipeline, resolve_device, resolve_dtype
    from lorakit.pipelines import load_pipeline

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    return place_pipeline(load_pipeline(settings.model, dtype=dtype), device, dtype, settings.offload)


def _catalogue(registry: Registry) -> Any:
    """The parsed valid LoRAs of the folder: what the worker prepares its adapter slots for."""

    def read() -> list[Any]:
        out = []
        for info in registry.list():
            if info.get("valid"):
                sha, path = registry.resolve(info["name"])
                out.append(registry.get(sha, path))
        return out

    return read


class _RemoteWorker:
    """Stand-in for the local worker when jobs run elsewhere (Ray): nothing queued or fused here."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.current: Stack = ()
        self.swaps = 0

    def depth(self) -> int:
        return 0

    def close(self) -> None:
        pass


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        yield
    finally:
        # Stops the worker thread and restores the pipeline's base weights.
        app.state.worker.close()
        app.state.registry.close()


def create_app(settings: Settings) -> FastAPI:
    """Build the app: registry, metrics and one worker thread that owns the pipeline."""
    from .._quiet import silence_known_noise

    silence_known_noise()  # dependencies' known start-up noise only (loading the pipeline triggers it)
    app = FastAPI(title="lorakit", version="0.1.0", description="Generate images and videos with stacks of LoRA adapters.",
                  lifespan=_lifespan)
    metrics = Metrics()
    registry = Registry(settings.lora_dir, cache_bytes=int(settings.cache_mb * (1 << 20)),
                        allow_hub=settings.allow_hub)
    progress = Progress()
    task = "t2i"
    if settings.backend is None:
        from lorakit.generation.tasks import infer_task

        pipe = settings.pipe if settings.pipe is not None else _load_pipeline(settings)
        task = infer_task(pipe)
        worker: Any = Worker(pipe, metrics, max_queue=settings.max_queue, max_batch=settings.max_batch,
                             max_wait_s=settings.max_wait_s, progress=progress, batching=settings.batching,
                             slots=settings.slots, catalogue=_catalogue(registry))
        progress.position = worker.position
    else:
        worker = _RemoteWorker(settings.backend)
    app.state.task, app.state.progress = task, progress
    metrics.watch(queue_depth=worker.depth,
                  cache=lambda: (registry.hits, registry.misses, registry.cached_bytes()))
    app.state.settings, app.state.metrics, app.state.registry, app.state.worker = settings, metrics, registry, worker
    install_error_handlers(app)
    # Outermost of ours: auth, upload switch and body cap before any parsing; metrics by route template.
    app.add_middleware(Guard, settings=settings, metrics=metrics, routes_of=app.router)
    for router in (service_router, loras_router, generate_router):
        app.include_router(router)
    return app
