"""Check a LoRA against the fine-tune it approximates: per-module relative error ‖ΔW_lora − (TUNED−BASE)‖ /
‖TUNED−BASE‖, coverage, success rate, layer names, and a self-contained HTML report with plots.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

import torch

from ..io import atomic_output
from ..model import LoRA
from ..placement import WHOLE, bias_delta, weight_delta
from .common import Checkpoint, OpResult, Progress, check_finite, checkpoint_resolver, load_lora
from .svd import randomized_svd

__all__ = ["DEFAULT_THRESHOLD", "validate", "write_report"]

#: A module counts as reproduced when its relative error is below 5 %: at that level the residual's energy
#: is 0.25 % of the fine-tune's change, below typical seed-to-seed variation of a fine-tune.
DEFAULT_THRESHOLD = 0.05
_SPECTRA = 4  # layers whose spectra the HTML report plots (the largest changes)


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
    lo = load_lora(lora)
    b_ck, t_ck = Checkpoint(base), Checkpoint(tuned)
    resolver = checkpoint_resolver(b_ck)
    predicted: dict[tuple[str | None, str], tuple[object, str]] = {}
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
    rows = []
    spurious = []
    spectra_src: list[tuple[float, str, torch.Tensor, int | None]] = []
    infos = [i for i in b_ck if i.dtype.is_floating_point and (i.component, i.key) in t_ck.infos]
    for n, bi in enumerate(infos):
        if progress:
            progress("validate", n, len(infos))
        ident = (bi.component, bi.key)
        b = b_ck.read(bi).float()
        t = t_ck.read(t_ck.infos[ident]).float()
        check_finite(b, f"{base}: {bi.ref}")
        check_finite(t, f"{tuned}: {bi.ref}")
        true = t - b
        del t
        changed = bool(true.abs().max() > 0) if true.numel() else False
        pred = predicted.get(ident)
        if not changed and pred is None:
            continue
        if pred is None:
            approx = torch.zeros_like(true)
            rank = None
            name = None
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
            spurious.append({"key": bi.ref, "layer": name, "abs_norm": resid})
            continue
        rel = resid / denom
        rows.append({"key": bi.ref, "layer": name, "rank": rank, "shape": list(bi.shape), "rel_error": rel,
                     "diff_norm": denom, "covered": pred is not None})
        if report is not None and true.dim() >= 2:
            spectra_src.append((denom, bi.ref, true.reshape(true.shape[0], -1), rank))
            spectra_src.sort(key=lambda x: -x[0])
            del spectra_src[_SPECTRA:]
    covered = [r for r in rows if r["covered"]]
    ok = [r for r in rows if r["rel_error"] < threshold]
    errs = [r["rel_error"] for r in covered]
    # Energy-weighted error: the relative error of the whole fine-tune, not an average of layers.
    tot = sum(r["diff_norm"] ** 2 for r in rows)
    weighted = (sum((r["rel_error"] * r["diff_norm"]) ** 2 for r in rows) / tot) ** 0.5 if tot else 0.0
    summary = {
        "changed_modules": len(rows), "covered_modules": len(covered),
        "coverage": len(covered) / len(rows) if rows else 1.0,
        "threshold": threshold, "success_rate": len(ok) / len(rows) if rows else 1.0,
        "mean_rel_error": sum(errs) / len(errs) if errs else None, "max_rel_error": max(errs, default=None),
        "weighted_rel_error": weighted, "spurious": spurious, "unmatched_layers": sorted(unmatched),
        "layer_names": sorted(layer.name for layer in lo),
    }
    result = OpResult("validate", None if report is None else str(report), summary, rows)
    if report is not None:
        write_report(result, report, spectra_src, lo.source or str(lora), str(base), str(tuned))
    return result


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def write_report(result: OpResult, path, spectra_src, lora_name: str, base: str, tuned: str) -> Path:
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
    summary = {k: v for k, v in result.summary.items() if k not in ("layer_names", "spurious", "unmatched_layers")}
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
