"""What a training run is told (:class:`TrainConfig`) and what it gives back (:class:`TrainResult`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

__all__ = ["EXPERT_NAMES", "PRESETS", "TrainConfig", "TrainResult"]

#: ``expert`` spellings -> ``high`` / ``low`` (``lorakit generate --lora f@low_noise``, LightX2V's ``low_noise_model``)
EXPERT_NAMES: dict[str, str] = {
    "high": "high", "high_noise": "high", "high_noise_model": "high",
    "low": "low", "low_noise": "low", "low_noise_model": "low",
}

#: ``--preset`` -> module-name patterns on the denoiser (UNet and DiT spellings side by side)
PRESETS: dict[str, tuple[str, ...]] = {
    "attn": (
        "to_q", "to_k", "to_v", "to_out.0",
        "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    ),
    "attn-mlp": (
        "to_q", "to_k", "to_v", "to_out.0",
        "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
    ),
    "all-linear": ("*",),
}


@dataclasses.dataclass
class TrainConfig:
    """Options of one run; every field is a ``lorakit train`` flag of the same name.

    A new LoRA is built on ``targets`` (module-name patterns: segment substrings such as ``to_q`` or
    ``attn2``, or globs) or a ``preset``; ``init`` continues an existing file instead, training only the
    layers ``train_modules`` select (all of them when empty) and writing ``format="same"`` by default.
    Exactly one of ``steps`` / ``epochs`` bounds the run (``steps`` wins when both are given)."""

    output: str | Path | None = None
    init: str | Path | None = None
    train_modules: tuple[str, ...] = ()
    freeze_modules: tuple[str, ...] = ()
    rank: int | None = None  # None: 16 for a new LoRA, the file's with init
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: tuple[str, ...] = ()
    preset: str | None = None
    conv_rank: int | None = None
    conv_alpha: float | None = None
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    lr_scheduler: str = "constant"
    warmup: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    resolution: int = 512
    seed: int = 0
    save_every: int | None = None
    state_dir: str | Path | None = None
    resume: str | Path | None = None
    validate_every: int | None = None
    validation_split: float = 0.0
    validation_data: Any = None
    cache_latents: bool = False
    format: str | None = None  # None: "same" with init, else kohya (UNet) / peft (transformer denoisers)
    device: str | None = None
    strict: bool = False
    report: str | Path | None = None  # train_report.html path (None: beside the output)
    frames: int | None = None  # video families: frames per clip (None: 5, the tiny pipelines' size)
    train_text_encoder: bool = False  # LoRA on the CLIP text encoder(s) too
    text_encoder_lr: float | None = None  # None: lr
    buckets: bool = False  # kohya-style aspect buckets around resolution², batches from one bucket
    bucket_step: int = 64
    min_snr_gamma: float | None = None  # min-SNR loss weighting (Hang et al. 2023)
    noise_offset: float = 0.0  # per-sample, per-channel constant added to the noise
    expert: str | None = None  # Wan 2.2 A14B: "high" (transformer, t >= boundary) or "low" (transformer_2)
    guidance: float = 1.0  # guidance-distilled transformers (FLUX.1-dev) take this as their guidance input
    progress: bool = False  # a rich progress bar (the CLI turns it on)

    def __post_init__(self) -> None:
        if isinstance(self.expert, str):  # lorakit generate's / LightX2V's spellings name the same experts
            self.expert = EXPERT_NAMES.get(self.expert.lower(), self.expert)
        self.train_modules = tuple(self.train_modules)
        self.freeze_modules = tuple(self.freeze_modules)
        self.targets = tuple(self.targets)
        checks = [
            (self.rank is None or self.rank >= 1, f"rank must be >= 1, got {self.rank}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.lr_scheduler in ("constant", "cosine"), f"lr_scheduler must be constant or cosine, got {self.lr_scheduler!r}"),
            (self.optimizer in ("adamw", "adamw8bit"), f"optimizer must be adamw or adamw8bit, got {self.optimizer!r}"),
            (self.mixed_precision in ("no", "fp16", "bf16"), f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}"),
            (self.preset is None or self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}"),
            (self.format in (None, "same", "kohya", "peft"), f"format must be kohya, peft or same, got {self.format!r}"),
            (self.format != "same" or self.init is not None, "format='same' needs init= (the file whose format to keep)"),
            (self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (0.0 <= self.validation_split < 1.0, f"validation_split must be in [0, 1), got {self.validation_split}"),
            (self.resolution >= 8, f"resolution must be >= 8, got {self.resolution}"),
            (self.frames is None or self.frames >= 1, f"frames must be >= 1, got {self.frames}"),
            (self.text_encoder_lr is None or self.text_encoder_lr > 0, f"text_encoder_lr must be > 0, got {self.text_encoder_lr}"),
            (self.bucket_step >= 8, f"bucket_step must be >= 8, got {self.bucket_step}"),
            (self.min_snr_gamma is None or self.min_snr_gamma > 0, f"min_snr_gamma must be > 0, got {self.min_snr_gamma}"),
            (self.noise_offset >= 0, f"noise_offset must be >= 0, got {self.noise_offset}"),
            (self.expert in (None, "high", "low"), f"expert must be high or low (Wan 2.2 A14B), got {self.expert!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.steps is None and self.epochs is None:
            self.steps = 1000

    @property
    def lora_rank(self) -> int:
        return 16 if self.rank is None else self.rank

    def out_format(self, transformer: bool = False) -> str:
        """The format written: ``format``, else ``same`` with ``init``, else kohya for UNets and peft for
        transformers (diffusers reads kohya FLUX files only in BFL names, which a DiT LoRA does not have)."""
        if self.format is not None:
            return self.format
        if self.init is not None:
            return "same"
        return "peft" if transformer else "kohya"


@dataclasses.dataclass
class TrainResult:
    """What a run did: per-step losses, validation ``[[step, loss], ...]``, parameter counts, the written file."""

    steps: int
    loss: list[float]
    validation_loss: list[list[float]]
    parameters: dict[str, int]
    seconds: float
    output: Path | None
    mismatches: list[str] = dataclasses.field(default_factory=list)
    report: Path | None = None
    lora: Any = None  # the trained LoRA (lorakit.LoRA), in memory
    #: with init: max|Δ|/max|ref| between the step-0 model and lorakit.apply of the file (one fixed sample)
    start_difference: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "loss": self.loss,
            "validation_loss": self.validation_loss,
            "parameters": self.parameters,
            "seconds": round(self.seconds, 3),
            "output": None if self.output is None else str(self.output),
            "mismatches": self.mismatches,
            "report": None if self.report is None else str(self.report),
            "start_difference": self.start_difference,
        }
