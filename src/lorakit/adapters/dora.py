"""DoRA: a learned magnitude on top of any weight adapter (``dora_scale`` or PEFT ``lora_magnitude_vector``).

With ``W₁ = W + ΔW`` (alpha/rank included) the DoRA weight is ``W' = m · W₁ / ‖W₁‖`` where the norm runs
per output row (``axis="out"``: LyCORIS ``wd_on_out=True`` ``[out, 1]``, PEFT ``[out]``/``[1, out, 1, 1]``) or per
input column (``axis="in"``: ``[1, in]``, older LyCORIS/kohya). lorakit applies a strength ``s`` as
``W + s · (W' − W)``: strength 0 is the identity and the delta is linear in ``s`` (peers differ for ``s ≠ 1``:
LyCORIS interpolates only the rescale, PEFT scales ``ΔW`` inside the norm; all agree at ``s = 1``).
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import FormatError, NonFiniteError

__all__ = ["DoRA"]


@dataclasses.dataclass(frozen=True, eq=False)
class DoRA:
    magnitude: torch.Tensor
    axis: str  # "out" | "in"
    #: the file spelling it came from: "dora_scale" (kohya/LyCORIS) or "lora_magnitude_vector" (PEFT)
    source: str = "dora_scale"

    @staticmethod
    def from_tensor(tensor: torch.Tensor, *, peft: bool, name: str = "?") -> DoRA:
        if not bool(torch.isfinite(tensor.float()).all()):
            raise NonFiniteError(f"{name}: DoRA magnitude contains NaN or Inf; the file is corrupt.")
        if tensor.dim() == 0:
            raise FormatError(f"{name}: a DoRA magnitude is a vector or a [out, 1] / [1, in] matrix, got a scalar; "
                              "the file is corrupt.")
        if peft or tensor.dim() == 1:
            axis = "out"
        elif tensor.shape[0] == 1 and tensor.dim() >= 2 and tensor.shape[1] != 1:
            axis = "in"
        elif tensor.shape[0] != 1 and all(s == 1 for s in tensor.shape[1:]):
            axis = "out"
        elif all(s == 1 for s in tensor.shape):
            axis = "out"
        else:
            raise FormatError(f"{name}: cannot tell the DoRA axis from shape {tuple(tensor.shape)}")
        return DoRA(tensor, axis, "lora_magnitude_vector" if peft else "dora_scale")

    def apply(self, base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The DoRA delta ``W' − W`` (fp32) for base weight ``base`` and adapter delta ``delta``."""
        w = base.float()
        w1 = w + delta
        m = self.magnitude.float().to(w.device)
        if self.axis == "out":
            dims = tuple(range(1, w1.dim()))
            m = m.reshape(w1.shape[0], *([1] * (w1.dim() - 1)))
        else:
            dims = (0, *range(2, w1.dim()))
            m = m.reshape(1, w1.shape[1], *([1] * (w1.dim() - 2)))
        norm = torch.linalg.vector_norm(w1, dim=dims, keepdim=True)
        scaled = torch.where(norm > 0, m / norm.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(norm))
        return w1 * scaled - w

    def parameters(self) -> int:
        return self.magnitude.numel()
