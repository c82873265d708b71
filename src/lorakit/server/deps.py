"""What the routes share: the app's services as FastAPI dependencies, and the API-key and upload checks.

The two checks are plain functions that a handler calls first, not ``Depends``: FastAPI runs dependencies
before it validates the body, so as dependencies they would answer 401/403 where the API answers 422 today.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from .guard import key_matches, unauthorized
from .metrics import Metrics
from .registry import ApiError, Registry
from .settings import Settings

__all__ = [
    "MetricsDep", "RegistryDep", "SettingsDep", "WorkerDep", "check_api_key", "check_upload_allowed",
]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def get_worker(request: Request) -> Any:
    return request.app.state.worker


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
WorkerDep = Annotated[Any, Depends(get_worker)]


def check_api_key(request: Request, settings: Settings) -> None:
    """Raise 401 unless the request carries ``Authorization: Bearer <api_key>`` (when a key is set)."""
    if settings.api_key is None:
        return
    # The Guard middleware already checked it before the body was read; this is the same check, kept so a
    # route never depends on the middleware being installed. Starlette decodes headers as latin-1: encoding
    # back with latin-1 gives the bytes the client sent.
    if not key_matches(request.headers.get("authorization", "").encode("latin-1"), settings.api_key):
        raise unauthorized()


def check_upload_allowed(settings: Settings) -> None:
    """Raise 403 unless the server was started with uploads enabled."""
    if not settings.allow_upload:
        raise ApiError(403, "uploads_disabled", "Uploads are disabled; start the server with --allow-upload.")
