"""Extract a LoRA from two checkpoints (BASE, TUNED): a low-rank factorisation of TUNED − BASE per layer,
conv LoRA for conv kernels, ``diff_b``/``w_norm``/``b_norm`` for biases and norms, or full ``diff`` tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..adapters import FullDiff, LoRAWeights, NormDiff
from ..errors import FormatError, ShapeMismatchError
from ..io import check_not_input
from ..model import Layer, LoRA
from .common import Checkpoint, OpResult, Progress, TensorInfo, check_finite, parse_dtype, save_lora, select
from .svd import Factorisation, allocate_budget, factorise

__all__ = ["extract"]

_COMP_PREFIX = {None: "lora_unet_", "denoiser": "lora_unet_", "text_encoder": "lora_te1_",
                "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}
_PEFT_COMP = {None: "", "denoiser": "unet.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2.",
              "text_encoder_3": "text_encoder_3."}
# Module-path prefixes of single-file checkpoints that are not part of the module's identity.
_STRIP = ("model.diffusion_model.", "diffusion_model.")


def _pair(base: Checkpoint, tuned: Checkpoint, include, exclude) -> list[tuple[TensorInfo, TensorInfo]]:
    b_keys = {k for k, i in base.infos.items() if select(i.key, include, exclude)}
    t_keys = {k for k, i in tuned.infos.items() if select(i.key, include, exclude)}
    for missing, here, there in ((b_keys - t_keys, base.path, tuned.path), (t_keys - b_keys, tuned.path, base.path)):
        if missing:
            some = ", ".join(sorted(i.ref for i in (base.infos.get(k) or tuned.infos[k] for k in missing))[:5])
            raise FormatError(
                f"{len(missing)} tensors of {here} are not in {there} (e.g. {some}); the checkpoints are not the same "
                "architecture. Restrict the comparison with --include/--exclude if that is intended."
            )
    pairs = []
    for k in sorted(b_keys, key=lambda k: (k[0] or "", k[1])):
        bi, ti = base.infos[k], tuned.infos[k]
        if bi.shape != ti.shape:
            raise ShapeMismatchError(
                f"{bi.ref}: shape {bi.shape} in {base.path} but {ti.shape} in {tuned.path}; "
                "the checkpoints are not the same architecture."
            )
        pairs.append((bi, ti))
    return pairs


def _layer_name(component: str | None, module: str, fmt: str) -> tuple[str, str]:
    for p in _STRIP:
        if module.startswith(p):
            module = module[len(p):]
            break
    if fmt == "peft":
        return _PEFT_COMP.get(component, f"{component}.") + module, module
    return _COMP_PREFIX.get(component, f"lora_{component}_") + module.replace(".", "_"), module.replace(".", "_")


def extract(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    *,
    rank: int | None = 32,
    conv_rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    rank_budget: int | None = None,
    size_budget_mb: float | None = None,
    diff_only: bool = False,
    dtype: str | torch.dtype | None = None,
    format: str = "kohya",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    min_diff: float = 0.0,
    progress: Progress | None = None,
) -> OpResult:
    """Extract ``TUNED − BASE`` as a LoRA and write it to ``output`` (skipped when ``output`` is None).

    Rank rules: ``rank`` (linear and 1×1 conv) and ``conv_rank`` (k×k conv, default ``rank``) are fixed ranks,
    or caps for ``energy``/``max_error``; budgets share ``rank_budget`` total rank units / ``size_budget_mb``
    megabytes (1e6 bytes) of factors across layers. A layer whose chosen factors would hold more numbers
    than the dense delta is stored as a full ``diff`` (exact and smaller). Output ``alpha = rank`` (scale 1)."""
    if energy is not None and max_error is not None:
        raise ValueError("pass either energy or max_error, not both")
    if rank_budget is not None and size_budget_mb is not None:
        raise ValueError("pass either rank_budget or size_budget_mb, not both")
    if (rank_budget is not None or size_budget_mb is not None) and (energy is not None or max_error is not None):
        raise ValueError("a global budget and energy/max_error both choose the ranks; pass only one of them")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if max_error is not None and not 0 <= max_error < 1:
        raise ValueError(f"max_error must be in [0, 1), got {max_error}")
    out_dtype = parse_dtype(dtype)
    if output is not None:
        check_not_input(output, [base, tuned])
    conv_rank = rank if conv_rank is None else conv_rank
    b_ck, t_ck = Checkpoint(base), Checkpoint(tuned)
    pairs = _pair(b_ck, t_ck, include, exclude)
    itemsize = torch.finfo(out_dtype or torch.float32).bits // 8

    # per module: weight adapter inputs and extra deltas
    layer_parts: dict[tuple[str | None, str], dict] = {}
    facts: dict[tuple[str | None, str], tuple[Factorisation, tuple[int, ...]]] = {}
    stats: list[dict] = []
    unchanged = 0
    unsupported: list[str] = []
    weight_ndim = {(i.component, i.key.rsplit(".", 1)[0]): len(i.shape) for i, _ in pairs if i.key.endswith(".weight")}
    for n, (bi, ti) in enumerate(pairs):
        if progress:
            progress("extract", n, len(pairs))
        if not bi.dtype.is_floating_point:
            continue
        b = b_ck.read(bi).float()
        check_finite(b, f"{b_ck.path}: {bi.ref}")
        t = t_ck.read(ti).float()
        check_finite(t, f"{t_ck.path}: {ti.ref}")
        diff = t - b
        del b, t
        if diff.numel() == 0 or float(diff.abs().max()) <= min_diff:
            unchanged += 1
            continue
        if "." not in bi.key:
            unsupported.append(bi.ref)
            continue
        module, param = bi.key.rsplit(".", 1)
        ident = (bi.component, module)
        parts = layer_parts.setdefault(ident, {})
        stat = {"key": bi.ref, "shape": list(bi.shape)}
        if param == "weight" and diff.dim() >= 2 and not diff_only:
            r = rank if diff.dim() == 2 or all(s == 1 for s in diff.shape[2:]) else conv_rank
            if not r:
                unsupported.append(bi.ref)  # --conv-rank 0 switches k×k convs off
                continue
            mat = diff.reshape(diff.shape[0], -1)
            budget = rank_budget is not None or size_budget_mb is not None
            f = factorise(mat, rank=r, energy=None if budget else energy, max_error=None if budget else max_error,
                          seed=n)
            facts[ident] = (f, tuple(diff.shape))
            stat.update(kind="lora")
        elif param == "weight":
            if diff.dim() == 1:
                parts["norm"] = diff
                stat.update(kind="w_norm", rel_error=0.0)
            else:
                parts["full"] = diff
                stat.update(kind="diff", rel_error=0.0)
        elif param == "bias" and diff.dim() == 1:
            parts["bias"] = diff
            parts["bias_key"] = "b_norm" if weight_ndim.get(ident) == 1 else "diff_b"
            stat.update(kind=parts["bias_key"], rel_error=0.0)
        elif param == "modulation":
            parts["modulation"] = diff
            stat.update(kind="diff_m", rel_error=0.0)
        else:
            unsupported.append(bi.ref)
            continue
        stats.append(stat)

    # Global budgets: allocate rank units where σ² is largest (per byte for the size budget).
    if facts and (rank_budget is not None or size_budget_mb is not None):
        spectra = {str(k): f.spectrum[: f.rank] for k, (f, _) in facts.items()}
        costs = {str(k): (f.up.shape[0] + f.down.shape[1]) * itemsize for k, (f, _) in facts.items()}
        size = None if size_budget_mb is None else int(size_budget_mb * 1e6)
        alloc = allocate_budget(spectra, costs, ranks=rank_budget, size=size)
        facts = {k: (f.truncate(alloc[str(k)]), s) for k, (f, s) in facts.items()}

    layers: dict[str, Layer] = {}
    by_key = {s["key"]: s for s in stats}
    dropped = 0
    for ident in sorted(set(layer_parts) | set(facts), key=lambda k: (k[0] or "", k[1])):
        comp, module = ident
        name, path = _layer_name(comp, module, format)
        parts = layer_parts.get(ident, {})
        weight = None
        ref = (f"{comp}/" if comp else "") + module + ".weight"
        if ident in facts:
            f, shape = facts[ident]
            st = by_key[ref]
            dense = f.rank * (f.up.shape[0] + f.down.shape[1]) >= shape[0] * f.down.shape[1]
            if f.rank == 0:
                st.update(kind="dropped", rank=0, rel_error=1.0, energy=0.0)
                dropped += 1
            elif dense:
                # Re-read the exact delta: stored dense it is lossless and no larger than the factors.
                bi = b_ck.infos[(comp, module + ".weight")]
                exact = t_ck.read(t_ck.infos[(comp, module + ".weight")]).float() - b_ck.read(bi).float()
                weight = FullDiff(exact)
                st.update(kind="diff", rank=None, rel_error=0.0, energy=1.0)
            else:
                down = f.down.reshape(f.rank, *shape[1:])
                up = f.up.reshape(shape[0], f.rank, *([1] * (len(shape) - 2)))
                weight = LoRAWeights(down=down, up=up, alpha=float(f.rank))
                st.update(rank=f.rank, rel_error=f.rel_error, energy=f.energy, bound_met=f.bound_met)
        elif "full" in parts:
            weight = FullDiff(parts["full"])
        elif "norm" in parts:
            weight = NormDiff(parts["norm"])
        if weight is None and "bias" not in parts and "modulation" not in parts:
            continue
        layers[name] = Layer(
            name=name, component=comp, path=path, flat=format == "kohya",
            weight=weight, bias=parts.get("bias"), params={"modulation": parts["modulation"]} if "modulation" in parts else {},
            bias_key=parts.get("bias_key", "diff_b"),
        )
    lora = LoRA(layers=layers, metadata={"lorakit_op": "extract", "lorakit_rank": str(rank)}, format=format)
    if output is not None:
        if not layers:
            raise FormatError(f"{tuned} does not differ from {base} in any selected tensor; nothing to write")
        save_lora(lora, output, format, dtype=out_dtype, inputs=[base, tuned])
    if progress:
        progress("extract", len(pairs), len(pairs))
    errs = [s["rel_error"] for s in stats if s.get("kind") == "lora" and "rel_error" in s]
    summary = {
        "tensors_compared": len(pairs), "unchanged": unchanged, "layers": len(layers),
        "lora_layers": sum(1 for s in stats if s.get("kind") == "lora"), "dropped_by_budget": dropped,
        "unsupported": sorted(unsupported), "total_rank": sum(s.get("rank") or 0 for s in stats),
        "mean_rel_error": sum(errs) / len(errs) if errs else 0.0, "max_rel_error": max(errs, default=0.0),
        "parameters": lora.parameters(),
        # layers where the --rank cap stopped --energy/--max-error before the target was reached
        "bound_not_met": sorted(s["key"] for s in stats if s.get("bound_met") is False),
    }
    result = OpResult("extract", None if output is None else str(Path(output)), summary, stats, lora=lora)
    return result
