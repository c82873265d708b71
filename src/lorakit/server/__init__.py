"""lorakit's HTTP service: FastAPI app, single-owner pipeline worker, LoRA registry and metrics.
Start it with ``lorakit serve`` or build it with :func:`create_app`.
"""

from .app import Settings, create_app

__all__ = ["Settings", "create_app"]
