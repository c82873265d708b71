"""Check a LoRA against the fine-tune it approximates: per-module relative error ‖ΔW_lora − (TUNED−BASE)‖ /
‖TUNED−BASE‖, coverage, success rate, layer names, and a self-contained HTML report with plots.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
from pathlib import Path

import torch

from ..families import Resolver
from ..io import atomic_output, check_output
from ..model import Layer, LoRA
from ..placement import WHOLE, bias_delta, weight_delta
from .common import (
    Checkpoint,
    OpResult,
    Progress,
    Record,
    TensorInfo,
    check_finite,
    checkpoint_resolver,
    load_lora,
)
from .svd import randomized_svd

__all__ = ["DEFAULT_THRESHOLD", "SpuriousRow", "ValidateRow", "ValidateSummary", "validate", "write_report"]

#: A module counts as reproduced when its relative error is below 5 %: at that level the residual's energy
#: is 0.25 % of the fine-tune's change, below typical seed-to-seed variation of a fine-tune.
DEFAULT_THRESHOLD = 0.05
_SPECTRA = 4  # layers whose spectra the HTML report plots (the largest changes)

#: checkpoint tensor ``(component, key)`` -> the LoRA layer predicting its change and which of its deltas
_Predictions = dict[tuple[str | None, str], tuple[Layer, str]]
#: ``(‖TUNED − BASE‖, tensor, its delta as a matrix, LoRA rank)`` of a change whose spectrum the report plots
_Spectrum = tuple[float, str, torch.Tensor, int | None]


@dataclasses.dataclass(frozen=True)
class ValidateRow(Record):
    """One changed tensor: the LoRA layer on it (None: not covered) and ``‖ΔW_lora − ΔW‖ / ‖ΔW‖``."""

    key: str
    layer: str | None
    rank: int | None
    shape: list[int]
    rel_error: float
    diff_norm: float
    covered: bool


@dataclasses.dataclass(frozen=True)
class SpuriousRow(Record):
    """A LoRA layer on a tensor the fine-tune did not change: ``abs_norm`` is the norm of its delta there."""

    key: str
    layer: str | None
    abs_norm: float


@dataclasses.dataclass(frozen=True)
class ValidateSummary(Record):
    changed_modules: int
    covered_modules: int
    coverage: float
    threshold: float
    success_rate: float
    mean_rel_error: float | None
    max_rel_error: float | None
    #: the relative error of the whole fine-tune (energy-weighted), not an average of layers
    weighted_rel_error: float
    spurious: list[SpuriousRow]
    unmatched_layers: list[str]
    layer_names: list[str]


@dataclasses.dataclass
class _Comparison:
    rows: list[ValidateRow] = dataclasses.field(default_factory=list)
    spurious: list[SpuriousRow] = dataclasses.field(default_factory=list)
    spectra: list[_Spectrum] = dataclasses.field(default_factory=list)


def _predictions(resolver: Resolver, lo: LoRA) -> tuple[_Predictions, list[str]]:
    """Which checkpoint tensors the LoRA's layers land on, and the names of the layers that land nowhere."""
    predicted: _Predictions = {}
    unmatched = []
    for layer in lo:
        hit = resolver.direct(layer)
        if hit is None:
            unmatched.append(layer.name)
            continue
        comp, module = hit[0].component, hit[0].module
        if layer.weight is not None:
            predicted[(comp, module + ".weight")] = (layer, "weight")
        if layer.delta_bias() is not None:
            predicted[(comp, module + ".bias")] = (layer, "bias")
        for p in layer.params:
            predicted[(comp, f"{module}.{p}")] = (layer, p)
    return predicted, unmatched


def _compare(bi: TensorInfo, b: torch.Tensor, true: torch.Tensor, pred: tuple[Layer, str] | None, strength: float,
             changed: bool) -> ValidateRow | SpuriousRow:
    """``strength · ΔW_lora`` (zero without a layer) against the true change of one tensor."""
    if pred is None:
        approx = torch.zeros_like(true)
        rank = name = None
    else:
        layer, what = pred
        if what == "weight":
            approx = weight_delta(layer, WHOLE, b)
        elif what == "bias":
            approx = bias_delta(layer, WHOLE)
        else:
            approx = layer.params[what].float()
        approx = strength * approx.reshape(true.shape)
        rank, name = layer.rank, layer.name
    denom = float(torch.linalg.vector_norm(true.flatten(), dtype=torch.float64))
    resid = float(torch.linalg.vector_norm((approx - true).flatten(), dtype=torch.float64))
    if not changed:
        return SpuriousRow(bi.ref, name, resid)
    return ValidateRow(bi.ref, name, rank, list(bi.shape), resid / denom, denom, pred is not None)


def _compare_all(b_ck: Checkpoint, t_ck: Checkpoint, names: tuple[str, str], predicted: _Predictions,
                 strength: float, keep_spectra: bool, progress: Progress | None) -> _Comparison:
    """Every tensor that changed or that the LoRA touches, compared; ``names`` label BASE and TUNED in errors."""
    out = _Comparison()
    infos = [i for i in b_ck if i.dtype.is_floating_point and (i.component, i.key) in t_ck.infos]
    for n, bi in enumerate(infos):
        if progress:
            progress("validate", n, len(infos))
        ident = (bi.component, bi.key)
        b = b_ck.read(bi).float()
        t = t_ck.read(t_ck.infos[ident]).float()
        check_finite(b, f"{names[0]}: {bi.ref}")
        check_finite(t, f"{names[1]}: {bi.ref}")
        true = t - b
        del t
        changed = bool(true.abs().max() > 0) if true.numel() else False
        pred = predicted.get(ident)
        if not changed and pred is None:
            continue
        row = _compare(bi, b, true, pred, strength, changed)
        if isinstance(row, SpuriousRow):
            out.spurious.append(row)
            continue
        out.rows.append(row)
        if keep_spectra and true.dim() >= 2:
            out.spectra.append((row.diff_norm, bi.ref, true.reshape(true.shape[0], -1), row.rank))
            out.spectra.sort(key=lambda x: -x[0])
            del out.spectra[_SPECTRA:]
    return out


def _summarise(found: _Comparison, threshold: float, unmatched: list[str], lo: LoRA) -> ValidateSummary:
    rows = found.rows
    covered = [r for r in rows if r.covered]
    ok = [r for r in rows if r.rel_error < threshold]
    errs = [r.rel_error for r in covered]
    # Energy-weighted error: the relative error of the whole fine-tune, not an average of layers.
    tot = sum(r.diff_norm**2 for r in rows)
    weighted = (sum((r.rel_error * r.diff_norm) ** 2 for r in rows) / tot) ** 0.5 if tot else 0.0
    return ValidateSummary(
        changed_modules=len(rows), covered_modules=len(covered), coverage=len(covered) / len(rows) if rows else 1.0,
        threshold=threshold, success_rate=len(ok) / len(rows) if rows else 1.0,
        mean_rel_error=sum(errs) / len(errs) if errs else None, max_rel_error=max(errs, default=None),
        weighted_rel_error=weighted, spurious=found.spurious, unmatched_layers=sorted(unmatched),
        layer_names=sorted(layer.name for layer in lo),
    )


def validate(
    lora: str | os.PathLike[str] | LoRA,
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    *,
    strength: float = 1.0,
    threshold: float = DEFAULT_THRESHOLD,
    report: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> OpResult:
    """Compare ``strength · ΔW_lora`` with ``TUNED − BASE`` for every tensor that changed or that the LoRA
    touches. A changed module without a LoRA layer has error 1 (it reproduces nothing) and counts against the
    success rate; a LoRA layer on an unchanged tensor is listed as ``spurious`` with its absolute norm."""
    if report is not None:
        check_output(report, [base, tuned, None if isinstance(lora, LoRA) else lora])
    lo = load_lora(lora)
    b_ck, t_ck = Checkpoint(base), Checkpoint(tuned)
    predicted, unmatched = _predictions(checkpoint_resolver(b_ck), lo)
    found = _compare_all(b_ck, t_ck, (str(base), str(tuned)), predicted, strength, report is not None, progress)
    summary = _summarise(found, threshold, unmatched, lo)
    result = OpResult("validate", None if report is None else str(report), summary, found.rows)
    if report is not None:
        write_report(result, report, found.spectra, lo.source or str(lora), str(base), str(tuned))
    return result


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def write_report(result: OpResult, path: str | os.PathLike[str], spectra_src: list[_Spectrum], lora_name: str,
                 base: str, tuned: str) -> Path:
    """Self-contained HTML (plots as base64 PNG): error per layer, spectra of the largest changes, and
    retained energy vs rank with each layer's LoRA rank marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.layers
    images = []
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.bar(range(len(rows)), [r["rel_error"] for r in rows],
           color=["tab:blue" if r["covered"] else "tab:red" for r in rows])
    ax.axhline(result.summary["threshold"], color="k", ls="--", lw=1, label="threshold")
    ax.set_xlabel("changed module (red: no LoRA layer)")
    ax.set_ylabel("relative error")
    ax.set_title("Relative error per module")
    ax.legend()
    images.append(("Error per layer", _png(fig)))
    plt.close(fig)
    if spectra_src:
        fig1, ax1 = plt.subplots(figsize=(6, 4))
        fig2, ax2 = plt.subplots(figsize=(6, 4))
        for _, ref, mat, rank in spectra_src:
            k = min(mat.shape)
            _, s, _ = torch.linalg.svd(mat, full_matrices=False) if k <= 1024 else randomized_svd(mat, 256)
            s = s.double()
            ax1.semilogy(range(1, s.numel() + 1), s.clamp_min(1e-30).numpy(), label=ref)
            energy = (torch.cumsum(s**2, 0) / float(torch.linalg.matrix_norm(mat.double())) ** 2).numpy()
            (line,) = ax2.plot(range(1, s.numel() + 1), energy, label=ref)
            if rank:
                ax2.axvline(rank, color=line.get_color(), ls=":", lw=1)
        ax1.set_xlabel("index")
        ax1.set_ylabel("singular value of TUNED − BASE")
        ax1.set_title("Spectra of the largest changes")
        ax1.legend(fontsize=7)
        ax2.set_xlabel("rank")
        ax2.set_ylabel("retained energy Σσ²/‖ΔW‖²")
        ax2.set_title("Retained energy vs rank (dotted: LoRA rank)")
        ax2.set_ylim(0, 1.02)
        ax2.legend(fontsize=7)
        images.append(("Singular-value spectra", _png(fig1)))
        images.append(("Retained energy vs rank", _png(fig2)))
        plt.close(fig1)
        plt.close(fig2)
    summary = {k: v for k, v in result.summary.to_dict().items() if k not in ("layer_names", "spurious", "unmatched_layers")}
    table = "\n".join(
        f"<tr><td>{html.escape(r['key'])}</td><td>{html.escape(str(r['layer']))}</td><td>{r['rank']}</td>"
        f"<td>{r['rel_error']:.4f}</td></tr>" for r in rows
    )
    imgs = "\n".join(f"<h2>{t}</h2><img alt='{t}' src='data:image/png;base64,{b}'>" for t, b in images)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>lorakit validate</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}</style></head>
<body><h1>lorakit validate</h1><p>LoRA {html.escape(lora_name)}<br>base {html.escape(base)}<br>tuned {html.escape(tuned)}</p>
<pre>{html.escape(json.dumps(summary, indent=2))}</pre>{imgs}
<h2>Modules</h2><table><tr><th>tensor</th><th>LoRA layer</th><th>rank</th><th>rel. error</th></tr>{table}</table>
</body></html>"""
    with atomic_output(path) as tmp:
        tmp.write_text(doc, encoding="utf-8")
    return Path(path)
