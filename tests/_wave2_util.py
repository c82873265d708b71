"""Shared by the wave-2 image family tests: the peer's placement (diffusers' LoRA converter, then PEFT through
``load_lora_adapter`` and ``fuse_lora``) as a plain state dict, and lorakit's placement checked against it in fuse
and hook mode with a bit-exact remove."""

from __future__ import annotations

import copy

import torch

import lorakit


def peer_fused(model: torch.nn.Module, converted: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """``model``'s weights after diffusers/PEFT load ``converted`` (``transformer.``-prefixed PEFT keys) and fuse
    it at ``strength``; the model itself is left untouched."""
    peer = copy.deepcopy(model)
    peer.load_lora_adapter(dict(converted), prefix="transformer", adapter_name="peer")
    peer.fuse_lora(lora_scale=strength)
    out = {}
    for key, value in peer.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def check_against(model, lora, want: dict[str, torch.Tensor], strength: float, forward, *, atol=1e-6) -> int:
    """lorakit fuses ``lora`` into a copy of ``model``: every weight equals ``want`` (within ``atol``); hook mode
    gives the fused output; remove restores bit-exactly. Returns how many tensors changed (non-vacuity)."""
    base = model.state_dict()
    fused, hooked = copy.deepcopy(model), copy.deepcopy(model)
    patch = lorakit.apply(fused, [(lora, strength)], strict=True)
    changed = 0
    for key, value in fused.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=atol, msg=key)
        changed += not torch.equal(value, base[key])
    hook = lorakit.apply(hooked, [(lora, strength)], mode="hook", strict=True)
    with torch.no_grad():
        out_fused, out_hook, out_base = forward(fused), forward(hooked), forward(model)
    torch.testing.assert_close(out_hook, out_fused, rtol=1e-4, atol=1e-5)
    assert (out_fused - out_base).abs().max() > 1e-4  # the LoRA changes the output
    patch.remove()
    hook.remove()
    assert all(torch.equal(v, base[k]) for k, v in fused.state_dict().items())
    with torch.no_grad():
        assert torch.equal(forward(hooked), out_base)
    return changed


def lora_pair(stem: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None, naming: str) -> dict:
    """One layer in a naming: ``kohya`` (``lora_down``/``lora_up``/``alpha``) or ``peft`` (``lora_A``/``lora_B``)."""
    if naming == "peft":
        return {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up}
    out = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
    if alpha is not None:
        out[f"{stem}.alpha"] = torch.tensor(alpha)
    return out
