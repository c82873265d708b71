"""Generation with LoRAs for every task (text/image to image, text/image to video, Video2World), shared by
``lorakit generate`` and the server: :func:`generate` and its result, the tasks a pipeline runs
(:mod:`.tasks`), where it runs (:mod:`.device`) and job files (:mod:`.jobs`)."""

from __future__ import annotations

from .core import EXPERTS, GenerateResult, LoraPatches, LoraSpec, apply_loras, default_fps, generate
from .device import place_pipeline, resolve_device, resolve_dtype
from .jobs import Job, LoraEntry, group_by_stack, parse_lora_arg, read_batch, read_config
from .tasks import (
    TASKS,
    VIDEO_TASKS,
    call_default,
    call_params,
    check_inputs,
    infer_task,
    pipeline_for_task,
    task_kind,
)

__all__ = [
    "EXPERTS",
    "TASKS",
    "VIDEO_TASKS",
    "GenerateResult",
    "Job",
    "LoraEntry",
    "LoraPatches",
    "LoraSpec",
    "apply_loras",
    "call_default",
    "call_params",
    "check_inputs",
    "default_fps",
    "generate",
    "group_by_stack",
    "infer_task",
    "parse_lora_arg",
    "pipeline_for_task",
    "place_pipeline",
    "read_batch",
    "read_config",
    "resolve_device",
    "resolve_dtype",
    "task_kind",
]
