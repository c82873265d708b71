"""Job files for ``lorakit generate``: LightX2V-style ``--config job.json``, ``--batch-input jobs.jsonl`` (one job
per line, as Cosmos' ``--batch_input_json``), the ``--lora PATH[:STRENGTH][@EXPERT]`` grammar, and the grouping of
jobs by LoRA stack so that no LoRA is swapped between two jobs of one stack.

LightX2V keys read: ``model_cls``, ``task``, ``model_path``, ``lora_configs: [{path, strength, name}]`` (``name``
``high_noise_model`` / ``low_noise_model`` routes a LoRA to a Wan 2.2 expert, as LightX2V's own configs do; lorakit's
``"expert": "high_noise" | "low_noise"`` does the same), ``lora_path`` (one path or a list) with ``strength_model``,
``infer_steps``, ``target_video_length``, ``target_height``, ``target_width``, ``sample_guide_scale`` (one number,
or ``[high_noise, low_noise]`` for Wan 2.2's two experts), ``seed``, ``prompt``, ``negative_prompt``,
``image_path``, ``save_video_path``. lorakit's own names (``model``, ``steps``, ``width``, ``height``, ``frames``,
``fps``, ``guidance_scale``, ``image``, ``video``, ``output``, ``loras``) work too. Other keys (LightX2V's attention,
offload and scheduler settings) are reported by :func:`read_config` so the caller can warn once, naming them.
Paths in job files are taken as written (relative to the working folder).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import FormatError, SourceNotFoundError
from ..io import parse_lora_spec
from .tasks import TASKS

__all__ = [
    "JOB_KEYS",
    "Job",
    "LoraEntry",
    "group_by_stack",
    "job_from_mapping",
    "parse_lora_arg",
    "read_batch",
    "read_config",
]

# LightX2V / lorakit spellings of an expert -> lorakit's expert name
_EXPERTS = {"high_noise": "high_noise", "low_noise": "low_noise",
            "high_noise_model": "high_noise", "low_noise_model": "low_noise"}
_EXPERT_TAIL = re.compile(r"^[A-Za-z_]+$")

# job key -> Job field, LightX2V names first
_FIELDS: dict[str, str] = {
    "model_path": "model", "model": "model", "model_cls": "model_cls", "task": "task",
    "prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed",
    "infer_steps": "steps", "steps": "steps",
    "target_video_length": "frames", "frames": "frames", "num_frames": "frames", "fps": "fps",
    "target_height": "height", "height": "height", "target_width": "width", "width": "width",
    "sample_guide_scale": "guidance", "guidance_scale": "guidance", "guidance": "guidance",
    "image_path": "image", "image": "image", "video_path": "video", "video": "video",
    "save_video_path": "output", "output": "output",
}
_LORA_KEYS = ("lora_configs", "loras", "lora_path", "strength_model")
#: every key a job file or batch line may hold
JOB_KEYS = frozenset([*_FIELDS, *_LORA_KEYS])


@dataclasses.dataclass(frozen=True)
class LoraEntry:
    """One LoRA of a job: its file, strength, and the Wan 2.2 expert it belongs to (``None``: the pipeline)."""

    path: str
    strength: float = 1.0
    expert: str | None = None

    def spec(self) -> tuple[str, float, str | None]:
        return (self.path, self.strength, self.expert)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "strength": self.strength}
        if self.expert is not None:
            out["expert"] = self.expert
        return out


@dataclasses.dataclass(frozen=True)
class Job:
    """One generation: every field ``None`` is left to the command line or the defaults (see :meth:`over`)."""

    model: str | None = None
    model_cls: str | None = None
    task: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    frames: int | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    guidance: float | None = None
    guidance_2: float | None = None
    image: str | None = None
    video: str | None = None
    output: str | None = None
    loras: tuple[LoraEntry, ...] | None = None

    def over(self, base: Job) -> Job:
        """This job's fields where set, ``base``'s elsewhere."""
        return dataclasses.replace(base, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                            if getattr(self, f.name) is not None})

    @property
    def stack(self) -> tuple[LoraEntry, ...]:
        return self.loras or ()


def parse_lora_arg(spec: str) -> LoraEntry:
    """``"a.safetensors:0.8@low_noise"`` -> ``LoraEntry("a.safetensors", 0.8, "low_noise")``. The ``@EXPERT`` tail
    (``high_noise`` / ``low_noise``) is optional, then ``:STRENGTH`` as in :func:`lorakit.io.parse_lora_spec`."""
    head, sep, tail = spec.rpartition("@")
    expert = None
    if sep and head and _EXPERT_TAIL.match(tail):
        expert = _expert(tail, f"--lora {spec}")
        spec = head
    path, strength = parse_lora_spec(spec)
    return LoraEntry(path, strength, expert)


def _expert(name: object, where: str) -> str:
    expert = _EXPERTS.get(str(name).lower()) if isinstance(name, str) else None
    if expert is None:
        raise FormatError(f"{where}: unknown expert {name!r}; use high_noise (transformer) or low_noise "
                          "(transformer_2)")
    return expert


def _number(value: object, key: str, where: str, kind: type = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise FormatError(f"{where}: {key!r} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _lora_entry(entry: object, key: str, where: str) -> LoraEntry:
    if isinstance(entry, str):
        return parse_lora_arg(entry)
    if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
        raise FormatError(f"{where}: each {key} entry needs a 'path', got {entry!r}")
    expert = entry.get("expert")
    name = entry.get("name")
    if expert is None and isinstance(name, str) and name.lower() in _EXPERTS:
        expert = name  # LightX2V: {"name": "high_noise_model", ...}
    strength = _number(entry.get("strength", 1.0), f"{key}[].strength", where)
    return LoraEntry(entry["path"], strength, None if expert is None else _expert(expert, where))


def _loras(data: Mapping[str, Any], where: str) -> tuple[LoraEntry, ...] | None:
    for key in ("lora_configs", "loras"):
        if key in data:
            if not isinstance(data[key], list):
                raise FormatError(f"{where}: {key!r} must be a list of {{path, strength}}, got {data[key]!r}")
            return tuple(_lora_entry(e, key, where) for e in data[key])
    if "lora_path" not in data:
        if "strength_model" in data:
            raise FormatError(f"{where}: 'strength_model' without 'lora_path'; add the LoRA file(s) as lora_path")
        return None
    paths = data["lora_path"] if isinstance(data["lora_path"], list) else [data["lora_path"]]
    strengths = data.get("strength_model", 1.0)
    strengths = strengths if isinstance(strengths, list) else [strengths] * len(paths)
    if len(strengths) != len(paths) or not all(isinstance(p, str) for p in paths):
        raise FormatError(f"{where}: 'lora_path' ({len(paths)} paths) and 'strength_model' ({len(strengths)}) "
                          "must pair up; give one strength per path, or one for all")
    return tuple(LoraEntry(p, _number(s, "strength_model", where)) for p, s in zip(paths, strengths))


def _guidance(value: object, where: str) -> tuple[float, float | None]:
    if isinstance(value, list):
        if len(value) != 2:
            raise FormatError(f"{where}: 'sample_guide_scale' as a list is [high_noise, low_noise], got {value!r}")
        return _number(value[0], "sample_guide_scale", where), _number(value[1], "sample_guide_scale", where)
    return _number(value, "sample_guide_scale", where), None


def job_from_mapping(data: Mapping[str, Any], where: str) -> tuple[Job, list[str]]:
    """A job from a parsed JSON object; returns the job and the sorted keys it does not know. ``where`` names the
    file (and line) in errors."""
    if not isinstance(data, Mapping):
        raise FormatError(f"{where} must hold a JSON object, got {type(data).__name__}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = _FIELDS.get(key)
        if name is None or value is None:
            continue
        if name in ("steps", "frames", "seed", "width", "height"):
            value = _number(value, key, where, int)
        elif name == "fps":
            value = _number(value, key, where)
        elif name == "guidance":
            value, values["guidance_2"] = _guidance(value, where)
        elif not isinstance(value, str):
            raise FormatError(f"{where}: {key!r} must be a string, got {value!r}")
        values[name] = value
    if values.get("task") is not None and values["task"] not in TASKS:
        raise FormatError(f"{where}: task {values['task']!r} is not one lorakit runs; use one of {', '.join(TASKS)}")
    unknown = sorted(k for k in data if k not in JOB_KEYS)
    return Job(**values, loras=_loras(data, where)), unknown


def read_config(path: str | os.PathLike[str]) -> tuple[Job, list[str]]:
    """A LightX2V-style job file -> ``(job, unknown keys)``; :class:`FormatError` names the file and key at fault."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceNotFoundError(f"No such job file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"cannot read job file {path}: {exc}") from exc
    return job_from_mapping(data, os.fspath(path))


def read_batch(path: str | os.PathLike[str]) -> tuple[list[Job], list[str]]:
    """A JSON-lines file, one job per line (blank lines and ``#`` comments skipped) -> ``(jobs, unknown keys)``.
    Errors name the file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SourceNotFoundError(f"No such batch file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"cannot read batch file {path}: {exc}") from exc
    jobs: list[Job] = []
    unknown: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{os.fspath(path)}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{where}: not a JSON object ({exc.msg}); write one job per line") from None
        job, extra = job_from_mapping(data, where)
        jobs.append(job)
        unknown.update(extra)
    if not jobs:
        raise FormatError(f"{path} holds no jobs; write one JSON object per line")
    return jobs, sorted(unknown)


def group_by_stack(jobs: Sequence[Job] | Iterable[Job]) -> list[list[int]]:
    """Indices of ``jobs`` grouped by LoRA stack (same files, strengths and experts, in the same order): groups in
    the order their stack first appears, jobs in file order within a group."""
    groups: dict[tuple[LoraEntry, ...], list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(job.stack, []).append(index)
    return list(groups.values())
