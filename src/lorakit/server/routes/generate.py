"""``POST /v1/generate``: validate the request, resolve its LoRA stack, queue it, answer the image or video (PNG,
MP4, WebP, GIF) or base64 JSON.

The body is JSON (a conditioning ``image``/``video`` as base64), or multipart/form-data with the same fields as
form fields (``loras`` as a JSON string) and the image or video as a file part. The model's task decides what a
request must carry: an image-to-video model without an image is 422, an image that does not decode is 400, more
frames than ``--max-frames`` is 422, and a video asked for as PNG (or an image as MP4) is 422.

Each request has a deadline (``--request-timeout``, queue wait plus run): past it the client gets 504 and a job
still queued is dropped. A client that disconnects while its job is queued cancels it: it is never generated.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from concurrent.futures import Future
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from lorakit.errors import LorakitError, MissingInputError, TaskInputError
from lorakit.generation.tasks import NEEDS, VIDEO_TASKS, check_inputs

from ..deps import MetricsDep, RegistryDep, SettingsDep, WorkerDep, check_api_key
from ..registry import ApiError, Registry
from ..settings import GenerateRequest, Settings
from ..worker import MEDIA_TYPES, Job, Stack

__all__ = ["build_job", "router"]

router = APIRouter()


def _check_task(req: GenerateRequest, settings: Settings, task: str, inputs: dict[str, bytes]) -> tuple[str, int | None]:
    """The output format and frame count for this model's ``task``, or 422 naming what is wrong."""
    video = task in VIDEO_TASKS
    try:  # the generation task rules, as for the CLI and the library (presence only: nothing is decoded yet)
        check_inputs(task, image=inputs.get("image"), video=inputs.get("video"))
    except MissingInputError as exc:
        raise ApiError(422, "missing_input", f"this model's task ({task}) needs {' or '.join(NEEDS[task])}: send "
                       "it base64 in the JSON body or as a multipart file part") from exc
    except TaskInputError as exc:
        raise ApiError(422, "invalid_request", f"{exc.field}: this model's task ({task}) takes no {exc.field}; "
                       "see GET /v1/info") from exc
    fmt = req.response_format or ("mp4" if video else "png")
    if fmt == "b64_json":
        fmt = "mp4" if video else "png"
    if video and fmt == "png":
        raise ApiError(422, "invalid_request", "response_format: this model makes videos; ask for mp4, webp, gif "
                       "or b64_json (an mp4 inside JSON)")
    if not video and fmt in ("mp4", "webp", "gif"):
        raise ApiError(422, "invalid_request", f"response_format: this model makes images; {fmt} is a video "
                       "format, ask for png or b64_json")
    frames = req.num_frames
    if not video:
        if frames is not None:
            raise ApiError(422, "invalid_request", "num_frames: this model makes images, not videos")
        return fmt, None
    frames = frames or settings.default_frames
    if frames is not None and frames > settings.max_frames:
        raise ApiError(422, "invalid_request", f"num_frames: at most {settings.max_frames} (--max-frames), "
                       f"got {frames}")
    return fmt, frames


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
    frames = req.num_frames or settings.default_frames or 1
    work = req.steps * req.width * req.height * frames
    if work > limit:
        what = "steps x width x height" + (" x frames" if frames > 1 else "")
        raise ApiError(422, "invalid_request",
                       f"{what} = {work} exceeds this server's limit of {limit} (--max-pixel-steps)")


def _decode_inputs(inputs: dict[str, bytes]) -> dict[str, Any]:
    from lorakit.errors import MediaError
    from lorakit.media import read_image, read_video

    out: dict[str, Any] = {}
    for name, data in inputs.items():
        try:
            out[name] = read_image(data) if name == "image" else read_video(data)
        except (MediaError, OSError, ValueError) as exc:
            raise ApiError(400, "invalid_input", f"{name}: does not decode as an {name} ({exc})") from exc
    return out


def build_job(req: GenerateRequest, settings: Settings, registry: Registry, task: str = "t2i",
              inputs: dict[str, bytes] | None = None) -> Job:
    """Check the request against the model's task and the server's limits, decode its image/video, and load its
    LoRAs (through the registry's cache) into a job."""
    inputs = inputs or {}
    fmt, frames = _check_task(req, settings, task, inputs)
    _check_limits(req, settings)
    decoded = _decode_inputs(inputs)
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
        sources=tuple(sources), fmt=fmt, video_task=task in VIDEO_TASKS, image=decoded.get("image"),
        video=decoded.get("video"), num_frames=frames, fps=float(req.fps or 16.0), request_id=req.request_id,
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


def _b64(name: str, value: str) -> bytes:
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "invalid_input", f"{name}: not valid base64 ({exc})") from exc


def _invalid(exc: ValidationError) -> RequestValidationError:
    return RequestValidationError(exc.errors(include_url=False))


async def _parse(request: Request, settings: Settings) -> tuple[GenerateRequest, dict[str, bytes]]:
    """The request and its raw conditioning inputs, from JSON or multipart/form-data."""
    ctype = request.headers.get("content-type", "")
    inputs: dict[str, bytes] = {}
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=2, max_fields=32)
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if key in ("image", "video"):
                inputs[key] = await value.read() if hasattr(value, "read") else _b64(key, str(value))
            elif key == "loras":
                try:
                    fields[key] = json.loads(str(value))
                except ValueError as exc:
                    raise ApiError(422, "invalid_request", f"loras: not JSON ({exc})") from exc
            else:
                fields[key] = value
        try:
            req = GenerateRequest.model_validate(fields)
        except ValidationError as exc:
            raise _invalid(exc) from exc
    else:
        body = await request.body()
        try:
            req = GenerateRequest.model_validate_json(body)
        except ValidationError as exc:
            raise _invalid(exc) from exc
        for key in ("image", "video"):
            value = getattr(req, key)
            if value is not None:
                inputs[key] = _b64(key, value)
    cap = int(settings.max_input_mb * (1 << 20))
    for key, data in inputs.items():
        if len(data) > cap:
            raise ApiError(413, "too_large", f"{key}: {len(data)} bytes exceeds --max-input-mb "
                           f"{settings.max_input_mb:g} MB")
    return req, inputs


def _schema() -> dict[str, Any]:
    """The JSON body's schema with its definitions inlined (the route parses the body itself)."""
    schema = GenerateRequest.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    schema = inline(schema)
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            **{k: v for k, v in schema["properties"].items() if k not in ("image", "video", "loras")},
            "loras": {"type": "string", "description": "the loras list as a JSON string"},
            "image": {"type": "string", "format": "binary"}, "video": {"type": "string", "format": "binary"},
        }}},
    }}}


@router.post(
    "/v1/generate",
    responses={200: {"content": {**{t: {} for t in MEDIA_TYPES.values()}, "application/json": {}}}},
    openapi_extra=_schema(),
)
async def generate(
    request: Request, settings: SettingsDep, registry: RegistryDep, metrics: MetricsDep, worker: WorkerDep,
) -> Response:
    check_api_key(request, settings)
    start = time.perf_counter()
    deadline = time.monotonic() + settings.request_timeout
    req, inputs = await _parse(request, settings)
    task = getattr(request.app.state, "task", "t2i")
    job = await run_in_threadpool(build_job, req, settings, registry, task, inputs)
    job.deadline = deadline
    progress = getattr(request.app.state, "progress", None)
    if progress is not None:
        progress.queued(job.request_id, job.steps)
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
    media_type = MEDIA_TYPES[job.fmt]
    if req.response_format == "b64_json":
        return JSONResponse({"b64_json": base64.b64encode(png).decode(), "media_type": media_type,
                             "seed": req.seed}, headers=headers)
    return Response(png, media_type=media_type, headers=headers)
