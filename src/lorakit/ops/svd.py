"""Low-rank factorisation for extract/resize/compose: randomized SVD (oversampling + QR-stabilised power
iterations), adaptive rank by energy or a verified Frobenius error bound, and global rank/size budgets.
"""

from __future__ import annotations

import dataclasses
import heapq

import torch

__all__ = [
    "Factorisation",
    "allocate_budget",
    "factorise",
    "factorise_product",
    "fro_norm",
    "product_norm",
    "randomized_svd",
]

OVERSAMPLE = 10
POWER_ITERS = 2
# Above this fraction of min(m, n) a sketch costs as much as the dense SVD, so use the dense one.
_DENSE_FRACTION = 0.4


def _qr(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x, mode="reduced").Q


def randomized_svd(
    a: torch.Tensor, rank: int, *, oversample: int = OVERSAMPLE, n_iter: int = POWER_ITERS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` ``U, S, Vh`` of a 2-D fp32 matrix (Halko et al.). Falls back to the exact thin SVD when
    the sketch would not be much smaller than the matrix; that also makes rank >= full rank exact."""
    m, n = a.shape
    if m > n:
        # Sketch the short side: the QR factorisations then run on n×l instead of m×l blocks.
        u, s, vh = randomized_svd(a.T, rank, oversample=oversample, n_iter=n_iter, seed=seed)
        return vh.T, s, u.T
    k = min(rank, m, n)
    width = k + oversample
    if width >= _DENSE_FRACTION * min(m, n):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, width, generator=gen, dtype=a.dtype).to(a.device)
    q = _qr(a @ omega)
    # Re-orthonormalising after every product keeps the small singular directions from drowning in
    # round-off when the spectrum decays fast (plain power iteration loses them).
    for _ in range(n_iter):
        z = _qr(a.T @ q)
        q = _qr(a @ z)
    b = q.T @ a
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    return (q @ ub)[:, :k], s[:k], vh[:k]


@dataclasses.dataclass
class Factorisation:
    """``a ≈ up @ down`` with ``up = U·√S``, ``down = √S·Vh`` (balanced, so fp16/bf16 storage treats both
    factors alike). ``rel_error`` is the measured ``‖a − up@down‖_F / ‖a‖_F``; ``energy`` the retained
    fraction of ``‖a‖²``; ``spectrum`` the singular values that were computed (descending)."""

    up: torch.Tensor
    down: torch.Tensor
    rank: int
    rel_error: float
    energy: float
    spectrum: torch.Tensor
    norm: float
    bound_met: bool = True

    def truncate(self, k: int) -> Factorisation:
        """The best rank-``k`` part of this factorisation; its error follows from the discarded spectrum."""
        k = max(0, min(k, self.rank))
        s2 = self.spectrum.double() ** 2
        kept = float(s2[:k].sum())
        total = self.norm**2
        err2 = max(total - kept, 0.0)
        return Factorisation(
            self.up[:, :k], self.down[:k], k, (err2**0.5 / self.norm) if self.norm > 0 else 0.0,
            kept / total if total > 0 else 1.0, self.spectrum, self.norm, self.bound_met,
        )


def fro_norm(a: torch.Tensor) -> float:
    """Frobenius norm with an fp64 total: one fp32 sum over millions of elements is off by ~1e-4
    relative, enough to distort error ratios; per-row fp32 norms are accurate and cheap."""
    if a.dim() < 2 or a.dtype == torch.float64:
        return float(torch.linalg.vector_norm(a.flatten(), dtype=torch.float64))
    rows = torch.linalg.vector_norm(a.reshape(a.shape[0], -1), dim=1)
    return float(rows.double().pow(2).sum().sqrt())


def _measure(a: torch.Tensor, up: torch.Tensor, down: torch.Tensor, norm: float) -> float:
    if norm == 0:
        return 0.0
    return fro_norm(a - up @ down) / norm


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


def factorise(
    a: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    seed: int = 0,
) -> Factorisation:
    """Factorise a 2-D matrix at a fixed ``rank``, or at the smallest rank that retains ``energy`` of
    ``Σσ²`` / whose measured relative Frobenius error is ``<= max_error`` (``rank`` then caps the search;
    ``bound_met`` is False when the cap stops it first)."""
    a = a.float()
    m, n = a.shape
    full = min(m, n)
    norm = fro_norm(a)
    if norm == 0.0:
        z = a.new_zeros
        return Factorisation(z(m, 0), z(0, n), 0, 0.0, 1.0, a.new_zeros(0), 0.0)
    cap = full if rank is None else min(rank, full)
    if energy is None and max_error is None:
        u, s, vh = randomized_svd(a, cap, seed=seed)
        up, down = _split(u, s, vh, cap)
        # U has orthonormal columns, so ‖a − U S Vh‖² = ‖a‖² − Σσ̃² exactly: no dense residual needed for a
        # fixed rank (the error-bound mode below does measure the residual).
        kept = min(float((s.double() ** 2).sum()) / norm**2, 1.0)
        # Near-exact factorisations lose the identity to cancellation (√(1 − kept)); measure those.
        err = (1.0 - kept) ** 0.5 if kept < 1.0 - 1e-4 else _measure(a, up, down, norm)
        return Factorisation(up, down, cap, err, kept, s, norm)
    # Energy target on Σσ²; an error bound e is the energy target 1 − e², then verified by measurement.
    target = energy if energy is not None else 1.0 - float(max_error) ** 2
    total = norm**2
    width = min(cap, 32)
    while True:
        u, s, vh = randomized_svd(a, width, seed=seed)
        # ‖a‖² is exact, so Σ_{i<=k} σ̃² / ‖a‖² is the energy the rank-k factorisation really keeps
        # (Q has orthonormal columns); the randomized σ̃ can only underestimate, so k is never too small.
        cum = torch.cumsum(s.double() ** 2, 0) / total
        hit = torch.nonzero(cum >= target - 1e-12)
        if len(hit) or width >= cap:
            k = int(hit[0]) + 1 if len(hit) else width
            break
        width = min(cap, width * 2)
    up, down = _split(u, s, vh, k)
    err = _measure(a, up, down, norm)
    # Verification: the bound is checked on the actual residual; round-off can push it over, then grow k.
    while max_error is not None and err > max_error and k < s.numel():
        k += 1
        up, down = _split(u, s, vh, k)
        err = _measure(a, up, down, norm)
    met = err <= max_error if max_error is not None else float(cum[k - 1]) >= target - 1e-6
    kept = float((s[:k].double() ** 2).sum()) / total
    return Factorisation(up, down, k, err, kept, s, norm, bool(met))


def allocate_budget(
    spectra: dict[str, torch.Tensor], costs: dict[str, int], *, ranks: int | None = None, size: int | None = None,
    caps: dict[str, int] | None = None,
) -> dict[str, int]:
    """Greedy global allocation across layers. ``ranks``: total rank; rank units go to the largest σ²
    anywhere. ``size``: bytes; units go to the largest σ² per byte (``costs[name]`` = bytes of one rank
    unit). Because each spectrum is descending, greedy picking is optimal for the total squared error."""
    caps = caps or {}
    alloc = {name: 0 for name in spectra}
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        k = alloc[name]
        s = spectra[name]
        if k < min(s.numel(), caps.get(name, s.numel())):
            score = float(s[k]) ** 2
            if size is not None:
                score /= max(costs[name], 1)
            heapq.heappush(heap, (-score, name))

    for name in spectra:
        push(name)
    used = 0
    while heap:
        _, name = heapq.heappop(heap)
        step = 1 if ranks is not None else costs[name]
        limit = ranks if ranks is not None else size
        if limit is not None and used + step > limit:
            continue  # this layer's next unit does not fit; cheaper units elsewhere may
        used += step
        alloc[name] += 1
        push(name)
    return alloc


def product_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """``‖up @ down‖_F`` without forming the product: QR of both factors, then the small core's norm."""
    if up.shape[1] == 0:
        return 0.0
    ru = torch.linalg.qr(up.double(), mode="r").R
    rd = torch.linalg.qr(down.double().T, mode="r").R
    return float(torch.linalg.matrix_norm(ru @ rd.T))


def factorise_product(
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
) -> Factorisation:
    """Optimal low-rank approximation of ``up @ down`` (``[m, R] @ [R, n]``) without forming it: QR of
    ``up`` and ``downᵀ``, SVD of the ``R × R`` core. The reported error is measured as the norm of the
    residual ``[up, up'] @ [down; −down']`` (itself computed through QR, so exact and cheap)."""
    up64, down64 = up.double(), down.double()
    qu, ru = torch.linalg.qr(up64, mode="reduced")
    qd, rd = torch.linalg.qr(down64.T, mode="reduced")
    uc, s, vhc = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    total = float((s**2).sum())
    norm = total**0.5
    if norm == 0.0:
        return Factorisation(up.new_zeros(up.shape[0], 0), down.new_zeros(0, down.shape[1]), 0, 0.0, 1.0,
                             s.float(), 0.0)
    cum = torch.cumsum(s**2, 0) / total
    if energy is None and max_error is None:
        k = min(rank if rank is not None else s.numel(), s.numel())
    else:
        target = energy if energy is not None else 1.0 - float(max_error) ** 2
        hit = torch.nonzero(cum >= target - 1e-12)
        k = int(hit[0]) + 1 if len(hit) else s.numel()
        if rank is not None:
            k = min(k, rank)

    def build(k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        root = s[:k].sqrt()
        new_up = (qu @ uc[:, :k]) * root
        new_down = root[:, None] * (vhc[:k] @ qd.T)
        err = product_norm(torch.cat([up64, new_up], 1), torch.cat([down64, -new_down], 0)) / norm
        return new_up, new_down, err

    new_up, new_down, err = build(k)
    while max_error is not None and err > max_error and k < s.numel() and (rank is None or k < rank):
        k += 1
        new_up, new_down, err = build(k)
    met = True if max_error is None and energy is None else (
        err <= max_error if max_error is not None else float(cum[k - 1]) >= energy - 1e-6)
    return Factorisation(new_up.float(), new_down.float(), k, err, float(cum[k - 1]) if k else 0.0, s.float(), norm,
                         bool(met))
