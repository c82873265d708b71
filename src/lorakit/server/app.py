"""The HTTP service: a thin FastAPI layer over the registry and the single pipeline worker.
``create_app(settings)`` builds it; ``lorakit serve`` runs it with uvicorn.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.errors import LorakitError

from .metrics import Metrics
from .registry import ApiError, Registry
from .worker import Job, Stack, Worker

__all__ = ["GenerateRequest", "Settings", "create_app"]

STATIC = Path(__file__).parent / "static"


@dataclasses.dataclass
class Settings:
    """Server configuration; every field maps to a ``lorakit serve`` option."""

    lora_dir: str
    model: str = "tiny"
    api_key: str | None = None
    max_queue: int = 64
    max_batch: int = 4
    allow_upload: bool = False
    max_upload_mb: float = 64.0
    cache_mb: float = 512.0
    max_steps: int = 50
    max_size: int = 1024
    max_wait_s: float = 5.0
    pipe: Any = None  # an already-built pipeline (tests); else built from ``model``
    # Something with ``async generate(job) -> (png, batch_size)`` that replaces the local worker
    # (the Ray Serve ingress routes jobs to replicas through it); no pipeline is built here then.
    backend: Any = None


class LoraRef(BaseModel):
    name: str = Field(min_length=1, max_length=300)
    strength: float = Field(1.0, ge=-4.0, le=4.0)


class GenerateRequest(BaseModel):
    prompt: str = Field(max_length=2000)
    negative_prompt: str | None = Field(None, max_length=2000)
    width: int = Field(64, ge=8)
    height: int = Field(64, ge=8)
    steps: int = Field(4, ge=1)
    guidance_scale: float = Field(5.0, ge=0.0, le=30.0)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    loras: list[LoraRef] = Field(default_factory=list, max_length=8)
    response_format: Literal["png", "b64_json"] = "png"


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _load_pipeline(model: str) -> Any:
    from lorakit.pipelines import load_pipeline

    return load_pipeline(model)


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


def create_app(settings: Settings) -> FastAPI:
    """Build the app: registry, metrics and one worker thread that owns the pipeline."""
    app = FastAPI(title="lorakit", version="0.1.0", description="Generate images with stacks of LoRA adapters.")
    metrics = Metrics()
    registry = Registry(settings.lora_dir, cache_bytes=int(settings.cache_mb * (1 << 20)))
    if settings.backend is None:
        pipe = settings.pipe if settings.pipe is not None else _load_pipeline(settings.model)
        worker: Any = Worker(pipe, metrics, max_queue=settings.max_queue, max_batch=settings.max_batch,
                             max_wait_s=settings.max_wait_s)
    else:
        worker = _RemoteWorker(settings.backend)
    app.state.settings, app.state.metrics, app.state.registry, app.state.worker = settings, metrics, registry, worker

    @app.on_event("shutdown")
    def _shutdown() -> None:
        worker.close()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.observe_request(request.url.path, exc.status, None)
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc}: {err.get('msg')}")
        metrics.observe_request(request.url.path, 422, None)
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(LorakitError)
    async def _lorakit(request: Request, exc: LorakitError) -> JSONResponse:
        # A LoRA that parses but does not fit the model (MatchError, ShapeMismatchError) is the client's input.
        metrics.observe_request(request.url.path, 400, None)
        return _error(400, type(exc).__name__, str(exc))

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        # Constant-time compare so the key cannot be guessed byte by byte from timings.
        if not token or not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise ApiError(401, "unauthorized", "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_upload_allowed() -> None:
        if not settings.allow_upload:
            raise ApiError(403, "uploads_disabled", "Uploads are disabled; start the server with --allow-upload.")

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "queue_depth": worker.depth(), "current_stack": [list(s) for s in worker.current]}

    @app.get("/metrics", response_class=PlainTextResponse)
    def get_metrics() -> PlainTextResponse:
        metrics.queue_depth = worker.depth()
        text = metrics.render(registry.hits, registry.misses, registry.cached_bytes())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/loras")
    async def list_loras(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"loras": await run_in_threadpool(registry.list)}

    @app.post("/v1/loras", status_code=201)
    async def upload_lora(request: Request, file: UploadFile = File(...), name: str | None = None) -> dict[str, Any]:
        check_key(request)
        check_upload_allowed()
        limit = int(settings.max_upload_mb * (1 << 20))
        filename = file.filename or ""
        if not filename.lower().endswith(".safetensors"):
            raise ApiError(400, "invalid_lora", f"Upload {filename!r} must be a .safetensors file.")
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise ApiError(413, "too_large", f"Upload {filename!r} exceeds the {settings.max_upload_mb:g} MB limit.")
        info = await run_in_threadpool(registry.store_upload, name or filename, data)
        metrics.observe_request("/v1/loras", 201, None)
        return info

    @app.delete("/v1/loras/{name}")
    async def delete_lora(request: Request, name: str) -> dict[str, Any]:
        check_key(request)
        check_upload_allowed()
        await run_in_threadpool(registry.delete, name)
        return {"deleted": name}

    def build_job(req: GenerateRequest) -> Job:
        for field, value in (("width", req.width), ("height", req.height)):
            if value % 8:
                raise ApiError(422, "invalid_request", f"{field}: must be a multiple of 8, got {value}")
            if value > settings.max_size:
                raise ApiError(422, "invalid_request", f"{field}: at most {settings.max_size}, got {value}")
        if req.steps > settings.max_steps:
            raise ApiError(422, "invalid_request", f"steps: at most {settings.max_steps}, got {req.steps}")
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

    @app.post(
        "/v1/generate",
        responses={200: {"content": {"image/png": {}, "application/json": {}}}},
    )
    async def generate(request: Request, req: GenerateRequest) -> Response:
        import asyncio

        check_key(request)
        start = time.perf_counter()
        job = await run_in_threadpool(build_job, req)
        if settings.backend is not None:
            png, batch_size = await settings.backend.generate(job)
        else:
            png, batch_size = await asyncio.wrap_future(worker.submit(job))
        metrics.observe_request("/v1/generate", 200, time.perf_counter() - start)
        headers = {
            "X-Lorakit-Stack": ",".join(f"{sha[:12]}:{s:g}" for sha, s in job.stack),
            "X-Lorakit-Batch-Size": str(batch_size),
        }
        if req.response_format == "b64_json":
            return JSONResponse({"b64_json": base64.b64encode(png).decode(), "seed": req.seed}, headers=headers)
        return Response(png, media_type="image/png", headers=headers)

    return app
