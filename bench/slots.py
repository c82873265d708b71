"""Adapter slots (``lorakit.slots``) on the attention layers of an SD1.5-size UNet: the 16 ``Transformer2DModel``
blocks of SD1.5 (dims 320/640/1280, cross-attention 768, 1x1-conv proj_in/proj_out) at a 256x256 image
(latents 32x32: 1024/256/64/16 tokens), random weights, rank-32 LoRAs on their 192 Linear/conv layers.

1. Load cost: ``slots.load(i, lora)`` of an in-memory LoRA (resolve, check, copy, fold alpha/rank) against a raw
   ``copy_`` of the same LoRA's bytes into preallocated tensors (the floor any copy-based load has), and the
   load of the same LoRA from its .safetensors file.
2. Mixed batch: a batch of 8 rows with 8 different LoRAs (``rows([0..7])``, gather + bmm) against the same batch
   through the same blocks with one LoRA fused by ``lorakit.apply`` (the base cost), and the uniform fast path
   (``rows([0]*8)``).

Rounds are interleaved (order alternating); figures are medians with [min-max] over rounds; the load average is
printed at start and end. Refuses to run (exit 3) when the load average is above 0.75 x cores.

Run: ``flock /tmp/lorakit-bench.lock python bench/slots.py [--rounds 5] [--batch 8] [--rank 32] [--size 256]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import check_quiet, ratio, spread, timed  # noqa: E402

import lorakit  # noqa: E402
from lorakit.adapters import LoRAWeights  # noqa: E402
from lorakit.model import Layer, LoRA  # noqa: E402

SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
# SD1.5's cross-attention transformers: (channels, latent downscale) for down 2x3 levels, mid, up 3x3 levels
LEVELS = [(320, 1)] * 2 + [(640, 2)] * 2 + [(1280, 4)] * 2 + [(1280, 8)] + [(1280, 4)] * 3 + [(640, 2)] * 3 + [(320, 1)] * 3


class Blocks(nn.Module):
    """The 16 SD1.5 attention blocks run one after the other on their own latent sizes (a stand-in for the UNet's
    attention cost: the resnets and convs between them are left out, so the LoRA share is the UNet's upper bound)."""

    def __init__(self, latent: int) -> None:
        super().__init__()
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        self.blocks = nn.ModuleList(
            Transformer2DModel(num_attention_heads=8, attention_head_dim=c // 8, in_channels=c, cross_attention_dim=768,
                               norm_num_groups=32) for c, _ in LEVELS)
        self.sizes = [latent // d for _, d in LEVELS]

    def inputs(self, batch: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        xs = [torch.randn(batch, c, s, s, generator=g) for (c, _), s in zip(LEVELS, self.sizes)]
        return xs, torch.randn(batch, 77, 768, generator=g)

    def forward(self, xs: list[torch.Tensor], ctx: torch.Tensor) -> list[torch.Tensor]:
        return [blk(x, encoder_hidden_states=ctx).sample for blk, x in zip(self.blocks, xs)]


def make_lora(model: nn.Module, seed: int, rank: int) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in model.named_modules():
        if name.endswith(SUFFIXES) and hasattr(m, "weight"):
            w = m.weight
            down = torch.randn(rank, *w.shape[1:], generator=g) * 0.02
            up = torch.randn(w.shape[0], rank, *([1] * (w.dim() - 2)), generator=g) * 0.02
            layers[name] = Layer(name, None, name, weight=LoRAWeights(down, up, alpha=rank / 2))
    return LoRA(layers, source=f"lora{seed}.safetensors")


def bench_load(model: nn.Module, loras: list[LoRA], path: Path, rounds: int, busy: str) -> None:
    """Interleaved: raw copy_, a first load (a new LoRA object: resolved and checked), a repeated load of a resident
    LoRA object (its plan kept), and a load from the file."""
    sl = lorakit.slots(model, k=len(loras), files=loras)
    pairs = [(t.clone(), t) for lay in loras[0] for t in lay.weight.tensors().values()]  # preallocated dst, src
    nbytes = sum(src.nbytes for _, src in pairs)
    sl.load(0, loras[0])  # warm-up, and the plan of loras[0] is kept from here on
    times: list[list[float]] = [[], [], [], []]
    for r in range(rounds * 4):
        i = r % len(loras)
        fresh = dataclasses.replace(loras[0], layers=dict(loras[0].layers))  # same tensors, a new object
        steps = [lambda: [d.copy_(s) for d, s in pairs], lambda i=i, fresh=fresh: sl.load(i, fresh),
                 lambda i=i: sl.load(i, loras[0]), lambda i=i: sl.load(i, str(path))]
        for j in (range(4) if r % 2 == 0 else reversed(range(4))):
            times[j].append(timed(steps[j]))
    raw, first, again, disk = times
    print(f"\n## load (one rank-{next(iter(loras[0].ranks().values()))} LoRA, {len(loras[0])} layers, "
          f"{nbytes / 2**20:.1f} MiB; slots: {len(sl.targets)} targets, k={sl.k}, buffers {sl.nbytes / 2**20:.1f} MiB){busy}")
    print("| operation | time | vs raw copy_ |")
    print("|---|---|---|")
    print(f"| raw copy_ of the LoRA's bytes | {spread(raw, digits=4)} | 1.00x |")
    print(f"| slots.load(i, lora), a LoRA object not loaded before (resolve + check + copy) | {spread(first, digits=4)} "
          f"| {ratio(first, raw)} |")
    print(f"| slots.load(i, lora), a resident LoRA loaded again (copy) | {spread(again, digits=4)} | {ratio(again, raw)} |")
    print(f"| slots.load(i, path) (reads the file) | {spread(disk, digits=4)} | {ratio(disk, raw)} |")
    sl.close()


def bench_batch(model: Blocks, loras: list[LoRA], batch: int, rounds: int, busy: str) -> None:
    xs, ctx = model.inputs(batch)
    sl = lorakit.slots(model, k=len(loras), files=loras)
    for i, lora in enumerate(loras):
        sl.load(i, lora)
    mixed_rows = [i % len(loras) for i in range(batch)]

    def fused() -> None:
        with lorakit.apply(model, [(loras[0], 1.0)]):
            timed_fused.append(timed(lambda: model(xs, ctx)))

    def mixed() -> None:
        with sl.rows(mixed_rows):
            timed_mixed.append(timed(lambda: model(xs, ctx)))

    def uniform() -> None:
        with sl.rows([0] * batch):
            timed_uniform.append(timed(lambda: model(xs, ctx)))

    timed_fused: list[float] = []
    timed_mixed: list[float] = []
    timed_uniform: list[float] = []
    with torch.inference_mode():
        for step in (fused, mixed, uniform):  # warm-up
            step()
        timed_fused.clear(), timed_mixed.clear(), timed_uniform.clear()
        for r in range(rounds):
            steps = [fused, mixed, uniform]
            for step in steps if r % 2 == 0 else steps[::-1]:
                step()
    sl.close()
    print(f"\n## forward, batch {batch} through the 16 attention blocks{busy}")
    print("| path | time | throughput vs fused |")
    print("|---|---|---|")
    print(f"| one LoRA fused (lorakit.apply) | {spread(timed_fused)} | 1.00x |")
    print(f"| slots, {len(set(mixed_rows))} different LoRAs (gather + bmm) | {spread(timed_mixed)} | "
          f"{ratio(timed_fused, timed_mixed)} |")
    print(f"| slots, every row slot 0 (fast path) | {spread(timed_uniform)} | {ratio(timed_fused, timed_uniform)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size / 8)")
    ap.add_argument("--no-forward", action="store_true", help="only the load timings")
    ap.add_argument("--allow-busy", action="store_true", help="print figures (tagged BUSY) even on a loaded machine")
    args = ap.parse_args()
    busy = check_quiet(args.allow_busy)
    torch.manual_seed(0)
    model = Blocks(args.size // 8).eval()
    loras = [make_lora(model, seed, args.rank) for seed in range(1, 9)]
    n = sum(p.numel() for p in model.parameters())
    print(f"SD1.5 attention blocks: {n / 1e6:.0f}M params, {len(loras[0])} LoRA layers; torch threads "
          f"{torch.get_num_threads()}; {args.rounds} interleaved rounds")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        lorakit.save(loras[0], str(path))
        bench_load(model, loras, path, args.rounds, busy)
    if not args.no_forward:
        bench_batch(model, loras, args.batch, args.rounds, busy)
    check_quiet(True, "end", own_threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
