"""The LoRA library: list the folder, upload a ``.safetensors`` file, delete one (uploads must be enabled)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, File, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from ..deps import RegistryDep, SettingsDep, check_api_key, check_upload_allowed
from ..registry import ApiError

__all__ = ["router"]

router = APIRouter(prefix="/v1/loras")


@router.get("")
async def list_loras(request: Request, settings: SettingsDep, registry: RegistryDep) -> dict[str, Any]:
    check_api_key(request, settings)
    return {"loras": await run_in_threadpool(registry.list)}


@router.post("", status_code=201)
async def upload_lora(
    request: Request, settings: SettingsDep, registry: RegistryDep,
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
    # Validation is time-bounded: a file that takes too long to parse is refused and never stored.
    future = registry.stage_in_pool(name or filename, data)
    try:
        staged = await asyncio.wait_for(asyncio.wrap_future(future), settings.upload_timeout_s)
    except TimeoutError as exc:
        registry.abandon(future)
        raise ApiError(422, "validation_timeout", f"Upload {filename[:200]!r} took longer than "
                       f"{settings.upload_timeout_s:g} s to validate; refused.") from exc
    info = await run_in_threadpool(registry.commit_upload, *staged)
    return info


@router.delete("/{name}")
async def delete_lora(request: Request, name: str, settings: SettingsDep, registry: RegistryDep) -> dict[str, Any]:
    check_api_key(request, settings)
    check_upload_allowed(settings)
    await run_in_threadpool(registry.delete, name)
    return {"deleted": name}
