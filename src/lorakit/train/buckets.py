"""Aspect-ratio buckets (kohya's ``make_bucket_resolutions``, written anew): sizes ``(width, height)`` on a grid
of ``step`` pixels with sides in ``[R/2, 2R]`` and area at most ``R²``; every image goes to the bucket whose
aspect ratio is nearest its own, is resized to cover it and centre-cropped, and a batch holds one bucket only."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["assign", "bucket_sizes", "nearest"]


def bucket_sizes(resolution: int, step: int) -> list[tuple[int, int]]:
    """Every ``(width, height)`` bucket for ``resolution`` on a ``step`` grid, sorted by aspect ratio."""
    side = max(step, resolution // step * step)
    low = max(step, (resolution // 2) // step * step)
    high = max(side, (resolution * 2) // step * step)
    area = resolution * resolution
    sizes = {(side, side)}
    for w in range(low, high + 1, step):
        h = min(high, (area // w) // step * step)
        if h >= low:
            sizes.add((w, h))
            sizes.add((h, w))
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest(size: tuple[int, int], sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest ``size``'s (``(width, height)``; ties: the larger area)."""
    ratio = size[0] / size[1]
    return min(sizes, key=lambda s: (abs(s[0] / s[1] - ratio), -s[0] * s[1]))


def assign(image_sizes: Sequence[tuple[int, int]], resolution: int, step: int) -> list[tuple[int, int]]:
    """The bucket of each image size."""
    sizes = bucket_sizes(resolution, step)
    return [nearest(s, sizes) for s in image_sizes]
