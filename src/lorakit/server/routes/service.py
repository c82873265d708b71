"""Service endpoints: the browser page, ``/healthz``, the Prometheus ``/metrics``, what the model is and what a
request may ask for (``/v1/info``), and a request's queue position and step (``/v1/progress/{request_id}``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, PlainTextResponse

from ..deps import MetricsDep, SettingsDep, WorkerDep, check_api_key
from ..metrics import CONTENT_TYPE

__all__ = ["router"]

STATIC = Path(__file__).resolve().parent.parent / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
def index() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))


@router.get("/healthz")
def healthz(worker: WorkerDep) -> dict[str, Any]:
    return {"status": "ok", "queue_depth": worker.depth(), "current_stack": [list(s) for s in worker.current]}


@router.get("/metrics", response_class=PlainTextResponse)
def get_metrics(metrics: MetricsDep) -> PlainTextResponse:
    return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/info")
def info(request: Request, settings: SettingsDep) -> dict[str, Any]:
    """The served model, its task (t2i, i2i, t2v, i2v, v2w), whether it makes videos, which inputs it needs or
    takes, and this server's limits: what the web page builds its controls from."""
    from lorakit.generation.tasks import NEEDS, TAKES, VIDEO_TASKS

    check_api_key(request, settings)
    task = request.app.state.task
    video = task in VIDEO_TASKS
    return {
        "model": settings.model, "task": task, "kind": "video" if video else "image",
        "needs": list(NEEDS.get(task, ())), "takes": list(TAKES.get(task, ())),
        "formats": ["mp4", "webp", "gif"] if video else ["png"],
        "limits": {"max_steps": settings.max_steps, "max_size": settings.max_size,
                   "max_frames": settings.max_frames if video else None,
                   "default_frames": settings.default_frames if video else None,
                   "max_input_mb": settings.max_input_mb, "max_pixel_steps": settings.max_pixel_steps},
        "device": settings.device, "dtype": settings.dtype,
    }


@router.get("/v1/progress/{request_id}")
def progress(request: Request, request_id: str, settings: SettingsDep) -> dict[str, Any]:
    """``state``: queued (with ``position``: jobs ahead), running (``step`` of ``steps``), done, failed (with
    ``error``), or unknown (never seen, or forgotten after 1024 newer ids)."""
    check_api_key(request, settings)
    return request.app.state.progress.get(request_id[:64])
