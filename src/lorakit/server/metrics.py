"""Server metrics kept in process and rendered in the Prometheus text exposition format (v0.0.4),
written by hand so the server needs no extra dependency.
"""

from __future__ import annotations

import threading
from collections import Counter

__all__ = ["Metrics"]

_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(_BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(_BUCKETS):
            if value <= bound:
                self.counts[i] += 1

    def render(self, name: str) -> list[str]:
        lines = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(_BUCKETS, self.counts)]
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.total}')
        lines.append(f"{name}_sum {self.sum:.6f}")
        lines.append(f"{name}_count {self.total}")
        return lines


class Metrics:
    """Counters and histograms; updated from the event loop and the worker thread under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.queue_depth = 0
        self.swaps = 0
        self.batches = 0
        self.batched_images = 0
        self.request_latency = _Histogram()
        self.inference_latency = _Histogram()

    def observe_request(self, endpoint: str, status: int, seconds: float | None) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if seconds is not None:
                self.request_latency.observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        with self._lock:
            self.batches += 1
            self.batched_images += size
            self.inference_latency.observe(seconds)

    def render(self, cache_hits: int, cache_misses: int, cache_bytes: int) -> str:
        with self._lock:
            out = [
                "# HELP lorakit_queue_depth Generate requests waiting for the worker.",
                "# TYPE lorakit_queue_depth gauge",
                f"lorakit_queue_depth {self.queue_depth}",
                "# HELP lorakit_requests_total HTTP requests by endpoint and status.",
                "# TYPE lorakit_requests_total counter",
            ]
            out += [
                f'lorakit_requests_total{{endpoint="{ep}",status="{st}"}} {n}'
                for (ep, st), n in sorted(self.requests.items())
            ]
            out += [
                "# HELP lorakit_lora_swaps_total LoRA stack switches (remove + fuse) done by the worker.",
                "# TYPE lorakit_lora_swaps_total counter",
                f"lorakit_lora_swaps_total {self.swaps}",
                "# HELP lorakit_batches_total Pipeline calls; images per call = batched_images / batches.",
                "# TYPE lorakit_batches_total counter",
                f"lorakit_batches_total {self.batches}",
                "# TYPE lorakit_batched_images_total counter",
                f"lorakit_batched_images_total {self.batched_images}",
                "# HELP lorakit_lora_cache_hits_total Parsed-LoRA cache hits.",
                "# TYPE lorakit_lora_cache_hits_total counter",
                f"lorakit_lora_cache_hits_total {cache_hits}",
                "# TYPE lorakit_lora_cache_misses_total counter",
                f"lorakit_lora_cache_misses_total {cache_misses}",
                "# TYPE lorakit_lora_cache_bytes gauge",
                f"lorakit_lora_cache_bytes {cache_bytes}",
                "# HELP lorakit_request_latency_seconds Generate latency, queueing included.",
                "# TYPE lorakit_request_latency_seconds histogram",
            ]
            out += self.request_latency.render("lorakit_request_latency_seconds")
            out += [
                "# HELP lorakit_inference_latency_seconds One pipeline call (a batch).",
                "# TYPE lorakit_inference_latency_seconds histogram",
            ]
            out += self.inference_latency.render("lorakit_inference_latency_seconds")
        return "\n".join(out) + "\n"
