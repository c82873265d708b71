"""Generation tasks: what a pipeline makes from what, taken from the pipeline's class, and the inputs each needs.

======  ==============================  ===========================================================
task    made from                       pipelines (examples)
======  ==============================  ===========================================================
t2i     text                            StableDiffusion(XL|3)Pipeline, FluxPipeline, QwenImagePipeline
i2i     text + an image (required)      FluxKontextPipeline, QwenImageEditPipeline, *Img2ImgPipeline
t2v     text                            WanPipeline, LTXPipeline, HunyuanVideoPipeline
i2v     text + an image (required)      WanImageToVideoPipeline, LTXImageToVideoPipeline
v2w     text + an image or a video      Cosmos2VideoToWorldPipeline (Cosmos Predict2 Video2World)
======  ==============================  ===========================================================

FLUX.2 is ``t2i`` whose ``image`` is an optional list of reference images: ``task="i2i"`` (or ``--image``) passes
them to the same pipeline. FLUX.1 Kontext is ``i2i``: it is an editing model, so by default it needs an image; ``task="t2i"`` runs it from text
alone (diffusers allows ``image=None``). ``task="i2i"`` on a text-to-image pipeline that has an image-to-image
twin in diffusers (SD1, SDXL, SD3, FLUX.1) runs that twin (``AutoPipelineForImage2Image.from_pipe``: the same
modules, so LoRAs applied to one are on the other).
"""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import MissingInputError, TaskInputError

__all__ = ["NEEDS", "TAKES", "TASKS", "VIDEO_TASKS", "call_default", "call_params", "check_inputs", "infer_task", "pipeline_for_task", "task_kind"]

TASKS = ("t2i", "i2i", "t2v", "i2v", "v2w")
VIDEO_TASKS = ("t2v", "i2v", "v2w")
#: the inputs each task needs (one of them) and the ones it takes (what check_inputs enforces; the server's /v1/info)
NEEDS = {"i2i": ("image",), "i2v": ("image",), "v2w": ("image", "video")}
TAKES = {"t2i": (), "t2v": (), "i2i": ("image",), "i2v": ("image",), "v2w": ("image", "video")}


#: text-to-image pipelines whose ``image`` argument is optional reference images (not an editing input)
OPTIONAL_REFERENCE = ("Flux2Pipeline", "Flux2KleinPipeline")


def _cls(pipe: Any) -> type:
    return pipe if isinstance(pipe, type) else type(pipe)


def _optional_reference(pipe: Any) -> bool:
    """Whether the pipeline (or a class it derives from) takes ``image`` as optional reference images (FLUX.2)."""
    return any(c.__name__ in OPTIONAL_REFERENCE for c in _cls(pipe).__mro__)


def call_params(pipe: Any) -> set[str]:
    """The keyword arguments a pipeline's (or pipeline class's) ``__call__`` takes; a wrapper's ``**kwargs`` (a
    subclass that sets defaults and calls ``super().__call__``) is looked through to the parent's signature."""
    found: set[str] = set()
    for cls in _cls(pipe).__mro__:
        call = cls.__dict__.get("__call__")
        if call is None:
            continue
        try:
            params = inspect.signature(call).parameters
        except (TypeError, ValueError):
            continue
        found |= {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return found


def call_default(pipe: Any, name: str) -> Any:
    """The default of argument ``name`` of the pipeline's ``__call__`` (the first class along the MRO declaring it);
    ``None`` when no class does or it has no default."""
    for cls in _cls(pipe).__mro__:
        call = cls.__dict__.get("__call__")
        try:
            param = None if call is None else inspect.signature(call).parameters.get(name)
        except (TypeError, ValueError):
            param = None
        if param is not None:
            return None if param.default is param.empty else param.default
    return None


def infer_task(pipe: Any) -> str:
    """The task of a diffusers pipeline (or pipeline class: no need to load the weights), from its class name and
    ``__call__`` arguments (see the module table).

    Video pipelines take ``num_frames``; ``*VideoToWorld*`` is ``v2w``; a pipeline taking an ``image`` is ``i2v``
    (video) or ``i2i`` (image); anything else is ``t2v`` / ``t2i``."""
    name = _cls(pipe).__name__
    params = call_params(pipe)
    video = "num_frames" in params or "Video" in name
    if "VideoToWorld" in name:
        return "v2w"
    if _optional_reference(pipe):
        return "t2i"
    if "image" in params:
        return "i2v" if video else "i2i"
    return "t2v" if video else "t2i"


def task_kind(task: str) -> str:
    """``"video"`` for t2v / i2v / v2w, ``"image"`` for t2i / i2i."""
    _check_task_name(task)
    return "video" if task in VIDEO_TASKS else "image"


def _check_task_name(task: str) -> None:
    if task not in TASKS:
        raise TaskInputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}", flag="--task", field="task")


def pipeline_for_task(pipe: Any, task: str) -> Any:
    """The pipeline that runs ``task``: ``pipe`` itself when it can, its diffusers image-to-image twin for ``i2i`` on
    a text-to-image pipeline; :class:`TaskInputError` (naming ``--task``) when it cannot."""
    _check_task_name(task)
    native = infer_task(pipe)
    if task == native or (task == "t2i" and native == "i2i" and "Kontext" in type(pipe).__name__):
        return pipe
    if task == "i2i" and native == "t2i" and _optional_reference(pipe):
        return pipe  # FLUX.2: reference images go to the pipeline itself
    if task == "i2i" and native == "t2i":
        from diffusers import AutoPipelineForImage2Image

        try:
            twin = AutoPipelineForImage2Image.from_pipe(pipe)
        except (ValueError, KeyError, TypeError) as exc:
            raise TaskInputError(
                f"{type(pipe).__name__} has no image-to-image twin in diffusers ({exc}); drop --task i2i",
                flag="--task", field="task",
            ) from exc
        twin.set_progress_bar_config(disable=True)
        return twin
    raise TaskInputError(
        f"{type(pipe).__name__} runs task {native!r}, not {task!r}; drop --task or load a pipeline for {task}",
        flag="--task", field="task",
    )


def check_inputs(task: str, image: Any = None, video: Any = None) -> None:
    """Raise :class:`MissingInputError` when ``task`` needs an input that is missing (i2i / i2v: an image; v2w: an
    image or a video), :class:`TaskInputError` when an input is given that the task does not use. Messages name
    the command-line flag (``--image``); ``error.field`` is the library / server argument (``image``)."""
    _check_task_name(task)
    if task in ("i2i", "i2v") and image is None:
        what = "image-to-image" if task == "i2i" else "image-to-video"
        raise MissingInputError(
            f"task {task} ({what}) needs an input image: pass --image PATH (image= in the library, 'image' to the "
            "server)", flag="--image", field="image",
        )
    if task == "v2w" and image is None and video is None:
        raise MissingInputError(
            "task v2w (Video2World) needs an input image or video: pass --image PATH or --video PATH "
            "(image= / video= in the library)", flag="--image", field="image",
        )
    if image is not None and task in ("t2i", "t2v"):
        raise TaskInputError(
            f"task {task} (text only) takes no image: drop --image, or pass --task "
            f"{'i2i' if task == 't2i' else 'i2v'} with a pipeline that runs it", flag="--image", field="image",
        )
    if video is not None and task != "v2w":
        raise TaskInputError(f"task {task} takes no input video: drop --video (only v2w, Video2World, uses one)",
                             flag="--video", field="video")
