"""Training LoRAs: ``lorakit.train(pipe_or_dir, data, TrainConfig(...)) -> TrainResult``. New LoRAs on chosen
modules, or an existing file continued on chosen layers with every other layer written back byte-identical."""

import sys
import types
from typing import Any

from .config import PRESETS, TrainConfig, TrainResult
from .loop import train

__all__ = ["PRESETS", "TrainConfig", "TrainResult", "train"]


class _CallablePackage(types.ModuleType):
    """``lorakit.train`` is both this package and the function: importing the package first (``from
    lorakit.train import TrainConfig``) binds the package to ``lorakit.train``, so calling it runs :func:`train`."""

    def __call__(self, *args: Any, **kwargs: Any) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
