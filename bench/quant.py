"""LoRAs on quantized bases, side by side in one run: a FLUX-like stack of Linear layers (per block qkv D->3D,
out D->D, fc1 D->4D, fc2 4D->D; random weights, bf16 activations) as bf16, torchao int8 weight-only, lorakit's fp8
scaled (per row) and lorakit's int8 + rank-32 low-rank branch; one rank-32 LoRA on every Linear.

Per base: memory of the weights, the forward without a LoRA and with it in hook mode (the overhead), and the time
to apply+remove the LoRA by hook vs by fuse (dequantize, add, requantize; the low-rank model appends to its branch
instead: ``apply_branch``). Rounds are interleaved across bases and phases; figures are medians [min-max]. Refuses
to run (exit 3) when the load average is above 0.75 x cores, unless ``--allow-busy`` (figures tagged BUSY).

Run: ``flock /tmp/lorakit-bench.lock python bench/quant.py [--dim 1024] [--blocks 4] [--tokens 64] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import check_quiet, ratio, spread, timed  # noqa: E402

import lorakit  # noqa: E402
from lorakit.adapters import LoRAWeights  # noqa: E402
from lorakit.model import Layer, LoRA  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        x = x + self.out(v * torch.sigmoid(q * k))  # cheap stand-in for attention: the Linears dominate
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def build(d: int, blocks: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(d) for _ in range(blocks)])
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=d ** -0.5)
    return model.to(torch.bfloat16).eval()


def make_lora(model: nn.Module, rank: int = 32) -> LoRA:
    g = torch.Generator().manual_seed(1)
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or hasattr(m, "in_features"):
            if not name or not hasattr(m, "out_features"):
                continue
            down = torch.randn(rank, m.in_features, generator=g) * m.in_features ** -0.5
            up = torch.randn(m.out_features, rank, generator=g) * 0.02
            layers[name] = Layer(name, None, name, weight=LoRAWeights(down, up, alpha=float(rank)))
    return LoRA(layers)


def _bytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_bytes(getattr(t, n)) for n in names)
    inner = getattr(t, "data", t)
    if inner is not t and hasattr(inner, "__tensor_flatten__") and type(inner) is not torch.Tensor:
        return _bytes(inner)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += _bytes(t)
    return total


def bases(d: int, blocks: int) -> dict[str, nn.Module]:
    """bf16, torchao int8 weight-only (when installed), fp8 scaled per row, int8 + rank-32 branch."""
    ref = build(d, blocks)
    out: dict[str, nn.Module] = {"bf16": ref}
    try:
        import torchao.quantization as tq

        m = copy.deepcopy(ref)
        tq.quantize_(m, tq.Int8WeightOnlyConfig())
        out["torchao int8 wo"] = m
    except ImportError:
        print("torchao not installed: its row is skipped")
    from lorakit.quant import Fp8ScaledLinear, quantize_model

    m = copy.deepcopy(ref)
    for blk in m:
        for attr, sub in list(blk.named_children()):
            setattr(blk, attr, Fp8ScaledLinear.from_linear(sub, per_row=True))
    out["fp8 scaled row"] = m
    m = copy.deepcopy(ref)
    quantize_model(m, "int8", 32)
    out["int8 + r32 branch"] = m
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--allow-busy", action="store_true", help="print figures (tagged BUSY) even on a loaded machine")
    args = ap.parse_args()
    tag = check_quiet(args.allow_busy)
    warnings.filterwarnings("ignore")
    models = bases(args.dim, args.blocks)
    lora = make_lora(models["bf16"])
    x = torch.randn(1, args.tokens, args.dim).to(torch.bfloat16)
    params = sum(p.numel() for p in models["bf16"].parameters())
    print(f"FLUX-like Linear stack: D={args.dim}, {args.blocks} blocks, {params / 1e6:.1f}M params, {args.tokens} tokens, "
          f"bf16 activations; LoRA rank 32 on {len(lora)} Linears; torch threads {torch.get_num_threads()}; "
          f"{args.rounds} interleaved rounds{tag}")
    from lorakit.quant import apply_branch

    t: dict[str, list[float]] = {}

    def rec(key: str, fn: Callable[[], object]) -> None:
        t.setdefault(key, []).append(timed(fn))

    def forward(m: nn.Module) -> Callable[[], object]:
        def run() -> None:
            with torch.inference_mode():
                m(x)
        return run

    def one_round(name: str, m: nn.Module) -> None:
        rec(f"{name}/fwd", forward(m))
        holder: list = []
        rec(f"{name}/hook_apply", lambda: holder.append(lorakit.apply(m, lora, mode="hook")))
        rec(f"{name}/fwd_hook", forward(m))
        rec(f"{name}/hook_remove", lambda: holder.pop().remove())
        if name.startswith("int8 +"):  # the low-rank model: append to its branch (exact, no requantization)
            rec(f"{name}/fuse_apply", lambda: holder.append(apply_branch(m, lora)))
        else:
            rec(f"{name}/fuse_apply", lambda: holder.append(lorakit.apply(m, lora, mode="fuse")))
        rec(f"{name}/fwd_fused", forward(m))
        rec(f"{name}/fuse_remove", lambda: holder.pop().remove())

    for m in models.values():
        forward(m)()  # warm-up
    for r in range(args.rounds):
        for name, m in (list(models.items()) if r % 2 == 0 else list(reversed(models.items()))):
            one_round(name, m)
    ref_bytes = weight_bytes(models["bf16"])
    print(f"\n| base{tag} | weights | vs bf16 | forward, no LoRA | forward, hook | hook overhead | forward, fused "
          "| hook apply+remove | fuse apply+remove | fuse / hook |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, m in models.items():
        b = weight_bytes(m)
        hook = [a + c for a, c in zip(t[f"{name}/hook_apply"], t[f"{name}/hook_remove"])]
        fuse = [a + c for a, c in zip(t[f"{name}/fuse_apply"], t[f"{name}/fuse_remove"])]
        fuse_name = "branch" if name.startswith("int8 +") else "fuse"
        print(f"| {name} | {b / 2**20:.1f} MiB | {b / ref_bytes:.2f}x | {spread(t[f'{name}/fwd'])} "
              f"| {spread(t[f'{name}/fwd_hook'])} | {ratio(t[f'{name}/fwd_hook'], t[f'{name}/fwd'])} "
              f"| {spread(t[f'{name}/fwd_fused'])} | {spread(hook)} | {spread(fuse)} ({fuse_name}) | {ratio(fuse, hook)} |")
    check_quiet(True, "end", own_threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
