"""Parse any supported LoRA state dict into the canonical :class:`~lorakit.model.LoRA`: strip the
wrapper and prefix, strip the adapter suffix, group by module, build one Layer per module.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

try:  # the parser behind ``re`` (``sre_parse`` before Python 3.11); used only to vet PEFT patterns
    from re import _parser as _sre_parser  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_parse as _sre_parser  # type: ignore[no-redef]

import torch

from ..adapters import DoRA, adapter_for_fields
from ..errors import FormatError, LorakitError, NonFiniteError, UnknownFormatError, UnsupportedAdapterError
from ..io import read_tensors, resolve_source
from ..model import Layer, LoadReport, LoRA
from .conventions import (
    KOHYA_OFT_FIELDS,
    KOHYA_OFT_MODULE,
    KOHYA_OFT_PREFIX,
    PEFT_COMPONENT,
    PEFT_TRANSFORMER,
    PREFIXES,
    SIBLING_FIELDS,
    SUFFIXES,
    UNSUPPORTED_BY_DIM,
    UNSUPPORTED_SUFFIXES,
    WRAPPERS,
)
from .peft_folder import (
    cloneofsimo_message,
    config_metadata,
    is_peft_save,
    modules_to_save,
    saved_module_field,
    sibling_config,
)

__all__ = ["detect_format", "load", "parse_state_dict", "split_key"]

# Fields that sit beside a weight adapter rather than selecting one.
_SIDE_FIELDS = {"alpha", "dora_scale", "magnitude", "diff_b", "b_norm", "diff_m"}
_REPEAT_OPS = tuple(
    getattr(_sre_parser, op) for op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") if hasattr(_sre_parser, op)
)
_ATOMIC_GROUP = getattr(_sre_parser, "ATOMIC_GROUP", object())


def split_key(key: str) -> tuple[str, str, str] | None:
    """``key`` -> ``(module name, canonical field, suffix convention)``, or ``None`` if no suffix matches."""
    for suffix in SUFFIXES:
        if key.endswith(suffix.text) and len(key) > len(suffix.text):
            return key[: -len(suffix.text)], suffix.field, suffix.convention
    return None


def _sibling_field(key: str, keys: Mapping[str, object]) -> tuple[str, str, str] | None:
    """``(module name, field, "lycoris")`` for a generic suffix whose sibling key is present (LyCORIS (IA)^3's
    ``x.weight`` beside ``x.on_input``); ``None`` otherwise, so a lone ``x.weight`` stays unknown."""
    for suffix, (sibling, field) in SIBLING_FIELDS.items():
        if key.endswith(suffix) and len(key) > len(suffix):
            stem = key[: -len(suffix)]
            if stem + sibling in keys:
                return stem, field, "lycoris"
    return None


def _split_prefix(name: str) -> tuple[str | None, str, bool, str]:
    """Module name -> ``(component, path, flat, prefix convention)``."""
    stripped = name
    for wrapper in WRAPPERS:
        if stripped.startswith(wrapper):
            stripped = stripped[len(wrapper):]
    wrapped = stripped != name
    for prefix in PREFIXES:
        if wrapped and prefix.text == PEFT_TRANSFORMER:
            # under PEFT's model wrapper "transformer." is ambiguous: GPT-2's "transformer.h.0" is a module path
            # of the wrapped model, not the diffusers pipeline attribute; the resolver tries both readings
            continue
        if stripped.startswith(prefix.text) and len(stripped) > len(prefix.text):
            path = stripped[len(prefix.text):]
            return prefix.component, _normalise_path(path), prefix.flat, prefix.convention
    # PEFT's model wrapper with no component prefix: a PEFT save of a bare model
    return None, _normalise_path(stripped), False, "peft" if stripped != name else "plain"


_FLAT_PREFIXES = tuple(p.text for p in PREFIXES if p.flat)


def _flatten_kohya_stem(name: str) -> str:
    """Kohya module names have no dots; diffusers' ``convert_state_dict_to_kohya`` leaves some in DoRA keys
    (``lora_unet_..._attn1.to_q.lora_magnitude_vector``). Flatten so the key joins its layer."""
    if "." in name and name.startswith(_FLAT_PREFIXES):
        return name.replace(".", "_")
    return name


def _normalise_path(path: str) -> str:
    # Old diffusers attention processors: "...attn1.processor.to_out" is the module "...attn1.to_out.0".
    if ".processor." in path:
        path = path.replace(".processor.", ".")
        if path.endswith(".to_out"):
            path += ".0"
    return path


def _peft_config(metadata: Mapping[str, str]) -> dict[str | None, dict]:
    """The PEFT adapter config(s) of ``lora_adapter_metadata``, keyed by component (None: unprefixed)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FormatError(f"lora_adapter_metadata is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        return {}
    out: dict[str | None, dict] = defaultdict(dict)
    for key, value in cfg.items():
        head, _, rest = key.partition(".")
        if rest and head in PEFT_COMPONENT:
            out[PEFT_COMPONENT[head]][rest] = value
        else:
            out[None][key] = value
    return dict(out)


# Regex metacharacters besides "." (a "." alone cannot make matching slow: no quantifier, no alternation).
_REGEX_META = frozenset("\\^$*+?{}[]()|")
# At most this many repeats (``*``, ``+``, ``{m,n}``) in one pattern: k overlapping repeats cost O(n^(k+1))
# on a module name of n characters, so more would again be a (polynomial) denial of service.
_MAX_REPEATS = 3


def _regex_hazard(pattern: str) -> str | None:
    """Why matching ``pattern`` could backtrack catastrophically (``None`` when it cannot): a repeat inside a
    repeat (``(a+)+``), an alternation inside a repeat (``(a|a)*``), a backreference, or too many repeats."""
    try:
        tree = _sre_parser.parse(pattern)
    except re.error:
        return None  # not a regex at all: matched literally by the caller

    def walk(items: Iterable, in_repeat: bool) -> tuple[int, str | None]:
        count = 0
        for op, av in items:
            inner: list = []
            repeat = False
            if op in _REPEAT_OPS:
                repeat = av[1] > 1
                if repeat and in_repeat:
                    return count, "a quantifier inside a quantified group (nested quantifiers)"
                inner = [av[2]]
            elif op == _sre_parser.BRANCH:
                if in_repeat:
                    return count, "an alternation inside a quantified group"
                inner = list(av[1])
            elif op in (_sre_parser.GROUPREF, _sre_parser.GROUPREF_EXISTS):
                return count, "a backreference"
            elif op == _sre_parser.SUBPATTERN:
                inner = [av[3]]
            elif op in (_sre_parser.ASSERT, _sre_parser.ASSERT_NOT):
                inner = [av[1]]
            elif op == _ATOMIC_GROUP:
                inner = [av]
            count += repeat
            for sub in inner:
                n, why = walk(sub, in_repeat or repeat)
                count += n
                if why:
                    return count, why
        return count, None

    count, why = walk(tree, False)
    if why is None and count > _MAX_REPEATS:
        why = f"{count} quantifiers (at most {_MAX_REPEATS})"
    return why


def _pattern_matches(pattern: str, path: str, *, field: str = "alpha_pattern") -> bool:
    """PEFT's ``get_pattern_key``: ``pattern`` is a regex matched against the end of ``path`` at a dot,
    ``re.match(rf"(.*\\.)?({pattern})$", path)``, without its catastrophic backtracking. The common cases
    (the module path itself, or its dotted suffix) need no regex; a pattern that could backtrack
    exponentially (or polynomially, with many repeats) raises :class:`FormatError` naming the key."""
    if path == pattern or path.endswith("." + pattern):
        return True
    if _REGEX_META.isdisjoint(pattern):  # literal but for "." wildcards: linear, and exactly PEFT's rule
        return re.match(rf"(.*\.)?({pattern})$", path) is not None
    why = _regex_hazard(pattern)
    if why is not None:
        raise FormatError(
            f"lora_adapter_metadata: {field} key {pattern!r} is refused: {why} can make matching take "
            "exponential time. Use the module name, a dotted suffix, or a simpler regex."
        )
    try:
        return re.match(rf"(.*\.)?({pattern})$", path) is not None
    except re.error:
        return False  # PEFT would raise here; lorakit only ever matched it literally (done above)


def _peft_alpha(cfg: dict | None, path: str, rank: int) -> float | None:
    """The alpha PEFT would use for module ``path`` (first matching ``alpha_pattern`` wins, as in PEFT),
    expressed so that ``scale = alpha / rank`` holds for lorakit; ``None`` when the config has none."""
    if not cfg:
        return None
    alpha = cfg.get("lora_alpha")
    patterns = cfg.get("alpha_pattern") or {}
    if isinstance(patterns, Mapping):
        for pattern, value in patterns.items():
            if _pattern_matches(str(pattern), path):
                alpha = value
                break
    if alpha is None:
        return None
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise FormatError(f"lora_adapter_metadata: lora_alpha for {path} is {alpha!r}, not a number") from None
    if cfg.get("use_rslora"):
        # PEFT rsLoRA scales by alpha/sqrt(r); expressed as alpha'/r with alpha' = alpha*sqrt(r).
        alpha = alpha * math.sqrt(rank)
    return alpha


def parse_state_dict(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    strict: bool = False,
    source: str | None = None,
) -> LoRA:
    """Build a :class:`LoRA` from a state dict; every key ends in the report (see :class:`LoadReport`)."""
    metadata = dict(metadata or {})
    report = LoadReport()
    where = f" in {source}" if source else ""
    peft_cfg = _peft_config(metadata)
    kohya_oft = metadata.get("ss_network_module") == KOHYA_OFT_MODULE
    groups, group_keys = _group_keys(tensors, report, modules_to_save(peft_cfg), kohya_oft=kohya_oft)
    _pair_stray_alphas(groups, group_keys)
    _move_base_weights(tensors, report, groups)
    layers = _build_layers(groups, group_keys, peft_cfg, report, strict=strict, where=where)
    if not layers:
        raise _nothing_loaded(tensors, report, where)
    if strict and not report.ok:
        raise FormatError(f"{len(report.problems())} keys{where} were not loaded: " + "; ".join(
            f"{k}: {v}" for k, v in list(report.problems().items())[:10]))
    return LoRA(layers, metadata, detect_format(report.consumed), source, report)


_PEFT_INJECTED = re.compile(r"\.(base_layer\.|lora_[AB]\.default\.|lora_(embedding_)?[AB]\.default$)")


def is_base_weight_file(keys: Iterable[str]) -> bool:
    """Whether the keys are a model's state dict with PEFT LoRA layers injected (``x.base_layer.weight`` next to
    ``x.lora_A.default.weight``, as Cosmos Predict2 post-training checkpoints save them)."""
    return any(_PEFT_INJECTED.search(k) for k in keys if isinstance(k, str))


def _move_base_weights(tensors: Mapping[str, torch.Tensor], report: LoadReport, groups: Mapping[str, dict]) -> None:
    """In a model checkpoint with LoRA layers inside, the model's own weights are ``base_weights``, not unknown
    keys; a key that mentions ``lora`` but parsed as nothing stays unknown (a broken LoRA key)."""
    if not groups or not report.unknown or not is_base_weight_file(tensors):
        return
    base = [k for k in report.unknown if k in tensors and not any(p.lower().startswith(("lora", "alpha"))
                                                                  for p in k.split("."))]
    moved = set(base)
    report.base_weights.extend(base)
    report.base_parameters += sum(int(tensors[k].numel()) for k in base)
    report.unknown[:] = [k for k in report.unknown if k not in moved]


def _unsupported_stems(tensors: Mapping[str, torch.Tensor], report: LoadReport) -> dict[str, str]:
    """Module stems of recognised-but-unsupported adapters (OFT, (IA)^3, ...) -> adapter name; non-string keys
    go to ``report.unknown`` here."""
    stems: dict[str, str] = {}
    for key in tensors:
        if not isinstance(key, str):
            report.unknown.append(str(key))
            continue
        for suffix, kind in UNSUPPORTED_SUFFIXES.items():
            if key.endswith(suffix):
                stems[key[: -len(suffix)]] = kind
                break
        for suffix, (dim, kind) in UNSUPPORTED_BY_DIM.items():
            value = tensors[key]
            if key.endswith(suffix) and isinstance(value, torch.Tensor) and value.dim() == dim:
                stems[key[: -len(suffix)]] = kind
    return stems


def _group_keys(
    tensors: Mapping[str, torch.Tensor], report: LoadReport, saved: tuple[str, ...] = (), *, kohya_oft: bool = False,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, list[str]]]:
    """``({module name: {canonical field: tensor}}, {module name: file keys})``; every key that joins no
    group is recorded in ``report`` (unknown, invalid or unsupported). ``kohya_oft``: the file says it is
    sd-scripts' own OFT (metadata), so its ``oft_blocks`` are kohya's whatever their prefix."""
    unsupported_stems = _unsupported_stems(tensors, report)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    group_keys: dict[str, list[str]] = defaultdict(list)
    for key, value in tensors.items():
        if not isinstance(key, str):
            continue
        if not isinstance(value, torch.Tensor):
            report.invalid[key] = f"not a tensor ({type(value).__name__})"
            continue
        stem = next((s for s in unsupported_stems if key.startswith(s + ".")), None)
        if stem is not None:
            report.unsupported[key] = f"{unsupported_stems[stem]} is recognised but not supported yet"
            continue
        parts = _sibling_field(key, tensors) or split_key(key)
        if parts is None:
            hit = saved_module_field(key, saved)  # PEFT modules_to_save: full replacement weights
            if hit is None:
                report.unknown.append(key)
                continue
            parts = (*hit, "peft")
        name, field, _conv = parts
        name = _flatten_kohya_stem(name)
        if field in KOHYA_OFT_FIELDS and (kohya_oft or name.startswith(KOHYA_OFT_PREFIX)) and value.dim() == 3:
            field = KOHYA_OFT_FIELDS[field]  # sd-scripts' OFT: same key as LyCORIS diag-OFT, other normalisation
        if field in groups[name]:
            # e.g. "x.lora_A.weight" and "x.lora_A.default.weight" both present
            report.invalid[key] = f"duplicate {field} for module {name}"
            continue
        groups[name][field] = value
        group_keys[name].append(key)
    return groups, group_keys


def _pair_stray_alphas(groups: dict[str, dict[str, torch.Tensor]], group_keys: dict[str, list[str]]) -> None:
    """An alpha alone under its own module name joins the one layer whose name differs only in ``.`` vs ``_``
    and which has no alpha: dot-spelled trainers (Anime-Z on Z-Image) write ``layers.1.attention.to.v.lora.down
    .weight`` but ``layers.1.attention.to_v.alpha``. Ambiguous or unmatched alphas stay alone (reported invalid)."""
    stray = [name for name, fields in groups.items() if set(fields) == {"alpha"}]
    if not stray:
        return
    spelled: dict[str, list[str]] = defaultdict(list)
    for name, fields in groups.items():
        if "alpha" not in fields:
            spelled[name.replace("_", ".")].append(name)
    for name in stray:
        homes = spelled.get(name.replace("_", "."), [])
        if len(homes) == 1 and "alpha" not in groups[homes[0]]:
            groups[homes[0]]["alpha"] = groups.pop(name)["alpha"]
            group_keys[homes[0]].extend(group_keys.pop(name))


def _build_layers(
    groups: dict[str, dict[str, torch.Tensor]], group_keys: dict[str, list[str]], peft_cfg: dict,
    report: LoadReport, *, strict: bool, where: str,
) -> dict[str, Layer]:
    """One :class:`Layer` per group; a group that forms none is invalid (``strict``: raises naming the file)."""
    layers: dict[str, Layer] = {}
    for name, fields in groups.items():
        keys = tuple(sorted(group_keys[name]))
        try:
            layer = _build_layer(name, fields, keys, peft_cfg)
        except UnsupportedAdapterError as exc:  # a recognised adapter lorakit cannot compute (not a broken file)
            if strict:
                raise type(exc)(f"{exc}{where}") from exc
            for key in keys:
                report.unsupported[key] = str(exc)
            continue
        except LorakitError as exc:
            if strict:
                raise type(exc)(f"{exc}{where}") from exc
            for key in keys:
                report.invalid[key] = str(exc)
            continue
        layers[name] = layer
        for key in keys:
            report.consumed[key] = name
    return layers


def _nothing_loaded(tensors: Mapping[str, torch.Tensor], report: LoadReport, where: str) -> LorakitError:
    """The error for a file of which no layer loaded: its first broken key, its unsupported adapter types, or
    a sample of keys no convention knows."""
    if report.invalid:
        first = next(iter(sorted(report.invalid.items())))
        return FormatError(f"No layer of{where or ' the file'} could be loaded; first problem: {first[0]}: {first[1]}")
    if report.unsupported:
        kinds = sorted({reason.split(" is recognised")[0] for reason in report.unsupported.values()})
        return UnsupportedAdapterError(
            f"Nothing{where} can be loaded: {', '.join(kinds)} adapters are recognised but not supported yet "
            f"(e.g. {next(iter(sorted(report.unsupported)))}). Convert the file to LoRA/LoHa/LoKr with its trainer."
        )
    positional = cloneofsimo_message(tensors, where)
    if positional:
        return UnsupportedAdapterError(positional)
    sample = ", ".join(sorted(map(str, tensors))[:5])
    return UnknownFormatError(
        f"No LoRA layer recognised{where} (keys: {sample}{', ...' if len(tensors) > 5 else ''}). "
        "Supported: kohya lora_down/lora_up, PEFT lora_A/lora_B, LyCORIS hada_/lokr_/diff, ..."
    )


def _build_layer(name: str, fields: dict[str, torch.Tensor], keys: tuple[str, ...], peft_cfg: dict) -> Layer:
    component, path, flat, _ = _split_prefix(name)
    main = {f: t for f, t in fields.items() if f not in _SIDE_FIELDS or f == "alpha"}
    weight = None
    adapter_fields = {f for f in main if f != "alpha"}
    if adapter_fields:
        cls = adapter_for_fields(adapter_fields)
        if cls is None:
            raise FormatError(f"{name}: fields {sorted(adapter_fields)} form no known adapter")
        extra = adapter_fields - set(cls.fields)
        if extra:
            raise FormatError(f"{name}: {cls.kind} adapter cannot hold {sorted(extra)}; the keys are mixed up")
        weight = cls.from_fields(main, name=name)
        if weight.alpha is None and "down" in main and ("up" in main):
            alpha = _peft_alpha(peft_cfg.get(component) or peft_cfg.get(None), path, weight.rank)
            if alpha is not None:
                weight = dataclasses.replace(weight, alpha=alpha)
        _check_on_input(name, fields.get("on_input"))
    elif "alpha" in fields and len(fields) == 1:
        raise FormatError(f"{name}.alpha has no adapter weights beside it (missing lora_down/lora_up)")
    dora = None
    if "dora_scale" in fields or "magnitude" in fields:
        if weight is None:
            raise FormatError(f"{name}: DoRA magnitude without an adapter to scale")
        peft = "magnitude" in fields
        dora = DoRA.from_tensor(fields["magnitude" if peft else "dora_scale"], peft=peft, name=name)
    bias, bias_key = None, "diff_b"
    for key in ("diff_b", "b_norm"):
        if key in fields:
            bias, bias_key = fields[key], key
    for t in (bias, fields.get("diff_m")):
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{name}: a bias/modulation delta contains NaN or Inf; the file is corrupt.")
    params = {"modulation": fields["diff_m"]} if "diff_m" in fields else {}
    return Layer(
        name=name, component=component, path=path, flat=flat, weight=weight, bias=bias, dora=dora,
        params=params, keys=keys, bias_key=bias_key,
    )


def _check_on_input(name: str, flag: torch.Tensor | None) -> None:
    """LyCORIS (IA)^3's ``on_input`` is one 0/1 flag (1: the vector scales input columns)."""
    if flag is None:
        return
    ok = flag.numel() == 1 and not flag.is_complex() and float(flag.reshape(-1)[0]) in (0.0, 1.0)
    if not ok:
        raise FormatError(f"{name}.on_input must be a single 0 or 1 flag ((IA)^3: 1 scales the input side), got "
                          f"shape {tuple(flag.shape)}; the file is corrupt")


# Fields that do not tell conventions apart (kohya, LyCORIS and diffusers' kohya export all use them).
_NEUTRAL_FIELDS = {"alpha", "dora_scale", "magnitude"}
_PAIR_CONVENTIONS = {"kohya", "peft", "diffusers", "diffusers-old", "xlabs"}
# Conventions that legitimately appear together in one file, and the name the file gets.
_COMPATIBLE = {
    frozenset({"peft", "diffusers"}): "diffusers",  # diffusers: lora.down for the UNet, lora_linear_layer for the TE
    frozenset({"kohya", "lycoris"}): "lycoris",  # LyCORIS: LoCon beside LoHa/LoKr under lora_unet_
    frozenset({"kohya", "onetrainer"}): "onetrainer",  # OneTrainer: lora_te1_ text encoders, lora_transformer_
}


def _group_convention(prefix_conv: str, suffix_convs: set[str], fields: set[str]) -> tuple[str, bool]:
    """``(convention, strong)`` of one module's keys; ``strong`` when a low-rank pair spelling says it."""
    pair = suffix_convs & _PAIR_CONVENTIONS
    if prefix_conv == "kohya-oft":
        return "kohya", True  # sd-scripts' own OFT network (oft_unet_)
    flat = prefix_conv in ("kohya", "onetrainer", "lycoris")
    if pair:
        spelling = sorted(pair)[0] if len(pair) == 1 else "mixed"
        if spelling in ("kohya", "peft") and flat:
            return prefix_conv, True
        if spelling == "kohya":
            return "native", True  # lora_down on dotted model names: ComfyUI / LightX2V / musubi files
        if spelling == "peft" and prefix_conv == "native":
            return "native", True
        return spelling, True
    if flat:
        return ("lycoris" if prefix_conv == "kohya" else prefix_conv), False
    # full-weight / bias / modulation diffs on native names are LightX2V's (Wan distill) files
    if fields <= {"diff", "diff_b", "diff_m"} and prefix_conv in ("native", "plain"):
        return "lightx2v", False
    return "lycoris", False


def detect_format(keys: Iterable[str]) -> str:
    """The naming convention of a file from its keys alone: ``kohya``, ``peft``, ``diffusers``, ``diffusers-old``,
    ``lycoris``, ``onetrainer``, ``native``, ``lightx2v``, ``xlabs``, ``mixed`` or ``unknown``."""
    suffixes: dict[str, set[str]] = defaultdict(set)
    fields: dict[str, set[str]] = defaultdict(set)
    for key in keys:
        parts = split_key(key) if isinstance(key, str) else None
        if parts is None:
            continue
        name, field, conv = parts
        stem = _flatten_kohya_stem(name)
        if field not in _NEUTRAL_FIELDS:
            suffixes[stem].add(conv)
            fields[stem].add(field)
    strong: Counter[str] = Counter()
    weak: Counter[str] = Counter()
    for name, convs in suffixes.items():
        if not convs:
            continue  # alpha/dora_scale alone: says nothing
        convention, is_strong = _group_convention(_split_prefix(name)[3], convs, fields[name])
        (strong if is_strong else weak)[convention] += 1
    votes = set(strong) or set(weak)
    if not votes:
        return "unknown"
    if len(votes) == 1:
        only = next(iter(votes))
        if only == "native" and "lightx2v" in weak:
            return "lightx2v"
        return only
    return _COMPATIBLE.get(frozenset(votes), "mixed")


def load(source: str | os.PathLike[str] | Mapping[str, torch.Tensor] | LoRA, *, strict: bool = False) -> LoRA:
    """Load a LoRA from a path, a hub reference ``org/repo/file.safetensors``, a state dict or a LoRA.

    ``strict=True`` raises on the first broken or unloadable key; the default loads what is valid and
    lists every other key in ``lora.report``.
    """
    if isinstance(source, LoRA):
        return source
    if isinstance(source, Mapping):
        return parse_state_dict(source, {}, strict=strict, source=None)
    path = resolve_source(source)
    tensors, metadata = read_tensors(path)
    config = sibling_config(path)
    if config is not None and "lora_adapter_metadata" not in metadata:
        metadata = {**metadata, "lora_adapter_metadata": config_metadata(config)}  # a PEFT adapter folder
    lora = parse_state_dict(tensors, metadata, strict=strict, source=str(Path(path)))
    _warn_unknown_alpha(lora, path)
    return lora


def _warn_unknown_alpha(lora: LoRA, path: Path) -> None:
    """A PEFT save keeps alpha only in its adapter_config.json: without one, say that ``alpha = r`` was assumed."""
    if "lora_adapter_metadata" in lora.metadata or not is_peft_save(path, lora.report.consumed):
        return
    missing = [layer.name for layer in lora if layer.weight is not None and layer.rank and layer.alpha is None]
    if missing:
        warnings.warn(
            f"{path}: a PEFT adapter file without its {path.with_name('adapter_config.json').name}: lora_alpha is "
            f"unknown for {len(missing)} layer(s), so alpha = r (scale 1) was assumed. Put the adapter_config.json "
            "the file was saved with next to it for the right scale.",
            stacklevel=3,
        )
