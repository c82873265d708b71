"""Naming conventions: read any supported LoRA file into the canonical model, write kohya or PEFT files.

Conventions are data (``conventions.py``: prefixes and suffixes); ``reader.py`` groups keys generically.
"""

from .reader import detect_format, load, parse_state_dict, split_key
from .writer import save, to_state_dict

__all__ = ["detect_format", "load", "parse_state_dict", "save", "split_key", "to_state_dict"]
