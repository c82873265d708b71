"""Bounded load run of ``lorakit serve`` on loopback: tiny model, small images, 8 clients over 5 LoRA stacks;
the two scheduling policies side by side in interleaved rounds (``swap``: one fused stack per call, wave 1;
``auto``: mixed-LoRA batches through adapter slots unless a stack is hot). Prints per policy the median and
spread of throughput, p50/p99 latency, swaps, images per call and mixed calls, and the auto/swap throughput ratio.
Exits 3 on a busy machine (``--allow-busy`` prints figures tagged BUSY).

Usage: python bench/serve.py [--requests 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_quiet, ratio, spread  # noqa: E402

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


def one_run(pipe, folder: Path, args, batching: str) -> dict:
    app = create_app(Settings(lora_dir=str(folder), pipe=pipe, max_batch=args.max_batch, max_queue=256,
                              batching=batching))
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
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as c:
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
    return {"rps": args.requests / wall, "p50": q[49], "p99": q[98], "swaps": worker.swaps,
            "per_call": args.requests / max(worker.calls, 1), "mixed": worker.mixed_calls, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--allow-busy", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tag = check_quiet(args.allow_busy)

    pipe = lorakit.tiny_pipeline(0)
    folder = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    write_loras(folder, pipe)
    runs: dict[str, list[dict]] = {"swap": [], "auto": []}
    for r in range(args.rounds):
        order = ("swap", "auto") if r % 2 == 0 else ("auto", "swap")
        for batching in order:
            runs[batching].append(one_run(pipe, folder, args, batching))
            print(f"round {r + 1} {batching}: {runs[batching][-1]['rps']:.2f} req/s", flush=True)
    # no second load check: this bench's own 8 clients and server keep the load average near 2 by the end
    print(f"\n{args.requests} requests, {args.clients} clients, {args.size}x{args.size}, {args.steps} steps, "
          f"5 stacks, max_batch {args.max_batch}, {args.rounds} interleaved rounds, {args.threads} torch threads{tag}")
    print(f"{'':16}{'swap (wave 1)':>26}{'auto (mixed batches)':>28}")
    rows = [("req/s", "rps", 2, ""), ("latency p50", "p50", 2, "s"), ("latency p99", "p99", 2, "s"),
            ("swaps", "swaps", 0, ""), ("images/call", "per_call", 2, ""), ("mixed calls", "mixed", 0, "")]
    for label, key, digits, unit in rows:
        cells = [spread([float(x[key]) for x in runs[p]], unit, digits) for p in ("swap", "auto")]
        print(f"{label:16}{cells[0]:>26}{cells[1]:>28}")
    print(f"auto / swap req/s: {ratio([x['rps'] for x in runs['auto']], [x['rps'] for x in runs['swap']])}{tag}")
    errors = [e for p in runs.values() for x in p for e in x["errors"]]
    print(f"errors          {len(errors)}" + (f"  first: {errors[0]}" if errors else ""))


if __name__ == "__main__":
    main()
