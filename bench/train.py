"""Training step time (and peak CUDA memory) of ``lorakit.train`` vs the plain PEFT + diffusers loop that
diffusers' ``train_text_to_image_lora.py`` uses (``unet.add_adapter(LoraConfig(...))``, AdamW, DDPM ε loss), on
the same UNet, LoRA targets (attention q/k/v/out), rank, batch and cached latents/text embeddings.

Rounds are interleaved (lorakit, PEFT, order alternating); each round runs ``--steps`` steps and the first
``--warmup`` are not timed. Figures are medians with [min-max] over rounds. Refuses to run (exit 3) when the load
average is above 0.75 x cores unless ``--allow-busy``.

Run: ``flock /tmp/lorakit-bench.lock python bench/train.py [--model tiny|DIR] [--device cuda] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from _common import check_quiet, ratio, spread  # noqa: E402

import lorakit  # noqa: E402
from _train_util import make_shapes  # noqa: E402
from lorakit.pipelines import load_pipeline  # noqa: E402
from lorakit.train import TrainConfig, train  # noqa: E402
from lorakit.train.data import load_samples, to_pixels  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lorakit_round(pipe, data: Path, args) -> tuple[float, int]:
    stamps: list[float] = []
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, rank=args.rank, resolution=args.resolution,
                      targets=tuple(TARGETS), cache_latents=True, lr=1e-4, device=args.device)
    reset_peak(args.device)
    train(pipe, data, cfg, callback=lambda s, loss: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[args.warmup - 1]) / (len(stamps) - args.warmup), peak(args.device)


def peft_setup(pipe, data: Path, args):
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    unet = pipe.unet.to(args.device)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    samples = load_samples(data)
    with torch.no_grad():
        pixels = torch.stack([to_pixels(s.open(), args.resolution) for s in samples]).to(args.device)
        latents = pipe.vae.to(args.device).encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds, _ = pipe.encode_prompt([s.caption for s in samples], args.device, 1, False)
    return unet, params, opt, sched, latents, embeds


def peft_round(state, args) -> tuple[float, int]:
    unet, params, opt, sched, latents, embeds = state
    g = torch.Generator().manual_seed(0)
    reset_peak(args.device)
    stamps = []
    for _ in range(args.steps):
        idx = torch.randperm(len(latents), generator=g)[: args.batch]
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=g).to(x0.device)
        pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=embeds[idx]).sample
        F.mse_loss(pred.float(), noise.float()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[args.warmup - 1]) / (len(stamps) - args.warmup), peak(args.device)


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--allow-busy", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tag = check_quiet(args.allow_busy)
    data = make_shapes(Path(tempfile.mkdtemp()) / "shapes", n=8, size=max(40, args.resolution))
    ours_pipe, peft_pipe = load_pipeline(args.model), load_pipeline(args.model)
    state = peft_setup(peft_pipe, data, args)
    ours, theirs, mem_ours, mem_theirs = [], [], [], []
    for r in range(args.rounds):
        order = [0, 1] if r % 2 == 0 else [1, 0]
        for which in order:
            if which == 0:
                s, m = lorakit_round(ours_pipe, data, args)
                ours.append(s)
                mem_ours.append(m)
            else:
                s, m = peft_round(state, args)
                theirs.append(s)
                mem_theirs.append(m)
    print(f"model {args.model}, device {args.device}, batch {args.batch}, rank {args.rank}, {args.resolution}px, "
          f"{args.steps} steps x {args.rounds} rounds{tag}")
    print(f"lorakit.train   {spread(ours, ' s/step', 4)}")
    print(f"PEFT loop       {spread(theirs, ' s/step', 4)}")
    print(f"lorakit / PEFT  {ratio(ours, theirs)} (time per step; < 1 is faster)")
    if args.device.startswith("cuda"):
        print(f"peak memory     lorakit {max(mem_ours) / 2**20:.1f} MiB, PEFT {max(mem_theirs) / 2**20:.1f} MiB")
    print(f"lorakit {lorakit.__version__}")


if __name__ == "__main__":
    main()
