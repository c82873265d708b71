"""Compile-stable adapter slots: ``k`` LoRAs resident at once in padded buffers preallocated per target module,
and mixed batches in which each row of a call uses its own slot (gather + bmm, as Punica / S-LoRA do for LLMs).

Weights are never touched: a forward hook per target adds ``s[slot[r]] · B[slot[r]] @ (A[slot[r]] @ x[r])`` to
row ``r`` of the module's output. Loads and unloads ``copy_`` into the buffers; strengths and the row map are
tensors from the start, so a ``torch.compile``d model keeps its graph across loads, unloads and row patterns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
import os
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MatchError, SlotError, UnsupportedAdapterError
from ..families import ModuleRef, Resolver, Target, components_of
from ..model import Layer, LoRA
from ..placement import dst_view, row_piece
from .checks import refuse_meta
from .patch import _check_finite, _check_invalid

__all__ = ["Slots", "slots"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _hookable(module: nn.Module) -> str | None:
    """Why ``module`` cannot hold a slot, or ``None`` when it can (Linear; ungrouped, zero-padded Conv1d/2d/3d)."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, _CONVS):
        if module.groups != 1:
            return f"a grouped {type(module).__name__} (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"a {type(module).__name__} with padding_mode={module.padding_mode!r}"
        return None
    return f"a {type(module).__name__} (slots hook Linear and ungrouped Conv1d/2d/3d)"


@dataclasses.dataclass(eq=False)
class _Site:
    """One hooked module: its padded buffers ``A [k, R, in·kernel]`` and ``B [k, out, R]``, and, per slot, the rank
    columns in use (eager calls compute only those; a compiled graph always runs all ``R``)."""

    ref: ModuleRef
    module: nn.Module
    A: torch.Tensor
    B: torch.Tensor
    used: list[int]
    kernel: tuple[int, ...] = ()  # conv kernel size; () for a Linear

    @property
    def capacity(self) -> int:
        return int(self.A.shape[1])

    @property
    def in_flat(self) -> int:
        return int(self.A.shape[2])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[1])


@dataclasses.dataclass(eq=False)
class _RowState:
    """The tensors a call reads on one device: the row map (``rowmap[:nrows]``) and the slot strengths."""

    rowmap: torch.Tensor  # [max_rows] int64, -1 = no LoRA
    nrows: torch.Tensor  # 0-d int64
    strengths: torch.Tensor  # [k] float32


@dataclasses.dataclass
class _Piece:
    """A planned copy: ``down`` into ``A[i, col:col+r]``, ``scale·up`` into ``B[i, rows, col:col+r]``."""

    site: _Site
    col: int
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    rows: tuple[int, int] | None


def _slot_index(state: _RowState, n: int) -> torch.Tensor:
    """The slot of each of the ``n`` rows of a call, from tensors only (no Python value a graph would guard on).

    Row ``r`` uses ``rows[r % L]`` when the call has at least ``L = len(rows)`` rows (CFG's doubled batch maps
    onto the prompts), else ``rows[r · L // n]`` (a text encoder sees one row per prompt while ``rows`` lists
    one entry per image, ``num_images_per_prompt`` entries per prompt)."""
    r = torch.arange(n, device=state.rowmap.device)
    pos = torch.where(state.nrows <= n, r % state.nrows, torch.div(r * state.nrows, n, rounding_mode="floor"))
    return state.rowmap[pos]


def _row_strengths(state: _RowState, idx: torch.Tensor) -> torch.Tensor:
    """Per-row strength: the slot's strength, 0 for ``-1`` rows (their gathered factors are slot 0's, zeroed out)."""
    return state.strengths[idx.clamp(min=0)] * (idx >= 0)


class _Hook:
    """The forward hook of one site. Compiled: always the gather path over all ``R`` columns (one fixed graph).
    Eager: nothing for an all ``-1`` map, one matmul pair when every row uses the same slot, the gather path over
    the used columns otherwise."""

    def __init__(self, site: _Site, owner: Slots) -> None:
        self.site = site
        self.owner = owner

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
                 ) -> torch.Tensor:
        x = args[0] if args else kwargs["input"]
        site, owner = self.site, self.owner
        state = owner._states[site.A.device]
        if torch.compiler.is_compiling():
            idx = _slot_index(state, x.shape[0])
            return _mixed(site, x, output, idx, _row_strengths(state, idx), site.capacity)
        pattern = owner._pattern
        live = {s for s in pattern if s >= 0}
        rank = max((site.used[s] for s in live), default=0)
        if rank == 0:
            return output  # every row is -1, or no slot in use here holds a LoRA for this module
        if len(live) == 1 and -1 not in pattern:
            (s,) = live
            return _uniform(site, x, output, s, state.strengths[s], rank)
        idx, srow = owner._eager_rows(state, x.shape[0])
        return _mixed(site, x, output, idx, srow, rank)


def _accumulate(y: torch.Tensor, y3: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``y + h @ b`` batched (``y3``: ``y`` reshaped ``[n, ·, ·]``, a view when ``y`` is contiguous): in place into
    the module's fresh output when nothing needs it for a backward pass (no extra pass over it), else out of place."""
    if y.is_contiguous() and not (y.requires_grad and torch.is_grad_enabled()):
        y3.baddbmm_(h, b)
        return y
    return torch.baddbmm(y3, h, b).view(y.shape)


def _uniform(site: _Site, x: torch.Tensor, y: torch.Tensor, s: int, strength: torch.Tensor, rank: int) -> torch.Tensor:
    """Every row on slot ``s``: ``y + strength · B[s] @ (A[s] @ x)`` with the used rank only (no gather)."""
    a = site.A[s, :rank].to(x.dtype)
    b = site.B[s, :, :rank].to(x.dtype)
    n = x.shape[0]
    if not site.kernel:
        h = F.linear(x, a).mul_(strength.to(x.dtype)).reshape(1, -1, rank)  # [1, n·tokens, rank]
        return _accumulate(y, y.reshape(1, -1, site.out_features), h, b.t().unsqueeze(0))
    m = site.module
    h = _CONV_FN[len(site.kernel)](x, a.reshape(rank, -1, *site.kernel), None, m.stride, m.padding, m.dilation)
    h = h.mul_(strength.to(x.dtype)).reshape(n, rank, -1)  # [n, rank, spatial]
    y3 = y.reshape(n, site.out_features, -1)
    return _accumulate(y, y3, b.unsqueeze(0).expand(n, -1, -1), h)  # [n, out, rank] @ [n, rank, spatial]


def _mixed(site: _Site, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, srow: torch.Tensor, rank: int) -> torch.Tensor:
    """Row ``r`` gets ``srow[r] · B[idx[r]] @ (A[idx[r]] @ x[r])``: gather the factors of each row's slot, then two
    batched matmuls (a Linear) or a grouped conv and a batched matmul (a conv, the down conv grouped by row)."""
    n = x.shape[0]
    safe = idx.clamp(min=0)
    a = site.A[:, :rank].index_select(0, safe).to(x.dtype)  # [n, rank, in·kernel]
    b = site.B[:, :, :rank].index_select(0, safe).to(x.dtype)  # [n, out, rank]
    scale = srow.to(x.dtype).view(n, 1, 1)
    if not site.kernel:
        h = torch.bmm(x.reshape(n, -1, site.in_flat), a.transpose(1, 2)).mul_(scale)  # [n, tokens, rank]
        y3 = y.reshape(n, -1, site.out_features)
        return _accumulate(y, y3, h, b.transpose(1, 2))
    m = site.module
    conv = _CONV_FN[len(site.kernel)]
    channels = site.in_flat // math.prod(site.kernel)
    h = conv(x.reshape(1, n * channels, *x.shape[2:]), a.reshape(n * rank, channels, *site.kernel), None,
             m.stride, m.padding, m.dilation, n)  # [1, n·rank, *spatial]: the down conv grouped by row
    h = h.reshape(n, rank, -1).mul_(scale)
    y3 = y.reshape(n, site.out_features, -1)
    return _accumulate(y, y3, b, h)


class Slots:
    """``k`` LoRA slots on a model (see :func:`slots`). ``load``/``unload`` copy into preallocated buffers;
    ``rows([...])`` picks the slot of each row of the calls inside the block; ``close()`` removes the hooks."""

    def __init__(self, components: dict[str, nn.Module], resolver: Resolver, sites: dict[tuple[str, str], _Site],
                 k: int, max_rows: int) -> None:
        self.components = components
        self.k = k
        self.max_rows = max_rows
        self._resolver = resolver
        self._sites = sites
        self._states: dict[torch.device, _RowState] = {}
        for site in sites.values():
            dev = site.A.device
            if dev not in self._states:
                self._states[dev] = _RowState(
                    torch.full((max_rows,), -1, dtype=torch.long, device=dev),
                    torch.ones((), dtype=torch.long, device=dev),
                    torch.zeros(k, dtype=torch.float32, device=dev),
                )
        self._pattern: tuple[int, ...] = (-1,)  # outside rows(): every row is base
        self._cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self.labels: list[str | None] = [None] * k
        self._strengths: list[float] = [0.0] * k
        # id(LoRA) -> (its layers, its checked plan, its unmatched layer count): a LoRA object loaded again is not
        # resolved and checked again
        self._plans: dict[int, tuple[tuple[Layer, ...], list[_Piece], int]] = {}
        self._handles = [site.module.register_forward_hook(_Hook(site, self), with_kwargs=True) for site in sites.values()]
        self.closed = False

    # -- what was prepared ------------------------------------------------------------------------------
    @property
    def targets(self) -> list[ModuleRef]:
        """The hooked modules, ``component:module``."""
        return [site.ref for site in self._sites.values()]

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the slots preallocated (A, B, row maps, strengths)."""
        total = sum(s.A.nbytes + s.B.nbytes for s in self._sites.values())
        return total + sum(st.rowmap.nbytes + st.nrows.nbytes + st.strengths.nbytes for st in self._states.values())

    @property
    def strengths(self) -> list[float]:
        return list(self._strengths)

    # -- loading ----------------------------------------------------------------------------------------
    def load(self, i: int, lora: LoRA | str | os.PathLike[str], strength: float = 1.0, *, strict: bool = False) -> None:
        """Copy ``lora`` (a :class:`LoRA` or a path) into slot ``i`` at ``strength``, alpha/rank folded into ``B``.

        Atomic: every layer is resolved, checked (type, rank against the prepared capacity, shape, finiteness) and
        planned first; on any error the slot keeps what it held. A layer landing on a module outside the prepared
        targets, or needing more rank than the slot has there, raises :class:`SlotError`; an adapter other than a
        low-rank LoRA (LoHa, LoKr, DoRA, full diffs, bias/param deltas) raises :class:`UnsupportedAdapterError`.
        Layers matching no module of the model are skipped with a warning (``strict=True``: :class:`MatchError`).
        """
        self._check_open()
        self._check_slot(i)
        strength = _finite_strength(strength)
        if not isinstance(lora, LoRA):
            from ..formats import load as read  # lazy: the reader is only needed for paths

            lora = read(lora)
        _check_invalid([(lora, strength)], None if not strict else True)
        pieces = self._cached_plan(lora, strict)
        self._commit(i, pieces)
        self.labels[i] = os.path.basename(str(lora.source)) if lora.source else "lora"
        self.set_strength(i, strength)

    def unload(self, i: int) -> None:
        """Empty slot ``i`` (its rows then add nothing) by zeroing the columns it used."""
        self._check_open()
        self._check_slot(i)
        self._commit(i, [])
        self.labels[i] = None
        self.set_strength(i, 0.0)

    def set_strength(self, i: int, strength: float) -> None:
        """Slot ``i``'s strength from the next call on (a tensor write: no recompilation)."""
        self._check_slot(i)
        strength = _finite_strength(strength)
        self._strengths[i] = strength
        for st in self._states.values():
            st.strengths[i] = strength
        self._cache.clear()

    def _cached_plan(self, lora: LoRA, strict: bool) -> list[_Piece]:
        """The plan of ``lora``, kept while the LoRA object lives: a catalogue resident in memory loads at the
        cost of its copies. Replacing a layer of ``lora.layers`` makes a new plan; changing its tensors in place
        after a load is not seen (load a new LoRA object instead)."""
        layers = tuple(lora.layers.values())
        hit = self._plans.get(id(lora))
        if hit is not None and len(hit[0]) == len(layers) and all(a is b for a, b in zip(hit[0], layers)):
            if not (strict and hit[2]):  # a strict load of a LoRA with unmatched layers plans again, and raises
                return hit[1]
        pieces, unmatched = self._plan(lora, strict)
        if hit is None:
            weakref.finalize(lora, self._plans.pop, id(lora), None)
        self._plans[id(lora)] = (layers, pieces, unmatched)
        return pieces

    def _plan(self, lora: LoRA, strict: bool) -> tuple[list[_Piece], int]:
        res = self._resolver.resolve(lora)
        unmatched = sorted(layer.name for layer in res.unmatched)
        if not res.matched:
            raise MatchError(f"no layer of {lora.source or 'the LoRA'} matched a module of the model "
                             f"(unmatched: {', '.join(unmatched[:10])}{' ...' if len(unmatched) > 10 else ''}); "
                             "is it a LoRA for another model family?")
        if unmatched:
            msg = (f"{len(unmatched)} layer(s) of {lora.source or 'the LoRA'} matched no module:\n  "
                   + "\n  ".join(unmatched))
            if strict:
                raise MatchError(f"strict=True and nothing was loaded; {msg}\nPass strict=False to skip them.")
            warnings.warn(msg + "\nPass strict=True to make this an error.", stacklevel=3)
        pieces: list[_Piece] = []
        cols: dict[int, int] = {}
        for layer, targets in res.matched:
            for t in targets:
                site = self._site_of(layer, t)
                piece = _place(layer, t, site, cols.get(id(site), 0))
                cols[id(site)] = piece.col + piece.down.shape[0]
                pieces.append(piece)
            dtypes = {self._site_of(layer, t).A.dtype for t in targets}
            if not _finite(layer, dtypes):
                _check_finite(layer, lora.source or "lora", dtypes)  # names the tensors at fault and raises
        return pieces, len(unmatched)

    def _site_of(self, layer: Layer, t: Target) -> _Site:
        site = self._sites.get((t.component, t.module))
        if site is None:
            raise SlotError(
                f"{layer.name} lands on {t.ref}, which is not among the {len(self._sites)} prepared slot targets; "
                "nothing was loaded. Create the slots with targets= covering it, or files= including this LoRA."
            )
        return site

    def _commit(self, i: int, pieces: list[_Piece]) -> None:
        """Write slot ``i``: zero what it used and the new pieces do not overwrite, then copy the pieces in."""
        new_cols: dict[int, int] = {}
        split: set[int] = set()
        for p in pieces:
            new_cols[id(p.site)] = max(new_cols.get(id(p.site), 0), p.col + p.down.shape[0])
            if p.rows is not None:
                split.add(id(p.site))
        with torch.no_grad():
            for site in self._sites.values():
                old, new = site.used[i], new_cols.get(id(site), 0)
                if id(site) in split:  # pieces cover some rows of B only: clear every row of the columns
                    site.B[i, :, :max(old, new)].zero_()
                elif old > new:
                    site.B[i, :, new:old].zero_()
                if old > new:
                    site.A[i, new:old].zero_()
                site.used[i] = new
            for p in pieces:
                r = p.down.shape[0]
                p.site.A[i, p.col:p.col + r].copy_(p.down)
                dst = p.site.B[i, :, p.col:p.col + r]
                if p.rows is not None:
                    dst = dst[p.rows[0]:p.rows[1]]
                if p.scale == 1.0:
                    dst.copy_(p.up)
                elif torch.promote_types(p.up.dtype, dst.dtype) == p.up.dtype:
                    torch.mul(p.up, p.scale, out=dst)  # one pass, computed in up's dtype, rounded once into dst
                else:  # a lower-precision file into a wider buffer: scale in the buffer's dtype
                    dst.copy_(p.up).mul_(p.scale)
        self._cache.clear()

    # -- rows -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def rows(self, rows: Sequence[int]) -> Iterator[Slots]:
        """Inside the block, row ``r`` of every hooked call uses slot ``rows[r % len(rows)]`` (``-1``: none); a
        call with fewer rows than ``rows`` (a text encoder under ``num_images_per_prompt``) uses
        ``rows[r·len(rows)//n]``. Blocks nest; the previous map comes back on exit."""
        self._check_open()
        pattern = self._check_rows(rows)
        previous = self._pattern
        self._set_pattern(pattern)
        try:
            yield self
        finally:
            if not self.closed:
                self._set_pattern(previous)

    def _check_rows(self, rows: Sequence[int]) -> tuple[int, ...]:
        pattern = tuple(int(r) for r in rows)
        if not pattern:
            raise SlotError("rows([]) is empty; pass one slot (or -1) per row")
        if len(pattern) > self.max_rows:
            raise SlotError(f"rows has {len(pattern)} entries, more than max_rows={self.max_rows}; "
                            "create the slots with a larger max_rows")
        bad = [r for r in pattern if not -1 <= r < self.k]
        if bad:
            raise SlotError(f"rows {bad} are not slots: use 0..{self.k - 1}, or -1 for no LoRA")
        return pattern

    def _set_pattern(self, pattern: tuple[int, ...]) -> None:
        values = torch.tensor(pattern, dtype=torch.long)
        for st in self._states.values():
            st.rowmap[: len(pattern)].copy_(values)
            st.nrows.fill_(len(pattern))
        self._pattern = pattern
        self._cache.clear()

    def _eager_rows(self, state: _RowState, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot index and strength per row for an ``n``-row call, computed once per pattern (eager calls)."""
        key = (n, state.rowmap.device)
        hit = self._cache.get(key)
        if hit is None:
            idx = _slot_index(state, n)
            hit = self._cache[key] = (idx, _row_strengths(state, idx))
        return hit

    # -- lifetime ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook and free the buffers; the weights were never changed, so the model is as before."""
        if self.closed:
            return
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._sites.clear()
        self._plans.clear()
        self._states.clear()
        self._cache.clear()
        self.closed = True

    def __enter__(self) -> Slots:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise SlotError("these slots were closed; create new ones with lorakit.slots(...)")

    def _check_slot(self, i: int) -> None:
        if not isinstance(i, int) or not 0 <= i < self.k:
            raise SlotError(f"slot {i!r} does not exist; slots are 0..{self.k - 1}")

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._sites)} targets, {self.nbytes / 2**20:.1f} MiB"
        loaded = ", ".join(f"{i}:{label}@{self._strengths[i]:g}" for i, label in enumerate(self.labels) if label)
        return f"<Slots k={self.k} {state}; loaded: {loaded or '-'}>"


def _finite(layer: Layer, dtypes: set[torch.dtype]) -> bool:
    """Whether the layer's factors are finite and stay finite in the buffers' ``dtypes``, in one reduction per
    tensor (no per-element copy): a NaN/Inf anywhere makes the fp32 sum non-finite. A ``False`` (also from an
    fp32 overflow of a huge but finite sum) sends the layer to the exact per-element check."""
    alpha = None if layer.weight is None else layer.weight.alpha
    if alpha is not None and not math.isfinite(float(alpha)):
        return False
    for t in layer.weight.tensors().values() if layer.weight is not None else ():
        if not t.is_floating_point():
            continue
        if not math.isfinite(float(t.sum(dtype=torch.float32))):
            return False
        narrower = [d for d in dtypes if d.is_floating_point and torch.finfo(d).max < torch.finfo(t.dtype).max]
        if narrower and t.numel():
            lo, hi = torch.aminmax(t)
            if max(-float(lo), float(hi)) > min(torch.finfo(d).max for d in narrower):
                return False
    return True


def _finite_strength(strength: float) -> float:
    value = float(strength)
    if not math.isfinite(value):
        raise ValueError(f"strength must be finite, got {strength}")
    return value


def _place(layer: Layer, t: Target, site: _Site, col: int) -> _Piece:
    """Check ``layer`` can live in ``site`` from rank column ``col`` on, and return its copy plan."""
    kinds = ", ".join(layer.kinds)
    if layer.weight is None or layer.dora is not None or layer.bias is not None or layer.params:
        raise UnsupportedAdapterError(
            f"{layer.name} ({kinds}): slots hold low-rank weight factors only (no DoRA, bias or parameter deltas); "
            "apply this LoRA with lorakit.apply"
        )
    lr = layer.weight.low_rank() if not layer.weight.needs_base else None
    if lr is None or layer.weight.delta_bias() is not None:
        raise UnsupportedAdapterError(
            f"{layer.name} ({kinds}): only LoRA factors (down/up, 1x1 up) fit a slot; LoHa, LoKr, Tucker, full "
            "and base-dependent diffs do not. Apply this LoRA with lorakit.apply instead"
        )
    up = row_piece(lr.up, t)  # the target's rows of a fused file layer, row transforms included
    rows = dst_view(torch.empty(site.out_features, 0, device="meta"), t).shape[0]
    if up.shape[0] != rows or lr.down.shape[1] != site.in_flat:
        where = f"rows {t.dst_rows} of {t.ref}" if t.dst_rows else str(t.ref)
        raise SlotError(f"{layer.name}: LoRA up {tuple(up.shape)} / down {tuple(lr.down.shape)} does not fit {where} "
                        f"({rows} outputs, {site.in_flat} inputs); nothing was loaded")
    if col + lr.rank > site.capacity:
        extra = f" (after {col} columns of other layers on the same module)" if col else ""
        raise SlotError(f"{layer.name}: rank {lr.rank}{extra} does not fit the {site.capacity} rank columns prepared "
                        f"on {t.ref}; nothing was loaded. Create the slots with a larger max_rank (or files= "
                        "including this LoRA)")
    return _Piece(site, col, lr.down, up, lr.scale, t.dst_rows)


def _never_called(root: nn.Module) -> set[int]:
    """Linears whose weight their parent reads without calling them (``nn.MultiheadAttention.out_proj``): a hook
    there would never run."""
    return {id(m.out_proj) for m in root.modules() if isinstance(m, nn.MultiheadAttention)}


def _select(components: dict[str, nn.Module], patterns: Sequence[str] | None) -> dict[tuple[str, str], nn.Module]:
    """Every hookable module of every component, or those whose name or ``component:name`` matches a glob."""
    out: dict[tuple[str, str], nn.Module] = {}
    for comp, root in components.items():
        skip = _never_called(root)
        for name, module in root.named_modules():
            if not name or id(module) in skip or _hookable(module) is not None:
                continue
            if patterns is None or any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(f"{comp}:{name}", p)
                                       for p in patterns):
                out[(comp, name)] = module
    return out


def _catalogue(resolver: Resolver, files: Sequence[Any]) -> dict[tuple[str, str], int]:
    """``(component, module) -> rank columns`` a catalogue needs: per module, the largest sum over one file of the
    ranks of its layers landing there (split q/k/v layers on a fused qkv module add up)."""
    from ..formats import load as read

    need: dict[tuple[str, str], int] = {}
    for f in files:
        lora = f if isinstance(f, LoRA) else read(f)
        per_file: dict[tuple[str, str], int] = {}
        for layer, targets in resolver.resolve(lora).matched:
            lr = None if layer.weight is None else layer.weight.low_rank()
            if lr is None:
                continue  # not a slot adapter (LoHa, LoKr, full, ...): its load will say so
            for t in targets:
                key = (t.component, t.module)
                per_file[key] = per_file.get(key, 0) + lr.rank
        for key, r in per_file.items():
            need[key] = max(need.get(key, 0), r)
    return need


def _make_site(ref: ModuleRef, module: nn.Module, k: int, rank: int, dtype: torch.dtype | None) -> _Site:
    weight = module.weight
    dt = dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
    if isinstance(module, nn.Linear):
        out_f, in_f, kernel = module.out_features, module.in_features, ()
    else:
        out_f, kernel = module.out_channels, tuple(module.kernel_size)
        in_f = module.in_channels * math.prod(kernel)
    a = torch.zeros(k, rank, in_f, dtype=dt, device=weight.device)
    b = torch.zeros(k, out_f, rank, dtype=dt, device=weight.device)
    return _Site(ref, module, a, b, [0] * k, kernel)


def slots(
    target: object,
    k: int = 8,
    max_rank: int | None = None,
    *,
    targets: str | Sequence[str] | None = None,
    files: Sequence[Any] | None = None,
    max_rows: int = 256,
    dtype: torch.dtype | None = None,
    component: str | None = None,
) -> Slots:
    """Prepare ``k`` adapter slots on ``target`` (a pipeline, a diffusers/transformers model or any module).

    The hooked modules: those of ``files`` (a catalogue of paths or :class:`LoRA`: the union of their targets, each
    with the rank columns the catalogue needs there, at least ``max_rank`` when given), else the modules matching
    ``targets`` (globs over ``module`` or ``component:module``), else every Linear and ungrouped Conv1d/2d/3d of
    the denoiser and text encoders. Without ``files``, each target gets ``max_rank`` columns (default 64); a
    fused module receiving several split file layers (q, k, v) shares them.

    Buffers are allocated here, before any ``torch.compile``: ``A [k, R, in·kernel]`` and ``B [k, out, R]`` per
    target in its weight's dtype and device (``dtype=`` overrides), the row map (``max_rows`` entries) and the
    strengths. ``Slots.nbytes`` reports their size.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive number of slots, got {k!r}")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
    if files is not None and targets is not None:
        raise ValueError("pass targets= (module globs) or files= (a catalogue), not both")
    components = components_of(target, component)
    refuse_meta(components, target)
    resolver = Resolver(components)
    if files is not None:
        need = _catalogue(resolver, files)
        never = {comp: _never_called(root) for comp, root in components.items()}
        chosen = {}
        for key, rank in need.items():
            module = resolver.index.modules[key[0]][key[1]]
            why = _hookable(module)
            if why is None and id(module) in never[key[0]]:
                why = "the out_proj of an nn.MultiheadAttention, which never calls it"
            if why is not None:
                raise SlotError(f"{ModuleRef(*key)} is {why}: it cannot hold a slot; drop the LoRA from files= or "
                                "apply it with lorakit.apply")
            chosen[key] = (module, max(rank, max_rank or 0))
    else:
        pats = [targets] if isinstance(targets, str) else (None if targets is None else list(targets))
        chosen = {key: (m, max_rank or 64) for key, m in _select(components, pats).items()}
    if not chosen:
        raise SlotError(f"no module of the {type(target).__name__} can hold a slot"
                        + (f" (targets={targets!r} matched nothing hookable)" if targets is not None else ""))
    sites = {key: _make_site(ModuleRef(*key), m, k, rank, dtype) for key, (m, rank) in chosen.items()}
    return Slots(components, resolver, sites, k, max_rows)
