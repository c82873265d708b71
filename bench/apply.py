"""Apply/remove/switch timings and exactness of lorakit vs diffusers+PEFT on an SD1.5-size UNet (random weights),
rank-32 LoRAs on the ~192 attention/projection/feed-forward layers; plus hook-mode forward overhead.

Run: ``flock /tmp/lorakit-bench.lock python bench/apply.py [--dtypes fp32,bf16,fp16] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings

import torch

import lorakit
from lorakit.adapters import LoRAWeights
from lorakit.model import Layer, LoRA

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def targets(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in unet.named_modules() if n.endswith(SUFFIXES) and hasattr(m, "weight")}


def make_lora(mods: dict[str, torch.nn.Module], seed: int, rank: int = 32) -> tuple[LoRA, dict[str, torch.Tensor]]:
    """The same LoRA as a lorakit object and as a diffusers/PEFT state dict (alpha == rank: scale 1)."""
    g = torch.Generator().manual_seed(seed)
    layers, state = {}, {}
    for name, m in mods.items():
        w = m.weight
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.02
        up = torch.randn(w.shape[0], rank, *([1] * (w.dim() - 2)), generator=g) * 0.02
        layers[name] = Layer(name, "denoiser", name, weight=LoRAWeights(down, up, alpha=float(rank)))
        state[f"unet.{name}.lora_A.weight"] = down
        state[f"unet.{name}.lora_B.weight"] = up
    return LoRA(layers), state


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def differing(unet: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> int:
    sd = unet.state_dict()
    return sum(not torch.equal(sd[k].view(torch.uint8), v.view(torch.uint8)) for k, v in snapshot.items())


def bench_dtype(unet32: torch.nn.Module, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    unet = unet32.to(dtype)
    mods = targets(unet)
    lora_a, state_a = make_lora(mods, 1)
    lora_b, state_b = make_lora(mods, 2)
    snapshot = {f"{n}.{p}": t.detach().clone() for n, m in mods.items() for p, t in m.named_parameters(recurse=False)}
    r: dict[str, list[float]] = {k: [] for k in ("lk_apply", "lk_remove", "lk_switch", "df_apply", "df_remove", "df_switch")}
    for _ in range(repeats):
        patch = None

        def lk_apply():
            nonlocal patch
            patch = lorakit.apply(unet, [(lora_a, 1.0)])

        r["lk_apply"].append(timed(lk_apply))
        r["lk_remove"].append(timed(patch.remove))

        def lk_switch():
            nonlocal patch
            p = lorakit.apply(unet, [(lora_a, 1.0)])
            t0 = time.perf_counter()
            p.remove()
            patch = lorakit.apply(unet, [(lora_b, 1.0)])
            return time.perf_counter() - t0

        r["lk_switch"].append(lk_switch())
        patch.remove()
    lk_diff = differing(unet, snapshot)

    def df_load_fuse(state, name):
        unet.load_lora_adapter(dict(state), prefix="unet", adapter_name=name)
        unet.fuse_lora(lora_scale=1.0, adapter_names=[name])

    def df_unfuse():
        unet.unfuse_lora()
        unet.unload_lora()

    for i in range(repeats):
        r["df_apply"].append(timed(lambda i=i: df_load_fuse(state_a, f"a{i}")))
        r["df_remove"].append(timed(df_unfuse))
        df_load_fuse(state_a, f"a{i}x")
        r["df_switch"].append(timed(lambda i=i: (df_unfuse(), df_load_fuse(state_b, f"b{i}"))))
        df_unfuse()
    df_diff = differing(unet, snapshot)
    # put the reference weights back so the next dtype starts from the same model
    with torch.no_grad():
        for n, m in mods.items():
            for p, t in m.named_parameters(recurse=False):
                t.copy_(snapshot[f"{n}.{p}"])
    out = {k: statistics.median(v) for k, v in r.items()}
    out.update(lk_diff=lk_diff, df_diff=df_diff, layers=len(mods))
    unet.to(torch.float32)
    return out


def hook_overhead(unet: torch.nn.Module, repeats: int) -> tuple[float, float, float]:
    mods = targets(unet)
    loras = [make_lora(mods, s)[0] for s in (11, 12, 13)]
    x = torch.randn(1, 4, 32, 32)
    t = torch.tensor([500])
    ctx = torch.randn(1, 77, 768)

    def fwd() -> float:
        with torch.no_grad():
            unet(x, t, ctx)  # warm-up
            return min(timed(lambda: unet(x, t, ctx)) for _ in range(repeats))

    base = fwd()
    with lorakit.apply(unet, [(lo, 0.5) for lo in loras]):
        fused = fwd()
    with lorakit.apply(unet, [(lo, 0.5) for lo in loras], mode="hook"):
        hooked = fwd()
    return base, fused, hooked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hooks", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        unet = UNet2DConditionModel(**SD15_UNET).eval()
    n = sum(p.numel() for p in unet.parameters())
    print(f"SD1.5-size UNet: {n / 1e6:.0f}M params, built in {time.perf_counter() - t0:.1f}s; torch threads {torch.get_num_threads()}")
    print("| dtype | layers | lorakit apply | diffusers apply | ratio | lorakit remove | diffusers remove | ratio "
          "| lorakit switch A->B | diffusers switch | ratio | differ after remove (lorakit / diffusers) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in args.dtypes.split(","):
        r = bench_dtype(unet, DTYPES[key], args.repeats)
        print(
            f"| {key} | {r['layers']} | {r['lk_apply']:.3f}s | {r['df_apply']:.3f}s | {r['df_apply'] / r['lk_apply']:.1f}x "
            f"| {r['lk_remove']:.4f}s | {r['df_remove']:.3f}s | {r['df_remove'] / max(r['lk_remove'], 1e-6):.0f}x "
            f"| {r['lk_switch']:.3f}s | {r['df_switch']:.3f}s | {r['df_switch'] / r['lk_switch']:.1f}x "
            f"| {r['lk_diff']} / {r['df_diff']} |",
            flush=True,
        )
        gc.collect()
    if not args.no_hooks:
        base, fused, hooked = hook_overhead(unet, args.repeats)
        print(f"\nUNet forward fp32 1x4x32x32: plain {base:.3f}s, fused (3 LoRAs) {fused:.3f}s, "
              f"hook (3 LoRAs, rank 32) {hooked:.3f}s -> hook overhead {100 * (hooked / fused - 1):.1f}%")


if __name__ == "__main__":
    main()
