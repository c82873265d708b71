"""Service endpoints: the browser page, ``/healthz`` and the Prometheus ``/metrics``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, PlainTextResponse

from ..deps import MetricsDep, WorkerDep
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
