"""The run's LoRA layers: new ones on the modules ``targets``/``preset`` select, or those of an ``--init`` file
(rank, alpha, shapes and names from the file; ``train_modules`` pick the layers that train, the others are
applied frozen through :func:`lorakit.runtime.apply`)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import MatchError, RankMismatchError, ShapeMismatchError, UnsupportedAdapterError
from ..families import Resolver
from ..families.base import Target
from ..formats.conventions import peft_prefix
from ..model import Layer, LoRA
from .config import PRESETS, TrainConfig
from .network import Entry, LoRAModule, Network, matches, no_match_error, shape_problem

__all__ = ["TE_PRESETS", "Built", "from_file", "new_network", "text_encoders"]


@dataclasses.dataclass
class Built:
    """A network plus what the run must know about the file it came from."""

    network: Network
    frozen: LoRA | None = None  # layers applied frozen (fused) for the run
    mismatches: list[str] = dataclasses.field(default_factory=list)
    frozen_params: int = 0
    source: LoRA | None = None  # the --init file
    fitting: LoRA | None = None  # its layers that fit the model (trained and frozen): what step 0 must equal


def _target_patterns(config: TrainConfig) -> tuple[str, ...]:
    if config.targets:
        return config.targets
    return PRESETS[config.preset or "attn"]


def _kernel(module: nn.Module) -> tuple[int, ...]:
    return tuple(module.kernel_size) if isinstance(module, nn.Conv2d) else ()


#: ``--train-text-encoder``: CLIP projections a new LoRA covers per preset (kohya and diffusers train these)
TE_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "attn-mlp": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "all-linear": ("*",),
}


def _pick_new(denoiser: nn.Module, config: TrainConfig, text_encoder: bool = False) -> list[tuple[str, nn.Module, int, float]]:
    """``(module path, module, rank, alpha)`` of every module a new LoRA covers (``text_encoder``: the CLIP
    projections of :data:`TE_PRESETS`; ``--targets`` names denoiser modules only)."""
    patterns = TE_PRESETS[config.preset or "attn"] if text_encoder else _target_patterns(config)
    chosen: list[tuple[str, nn.Module, int, float]] = []
    used: set[str] = set()
    candidates = [(n, m) for n, m in denoiser.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n]
    for name, module in candidates:
        if any(matches(p, name) for p in config.freeze_modules):
            continue
        big_conv = isinstance(module, nn.Conv2d) and _kernel(module) != (1, 1)
        hit = [p for p in patterns if matches(p, name)]
        if big_conv and config.conv_rank is None:
            continue  # k×k convs train only with --conv-rank (LoCon)
        if not hit and not (big_conv and config.conv_rank and not name.startswith(("conv_in", "conv_out"))):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            continue
        used.update(hit)
        if big_conv:
            rank = config.conv_rank or config.lora_rank
            alpha = config.conv_alpha if config.conv_alpha is not None else float(rank)
        else:
            rank = config.lora_rank
            alpha = config.alpha if config.alpha is not None else float(rank)
        chosen.append((name, module, rank, alpha))
    names = [n for n, _ in candidates]
    if text_encoder:
        if not chosen:
            raise no_match_error("--train-text-encoder", ",".join(patterns), names)
        return chosen
    for p in config.targets:  # a preset names projections of several families: only typed patterns must hit
        if p not in used:
            raise no_match_error("--targets", p, names)
    if not chosen:
        raise no_match_error("--preset", config.preset or "attn", names)
    return chosen


def text_encoders(components: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """The CLIP text encoders ``--train-text-encoder`` puts a LoRA on, or :class:`UnsupportedAdapterError`."""
    found = {k: m for k, m in components.items() if k.startswith("text_encoder") and type(m).__name__.startswith("CLIPText")}
    if not found:
        others = ", ".join(f"{k}: {type(m).__name__}" for k, m in components.items() if k.startswith("text_encoder"))
        raise UnsupportedAdapterError(
            f"--train-text-encoder trains CLIP text encoders (SD 1.x/2.x, SDXL); this pipeline has "
            f"{others or 'no text encoder'}; drop --train-text-encoder"
        )
    return found


def new_network(denoiser: nn.Module, config: TrainConfig, generator: torch.Generator, prefix: str,
                encoders: Mapping[str, nn.Module] | None = None) -> Built:
    """Fresh LoRA layers: ``down`` Kaiming-uniform (as PEFT), ``up`` zero, so step 0 equals the base model.
    ``encoders`` (``{component: text encoder}``) get layers too, named ``<component>.<module path>``."""
    entries: list[Entry] = []
    modules: dict[str, nn.Module] = {}
    picks = [("denoiser", prefix, p) for p in _pick_new(denoiser, config)]
    for component, encoder in (encoders or {}).items():
        picks += [(component, peft_prefix(component), p) for p in _pick_new(encoder, config, text_encoder=True)]
    for component, head, (path, module, rank, alpha) in picks:
        w = module.weight
        if isinstance(module, nn.Conv2d):
            down = torch.empty(rank, w.shape[1], *w.shape[2:])
            up = torch.zeros(w.shape[0], rank, 1, 1)
        else:
            down = torch.empty(rank, w.shape[1])
            up = torch.zeros(w.shape[0], rank)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        name = head + path
        entries.append(Entry(name, Target(component, path), LoRAModule(module, down, up, alpha), True))
        modules[name] = module
    return Built(Network(entries, modules))


def _trainable_kind(layer: Layer) -> str | None:
    """Why ``layer`` cannot train (``None``: a plain LoRA/LoCon pair that can)."""
    w = layer.weight
    if w is None:
        return f"{', '.join(layer.kinds) or 'no weight delta'} (not a low-rank pair)"
    if w.kind != "lora":
        return f"{w.kind} (only LoRA/LoCon layers train; LoHa/LoKr/full deltas can only stay frozen)"
    if getattr(w, "mid", None) is not None:
        return "a Tucker (lora_mid) conv LoRA"
    if layer.dora is not None or layer.bias is not None or layer.params or getattr(w, "up_bias", None) is not None:
        return "a layer with DoRA/bias/parameter deltas"
    return None


def _selected(layer: Layer, paths: Sequence[str], config: TrainConfig) -> bool:
    if (layer.component or "").startswith("text_encoder") and not config.train_text_encoder:
        return False  # text-encoder layers of a file train only with --train-text-encoder
    names = (layer.name, *paths)
    chosen = not config.train_modules or any(matches(p, *names) for p in config.train_modules)
    return chosen and not any(matches(p, *names) for p in config.freeze_modules)


def _check_patterns(lora: LoRA, resolved: Mapping[str, list[Target]], config: TrainConfig) -> None:
    names = [*lora.layers, *(t.module for ts in resolved.values() for t in ts)]
    for option, patterns in (("--train-modules", config.train_modules), ("--freeze-modules", config.freeze_modules)):
        for p in patterns:
            hit = any(matches(p, name, *(t.module for t in resolved.get(name, []))) for name in lora.layers)
            if not hit:
                raise no_match_error(option, p, names)


def _check_rank(lora: LoRA, chosen: Sequence[Layer], config: TrainConfig) -> None:
    """An explicit ``rank`` with ``init`` must be the file's: the factors are the file's own."""
    if config.rank is not None:
        bad = [ly for ly in chosen if ly.rank != config.rank]
        if bad:
            raise RankMismatchError(
                f"{lora.source}: --rank {config.rank} but layer {bad[0].name} has rank {bad[0].rank} "
                f"({len(bad)} layers differ); drop --rank (it is read from the file) or change it first "
                "with lorakit resize"
            )


def _classify(lora: LoRA, resolver: Resolver, config: TrainConfig) -> tuple[list, list[Layer], list[str]]:
    """(trainable ``(layer, target, module)``, frozen layers, mismatch lines)."""
    resolved = {name: resolver.lookup(layer) or [] for name, layer in lora.layers.items()}
    _check_patterns(lora, resolved, config)
    train: list[tuple[Layer, Target, nn.Module]] = []
    frozen: list[Layer] = []
    report: list[str] = []
    for name, layer in lora.layers.items():
        targets = resolved[name]
        if not targets:
            report.append(f"{name}: unmatched (no module of the model is named like it)")
            continue
        if not _selected(layer, [t.module for t in targets], config):
            frozen.append(layer)
            continue
        why = _trainable_kind(layer)
        if why is not None:
            raise UnsupportedAdapterError(
                f"{name}: cannot train {why}; exclude it with --train-modules/--freeze-modules to keep it frozen"
            )
        t = targets[0]
        if len(targets) != 1 or t.src_rows or t.dst_rows or t.transform:
            raise UnsupportedAdapterError(
                f"{name}: lands on {len(targets)} module slices (a fused/split projection); training it is not "
                "supported, keep it frozen with --freeze-modules"
            )
        module = resolver.module(t)
        problem = shape_problem(module, layer.weight.down, layer.weight.up)
        if problem is not None:
            report.append(f"{name}: shape mismatch on {t.module}: {problem}")
            continue
        train.append((layer, t, module))
    return train, frozen, report


def from_file(lora: LoRA, components: Mapping[str, nn.Module], config: TrainConfig) -> Built:
    """Layers of an existing file, each starting from its own tensors, rank and alpha."""
    resolver = Resolver(components)
    train, frozen, report = _classify(lora, resolver, config)
    if report and config.strict:
        raise (ShapeMismatchError if any("shape" in r for r in report) else MatchError)(
            f"{lora.source}: {len(report)} layers do not fit the model (strict): " + "; ".join(report[:5])
        )
    if report:
        warnings.warn(f"{lora.source}: {len(report)} layers do not fit the model and are not used: "
                      + "; ".join(report[:5]), stacklevel=3)
    if not train:
        raise MatchError(f"{lora.source}: no layer left to train ({len(frozen)} frozen, {len(report)} not fitting)")
    _check_rank(lora, [layer for layer, _, _ in train], config)
    entries, modules = [], {}
    for layer, target, module in train:
        w = layer.weight
        entries.append(Entry(layer.name, target, LoRAModule(module, w.down, w.up, w.alpha), True))
        modules[layer.name] = module
    frozen_lora = dataclasses.replace(lora, layers={ly.name: ly for ly in frozen}) if frozen else None
    fitting = dataclasses.replace(lora, layers={ly.name: ly for ly in [*frozen, *(t[0] for t in train)]})
    return Built(Network(entries, modules), frozen_lora, report, sum(ly.parameters() for ly in frozen), lora, fitting)
