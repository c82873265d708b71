"""Naming conventions: read any supported LoRA file into the canonical model, write kohya or PEFT files.

Conventions are data (``conventions.py``: prefixes and suffixes); ``reader.py`` groups keys generically. The
writer spells names already resolved: ``lorakit.save`` (``lorakit.saving``) resolves them against a model first.
"""

from .reader import detect_format, load, parse_state_dict, split_key
from .writer import check_peft_expressible, save, to_state_dict

__all__ = ["check_peft_expressible", "detect_format", "load", "parse_state_dict", "save", "split_key", "to_state_dict"]
