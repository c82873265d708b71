"""Peak RSS of merging a rank-32 LoRA into an SDXL-size fp16 checkpoint on disk: lorakit's streaming merge
vs a load-everything baseline (safetensors load_file + patch + save_file), each in its own subprocess.

Run: ``flock /tmp/lorakit-bench.lock python bench/merge.py [--scale 0.25] [--no-baseline]``. Files are
generated tensor by tensor in a temp folder and deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def sdxl_shapes(scale: float) -> dict[str, tuple[int, ...]]:
    """SDXL UNet tensor names and shapes (built on the meta device: no memory, no weights), with the
    leading dimension scaled by ``scale`` for quicker runs."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    shapes = {}
    for key, t in unet.state_dict().items():
        shape = tuple(t.shape)
        if scale != 1.0 and shape:
            shape = (max(1, round(shape[0] * scale)), *shape[1:])
        shapes[key] = shape
    return shapes


def write_random_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """fp16 safetensors written tensor by tensor from a reused random pool (memory stays ~pool size)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + 2 * n]}
        offset += 2 * n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    pool = (torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)) * 0.02).half().view(torch.uint8).numpy()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for spec in header.values():
            left = spec["data_offsets"][1] - spec["data_offsets"][0]
            start = (spec["data_offsets"][0] // 2) % (1 << 23) * 2  # vary the slice so tensors differ
            while left:
                chunk = min(left, pool.nbytes - start)
                fh.write(memoryview(pool[start : start + chunk]))
                left -= chunk
                start = 0
    return offset


def write_lora(path: Path, shapes: dict[str, tuple[int, ...]], rank: int) -> int:
    """Rank-``rank`` kohya LoRA on every linear of the transformer blocks (attention, ff, proj_in/out)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    sd = {}
    for key, shape in shapes.items():
        if len(shape) != 2 or not key.endswith(".weight") or "attentions" not in key or "norm" in key:
            continue
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, shape[1], generator=g) * 0.01).half()
        sd[f"{name}.lora_up.weight"] = (torch.randn(shape[0], rank, generator=g) * 0.01).half()
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(sd, path)
    return len(sd) // 3


CHILD_LORAKIT = """
import resource, sys, time, json
import lorakit.ops as ops
t = time.perf_counter()
res = ops.merge(sys.argv[1], [(sys.argv[2], 1.0)], sys.argv[3])
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "s": time.perf_counter() - t,
                  "patched": res.summary["patched_tensors"]}))
"""

CHILD_BASELINE = """
import resource, sys, time, json
import torch
from safetensors.torch import load_file, save_file
t = time.perf_counter()
model = load_file(sys.argv[1])
lora = load_file(sys.argv[2])
patched = 0
for key in list(model):
    name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
    if key.endswith(".weight") and name + ".lora_down.weight" in lora:
        down, up = lora[name + ".lora_down.weight"].float(), lora[name + ".lora_up.weight"].float()
        scale = float(lora[name + ".alpha"]) / down.shape[0]
        model[key] = (model[key].float() + scale * (up @ down)).half()
        patched += 1
save_file(model, sys.argv[3])
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "s": time.perf_counter() - t,
                  "patched": patched}))
"""


def run_child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", type=float, default=1.0, help="scale the leading dim of every tensor (0.25: quick)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--no-baseline", action="store_true", help="skip the load-everything baseline (needs ~2x model RAM)")
    ap.add_argument("--dir", default=None, help="where to put the temporary files (default: system temp)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-merge-", dir=args.dir))
    try:
        shapes = sdxl_shapes(args.scale)
        t = time.perf_counter()
        nbytes = write_random_checkpoint(work / "base.safetensors", shapes)
        n_lora = write_lora(work / "lora.safetensors", shapes, args.rank)
        params = nbytes // 2
        print(f"SDXL UNet shapes x{args.scale}: {len(shapes)} tensors, {params / 1e9:.2f} B params, "
              f"{nbytes / 2**30:.2f} GiB fp16 (generated in {time.perf_counter() - t:.0f} s); "
              f"LoRA rank {args.rank} on {n_lora} linears, {(work / 'lora.safetensors').stat().st_size / 2**20:.0f} MiB")
        ours = run_child(CHILD_LORAKIT, str(work / "base.safetensors"), str(work / "lora.safetensors"), str(work / "out.safetensors"))
        print(f"lorakit streaming merge: peak RSS {ours['rss_mb']:.0f} MiB, {ours['s']:.1f} s, {ours['patched']} tensors patched")
        (work / "out.safetensors").unlink()
        if not args.no_baseline:
            base = run_child(CHILD_BASELINE, str(work / "base.safetensors"), str(work / "lora.safetensors"), str(work / "ref.safetensors"))
            print(f"load-everything baseline: peak RSS {base['rss_mb']:.0f} MiB, {base['s']:.1f} s, {base['patched']} tensors patched")
            print(f"RSS ratio baseline/lorakit: {base['rss_mb'] / ours['rss_mb']:.1f}x")
        print(f"target: lorakit peak RSS <= 1536 MiB -> {'met' if ours['rss_mb'] <= 1536 else 'NOT met'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
