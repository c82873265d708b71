"""PEFT adapter folders (``adapter_model.safetensors`` beside ``adapter_config.json``), PEFT ``modules_to_save``
replacement tensors, and the recognisable formats lorakit does not read (cloneofsimo/lora positional files).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import FormatError

__all__ = [
    "ADAPTER_CONFIG", "CONFIG_KEYS", "cloneofsimo_message", "config_metadata", "is_peft_save", "modules_to_save",
    "saved_module_field", "sibling_config",
]

ADAPTER_CONFIG = "adapter_config.json"
#: the adapter_config.json entries lorakit reads (the others describe training)
CONFIG_KEYS = ("r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora", "fan_in_fan_out",
               "modules_to_save", "target_modules", "peft_type", "use_dora", "lora_bias")
_MODULES_TO_SAVE_INFIX = ".modules_to_save.default."
_POSITIONAL = re.compile(r"^[A-Za-z_][\w.]*:\d+:(up|down)$")


def sibling_config(path: str | Path) -> dict | None:
    """The ``adapter_config.json`` next to ``path`` (a PEFT adapter folder), or ``None``."""
    cfg_path = Path(path).with_name(ADAPTER_CONFIG)
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"{cfg_path} is not valid JSON ({exc}); fix or remove it") from exc
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_path} does not hold a JSON object")
    return cfg


def config_metadata(cfg: Mapping[str, object]) -> str:
    """The config as lorakit's ``lora_adapter_metadata`` JSON (the keys in :data:`CONFIG_KEYS`)."""
    return json.dumps({k: cfg[k] for k in CONFIG_KEYS if k in cfg and cfg[k] is not None}, sort_keys=True)


def is_peft_save(path: str | Path | None, keys: Iterable[str]) -> bool:
    """Whether a file is a PEFT ``save_pretrained`` output: its name or its ``base_model.model.`` keys say so."""
    if path is not None and Path(path).name.startswith("adapter_model."):
        return True
    return any(isinstance(k, str) and k.startswith("base_model.model.") for k in keys)


def modules_to_save(cfg: Mapping[str | None, dict]) -> tuple[str, ...]:
    """The ``modules_to_save`` names of every component's config."""
    names: list[str] = []
    for sub in cfg.values():
        value = sub.get("modules_to_save") if isinstance(sub, Mapping) else None
        if isinstance(value, (list, tuple)):
            names += [str(v) for v in value]
    return tuple(dict.fromkeys(names))


def saved_module_field(key: str, names: tuple[str, ...]) -> tuple[str, str] | None:
    """``(module name, field)`` of a ``modules_to_save`` replacement tensor (``saved_weight``/``saved_bias``), or
    ``None``. Raw PEFT state dicts spell it ``<m>.modules_to_save.default.weight``; saved adapters ``<m>.weight``
    with ``<m>`` (or a parent of it) listed in the config's ``modules_to_save``."""
    stem, dot, param = key.rpartition(".")
    if not dot or param not in ("weight", "bias"):
        return None
    field = "saved_" + param
    if _MODULES_TO_SAVE_INFIX in key:
        return key.replace(_MODULES_TO_SAVE_INFIX, ".").rpartition(".")[0], field
    parts = stem.split(".")
    for name in names:
        want = name.split(".")
        for i in range(len(parts) - len(want) + 1):
            if parts[i : i + len(want)] == want:
                return stem, field
    return None


def cloneofsimo_message(keys: Iterable[object], where: str) -> str | None:
    """The error text for a cloneofsimo/lora positional file (``unet:0:up``), or ``None``."""
    sample = [k for k in keys if isinstance(k, str) and _POSITIONAL.match(k)]
    if not sample:
        return None
    return (
        f"{where.strip() or 'the file'} is a cloneofsimo/lora positional file (keys like {sample[0]!r}: "
        "tensors numbered by position, no module names): not supported. Convert it with cloneofsimo/lora's own "
        "tools (e.g. `lora_add` to merge it into its base model), then `lorakit extract` a LoRA from the result."
    )
