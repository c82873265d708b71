"""Recognition of each library's quantized layer or tensor type: its logical shape and scheme, dequantization,
requantization with the layer's own scheme and block layout, and the raw storage (int data and scales).

One :class:`QuantKind` per library (torchao, bitsandbytes, diffusers GGUF, optimum-quanto, fp8 with a separate
scale). Every library is imported lazily, only when a module's type says it is one of its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedAdapterError
from .fp8 import FP8_DTYPES, round_fp8

__all__ = ["KINDS", "QuantInfo", "QuantKind", "kind_of", "swap_state"]


@dataclasses.dataclass(frozen=True)
class QuantInfo:
    """What a quantized layer is: ``library`` (torchao, bitsandbytes, gguf, quanto, fp8), ``scheme`` (e.g.
    ``int8 weight-only per-row``), the logical weight ``shape`` and the dtype its forward computes in."""

    library: str
    scheme: str
    shape: tuple[int, ...]
    compute_dtype: torch.dtype

    def label(self) -> str:
        return f"{self.library} {self.scheme}"


class QuantKind:
    """One library's quantized layers. ``requantize`` returns the new attribute objects (never mutating the old
    ones), so that swapping the old objects back (:func:`swap_state`) restores the storage bit for bit."""

    library = ""
    #: the module attributes that together hold the quantized storage (swapped as a whole)
    state_names: tuple[str, ...] = ("weight",)

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def info(self, module: nn.Module) -> QuantInfo:
        raise NotImplementedError

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The logical weight in fp32."""
        raise NotImplementedError

    def requantize(self, module: nn.Module, weight: torch.Tensor, rounding: str,
                   generator: torch.Generator | None) -> dict[str, Any]:
        """New state objects for ``weight`` (fp32, logical shape), quantized with the layer's own scheme."""
        raise NotImplementedError

    def storage(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The raw quantized tensors (int data, scales, ...), for bit-exact comparisons."""
        raise NotImplementedError

    def float8(self, module: nn.Module) -> bool:
        """Whether the storage is float8 (``rounding="stochastic"`` is available)."""
        return False

    def _refuse_stochastic(self, rounding: str, scheme: str) -> None:
        if rounding != "nearest":
            raise UnsupportedAdapterError(
                f"rounding={rounding!r} is only available for float8 storage, not {self.library} {scheme}; "
                "use rounding='nearest' or mode='hook'"
            )


def _weight(module: nn.Module) -> Any:
    return module.__dict__.get("_parameters", {}).get("weight", getattr(module, "weight", None))


def _type_from(obj: object, prefix: str) -> bool:
    return type(obj).__module__.startswith(prefix)


def swap_state(module: nn.Module, new: dict[str, Any]) -> dict[str, Any]:
    """Put ``new`` objects in place of the module's attributes of the same names; return the objects replaced."""
    old: dict[str, Any] = {}
    for name, value in new.items():
        if name in module._parameters:
            old[name] = module._parameters[name]
            module._parameters[name] = value
        elif name in module._buffers:
            old[name] = module._buffers[name]
            module._buffers[name] = value
        else:
            old[name] = module.__dict__.get(name)
            module.__dict__[name] = value
    return old


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


# -- torchao -------------------------------------------------------------------------------------------------
class TorchaoKind(QuantKind):
    library = "torchao"

    def matches(self, module: nn.Module) -> bool:
        w = _weight(module)
        return _type_from(w, "torchao") and hasattr(w, "qdata") and hasattr(w, "scale")

    def _granularity(self, w: Any) -> Any:
        from torchao.quantization.granularity import PerGroup, PerRow, PerTensor

        block = list(w.block_size)
        if block == list(w.shape):
            return PerTensor()
        if block[-1] == w.shape[-1]:
            return PerRow()
        return PerGroup(block[-1])

    def info(self, module: nn.Module) -> QuantInfo:
        w = _weight(module)
        kind = "float8" if w.qdata.dtype in FP8_DTYPES else "int8"
        act = "dynamic" if getattr(w, "act_quant_kwargs", None) is not None else "weight-only"
        gran = type(self._granularity(w)).__name__
        return QuantInfo(self.library, f"{type(w).__name__} {kind} {act} {gran}", tuple(w.shape), w.dtype)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return _weight(module).dequantize().float()

    def requantize(self, module: nn.Module, weight: torch.Tensor, rounding: str,
                   generator: torch.Generator | None) -> dict[str, Any]:
        w = _weight(module)
        hp = weight.to(w.dtype)
        cls = type(w)
        if w.qdata.dtype in FP8_DTYPES:
            q = cls.from_hp(hp, float8_dtype=w.qdata.dtype, granularity=self._granularity(w), mm_config=w.mm_config,
                            kernel_preference=w.kernel_preference, act_quant_kwargs=w.act_quant_kwargs)
            if rounding != "nearest":
                scale = q.scale.float().reshape(q.scale.shape[0], -1) if q.scale.dim() else q.scale.float()
                qdata = round_fp8(weight.float() / scale, w.qdata.dtype, rounding, generator)
                q = cls(qdata, q.scale, q.block_size, q.mm_config, q.act_quant_kwargs, q.kernel_preference, q.dtype)
            return {"weight": _param(q)}
        self._refuse_stochastic(rounding, self.info(module).scheme)
        q = cls.from_hp(hp, self._granularity(w), act_quant_kwargs=w.act_quant_kwargs)
        return {"weight": _param(q)}

    def storage(self, module: nn.Module) -> dict[str, torch.Tensor]:
        w = _weight(module)
        return {"weight.qdata": w.qdata, "weight.scale": w.scale}

    def float8(self, module: nn.Module) -> bool:
        return _weight(module).qdata.dtype in FP8_DTYPES


# -- optimum-quanto ------------------------------------------------------------------------------------------
class QuantoKind(QuantKind):
    library = "quanto"

    def matches(self, module: nn.Module) -> bool:
        w = _weight(module)
        return _type_from(w, "optimum.quanto") and hasattr(w, "qtype") and hasattr(w, "_data")

    def info(self, module: nn.Module) -> QuantInfo:
        w = _weight(module)
        group = getattr(w, "_group_size", None)
        act = getattr(w, "activation_qtype", None)
        scheme = (f"{w.qtype.name} axis={w.axis}" + (f" group={group}" if group else "")
                  + (f" activations={act.name}" if act is not None else ""))
        return QuantInfo(self.library, f"{type(w).__name__} {scheme}", tuple(w.shape), w.dtype)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return _weight(module).dequantize().float()

    def requantize(self, module: nn.Module, weight: torch.Tensor, rounding: str,
                   generator: torch.Generator | None) -> dict[str, Any]:
        from optimum.quanto import freeze, quantize

        w = _weight(module)
        if not self.float8(module):
            self._refuse_stochastic(rounding, self.info(module).scheme)
        # quanto's own quantizer (scale optimiser, group size) on a throwaway Linear of the same shape
        tmp = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)).requires_grad_(False)
        with torch.no_grad():
            tmp[0].weight.copy_(weight.to(w.dtype))
        quantize(tmp, weights=w.qtype)
        freeze(tmp)
        q = tmp[0].weight
        act = getattr(w, "activation_qtype", None)
        if rounding != "nearest" or act is not None:
            # float8 + stochastic: quanto's scale, the values rounded stochastically onto its grid; and the layer's
            # activation qtype (int8/fp8 activations) carried over, which the throwaway Linear did not have
            data = q._data
            if rounding != "nearest":
                data = round_fp8(weight.float() / q._scale.float(), q._data.dtype, rounding, generator)
            q = type(q)(q.qtype, q.axis, q.size(), q.stride(), data, q._scale, act)
        return {"weight": q}

    def float8(self, module: nn.Module) -> bool:
        w = _weight(module)
        return type(_plain(w._data)) is torch.Tensor and w._data.dtype in FP8_DTYPES

    def storage(self, module: nn.Module) -> dict[str, torch.Tensor]:
        w = _weight(module)
        out = {"weight._data": _plain(w._data), "weight._scale": w._scale}
        if getattr(w, "_shift", None) is not None:
            out["weight._shift"] = w._shift
        return out


def _plain(t: Any) -> torch.Tensor:
    """A packed tensor subclass as its raw bytes tensor."""
    for attr in ("_data", "data"):
        inner = getattr(t, attr, None)
        if isinstance(inner, torch.Tensor) and type(inner) is torch.Tensor:
            return inner
    return t


# -- diffusers GGUF ------------------------------------------------------------------------------------------
class GGUFKind(QuantKind):
    library = "gguf"

    def matches(self, module: nn.Module) -> bool:
        w = _weight(module)
        return type(w).__name__ == "GGUFParameter" and hasattr(w, "quant_type")

    def info(self, module: nn.Module) -> QuantInfo:
        w = _weight(module)
        name = getattr(w.quant_type, "name", str(w.quant_type))
        dtype = getattr(module, "compute_dtype", None) or torch.float32
        return QuantInfo(self.library, f"GGUFParameter {name}", tuple(w.quant_shape), dtype)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        return dequantize_gguf_tensor(_weight(module)).float()

    def requantize(self, module: nn.Module, weight: torch.Tensor, rounding: str,
                   generator: torch.Generator | None) -> dict[str, Any]:
        import gguf
        from diffusers.quantizers.gguf.utils import GGUFParameter

        w = _weight(module)
        self._refuse_stochastic(rounding, self.info(module).scheme)
        try:
            packed = gguf.quants.quantize(weight.detach().cpu().float().numpy(), w.quant_type)
        except NotImplementedError as exc:
            raise UnsupportedAdapterError(
                f"gguf cannot requantize {w.quant_type.name} ({exc}); apply this LoRA with mode='hook' on this model"
            ) from exc
        data = torch.from_numpy(packed.copy()).to(w.device)
        return {"weight": GGUFParameter(data, requires_grad=False, quant_type=w.quant_type)}

    def storage(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": _weight(module).as_tensor()}


# -- bitsandbytes --------------------------------------------------------------------------------------------
class Bnb8bitKind(QuantKind):
    library = "bitsandbytes"
    state_names = ("weight", "state")

    def matches(self, module: nn.Module) -> bool:
        w = _weight(module)
        return type(w).__name__ == "Int8Params" and _type_from(w, "bitsandbytes") and w.dtype == torch.int8

    def _scb(self, module: nn.Module) -> torch.Tensor:
        w = _weight(module)
        scb = getattr(w, "SCB", None)
        return scb if scb is not None else module.state.SCB

    def info(self, module: nn.Module) -> QuantInfo:
        w = _weight(module)
        return QuantInfo(self.library, "Linear8bitLt int8 per-row (LLM.int8)", tuple(w.shape), torch.float16)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        w = _weight(module)
        return w.data.float() * (self._scb(module).float()[:, None] / 127.0)

    def requantize(self, module: nn.Module, weight: torch.Tensor, rounding: str,
                   generator: torch.Generator | None) -> dict[str, Any]:
        import bitsandbytes as bnb

        self._refuse_stochastic(rounding, "int8")
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        new = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False)
        new.CB, new.SCB = cb, scb
        state = bnb.MatmulLtState()
        old = module.state
        state.threshold, state.has_fp16_weights, state.is_training = old.threshold, old.has_fp16_weights, old.is_training
        state.use_pool = getattr(old, "use_pool", False)
        return {"weight": new, "state": state}

    def storage(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight.CB": _weight(module).data, "weight.SCB": self._scb(module)}


class Bnb4bitKind(QuantKind):
    library = "bitsandbytes"
    state_names = ("weight", "quant_state")

    def matches(self, module: nn.Module) -> bool:
        w = _weight(module)
        return type(w).__name__ == "Params4bit" and bool(getattr(w, "bnb_quantized", False))

    def info(self, module: nn.Module) -> QuantInfo:
        qs = _weight(module).quant_state
        nested = " double-quant" if qs.nested else ""
        scheme = f"Linear4bit {qs.quant_type} block={qs.blocksize}{nested}"
        return QuantInfo(self.library, scheme, tuple(qs.shape), getattr(module, "compute_dtype", None) or qs.dtype)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        w = _weight(module)
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()

    def requantize(self, module: nn.Module, weight: torch.Tensor, rounding: str,
                   generator: torch.Generator | None) -> dict[str, Any]:
        import bitsandbytes as bnb

        w = _weight(module)
        qs = w.quant_state
        self._refuse_stochastic(rounding, qs.quant_type)
        data, state = bnb.functional.quantize_4bit(
            weight.to(qs.dtype).contiguous(), blocksize=qs.blocksize, compress_statistics=qs.nested,
            quant_type=qs.quant_type, quant_storage=w.quant_storage,
        )
        new = bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=qs.blocksize,
                                compress_statistics=qs.nested, quant_type=qs.quant_type,
                                quant_storage=w.quant_storage, module=module, bnb_quantized=True)
        return {"weight": new, "quant_state": state}

    def storage(self, module: nn.Module) -> dict[str, torch.Tensor]:
        w = _weight(module)
        qs = w.quant_state
        out = {"weight": w.data, "absmax": qs.absmax}
        if qs.nested:
            out["absmax2"] = qs.state2.absmax
            out["offset"] = qs.offset
        return out


# -- plain float8 with a separate scale ----------------------------------------------------------------------
_SCALE_NAMES = ("weight_scale", "scale_weight")


class Fp8ScaledKind(QuantKind):
    library = "fp8"

    def _scale_name(self, module: nn.Module) -> str | None:
        return next((n for n in _SCALE_NAMES if isinstance(getattr(module, n, None), torch.Tensor)), None)

    def matches(self, module: nn.Module) -> bool:
        w = _weight(module)
        return isinstance(w, torch.Tensor) and w.dtype in FP8_DTYPES and self._scale_name(module) is not None

    def _scale(self, module: nn.Module) -> torch.Tensor:
        s = getattr(module, self._scale_name(module) or "").float()
        return s.reshape(-1, *([1] * (_weight(module).dim() - 1))) if s.numel() > 1 else s

    def info(self, module: nn.Module) -> QuantInfo:
        w = _weight(module)
        per = "per-row" if getattr(module, self._scale_name(module)).numel() > 1 else "per-tensor"
        return QuantInfo(self.library, f"{str(w.dtype).removeprefix('torch.')} scaled {per}", tuple(w.shape),
                         torch.float32)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return _weight(module).float() * self._scale(module)

    def requantize(self, module: nn.Module, weight: torch.Tensor, rounding: str,
                   generator: torch.Generator | None) -> dict[str, Any]:
        w = _weight(module)
        # the scale is kept, as ComfyUI does when it patches fp8 scaled weights
        return {"weight": _param(round_fp8(weight.float() / self._scale(module), w.dtype, rounding, generator))}

    def storage(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": _weight(module), "scale": getattr(module, self._scale_name(module))}

    def float8(self, module: nn.Module) -> bool:
        return True


#: first match wins (registration order); third parties may append their own kinds
KINDS: list[QuantKind] = [TorchaoKind(), QuantoKind(), GGUFKind(), Bnb8bitKind(), Bnb4bitKind(), Fp8ScaledKind()]


def kind_of(module: nn.Module) -> QuantKind | None:
    """The quantization kind of ``module``'s weight, or ``None`` for a plain floating-point layer."""
    w = _weight(module)
    if w is None or (type(w) in (torch.Tensor, nn.Parameter) and w.is_floating_point() and w.dtype not in FP8_DTYPES):
        return None
    return next((k for k in KINDS if k.matches(module)), None)
