"""The LoRA library: list the folder, upload a ``.safetensors`` file, delete one (uploads must be enabled)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, File, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from ..deps import MetricsDep, RegistryDep, SettingsDep, check_api_key, check_upload_allowed
from ..registry import ApiError

__all__ = ["router"]

router = APIRouter(prefix="/v1/loras")


@router.get("")
async def list_loras(request: Request, settings: SettingsDep, registry: RegistryDep) -> dict[str, Any]:
    check_api_key(request, settings)
    return {"loras": await run_in_threadpool(registry.list)}


@router.post("", status_code=201)
async def upload_lora(
    request: Request, settings: SettingsDep, registry: RegistryDep, metrics: MetricsDep,
    file: UploadFile = File(...), name: str | None = None,
) -> dict[str, Any]:
    check_api_key(request, settings)
    check_upload_allowed(settings)
    limit = int(settings.max_upload_mb * (1 << 20))
    filename = file.filename or ""
    if not filename.lower().endswith(".safetensors"):
        raise ApiError(400, "invalid_lora", f"Upload {filename!r} must be a .safetensors file.")
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "too_large", f"Upload {filename!r} exceeds the {settings.max_upload_mb:g} MB limit.")
    info = await run_in_threadpool(registry.store_upload, name or filename, data)
    return info


@router.delete("/{name}")
async def delete_lora(request: Request, name: str, settings: SettingsDep, registry: RegistryDep) -> dict[str, Any]:
    check_api_key(request, settings)
    check_upload_allowed(settings)
    await run_in_threadpool(registry.delete, name)
    return {"deleted": name}
