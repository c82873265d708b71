"""Server configuration (one field per ``lorakit serve`` option) and the request bodies of the HTTP API."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = ["GenerateRequest", "LoraRef", "Settings"]


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
    max_body_kb: float = 1024.0  # body cap of every request but uploads (JSON bodies are small)
    cache_mb: float = 512.0
    max_steps: int = 50
    max_size: int = 1024
    max_wait_s: float = 5.0
    # Queue wait plus run of one generate request; past it the client gets 504 and a queued job is dropped.
    request_timeout: float = 300.0
    # Work cap per request: steps * width * height; None = max_steps * max_size**2 (the size and step limits).
    max_pixel_steps: int | None = None
    # Time bound on parsing and validating one upload (it runs on a small pool of its own).
    upload_timeout_s: float = 30.0
    # Hub references org/repo/file: None = refused (default), an empty sequence = any org, else these orgs.
    allow_hub: Sequence[str] | None = None
    pipe: Any = None  # an already-built pipeline (tests); else built from ``model``
    # Something with ``async generate(job) -> (png, batch_size)`` that replaces the local worker
    # (the Ray Serve ingress routes jobs to replicas through it); no pipeline is built here then.
    backend: Any = None
    # Where the pipeline runs (as ``lorakit generate``): auto = CUDA, then MPS, then the CPU.
    device: str = "auto"
    dtype: str = "auto"
    offload: str = "none"
    # Video models: the most frames one request may ask for, and the count used when it names none.
    max_frames: int = 129
    default_frames: int | None = None
    # Conditioning inputs (image / video in a generate request): decoded size cap in MB.
    max_input_mb: float = 16.0
    # Scheduling: "auto" runs mixed-LoRA batches through adapter slots when no stack is hot; "swap" fuses only.
    batching: str = "auto"
    slots: int = 8  # adapter slots for mixed batches (0: swap only)


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
    #: png (images), mp4 / webp / gif (videos; webp and gif also animate one image), or b64_json: the
    #: model's default format (png for images, mp4 for videos) as base64 inside JSON. Unset: that default.
    response_format: Literal["png", "mp4", "webp", "gif", "b64_json"] | None = None
    #: the conditioning image / video for image-to-image, image-to-video and Video2World models: base64
    #: (a ``data:`` URL prefix is accepted), or a multipart file part of the same name
    image: str | None = Field(None, max_length=64 << 20)
    video: str | None = Field(None, max_length=64 << 20)
    num_frames: int | None = Field(None, ge=1)
    fps: float | None = Field(None, gt=0, le=120)
    #: a client-chosen id to poll ``GET /v1/progress/{request_id}`` with while the request runs
    request_id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
