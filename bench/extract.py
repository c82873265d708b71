"""Benchmark lorakit's extraction SVD against torch.linalg.svd on SD1.5-size layer shapes.

Each layer gets a realistic fine-tune difference (a decaying low-rank signal plus small dense noise); both
methods factorise it at the same rank in this process. Run: ``flock /tmp/lorakit-bench.lock python bench/extract.py``.
"""

from __future__ import annotations

import argparse
import time

import torch

from lorakit.ops.svd import factorise, fro_norm

# (name, out, in·kh·kw) of SD1.5 UNet layers: attention at 320/640/1280, cross-attention k/v from the
# 768-dim text embedding, GEGLU feed-forward, and 3×3 resnet convs flattened to (out, in·9).
SD15_SHAPES = [
    ("attn1.to_q 320", 320, 320),
    ("attn2.to_k 320", 320, 768),
    ("ff.proj 320", 2560, 320),
    ("ff.out 320", 320, 1280),
    ("attn1.to_q 640", 640, 640),
    ("attn2.to_v 640", 640, 768),
    ("ff.proj 640", 5120, 640),
    ("ff.out 640", 640, 2560),
    ("attn1.to_out 1280", 1280, 1280),
    ("attn2.to_k 1280", 1280, 768),
    ("ff.proj 1280", 10240, 1280),
    ("ff.out 1280", 1280, 5120),
    ("conv3x3 320", 320, 320 * 9),
    ("conv3x3 640", 640, 640 * 9),
    ("conv3x3 1280", 1280, 1280 * 9),
]


def fine_tune_diff(m: int, n: int, seed: int, signal_rank: int = 96, noise: float = 0.1) -> torch.Tensor:
    """Low-rank-ish update: decaying spectrum over ``signal_rank`` directions, plus dense noise whose norm
    is ``noise`` times the signal's (fine-tunes are not exactly low rank)."""
    g = torch.Generator().manual_seed(seed)
    k = min(signal_rank, m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    s = 1e-3 * 0.96 ** torch.arange(k, dtype=torch.float32)
    signal = (u * s) @ v.T
    eps = torch.randn(m, n, generator=g)
    return signal + eps * (noise * float(signal.norm()) / float(eps.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"rank {args.rank}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"{'layer':<20}{'shape':>14}{'lorakit s':>11}{'svd s':>9}{'speed-up':>10}{'err lorakit':>13}{'err optimal':>13}{'ratio':>8}")
    tot_fast = tot_svd = 0.0
    worst = 0.0
    for i, (name, m, n) in enumerate(SD15_SHAPES):
        a = fine_tune_diff(m, n, seed=i)
        norm = fro_norm(a)
        t0 = time.perf_counter()
        f = factorise(a, rank=args.rank, seed=i)  # includes measuring its own error
        t1 = time.perf_counter()
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        best = (u[:, : args.rank] * s[: args.rank]) @ vh[: args.rank]
        t2 = time.perf_counter()
        # Both errors measured the same way, in fp64 accumulation, outside the timed region.
        err_opt = fro_norm(a - best) / norm
        err_fast = fro_norm(a - f.up @ f.down) / norm
        fast, slow = t1 - t0, t2 - t1
        tot_fast += fast
        tot_svd += slow
        ratio = err_fast / err_opt
        worst = max(worst, ratio)
        print(f"{name:<20}{f'{m}x{n}':>14}{fast:>11.4f}{slow:>9.3f}{slow / fast:>9.1f}x{err_fast:>13.5f}{err_opt:>13.5f}{ratio:>8.4f}")
    print(f"total: lorakit {tot_fast:.2f} s, torch.linalg.svd {tot_svd:.2f} s, speed-up {tot_svd / tot_fast:.1f}x; "
          f"worst error ratio {worst:.4f} (target >= 10x at <= 1.01)")


if __name__ == "__main__":
    main()
