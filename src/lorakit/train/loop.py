"""``lorakit.train``: the loop. One seeded CPU generator draws everything random (data order, VAE posterior
samples, noise, timesteps), and checkpoints store it with the optimizer and scheduler, so a resumed run on
the CPU equals an uninterrupted one tensor for tensor."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError, InternalError
from ..families import components_of
from ..formats import load
from ..io import atomic_output
from ..pipelines import load_pipeline
from ..runtime import apply
from .buckets import assign
from .build import Built, from_file, new_network, text_encoders
from .config import TrainConfig, TrainResult
from .data import Sample, load_samples, size_of, split, to_pixels, to_video_pixels
from .dist import steps_for, world
from .objective import Denoiser, denoiser_for
from .output import denoiser_prefix, write
from .report import write_report

__all__ = ["train"]

log_ = logging.getLogger("lorakit.train")
STATE_FILE = "state.pt"


def _lr_lambda(config: TrainConfig, total: int) -> Callable[[int], float]:
    warmup = config.warmup

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.lr_scheduler == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def _optimizer(params: list[Any], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes AdamW8bit) over ``params`` (tensors, or param groups with their own ``lr``)."""
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError(
                "--optimizer adamw8bit needs the bitsandbytes package (pip install bitsandbytes); "
                "use --optimizer adamw without it"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class _Data:
    """Batches in a seeded random order, epoch after epoch; its position is part of a checkpoint. With ``groups``
    (aspect buckets: lists of sample indices) every batch comes from one group and the batches are shuffled."""

    def __init__(self, n: int, batch_size: int, groups: list[list[int]] | None = None) -> None:
        self.n, self.batch_size = n, batch_size
        self.groups = groups
        self.batches: list[list[int]] = []
        self.pos = 0
        self.epoch = 0

    def _epoch(self, generator: torch.Generator) -> list[list[int]]:
        if self.groups is None:  # one group: exactly the draws of a plain shuffled order
            order = torch.randperm(self.n, generator=generator).tolist()
            return [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        batches = []
        for group in self.groups:
            order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def next(self, generator: torch.Generator) -> list[int]:
        if self.pos >= len(self.batches):
            self.batches = self._epoch(generator)
            self.pos = 0
            self.epoch += 1
        batch = self.batches[self.pos]
        self.pos += 1
        return batch

    def state(self) -> dict[str, Any]:
        return {"batches": [list(b) for b in self.batches], "pos": self.pos, "epoch": self.epoch}

    def load(self, state: Mapping[str, Any]) -> None:
        if "batches" not in state:  # a state.pt of the first version: one flat order and a sample position
            order, size = list(state["order"]), self.batch_size
            self.batches = [order[i : i + size] for i in range(0, len(order), size)]
            self.pos, self.epoch = -(-int(state["pos"]) // size), int(state["epoch"])
            return
        self.batches = [list(b) for b in state["batches"]]
        self.pos, self.epoch = int(state["pos"]), int(state["epoch"])


class _Run:
    """One training run over a pipeline: setup, steps, validation, checkpoints, output, cleanup."""

    def __init__(self, pipe: Any, samples: list[Sample], config: TrainConfig, log: Callable[[str], None]) -> None:
        self.pipe, self.config, self.log = pipe, config, log
        self.frames = _frames(config) if samples and samples[0].video else None
        self.train_samples, self.val_samples = split(samples, config.validation_split)
        if config.validation_data is not None:
            self.val_samples = load_samples(config.validation_data, frames=self.frames)
        if not self.val_samples and config.validate_every:
            self.val_samples = self.train_samples[:4]
        self.world = world(config.device)
        self.device = self.world.device(config.device)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.sizes: dict[str, tuple[int, int]] = {}  # sample source -> its bucket (width, height)
        self.data = _Data(len(self.train_samples), config.batch_size * self.world.size)
        self.step = 0
        self.losses: list[float] = []
        self.val_losses: list[list[float]] = []
        self._grad_flags: dict[torch.nn.Parameter, bool] = {}
        self._patch = None
        self._cache: dict[Any, Any] = {}
        self.built: Built | None = None
        self.start_difference: float | None = None
        self.denoiser: Denoiser | None = None

    # -- setup ---------------------------------------------------------------------------------------------
    def total_steps(self) -> int:
        c = self.config
        if c.steps is not None:
            return c.steps
        per_epoch = math.ceil(len(self.train_samples) / (c.batch_size * self.world.size))
        return max(1, math.ceil(c.epochs * per_epoch / c.grad_accum))

    def setup(self) -> None:
        c = self.config
        self.pipe.to(self.device)
        self.denoiser = denoiser_for(self.pipe, self.device, c.expert)
        self.denoiser.guidance = c.guidance
        self._check_frames()
        # the denoiser trained: the pipeline's, or the Wan 2.2 expert picked by --expert
        self.components = components = {**components_of(self.pipe), "denoiser": self.denoiser.model}
        for module in components.values():
            for p in module.parameters():
                self._grad_flags[p] = p.requires_grad
                p.requires_grad_(False)
        if c.init is not None:
            lora = load(c.init, strict=True)
            self.built = from_file(lora, components, c)
        else:
            prefix = denoiser_prefix(self.pipe)
            encoders = text_encoders(components) if c.train_text_encoder else None
            self.built = new_network(self.denoiser.model, c, self.generator, prefix, encoders)
        if c.buckets:
            self._bucket()
        network = self.built.network.to(self.device)
        if self.built.frozen is not None:
            self._patch = apply(components, self.built.frozen, mode="fuse", strict=False)
        network.attach()
        if c.gradient_checkpointing and hasattr(self.denoiser.model, "enable_gradient_checkpointing"):
            self.denoiser.model.enable_gradient_checkpointing()
        total = self.total_steps()
        # accumulation, autocast, fp16 loss scaling and the gradient all-reduce: an accelerate.Accelerator (see dist)
        self.steps = steps_for(self.world, self.device, c.grad_accum, c.mixed_precision, self.log)
        self.accelerator = self.steps.accelerator
        optimizer = _optimizer(self._param_groups(), c)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(c, total))
        self.optimizer = self.steps.prepare(network, optimizer)
        self.scaler = self.steps.scaler  # fp16: checkpointed with the run
        self._print_stats()
        self._fixed_validation()
        if c.resume is not None:
            self._resume(Path(c.resume))
        elif self.built.source is not None:
            self.start_difference = self.start_check()

    def _param_groups(self) -> list[Any]:
        """The trainable factors; with ``text_encoder_lr``, text-encoder layers in a group of their own."""
        entries = [e for e in self.built.network.entries if e.trainable]
        te = [p for e in entries if e.target.component.startswith("text_encoder") for p in (e.module.down, e.module.up)]
        if not te or self.config.text_encoder_lr is None:
            return self.built.network.trainable_parameters()
        rest = [p for e in entries if not e.target.component.startswith("text_encoder") for p in (e.module.down, e.module.up)]
        groups = [{"params": rest}] if rest else []
        return [*groups, {"params": te, "lr": self.config.text_encoder_lr}]

    def _bucket(self) -> None:
        """Each sample's aspect bucket; the data order then batches one bucket at a time."""
        c = self.config
        factor = self.denoiser.spatial_factor()
        if c.bucket_step % factor:
            raise ValueError(
                f"--bucket-step {c.bucket_step} is not a multiple of {factor}, the pixel size one latent patch of "
                f"this {type(self.pipe).__name__} covers; use {max(factor, c.bucket_step // factor * factor)}"
            )
        for samples in (self.train_samples, self.val_samples):
            chosen = assign([size_of(s.open()) for s in samples], c.resolution, c.bucket_step)
            self.sizes.update({s.source: b for s, b in zip(samples, chosen)})
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(self.train_samples):
            groups.setdefault(self.sizes[s.source], []).append(i)
        self.data = _Data(len(self.train_samples), c.batch_size * self.world.size, list(groups.values()))
        self.log("buckets: " + ", ".join(f"{w}x{h}: {len(v)}" for (w, h), v in sorted(groups.items())))

    def _check_frames(self) -> None:
        if self.frames is None:
            return
        step = int(getattr(self.pipe, "vae_scale_factor_temporal", 1) or 1)
        if (self.frames - 1) % step:
            raise ValueError(
                f"--frames {self.frames}: the {type(self.pipe).__name__} VAE compresses time {step}x, so a clip needs "
                f"{step}k+1 frames (e.g. {((self.frames - 1) // step) * step + 1} or {((self.frames - 1) // step + 1) * step + 1})"
            )

    @torch.no_grad()
    def start_check(self) -> float:
        """The training model at step 0 against ``lorakit.apply`` of the init file, on one fixed noisy sample:
        catches alpha, key and target mistakes before any compute is spent. Returns max|Δ| / max|ref|."""
        g = torch.Generator().manual_seed(self.config.seed + 7)
        mean, _, cond = self._encode(self.train_samples[:1])
        noise, t = torch.randn(mean.shape, generator=g), self.denoiser.draw_time(1, g)
        noisy, _ = self.denoiser.noisy_and_target(mean, noise.to(mean.device), t)
        ours = self.denoiser.predict(noisy, t, cond)
        self.built.network.detach()
        if self._patch is not None:
            self._patch.remove()
            self._patch = None
        try:
            with apply(self.components, self.built.fitting, mode="fuse", strict=False):
                ref = self.denoiser.predict(noisy, t, cond)
        finally:
            if self.built.frozen is not None:
                self._patch = apply(self.components, self.built.frozen, mode="fuse", strict=False)
            self.built.network.attach()
        diff = float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        if not diff < 1e-3:
            raise InternalError(
                f"{self.built.source.source}: at step 0 the training model differs from lorakit.apply of the file "
                f"by {diff:.3g} (relative); this is a lorakit bug, please report it"
            )
        self.log(f"step 0 equals lorakit.apply({self.built.source.source}) (max relative difference {diff:.2g})")
        return diff

    def parameters(self) -> dict[str, int]:
        network = self.built.network
        used = {e.target.component for e in network.entries if e.trainable} - {"denoiser"}
        base = sum(p.numel() for p in self.denoiser.model.parameters())
        base += sum(p.numel() for k in sorted(used) if k in self.components for p in self.components[k].parameters())
        trainable = network.count(True)
        frozen = self.built.frozen_params + network.count(False)
        return {"total": base + trainable + frozen, "trainable": trainable, "frozen_lora": frozen}

    def _print_stats(self) -> None:
        p = self.parameters()
        self.log(f"Total parameters: {p['total']:,}")
        self.log(f"Trainable LoRA parameters: {p['trainable']:,} in {len(self.built.network.entries)} layers")
        self.log(f"Frozen LoRA parameters: {p['frozen_lora']:,}")
        self.log(f"LoRA parameter ratio: {100 * p['trainable'] / max(1, p['total']):.2f}%")
        for line in self.built.mismatches:
            self.log(f"mismatch: {line}")

    def close(self) -> None:
        if getattr(self, "steps", None) is not None:
            self.steps.close()
            self.steps = None
        if self.built is not None:
            self.built.network.detach()
        if self._patch is not None:
            self._patch.remove()
            self._patch = None
        if self.config.gradient_checkpointing and self.denoiser is not None:
            if hasattr(self.denoiser.model, "disable_gradient_checkpointing"):
                self.denoiser.model.disable_gradient_checkpointing()
        for p, flag in self._grad_flags.items():
            p.requires_grad_(flag)
        self._grad_flags.clear()

    # -- batches ---------------------------------------------------------------------------------------------
    def _latents(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("latents", sample.source, sample.caption)
        hit = self._cache.get(key)
        if hit is None:
            size = self.sizes.get(sample.source, self.config.resolution)
            if sample.video:
                pixels = to_video_pixels(sample.open(), size, self.frames)[None]
            else:
                pixels = to_pixels(sample.open(), size)[None]
            hit = self.denoiser.encode_images(pixels)
            if self.config.cache_latents:
                self._cache[key] = hit
        return hit

    def _text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.text_grad:
            return self.denoiser.encode_text(captions)  # LoRA on the text encoder: with grad, never cached
        with torch.no_grad():
            return self._text_no_grad(captions)

    @property
    def text_trains(self) -> bool:
        """Some trainable layer sits on a text encoder (``--train-text-encoder``)."""
        built = self.built
        return built is not None and any(
            e.trainable and e.target.component.startswith("text_encoder") for e in built.network.entries
        )

    @property
    def text_grad(self) -> bool:
        """Captions are encoded with grad (the text encoder trains and this is a training step)."""
        return self.text_trains and torch.is_grad_enabled()

    def _text_no_grad(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if not self.config.cache_latents or self.text_trains:  # a training text encoder's output changes
            return self.denoiser.encode_text(captions)
        parts = []
        for caption in captions:
            key = ("text", caption)
            if key not in self._cache:
                self._cache[key] = self.denoiser.encode_text([caption])
            parts.append(self._cache[key])
        return {k: (parts[0][k] if k == "txt_ids" else torch.cat([p[k] for p in parts])) for k in parts[0]}

    def _encode(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        stats = [self._latents(s) for s in samples]
        mean = torch.cat([m for m, _ in stats])
        std = torch.cat([s for _, s in stats])
        return mean, std, self._text([s.caption for s in samples])

    def _loss(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
              weighted: bool = True) -> torch.Tensor:
        """Mean loss of the batch; ``weighted``: with the min-SNR-γ weights (validation stays plain MSE)."""
        noisy, target = self.denoiser.noisy_and_target(x0, noise.to(x0.device), t)
        with self._autocast():
            pred = self.denoiser.predict(noisy, t, cond)
        per = self.denoiser.per_sample_loss(pred, target)
        if weighted and self.config.min_snr_gamma is not None:
            per = per * self.denoiser.min_snr_weight(t, self.config.min_snr_gamma).to(per.device)
        return per.mean()

    def _autocast(self) -> contextlib.AbstractContextManager:
        return self.steps.autocast()

    # -- steps ---------------------------------------------------------------------------------------------------
    def one_step(self) -> float:
        """One optimizer update over ``grad_accum`` global batches; returns their mean loss (all processes)."""
        total = 0.0
        steps = self.steps
        params = self.built.network.trainable_parameters()
        for _ in range(self.config.grad_accum):
            batch = self.data.next(self.generator)
            n = len(batch)
            mine = self.world.mine(n, self.config.batch_size)
            # draw for the whole global batch from the shared generator, keep this process's rows
            shape = (n, *self._latent_shape(self.train_samples[batch[0]]))
            eps, noise = torch.randn(shape, generator=self.generator), torch.randn(shape, generator=self.generator)
            t = self.denoiser.draw_time(n, self.generator)
            if self.config.noise_offset:  # one constant per sample and channel (Guttenberg's noise offset)
                offset = torch.randn(*shape[:2], *([1] * (len(shape) - 2)), generator=self.generator)
                noise = noise + self.config.noise_offset * offset
            local = [self.train_samples[i] for i in batch[mine]]
            with steps.micro_batch():  # no gradient sync but on the step's last micro-batch
                if not local:  # a short last batch left this process nothing: it still joins the sync, with zeros
                    steps.backward(steps.forward(lambda: sum(p.sum() for p in params) * 0.0))
                    continue
                mean, std, cond = self._encode(local)
                x0 = mean + std * eps[mine].to(mean.device)
                loss = steps.forward(self._loss, x0, noise[mine], t[mine], cond)
                steps.backward(loss * steps.weight(len(local), n))
                total += float(loss.detach() * (len(local) / n))
        steps.step(self.optimizer, params, self.config.max_grad_norm)
        self.scheduler.step()
        return steps.total(total) / self.config.grad_accum

    def _latent_shape(self, sample: Sample) -> tuple[int, ...]:
        """The latent shape of ``sample``'s bucket (one encode per bucket, remembered)."""
        key = self.sizes.get(sample.source)
        shapes = self.__dict__.setdefault("_shapes", {})
        if key not in shapes:
            shapes[key] = tuple(self._latents(sample)[0].shape[1:])
        return shapes[key]

    @torch.no_grad()
    def _fixed_validation(self) -> None:
        """Noise and timesteps for the held-out samples, drawn once from their own seed: curves compare across runs."""
        self._val: list[tuple[list[Sample], torch.Tensor, torch.Tensor]] = []
        g = torch.Generator().manual_seed(self.config.seed + 1_000_003)
        bs = self.config.batch_size
        chunks: list[list[Sample]] = []
        for s in self.val_samples:  # consecutive samples of one bucket share a chunk
            if chunks and len(chunks[-1]) < bs and self.sizes.get(chunks[-1][0].source) == self.sizes.get(s.source):
                chunks[-1].append(s)
            else:
                chunks.append([s])
        for chunk in chunks:
            mean, _, _ = self._encode(chunk)
            self._val.append((chunk, torch.randn(mean.shape, generator=g), self.denoiser.draw_time(len(chunk), g)))

    @torch.no_grad()
    def validate(self) -> float | None:
        if not self._val:
            return None
        total, n = 0.0, 0
        for chunk, noise, t in self._val:
            mean, _, cond = self._encode(chunk)
            total += float(self._loss(mean, noise, t, cond, weighted=False)) * len(chunk)
            n += len(chunk)
        value = total / n
        self.val_losses.append([self.step, value])
        return value

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        c = self.config
        if not self.world.main:
            return
        if c.output is not None:
            write(self.built.network, self.built.source, c.output, c.out_format(self.denoiser.transformer), self.pipe)
        if c.state_dir is None:
            return
        state = {
            "step": self.step,
            "lora": {k: v.detach().cpu() for k, v in self.built.network.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "data": self.data.state(),
            "loss": list(self.losses),
            "validation_loss": [list(v) for v in self.val_losses],
        }
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        with atomic_output(Path(c.state_dir) / STATE_FILE) as tmp, open(tmp, "wb") as fh:
            torch.save(state, fh)

    def _resume(self, folder: Path) -> None:
        path = folder / STATE_FILE if folder.is_dir() else folder
        if not path.is_file():
            from ..errors import SourceNotFoundError

            raise SourceNotFoundError(f"{folder}: no {STATE_FILE} to resume from; pass the --state-dir of an earlier run")
        state = torch.load(path, map_location="cpu", weights_only=True)
        own = self.built.network.state_dict()
        theirs = state["lora"]
        if set(own) != set(theirs) or any(own[k].shape != theirs[k].shape for k in own):
            raise FormatError(
                f"{path}: the checkpoint's LoRA ({len(theirs)} tensors) does not fit this run's ({len(own)}); "
                "resume with the same --model, --init/--targets, --rank and --train-modules"
            )
        self.built.network.load_state_dict(theirs)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.data.load(state["data"])
        self.step = int(state["step"])
        self.losses = [float(x) for x in state["loss"]]
        self.val_losses = [list(v) for v in state["validation_loss"]]
        self.log(f"resumed at step {self.step} from {path}")

    def samples_for_report(self) -> list[tuple[str, Any]]:
        """With ``validate_every``: an image per validation caption (up to 4), LoRA on, fixed seed."""
        if not self.config.validate_every or self.denoiser.video:
            return []
        out = []
        for i, sample in enumerate(self.val_samples[:4]):
            g = torch.Generator(device="cpu").manual_seed(self.config.seed + i)
            res = self.config.resolution
            with torch.no_grad():
                image = self.pipe(sample.caption, num_inference_steps=8, height=res, width=res, generator=g).images[0]
            out.append((sample.caption, image))
        return out

    # -- the run -----------------------------------------------------------------------------------------------------
    def run(self, callback: Callable[[int, float], None] | None) -> None:
        c = self.config
        total = self.total_steps()
        if self.step == 0 and self._val:
            self.validate()
        with _progress(c.progress, total, self.step) as advance:
            while self.step < total:
                loss = self.one_step()
                self.step += 1
                self.losses.append(loss)
                if c.validate_every and self.step % c.validate_every == 0 and self.step < total:
                    self.validate()
                if c.save_every and self.step % c.save_every == 0 and self.step < total:
                    self.checkpoint()
                advance(loss)
                if callback is not None:
                    callback(self.step, loss)
        if self._val:
            self.validate()


@contextlib.contextmanager
def _progress(enabled: bool, total: int, done: int) -> Any:
    """``advance(loss)``: a rich bar (loss, it/s, ETA) on stderr when enabled, else nothing."""
    if not enabled:
        yield lambda loss: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
               TextColumn("{task.fields[rate]:.2f} it/s"), TimeRemainingColumn())
    start, first = time.perf_counter(), done
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("train", total=total, completed=done, loss=float("nan"), rate=0.0)

        def advance(loss: float) -> None:
            n = bar.tasks[0].completed + 1 - first
            bar.update(task, advance=1, loss=loss, rate=n / max(1e-9, time.perf_counter() - start))

        yield advance


VIDEO_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline", "Cosmos2VideoToWorldPipeline")


def _frames(config: TrainConfig) -> int:
    return 5 if config.frames is None else config.frames


def _is_video(pipe_or_dir: Any) -> bool:
    """Whether ``pipe_or_dir`` is a video family lorakit trains (decided before any model is loaded, so the data
    are checked first): a pipeline object, ``tiny-wan-t2v``/``-wan-i2v``/``-wan22``/``-cosmos``, or a folder's model_index.json."""
    if not isinstance(pipe_or_dir, (str, os.PathLike)):
        return type(pipe_or_dir).__name__ in VIDEO_PIPELINES
    from ..pipelines import tiny_model_name

    family = tiny_model_name(str(pipe_or_dir))
    if family is not None:
        return family in ("wan-t2v", "wan-i2v", "wan22", "cosmos")
    index = Path(pipe_or_dir) / "model_index.json"
    try:
        import json

        return json.loads(index.read_text(encoding="utf-8")).get("_class_name") in VIDEO_PIPELINES
    except (OSError, ValueError, AttributeError):
        return False


def _pipeline(pipe_or_dir: Any) -> Any:
    if isinstance(pipe_or_dir, (str, os.PathLike)):
        return load_pipeline(str(pipe_or_dir))
    return pipe_or_dir


def train(
    pipe_or_dir: Any,
    data: str | os.PathLike[str] | Iterable[Any],
    config: TrainConfig | None = None,
    *,
    log: Callable[[str], None] | None = None,
    callback: Callable[[int, float], None] | None = None,
    **options: Any,
) -> TrainResult:
    """Train a LoRA on ``pipe_or_dir`` (a diffusers pipeline, a pipeline folder, or ``tiny[-family]``) with
    ``data`` (a folder of images + ``.txt`` captions, a ``metadata.jsonl``, or ``(PIL image, caption)`` pairs).

    ``config`` (or keyword ``options``, the :class:`TrainConfig` fields) says what to train; ``log`` receives the
    parameter statistics and notes (default: the ``lorakit.train`` logger); ``callback(step, loss)`` runs after
    every step. Data, patterns and the ``init`` file are checked before the first step: on such an error nothing
    is written. The pipeline is left as it was (hooks removed, frozen layers unfused, grad flags restored)."""
    config = config if config is not None else TrainConfig(**options)
    log = log or log_.info
    samples = load_samples(data, frames=_frames(config) if _is_video(pipe_or_dir) else None)
    pipe = _pipeline(pipe_or_dir)
    start = time.perf_counter()
    run = _Run(pipe, samples, config, log)
    try:
        run.setup()
        run.run(callback)
        output = None
        if config.output is not None and run.world.main:
            output = write(run.built.network, run.built.source, config.output, config.out_format(run.denoiser.transformer), pipe)
        from .output import to_lora

        lora = to_lora(run.built.network, run.built.source)
        seconds = time.perf_counter() - start
        result = TrainResult(run.step, run.losses, run.val_losses, run.parameters(), seconds, output,
                             run.built.mismatches, lora=lora,
                             start_difference=run.start_difference)
        if config.report is not None and run.world.main:
            options = {k: v for k, v in vars(config).items() if k not in ("validation_data", "progress")}
            result.report = write_report(config.report, result.to_dict(), options, run.samples_for_report())
    finally:
        run.close()
    return result
