"""The API's routers: service pages (index, health, metrics), the LoRA library, and image generation."""

from .generate import router as generate_router
from .loras import router as loras_router
from .service import router as service_router

__all__ = ["generate_router", "loras_router", "service_router"]
