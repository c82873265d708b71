"""``POST /v1/generate``: validate the request, resolve its LoRA stack, queue it, answer PNG or base64 JSON.

Each request has a deadline (``--request-timeout``, queue wait plus run): past it the client gets 504 and a job
still queued is dropped. A client that disconnects while its job is queued cancels it: it is never generated.
"""

from __future__ import annotations

import asyncio
import base64
import time
from concurrent.futures import Future
from typing import Any

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
    limit = settings.max_pixel_steps
    if limit is None:
        limit = settings.max_steps * settings.max_size * settings.max_size
    work = req.steps * req.width * req.height
    if work > limit:
        raise ApiError(422, "invalid_request",
                       f"steps x width x height = {work} exceeds this server's limit of {limit} (--max-pixel-steps)")


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


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _timeout(settings: Settings) -> ApiError:
    return ApiError(504, "timeout", f"The request did not finish within {settings.request_timeout:g} s "
                    "(--request-timeout); it was cancelled.")


async def _await_job(request: Request, future: Future, settings: Settings, deadline: float) -> Any:
    """The job's result, or: client gone -> cancel the job (499); deadline passed -> cancel it (504). A job the
    worker has already started cannot be cancelled; it finishes and its result is dropped."""
    waiter = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({waiter, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if waiter in done:
        return waiter.result()
    future.cancel()
    waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody reads a late failure
    if gone in done:
        raise ApiError(499, "client_closed_request", "The client disconnected; the request was cancelled.")
    raise _timeout(settings)


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
    deadline = time.monotonic() + settings.request_timeout
    job = await run_in_threadpool(build_job, req, settings, registry)
    job.deadline = deadline
    if settings.backend is not None:
        try:
            png, batch_size = await asyncio.wait_for(settings.backend.generate(job),
                                                     max(0.0, deadline - time.monotonic()))
        except TimeoutError as exc:
            raise _timeout(settings) from exc
    else:
        png, batch_size = await _await_job(request, worker.submit(job), settings, deadline)
    metrics.observe_latency(time.perf_counter() - start)
    headers = {
        "X-Lorakit-Stack": ",".join(f"{sha[:12]}:{s:g}" for sha, s in job.stack),
        "X-Lorakit-Batch-Size": str(batch_size),
    }
    if req.response_format == "b64_json":
        return JSONResponse({"b64_json": base64.b64encode(png).decode(), "seed": req.seed}, headers=headers)
    return Response(png, media_type="image/png", headers=headers)
