"""Compatibility: name resolution lives in :mod:`lorakit.families.resolve` (one resolver for live models, meta
models and checkpoints). Kept so that ``from lorakit.runtime.resolve import Resolver`` keeps working."""

from ..families.resolve import GENERIC, Resolution, Resolver, components_of

__all__ = ["GENERIC", "Resolution", "Resolver", "components_of"]
