"""Apply/remove/switch timings and exactness of lorakit vs diffusers+PEFT on an SD1.5-size UNet (random weights),
rank-32 LoRAs on the 192 attention/projection/feed-forward layers, LoRAs read from .safetensors files by both;
the in-place floor ``W += s·B@A``; and the hook-mode forward overhead with 3 stacked LoRAs.

Rounds are interleaved (lorakit, diffusers, floor in turn, order alternating), figures are medians with
[min-max] over rounds. Refuses to run (exit 3) when the load average is above 0.75 x cores.

Run: ``flock /tmp/lorakit-bench.lock python bench/apply.py [--dtypes fp32,bf16,fp16] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import check_quiet, ratio, spread, timed  # noqa: E402

import lorakit  # noqa: E402
from lorakit.adapters import LoRAWeights  # noqa: E402
from lorakit.model import Layer, LoRA  # noqa: E402
from lorakit.runtime.fuse import drop_spares  # noqa: E402

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


def differing(unet: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> int:
    sd = unet.state_dict()
    return sum(not torch.equal(sd[k].view(torch.uint8), v.view(torch.uint8)) for k, v in snapshot.items())


class Sides:
    """The timed operations of one dtype; every LoRA is read from its file inside the timed region."""

    def __init__(self, unet: torch.nn.Module, dtype: torch.dtype, folder: Path) -> None:
        from safetensors.torch import save_file

        self.unet, self.mods = unet, targets(unet)
        self.files = []
        for seed in (1, 2):
            state = {k: v.to(dtype).contiguous() for k, v in make_lora(self.mods, seed)[1].items()}
            path = folder / f"lora{seed}-{dtype}.safetensors".replace("torch.", "")
            save_file(state, str(path))
            self.files.append(path)
        self.factors = [
            (m.weight, (state := make_lora({n: m}, 1)[1])[f"unet.{n}.lora_B.weight"].flatten(1).to(dtype),
             state[f"unet.{n}.lora_A.weight"].flatten(1).to(dtype))
            for n, m in self.mods.items()
        ]
        self.patch = None
        self.n = 0

    def lk_apply(self, which: int) -> None:
        self.patch = lorakit.apply(self.unet, [(str(self.files[which]), 1.0)])

    def lk_remove(self) -> None:
        self.patch.remove()

    def df_apply(self, which: int) -> None:
        from safetensors.torch import load_file

        self.n += 1
        self.unet.load_lora_adapter(load_file(str(self.files[which])), prefix="unet", adapter_name=f"a{self.n}")
        self.unet.fuse_lora(lora_scale=1.0, adapter_names=[f"a{self.n}"])

    def df_remove(self) -> None:
        self.unet.unfuse_lora()
        self.unet.unload_lora()

    def floor(self) -> float:
        """``W += B@A`` in place on every target (model dtype), then the weights are put back (untimed)."""
        saved = [w.detach().clone() for w, _, _ in self.factors]
        with torch.no_grad():
            t = time.perf_counter()
            for w, up, down in self.factors:
                w.view(w.shape[0], -1).addmm_(up, down)
            t = time.perf_counter() - t
            for (w, _, _), s in zip(self.factors, saved):
                w.copy_(s)
        return t


def bench_dtype(unet32: torch.nn.Module, dtype: torch.dtype, rounds: int, folder: Path) -> dict[str, list[float]]:
    unet = unet32.to(dtype)
    s = Sides(unet, dtype, folder)
    snapshot = {f"{n}.{p}" for n, m in s.mods.items() for p, _ in m.named_parameters(recurse=False)}
    r: dict[str, list[float]] = {}

    def rec(key: str, value: float) -> None:
        r.setdefault(key, []).append(value)

    def pre() -> dict[str, torch.Tensor]:
        # both sides share the model: each side's exactness is judged against the weights it started from
        return {k: v.detach().clone() for k, v in unet.state_dict().items() if k in snapshot}

    def lk_round(phase: str) -> None:
        if phase == "fresh":
            drop_spares()  # no buffer from an earlier remove: every fused tensor is a new allocation
        start = pre()
        rec(f"lk_{phase}", timed(lambda: s.lk_apply(0)))
        rec("lk_remove", timed(s.lk_remove))
        s.lk_apply(0)
        rec(f"lk_switch_{phase}", timed(lambda: (s.lk_remove(), s.lk_apply(1))))
        s.lk_remove()
        rec("lk_drift", differing(unet, start))

    def df_round(phase: str) -> None:
        start = pre()
        rec(f"df_{phase}", timed(lambda: s.df_apply(0)))
        rec("df_remove", timed(s.df_remove))
        s.df_apply(0)
        rec(f"df_switch_{phase}", timed(lambda: (s.df_remove(), s.df_apply(1))))
        s.df_remove()
        rec("df_drift", differing(unet, start))

    for phase in ("fresh", "switched"):
        if phase == "switched":  # ten switches on each side first
            for i in range(10):
                s.lk_apply(i % 2)
                s.lk_remove()
                s.df_apply(i % 2)
                s.df_remove()
        for i in range(rounds):
            order = [lk_round, df_round] if i % 2 == 0 else [df_round, lk_round]
            for fn in order:
                fn(phase)
                gc.collect()
            rec("floor", s.floor())
    drop_spares()
    unet.to(torch.float32)
    return r


def hook_overhead(unet: torch.nn.Module, rounds: int) -> dict[str, list[float]]:
    mods = targets(unet)
    loras = [make_lora(mods, s)[0] for s in (11, 12, 13)]
    x, t, ctx = torch.randn(1, 4, 32, 32), torch.tensor([500]), torch.randn(1, 77, 768)
    r: dict[str, list[float]] = {"fused": [], "hook": []}
    with torch.no_grad():
        for i in range(rounds):
            for mode in ("fuse", "hook") if i % 2 == 0 else ("hook", "fuse"):
                with lorakit.apply(unet, [(lo, 0.5) for lo in loras], mode=mode):
                    unet(x, t, ctx)  # warm-up
                    r["fused" if mode == "fuse" else "hook"].append(min(timed(lambda: unet(x, t, ctx)) for _ in range(2)))
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-hooks", action="store_true")
    ap.add_argument("--no-apply", action="store_true")
    ap.add_argument("--allow-busy", action="store_true", help="print figures (tagged BUSY) even on a loaded machine")
    args = ap.parse_args()
    busy = check_quiet(args.allow_busy)
    warnings.filterwarnings("ignore")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.no_grad():
        unet = UNet2DConditionModel(**SD15_UNET).eval()
    n = sum(p.numel() for p in unet.parameters())
    print(f"SD1.5-size UNet: {n / 1e6:.0f}M params; torch threads {torch.get_num_threads()}; {args.rounds} interleaved rounds")
    folder = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    if not args.no_apply:
        print("| dtype | phase | lorakit apply | diffusers apply | speed-up | lorakit switch A->B | diffusers switch | speed-up "
              "| in-place floor | switch / floor |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for key in args.dtypes.split(","):
            r = bench_dtype(unet, DTYPES[key], args.rounds, folder)
            for phase in ("fresh", "switched"):
                print(f"| {key} | {phase} | {spread(r[f'lk_{phase}'])} | {spread(r[f'df_{phase}'])} | {ratio(r[f'df_{phase}'], r[f'lk_{phase}'])} "
                      f"| {spread(r[f'lk_switch_{phase}'])} | {spread(r[f'df_switch_{phase}'])} "
                      f"| {ratio(r[f'df_switch_{phase}'], r[f'lk_switch_{phase}'])} | {spread(r['floor'])} "
                      f"| {ratio(r[f'lk_switch_{phase}'], r['floor'])} |{busy}", flush=True)
            print(f"| {key} | remove | {spread(r['lk_remove'], digits=4)} | {spread(r['df_remove'])} "
                  f"| {ratio(r['df_remove'], r['lk_remove'])} | tensors differing after a round's removes (worst round): "
                  f"lorakit {max(r['lk_drift']):g} / diffusers {max(r['df_drift']):g} | | | | |{busy}")
            gc.collect()
    if not args.no_hooks:
        r = hook_overhead(unet, args.rounds)
        print(f"\nUNet forward fp32 1x4x32x32, 3 stacked rank-32 LoRAs: fused {spread(r['fused'])}, hook {spread(r['hook'])}; "
              f"hook / fused = {ratio(r['hook'], r['fused'])}{busy}")
    check_quiet(True, "end", own_threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
