"""Which model family a LoRA file is for: a score table over the registered families, then the released models'
widths and blocks when names alone tie.

Each family scores a file's :class:`FileEvidence` (its denoiser layer paths, the layers' shapes, the text
encoders' widths and the file's metadata) through :meth:`Family.evidence` (by default the share of paths its
``matches_file`` recognises). A family registered by any module plugs in by overriding either method; nothing
here names a family. When the best scores tie (FLUX.1, HunyuanVideo, Qwen-Image and SD3 in diffusers names,
LTX-Video and a video-only LTX-2 LoRA), each tied family's released models (:attr:`Family.variants`) are built
on the meta device, and :func:`detect` keeps the families on which most layers land with fitting shapes, then
those on which most land at all, then the one whose every touched block stack the file covers; a tie left there
goes to the one family with the highest ``prior`` (FLUX.1 over HunyuanVideo) when the file has shapes that fit
none of them (a toy or truncated file), and is ``None`` when that prior is shared or the file has names only (a key
list from a log): truly ambiguous.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

from ..model import LoRA
from .base import FAMILIES, Family

__all__ = ["Candidate", "FileEvidence", "detect", "family_scores"]

#: a name score must exceed this to count
THRESHOLD = 0.5
_BLOCK = re.compile(r"(?:^|[._])((?:[a-z]+_)*(?:blocks|layers))[._](\d+)(?:[._]|$)")


@dataclasses.dataclass(frozen=True)
class FileEvidence:
    """What a file tells about its family: ``paths`` of its denoiser layers, ``shapes`` ``path -> (out, in, ...)``
    of the layers whose delta shape is known, ``text_widths`` ``component -> input widths`` of its text-encoder
    layers, and its ``metadata``."""

    paths: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    text_widths: Mapping[str, frozenset[int]] = dataclasses.field(default_factory=dict)
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    lora: LoRA | None = None

    @classmethod
    def of(cls, source: object) -> FileEvidence:
        if isinstance(source, FileEvidence):
            return source
        layers = getattr(source, "layers", None)
        if layers is None:
            return cls(tuple(source))  # type: ignore[arg-type]
        paths, shapes, widths = [], {}, {}
        for layer in layers.values():
            shape = _delta_shape(layer)
            if layer.component in (None, "denoiser"):
                # the denoiser's names tell the family; text encoders (CLIP, T5) are shared between families
                paths.append(layer.path)
                if shape is not None:
                    shapes[layer.path] = shape
            elif shape is not None and len(shape) >= 2:
                widths.setdefault(layer.component, set()).add(shape[1])
        return cls(tuple(paths), shapes, {k: frozenset(v) for k, v in widths.items()},
                   dict(getattr(source, "metadata", {}) or {}), source)  # type: ignore[arg-type]


def _delta_shape(layer) -> tuple[int, ...] | None:
    w = getattr(layer, "weight", None)
    if w is None:
        return None
    up, down = getattr(w, "up", None), getattr(w, "down", None)
    if up is not None and down is not None and up.dim() >= 2 and down.dim() >= 2:
        return (int(up.shape[0]), *(int(s) for s in down.shape[1:]))
    full = getattr(w, "diff", None)
    return None if full is None else tuple(int(s) for s in full.shape)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One family's score for a file: ``score`` from names (and the family's own shape rules). Only when names
    tied, from the family's released model (``variant``, the best of :attr:`Family.variants`) on the meta device:
    ``landed`` (share of layers whose names land on a module), ``fit`` (share that land with fitting shapes),
    ``coverage`` (share of the model's blocks the fitting layers address) and ``complete`` (the file addresses
    every block of each block stack it touches)."""

    family: str
    score: float
    fit: float | None = None
    coverage: float | None = None
    landed: float | None = None
    complete: bool | None = None
    variant: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()
                if v is not None or k in ("family", "score")}


def family_scores(source: object) -> list[Candidate]:
    """Every family that recognises part of the file, best first (ties broken by the released models)."""
    ev = FileEvidence.of(source)
    if not ev.paths:
        return []
    scored = [(f, float(f.evidence(ev))) for f in FAMILIES]
    scored = [(f, s) for f, s in scored if s > 0]
    top = max((s for _, s in scored), default=0.0)
    out = []
    tied = [f for f, s in scored if s > THRESHOLD and s >= top - 1e-9]
    for f, s in scored:
        if len(tied) > 1 and f in tied:
            out.append(_fit(f, s, ev))
        else:
            out.append(Candidate(f.name, s))
    return sorted(out, key=_rank)


def _rank(c: Candidate) -> tuple:
    return (-c.score, -(c.fit or 0.0), -(c.landed or 0.0), not c.complete, -(c.coverage or 0.0), -_prior(c.family),
            c.family)


def detect(source: object) -> str | None:
    """The one family the file is for, or ``None`` when no family fits or the best ones cannot be told apart.

    When names tie, the tied families' released models decide, in this order: a family on which fewer of the
    file's layers land with fitting shapes is out (SD3's widths are not FLUX.1's); then one on which fewer land
    at all, whatever their shapes (a toy file's ``transformer_blocks.19`` rules out FLUX.1's 19 double blocks);
    of the families that fit exactly, the only one whose every touched block stack the file covers wins (a full
    FLUX.1 file also fits HunyuanVideo's deeper model); otherwise the one family with the highest ``prior``
    (FLUX.1 over HunyuanVideo), and ``None`` where the highest prior is shared (FLUX.1 and Qwen-Image, or
    families with no prior).
    """
    ev = FileEvidence.of(source)
    cands = [c for c in family_scores(ev) if c.score > THRESHOLD]
    if not cands:
        return None
    tied = [c for c in cands if c.score >= cands[0].score - 1e-9]
    if len(tied) == 1:
        return tied[0].family
    fit = max(c.fit or 0.0 for c in tied)
    tied = [c for c in tied if (c.fit or 0.0) >= fit - 1e-9]
    landed = max(c.landed or 0.0 for c in tied)
    tied = [c for c in tied if (c.landed or 0.0) >= landed - 1e-9]
    if fit >= 0.999:
        # the file fits these released models exactly
        complete = [c for c in tied if c.complete]
        if complete:
            tied = complete
    # otherwise the shapes fit none of them exactly (a toy or truncated file): names and landing are all there is
    if len(tied) == 1:
        return tied[0].family
    if not ev.shapes:
        return None  # names alone (a key list from a log, no tensors): the prior would be a guess
    priors = {c.family: _prior(c.family) for c in tied}
    top = max(priors.values())
    winners = [f for f, p in priors.items() if p == top]
    return winners[0] if len(winners) == 1 else None


def _prior(name: str) -> float:
    return next((float(f.prior) for f in FAMILIES if f.name == name), 0.0)


def _fit(family: Family, score: float, ev: FileEvidence) -> Candidate:
    """The family's candidate with how the file lands on its released models (the best variant)."""
    from .offline import FAMILY_NAMES, meta_components, variant_for

    best = Candidate(family.name, score, 0.0, 0.0, 0.0, False)
    for variant in family.variants or (family.name,):
        if variant not in FAMILY_NAMES:
            continue
        try:
            denoiser = meta_components(variant, ("denoiser",))["denoiser"]
        except ImportError:
            continue
        name = variant_for(variant)
        landed, fit, cover, complete = _landing(name, denoiser, ev)
        cand = Candidate(family.name, score, fit, cover, landed, complete, name)
        if _rank(cand) < _rank(best):
            best = cand
    return best


def _landing(variant: str, denoiser, ev: FileEvidence) -> tuple[float, float, float, bool]:
    """How the file lands on one released model: (landed share, fitting share, block coverage, complete)."""
    from .resolve import Resolver

    resolver = _resolver(variant, denoiser, Resolver)
    mods = resolver.index.modules["denoiser"]
    landed = placed = 0
    blocks: set[tuple[str, int]] = set()
    for path in ev.paths:
        targets = resolver._first("denoiser", _names(path))
        if not targets:
            continue
        landed += 1
        if _fits(ev.shapes.get(path), targets, mods):
            placed += 1
            blocks.update(_blocks(t.module for t in targets))
    model_blocks = _blocks(mods)
    cover = len(blocks & model_blocks) / len(model_blocks) if model_blocks else 1.0
    stacks = {stack for stack, _ in blocks}
    complete = bool(stacks) and all({b for b in model_blocks if b[0] == s} <= blocks for s in stacks)
    n = len(ev.paths)
    return landed / n, placed / n, cover, complete


_RESOLVERS: dict[str, object] = {}


def _resolver(family, denoiser, cls):
    if family not in _RESOLVERS:
        _RESOLVERS[family] = cls({"denoiser": denoiser})
    return _RESOLVERS[family]


def _names(path: str) -> list[str]:
    from .resolve import _candidates

    return _candidates(path, "denoiser")


def _fits(shape: tuple[int, ...] | None, targets, mods) -> bool:
    if shape is None:
        return True
    w = getattr(mods[targets[0].module], "weight", None)
    if w is None:
        return True
    rows = sum((t.src_rows[1] - t.src_rows[0]) if t.src_rows else mods[t.module].weight.shape[0] for t in targets)
    if targets[0].dst_rows is not None:
        rows = shape[0]
    return rows == shape[0] and tuple(w.shape[1:]) == tuple(shape[1:])[: w.dim() - 1]


def _blocks(names: Iterable[str]) -> set[tuple[str, int]]:
    return {(m.group(1), int(m.group(2))) for n in names for m in [_BLOCK.search(n)] if m}
