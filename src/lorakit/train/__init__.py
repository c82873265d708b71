"""Training LoRAs: ``lorakit.train(pipe_or_dir, data, TrainConfig(...)) -> TrainResult``. New LoRAs on chosen
modules, or an existing file continued on chosen layers with every other layer written back byte-identical."""

from .config import PRESETS, TrainConfig, TrainResult
from .loop import train

__all__ = ["PRESETS", "TrainConfig", "TrainResult", "train"]
