"""The same HTTP app on Ray Serve: an ingress replica validates and resolves requests, N model replicas each
own a pipeline and a worker; ``serve.multiplexed`` keyed by the LoRA stack routes a stack to replicas holding it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from .app import Settings, create_app
from .worker import Job

__all__ = ["build_ray_app", "run_ray", "stack_id"]


def stack_id(job: Job) -> str:
    """The multiplexed model id of a job: its stack as JSON [[sha256, strength, file], ...] ("[]" = base)."""
    return json.dumps([[sha, strength, src] for (sha, strength), src in zip(job.stack, job.sources)])


# The model deployment's handle in this ingress process. The app is pickled to the ingress replica apart
# from the class that receives the handle, so the two meet through this (really imported) module.
_MODEL_HANDLE: dict[str, Any] = {}


class _RayBackend:
    """Sends jobs to the model deployment with the stack as multiplexed model id."""

    async def generate(self, job: Job) -> tuple[bytes, int]:
        # Plain fields only: parsed tensors are re-read from the replica's cache, the future stays here.
        skip = {"loras", "future", "enqueued", "deadline"}  # deadline: this host's clock
        payload = {f.name: getattr(job, f.name) for f in dataclasses.fields(job) if f.name not in skip}
        return await _MODEL_HANDLE["model"].options(multiplexed_model_id=stack_id(job)).generate.remote(payload)


def build_ray_app(settings: Settings, replicas: int = 2, max_stacks_per_replica: int = 1) -> Any:
    """A Ray Serve application (bind()) of an ingress plus ``replicas`` model replicas."""
    from ray import serve

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0.5})
    class StackModel:
        def __init__(self, settings: Settings) -> None:
            from .metrics import Metrics
            from .registry import Registry
            from .worker import Worker

            self.registry = Registry(settings.lora_dir, cache_bytes=int(settings.cache_mb * (1 << 20)))
            from .app import _load_pipeline

            pipe = settings.pipe if settings.pipe is not None else _load_pipeline(settings)
            # Each replica runs the single-process worker: one owner thread, swaps by remove + fuse.
            self.worker = Worker(pipe, Metrics(), max_queue=settings.max_queue, max_batch=settings.max_batch)

        # One stack per replica: the id Ray routes on is the stack this replica has (or is about to have) fused.
        @serve.multiplexed(max_num_models_per_replica=max_stacks_per_replica)
        async def get_stack(self, model_id: str) -> list[tuple[Any, float]]:
            spec = json.loads(model_id)
            return [(self.registry.get(sha, _path(src)), float(strength)) for sha, strength, src in spec]

        async def generate(self, payload: dict[str, Any]) -> tuple[bytes, int]:
            loras = await self.get_stack(serve.get_multiplexed_model_id())
            payload["stack"] = tuple((sha, float(s)) for sha, s in payload["stack"])
            payload["sources"] = tuple(payload["sources"])
            job = Job(loras=loras, **payload)
            return await asyncio.wrap_future(self.worker.submit(job))

        def swaps(self) -> int:
            return self.worker.swaps

    backend = _RayBackend()
    ingress_settings = dataclasses.replace(settings, backend=backend, pipe=None)
    fastapi_app = create_app(ingress_settings)

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(fastapi_app)
    class Ingress:
        def __init__(self, model: Any) -> None:
            import lorakit.server.ray_app as this_module  # the real module, not a pickled copy of its globals

            this_module._MODEL_HANDLE["model"] = model

    return Ingress.bind(StackModel.bind(dataclasses.replace(settings, backend=None)))


def _path(src: str) -> Any:
    from pathlib import Path

    return Path(src)


def run_ray(settings: Settings, replicas: int = 2, host: str = "127.0.0.1", port: int = 8000) -> None:
    """``lorakit serve --ray``: start (or join) Ray, run the app, block until interrupted."""
    import time

    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_ray_app(settings, replicas=replicas), name="lorakit", route_prefix="/")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
