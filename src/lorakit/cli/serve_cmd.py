"""``lorakit serve``: run the HTTP service (FastAPI + uvicorn, OpenAPI at /docs), or the same app on
Ray Serve with ``--ray --replicas N``.

The API key comes from ``LORAKIT_API_KEY`` or ``--api-key-file`` (``--api-key`` still works but shows the key in
``ps``). It is compared as UTF-8 bytes with the bytes of the ``Authorization`` header, so a non-ASCII key works
when clients send it UTF-8 encoded.

Connection limits given to uvicorn (slow clients): ``--keep-alive-s`` closes idle keep-alive connections,
``h11_max_incomplete_event_size`` (16 KiB) caps the request line plus headers, and ``--limit-concurrency`` caps
open connections plus running requests (more get 503), and ``--header-timeout-s`` closes a connection whose
request head is not complete in time (slow-loris: uvicorn itself has no such deadline; see
:mod:`lorakit.server.slowloris`).
"""

from __future__ import annotations

import os

import click

__all__ = ["read_api_key", "serve_cmd"]

MAX_HEADER_BYTES = 16 * 1024


def read_api_key(api_key: str | None, api_key_file: str | None) -> str | None:
    """The key from ``--api-key-file`` (trailing newline stripped), ``--api-key`` or ``LORAKIT_API_KEY``."""
    if api_key is not None and api_key_file is not None:
        raise click.UsageError("Pass --api-key or --api-key-file, not both.")
    if api_key_file is not None:
        with open(api_key_file, encoding="utf-8") as fh:
            api_key = fh.read().rstrip("\r\n")
    elif api_key is not None:
        click.echo("warning: --api-key is visible to every user in `ps`; use LORAKIT_API_KEY or --api-key-file.",
                   err=True)
    else:
        api_key = os.environ.get("LORAKIT_API_KEY")
    if api_key is not None and not api_key.strip():
        raise click.UsageError("The API key is empty.")
    return api_key


def _orgs(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(o.strip() for o in value.split(",") if o.strip())


_MODEL_OPTIONS = [
    click.option("--device", default="auto", show_default=True,
                 help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps, as in `lorakit generate`."),
    click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
                 help="auto: bf16 on CUDA where supported, else fp32."),
    click.option("--offload", default="none", show_default=True, type=click.Choice(["none", "model", "sequential"]),
                 help="diffusers' CPU offload, for models larger than the GPU."),
    click.option("--max-frames", default=129, show_default=True, type=click.IntRange(1),
                 help="Video models: the most frames one request may ask for (more: 422)."),
    click.option("--default-frames", default=None, type=click.IntRange(1),
                 help="Video models: frames when a request names none [default: the pipeline's]."),
    click.option("--max-input-mb", default=16.0, show_default=True, type=click.FloatRange(0, min_open=True),
                 help="Size cap of a request's conditioning image or video."),
    click.option("--batching", default="auto", show_default=True, type=click.Choice(["auto", "swap"]),
                 help="auto: requests with different LoRAs share one call through adapter slots when no stack is "
                      "hot; swap: one fused stack per call (remove and re-fuse between stacks)."),
    click.option("--slots", "n_slots", default=8, show_default=True, type=click.IntRange(0),
                 help="Adapter slots for mixed batches (0: swap only)."),
]


def _model_options(fn):
    """The device, video and batching options (their values reach ``serve_cmd`` as keyword arguments)."""
    for option in reversed(_MODEL_OPTIONS):
        fn = option(fn)
    return fn


@click.command("serve")
@click.option("--model", default="tiny", show_default=True, help="'tiny' or a local diffusers pipeline folder.")
@click.option("--lora-dir", required=True, type=click.Path(file_okay=False), help="Folder of .safetensors LoRAs.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY'. Visible in `ps`: prefer the "
              "LORAKIT_API_KEY environment variable or --api-key-file. Compared as UTF-8 bytes (non-ASCII works).")
@click.option("--api-key-file", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Read the API key from this file (one trailing newline stripped).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1), help="Waiting requests before 503.")
@click.option("--max-batch", default=4, show_default=True, type=click.IntRange(1), help="Images per pipeline call.")
@click.option("--allow-upload", is_flag=True, help="Enable POST/DELETE /v1/loras.")
@click.option("--max-upload-mb", default=64.0, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--max-body-kb", default=1024.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Body cap of every request but uploads.")
@click.option("--allow-hub", default=None, is_flag=False, flag_value="", metavar="[ORG,...]",
              help="Accept hub references org/repo/file: alone for any org, or only these orgs. Off by default.")
@click.option("--request-timeout", default=300.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds a generate request may take, queue wait included (then 504).")
@click.option("--max-pixel-steps", default=None, type=click.IntRange(1),
              help="Cap on steps*width*height per request [default: 50 steps at 1024x1024].")
@click.option("--upload-timeout", default=30.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds to validate one upload (then 422).")
@click.option("--header-timeout-s", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Close a connection whose request head is not complete this long after it opened or after its "
                   "previous response (slow-loris).")
@click.option("--keep-alive-s", default=5, show_default=True, type=click.IntRange(1),
              help="Close idle keep-alive connections after this long.")
@click.option("--limit-concurrency", default=256, show_default=True, type=click.IntRange(1),
              help="Open connections plus running requests before uvicorn answers 503.")
@click.option("--cache-mb", default=512.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Byte budget of the parsed-LoRA LRU cache.")
@_model_options
@click.option("--ray", "use_ray", is_flag=True, help="Serve on Ray Serve with LoRA-stack multiplexing.")
@click.option("--replicas", default=2, show_default=True, type=click.IntRange(1), help="Ray Serve replicas.")
def serve_cmd(model: str, lora_dir: str, host: str, port: int, api_key: str | None, api_key_file: str | None,
              max_queue: int, max_batch: int, allow_upload: bool, max_upload_mb: float, max_body_kb: float,
              allow_hub: str | None, request_timeout: float, max_pixel_steps: int | None, upload_timeout: float,
              header_timeout_s: float, keep_alive_s: int, limit_concurrency: int, cache_mb: float, use_ray: bool,
              replicas: int, **model_options: object) -> None:
    """Serve image and video generation with stacks of LoRAs over HTTP (the model's task: text-to-image,
    image-to-video, Video2World, ...)."""
    from lorakit.server.app import Settings

    settings = Settings(
        lora_dir=lora_dir, model=model, api_key=read_api_key(api_key, api_key_file), max_queue=max_queue,
        max_batch=max_batch, allow_upload=allow_upload, max_upload_mb=max_upload_mb, max_body_kb=max_body_kb,
        cache_mb=cache_mb, allow_hub=_orgs(allow_hub), request_timeout=request_timeout,
        max_pixel_steps=max_pixel_steps, upload_timeout_s=upload_timeout,
        **{("slots" if k == "n_slots" else k): v for k, v in model_options.items()},  # type: ignore[arg-type]
    )
    if use_ray:
        from lorakit.server.ray_app import run_ray

        run_ray(settings, replicas=replicas, host=host, port=port)
        return
    import uvicorn

    from lorakit.server.app import create_app
    from lorakit.server.slowloris import header_deadline_protocol

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", timeout_keep_alive=keep_alive_s,
                http=header_deadline_protocol(header_timeout_s),
                h11_max_incomplete_event_size=MAX_HEADER_BYTES, limit_concurrency=limit_concurrency,
                timeout_graceful_shutdown=10)
