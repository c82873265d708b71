"""Bounded load run of ``lorakit serve`` on loopback: tiny model, small images, mixed LoRA stacks; prints
throughput, p50/p99 latency, LoRA swaps, batches and errors.  Usage: python bench/serve.py [--requests 200]
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

import lorakit
from lorakit.io import write_tensors
from lorakit.server.app import Settings, create_app

NAMES = ("ink", "neon", "clay", "film")


def write_loras(folder: Path, pipe) -> None:
    """Four PEFT-style rank-4 LoRAs on the tiny UNet's attention projections (seeded random factors)."""
    for i, name in enumerate(NAMES):
        g = torch.Generator().manual_seed(100 + i)
        sd = {}
        for mod_name, mod in pipe.unet.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".attn" in mod_name:
                sd[f"unet.{mod_name}.lora_A.weight"] = torch.randn(4, mod.in_features, generator=g) * 0.3
                sd[f"unet.{mod_name}.lora_B.weight"] = torch.randn(mod.out_features, 4, generator=g) * 0.3
        write_tensors(sd, folder / f"{name}.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=4)
    args = parser.parse_args()

    pipe = lorakit.tiny_pipeline(0)
    folder = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    write_loras(folder, pipe)
    app = create_app(Settings(lora_dir=str(folder), pipe=pipe, max_batch=args.max_batch, max_queue=256))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    # Five stacks (none + one per LoRA), drawn at random per request: a FIFO server would swap ~80% of the time.
    stacks = [[]] + [[{"name": n, "strength": 0.8}] for n in NAMES]
    rng = random.Random(0)
    plan = [rng.choice(stacks) for _ in range(args.requests)]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            for i in range(k, args.requests, args.clients):
                req = {"prompt": f"bench {i % 7}", "seed": i, "steps": args.steps, "width": args.size,
                       "height": args.size, "loras": plan[i]}
                t0 = time.perf_counter()
                resp = c.post("/v1/generate", json=req)
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if resp.status_code != 200:
                        errors.append(f"{resp.status_code} {resp.text[:100]}")

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    worker = app.state.worker
    server.should_exit = True
    thread.join(10)

    q = statistics.quantiles(latencies, n=100)
    print(f"requests        {args.requests} ({args.clients} clients, {args.size}x{args.size}, {args.steps} steps, "
          f"5 stacks, max_batch {args.max_batch})")
    print(f"wall            {wall:.2f} s")
    print(f"throughput      {args.requests / wall:.2f} req/s")
    print(f"latency p50     {q[49] * 1000:.0f} ms")
    print(f"latency p99     {q[98] * 1000:.0f} ms")
    print(f"lora swaps      {worker.swaps}")
    print(f"pipeline calls  {worker.calls} ({args.requests / max(worker.calls, 1):.2f} images/call)")
    print(f"errors          {len(errors)}" + (f"  first: {errors[0]}" if errors else ""))


if __name__ == "__main__":
    main()
