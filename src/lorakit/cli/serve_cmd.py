"""``lorakit serve``: run the HTTP service (FastAPI + uvicorn, OpenAPI at /docs), or the same app on
Ray Serve with ``--ray --replicas N``.
"""

from __future__ import annotations

import click

__all__ = ["serve_cmd"]


@click.command("serve")
@click.option("--model", default="tiny", show_default=True, help="'tiny' or a local diffusers pipeline folder.")
@click.option("--lora-dir", required=True, type=click.Path(file_okay=False), help="Folder of .safetensors LoRAs.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", default=None, envvar="LORAKIT_API_KEY", help="Require 'Authorization: Bearer KEY'.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1), help="Waiting requests before 503.")
@click.option("--max-batch", default=4, show_default=True, type=click.IntRange(1), help="Images per pipeline call.")
@click.option("--allow-upload", is_flag=True, help="Enable POST/DELETE /v1/loras.")
@click.option("--max-upload-mb", default=64.0, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--cache-mb", default=512.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Byte budget of the parsed-LoRA LRU cache.")
@click.option("--ray", "use_ray", is_flag=True, help="Serve on Ray Serve with LoRA-stack multiplexing.")
@click.option("--replicas", default=2, show_default=True, type=click.IntRange(1), help="Ray Serve replicas.")
def serve_cmd(model: str, lora_dir: str, host: str, port: int, api_key: str | None, max_queue: int, max_batch: int,
              allow_upload: bool, max_upload_mb: float, cache_mb: float, use_ray: bool, replicas: int) -> None:
    """Serve image generation with stacks of LoRAs over HTTP."""
    from lorakit.server.app import Settings

    settings = Settings(
        lora_dir=lora_dir, model=model, api_key=api_key, max_queue=max_queue, max_batch=max_batch,
        allow_upload=allow_upload, max_upload_mb=max_upload_mb, cache_mb=cache_mb,
    )
    if use_ray:
        from lorakit.server.ray_app import run_ray

        run_ray(settings, replicas=replicas, host=host, port=port)
        return
    import uvicorn

    from lorakit.server.app import create_app

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
