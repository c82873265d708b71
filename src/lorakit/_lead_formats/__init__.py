from .reader import load, parse_state_dict, split_key
from .writer import save, to_state_dict
__all__ = ["load", "parse_state_dict", "save", "split_key", "to_state_dict"]
