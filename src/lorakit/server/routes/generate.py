"""``POST /v1/generate``: validate the request, resolve its LoRA stack, queue it, answer PNG or base64 JSON."""

from __future__ import annotations

import asyncio
import base64
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from lorakit.errors import LorakitError

from ..deps import MetricsDep, RegistryDep, SettingsDep, WorkerDep, check_api_key
from ..registry import ApiError, Registry
from ..settings import GenerateRequest, Settings
from ..worker import Job, Stack

__all__ = ["build_job", "router"]

router = APIRouter()


def _check_limits(req: GenerateRequest, settings: Settings) -> None:
    for field, value in (("width", req.width), ("height", req.height)):
        if value % 8:
            raise ApiError(422, "invalid_request", f"{field}: must be a multiple of 8, got {value}")
        if value > settings.max_size:
            raise ApiError(422, "invalid_request", f"{field}: at most {settings.max_size}, got {value}")
    if req.steps > settings.max_steps:
        raise ApiError(422, "invalid_request", f"steps: at most {settings.max_steps}, got {req.steps}")


def build_job(req: GenerateRequest, settings: Settings, registry: Registry) -> Job:
    """Check the server's limits and load the request's LoRAs (through the registry's cache) into a job."""
    _check_limits(req, settings)
    stack: list[tuple[str, float]] = []
    loras = []
    sources: list[str] = []
    for ref in req.loras:
        sha, path = registry.resolve(ref.name)
        try:
            lora = registry.get(sha, path)
        except LorakitError as exc:
            raise ApiError(400, "invalid_lora", f"LoRA {ref.name!r} cannot be loaded: {exc}") from exc
        stack.append((sha, float(ref.strength)))
        loras.append((lora, float(ref.strength)))
        sources.append(str(path))
    key: Stack = tuple(stack)
    return Job(
        stack=key, loras=loras, prompt=req.prompt, negative_prompt=req.negative_prompt or "",
        width=req.width, height=req.height, steps=req.steps, guidance_scale=req.guidance_scale, seed=req.seed,
        sources=tuple(sources),
    )


@router.post(
    "/v1/generate",
    responses={200: {"content": {"image/png": {}, "application/json": {}}}},
)
async def generate(
    request: Request, req: GenerateRequest, settings: SettingsDep, registry: RegistryDep, metrics: MetricsDep,
    worker: WorkerDep,
) -> Response:
    check_api_key(request, settings)
    start = time.perf_counter()
    job = await run_in_threadpool(build_job, req, settings, registry)
    if settings.backend is not None:
        png, batch_size = await settings.backend.generate(job)
    else:
        png, batch_size = await asyncio.wrap_future(worker.submit(job))
    metrics.observe_latency(time.perf_counter() - start)
    headers = {
        "X-Lorakit-Stack": ",".join(f"{sha[:12]}:{s:g}" for sha, s in job.stack),
        "X-Lorakit-Batch-Size": str(batch_size),
    }
    if req.response_format == "b64_json":
        return JSONResponse({"b64_json": base64.b64encode(png).decode(), "seed": req.seed}, headers=headers)
    return Response(png, media_type="image/png", headers=headers)
