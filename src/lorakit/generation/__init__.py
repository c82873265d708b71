"""Generation with LoRAs for every task (text/image to image, text/image to video, Video2World), shared by
``lorakit generate`` and the server: :func:`generate` and its result, the tasks a pipeline runs
(:mod:`.tasks`), where it runs (:mod:`.device`) and job files (:mod:`.jobs`)."""

from __future__ import annotations

from .core import EXPERTS, GenerateResult, LoraPatches, LoraSpec, apply_loras, default_fps, generate
from .device import place_pipeline, resolve_device, resolve_dtype
from .tasks import TASKS, VIDEO_TASKS, check_inputs, infer_task, pipeline_for_task, task_kind

__all__ = [
    "EXPERTS",
    "TASKS",
    "VIDEO_TASKS",
    "GenerateResult",
    "LoraPatches",
    "LoraSpec",
    "apply_loras",
    "check_inputs",
    "default_fps",
    "generate",
    "infer_task",
    "pipeline_for_task",
    "place_pipeline",
    "resolve_device",
    "resolve_dtype",
    "task_kind",
]
