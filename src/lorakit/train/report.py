"""``train_report.html``: the loss and validation curves as inline SVG (no plotting library, no scripts), the
parameter counts, the options and any sample images, in one self-contained file written atomically."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_output

__all__ = ["svg_curve", "write_report"]


def svg_curve(series: Mapping[str, Sequence[tuple[float, float]]], width: int = 640, height: int = 240) -> str:
    """One SVG chart of ``{label: [(x, y), ...]}`` lines with min/max labels on both axes."""
    points = [p for line in series.values() for p in line]
    if not points:
        return "<p>no data</p>"
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
    pad = 40
    colors = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y: float) -> float:
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
             f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="none" stroke="#ccc"/>',
             f'<text x="2" y="{pad + 4}">{y1:.4g}</text><text x="2" y="{height - pad}">{y0:.4g}</text>',
             f'<text x="{pad}" y="{height - 20}">{x0:g}</text><text x="{width - pad - 20}" y="{height - 20}">{x1:g}</text>']
    for i, (label, line) in enumerate(series.items()):
        color = colors[i % len(colors)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in line)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>')
        if len(line) < 40:
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in line]
        parts.append(f'<text x="{pad + 8 + 110 * i}" y="{pad - 8}" fill="{color}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _png(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_report(
    path: str | os.PathLike[str],
    result: Mapping[str, Any],
    options: Mapping[str, Any],
    samples: Sequence[tuple[str, Any]] = (),
) -> Path:
    """Write the report for ``result`` (:meth:`TrainResult.to_dict`); ``samples``: ``(caption, PIL image)``."""
    loss = [(i + 1, v) for i, v in enumerate(result["loss"])]
    curves = {"training loss": loss}
    val = {"validation loss": [(s, v) for s, v in result["validation_loss"]]}
    params = result["parameters"]
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in sorted(options.items()) if v not in (None, (), "", False))
    imgs = "".join(f'<figure><img src="data:image/png;base64,{_png(img)}" width="192"/>'
                   f"<figcaption>{html.escape(cap)}</figcaption></figure>" for cap, img in samples)
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>lorakit train report</title>
<style>body{{font-family:sans-serif;margin:2em}}td{{padding:2px 8px}}figure{{display:inline-block}}</style></head><body>
<h1>lorakit train</h1>
<p>{result["steps"]} steps in {result["seconds"]:.1f} s &rarr; {html.escape(str(result["output"]))}</p>
<p>Total parameters: {params["total"]:,} &middot; trainable LoRA: {params["trainable"]:,} &middot;
frozen LoRA: {params["frozen_lora"]:,} &middot; ratio {100 * params["trainable"] / max(1, params["total"]):.2f}%</p>
<h2>Training loss</h2>{svg_curve(curves)}
<h2>Validation loss (fixed noise and timesteps)</h2>{svg_curve(val) if val["validation loss"] else "<p>no validation set</p>"}
{"<h2>Samples</h2>" + imgs if imgs else ""}
<h2>Options</h2><table>{rows}</table></body></html>"""
    target = Path(path)
    with atomic_output(target) as tmp:
        tmp.write_text(body, encoding="utf-8")
    return target
