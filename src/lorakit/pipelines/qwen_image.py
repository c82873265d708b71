"""The tiny Qwen-Image pipelines (``family="qwen-image"``: diffusers' ``QwenImagePipeline``; ``"qwen-image-edit"``:
``QwenImageEditPipeline``): random weights from configs in code, a tiny Qwen2.5-VL text encoder (with a 1-block
vision tower for the edit pipeline's input image) over the offline byte-level chat tokenizer, no download.

Both pipelines wrap the prompt in a fixed chat template and drop the template's system prefix from the encoder's
hidden states by a token count written for the released tokenizer (34 / 64); the tiny pipelines set that count to
what the offline tokenizer makes of the same prefix, so the prompt's tokens are exactly what reaches the
transformer."""

from __future__ import annotations

import inspect
import types
from contextvars import ContextVar
from functools import lru_cache
from typing import Any

import torch

from ._text import chat_tokenizer

__all__ = ["QWEN_SPECIALS", "TINY_QWEN25_VL", "TINY_TRANSFORMER", "TINY_VAE", "build_qwen_image",
           "build_qwen_image_edit", "qwen_tokenizer"]

# 2 blocks of 2 heads x 16 (RoPE axes 4+6+6). The VAE (Wan-style, 8x) has 4 latent channels, packed 2x2 by the
# pipeline (16 channels in): 32x32 -> 4x4 latents -> 2x2 tokens. The VAE's base width is 2: random decoders of
# width 4-8 pass latent changes to pixels ~10x damped (a PEFT LoRA moved the image by only 0.01-0.017).
TINY_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 16, "axes_dims_rope": (4, 6, 6),
}
TINY_VAE: dict[str, Any] = {
    "base_dim": 2, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1, "temperal_downsample": [False, True, True],
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075], "latents_std": [2.8184, 1.4541, 2.3275, 2.6558],
}  # the released VAE's first four channel statistics
# Qwen's special tokens, ids 0.. in this order (the released ids are 151643..): pad/bos <|endoftext|>.
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
# Text: 2 layers, width 16 (2 heads x 8, 1 kv head), M-RoPE sections 2+1+1 = head_dim / 2. Vision: 1 block, width
# 16, patches 14 merged 2x2 into one token, out width 16 (the text width).
TINY_QWEN25_VL: dict[str, Any] = {
    "text_config": {
        "vocab_size": len(QWEN_SPECIALS) + 958, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0,
    },
    "vision_config": {
        "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16,
        "fullatt_block_indexes": [0], "window_size": 112,
    },
    "image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3, "vision_end_token_id": 4,
}


def qwen_tokenizer(max_length: int = 1024) -> Any:
    """The offline byte-level tokenizer with Qwen's special tokens (``<|im_start|>``, ``<|image_pad|>``, ...)."""
    return chat_tokenizer(QWEN_SPECIALS, max_length, pad="<|endoftext|>", bos="<|endoftext|>", eos="<|im_end|>")


def _prefix_tokens(tokenizer: Any, template: str, marker: str) -> int:
    """How many tokens ``template`` has before ``marker``: what the pipeline drops from the encoder's output."""
    return len(tokenizer(template.split(marker, 1)[0]).input_ids)


def _components(seed: int) -> dict[str, Any]:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**TINY_QWEN25_VL)).eval()
    return {"scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0), "vae": vae, "text_encoder": text_encoder,
            "transformer": transformer}


def build_qwen_image(seed: int = 0) -> Any:
    """A tiny random ``QwenImagePipeline``: same ``seed`` -> identical weights; 32x32 is a valid size (multiples
    of 16)."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(tokenizer=qwen_tokenizer(), **_components(seed))
    pipe.prompt_template_encode_start_idx = _prefix_tokens(pipe.tokenizer, pipe.prompt_template_encode, "{}")
    return pipe


@lru_cache(maxsize=1)
def _processor_class() -> type:
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        # Qwen2VLProcessor requires a video processor, and transformers' video processors need torchvision (not a
        # lorakit dependency). The edit pipeline only sends images: this one has no video slot.
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                     **kwargs: Any) -> None:
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    ImageOnlyQwen2VLProcessor.__name__ = ImageOnlyQwen2VLProcessor.__qualname__ = "Qwen2VLProcessor"
    return ImageOnlyQwen2VLProcessor


def _processor() -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # The PIL backend (the default one needs torchvision). Pixel bounds keep the vision tower at a few tokens.
    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56)
    return _processor_class()(image_processor=images, tokenizer=qwen_tokenizer())


_EDIT_AREA: ContextVar[int] = ContextVar("lorakit_tiny_qwen_edit_area", default=1024 * 1024)


@lru_cache(maxsize=1)
def _edit_class() -> type:
    from diffusers import QwenImageEditPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as stock

    # Stock Qwen-Image-Edit resizes the input image to ~1024² pixels whatever height/width say (its __call__ calls
    # the module's calculate_dimensions(1024 * 1024, ratio)); at tiny sizes that makes a CPU call take ~20 s. The
    # tiny pipeline runs the stock __call__'s own code with calculate_dimensions reading the target area from the
    # request (a context variable, so concurrent calls do not interfere); nothing else changes.
    inner = inspect.unwrap(QwenImageEditPipeline.__call__)
    if "calculate_dimensions" not in inner.__code__.co_names:  # a later diffusers: nothing to change
        return QwenImageEditPipeline

    def calculate_dimensions(target_area: int, ratio: float) -> Any:
        return stock.calculate_dimensions(_EDIT_AREA.get(), ratio)

    call = types.FunctionType(inner.__code__, {**inner.__globals__, "calculate_dimensions": calculate_dimensions},
                              inner.__name__, inner.__defaults__, inner.__closure__)
    call.__kwdefaults__ = inner.__kwdefaults__
    call = torch.no_grad()(call)

    class TinyQwenImageEdit(QwenImageEditPipeline):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            height = kwargs.get("height") or self.default_sample_size * self.vae_scale_factor
            width = kwargs.get("width") or self.default_sample_size * self.vae_scale_factor
            token = _EDIT_AREA.set(height * width)
            try:
                return call(self, *args, **kwargs)
            finally:
                _EDIT_AREA.reset(token)

    # Saved folders and task lookups see the stock pipeline (model_index.json names QwenImageEditPipeline).
    TinyQwenImageEdit.__name__ = TinyQwenImageEdit.__qualname__ = "QwenImageEditPipeline"
    return TinyQwenImageEdit


def build_qwen_image_edit(seed: int = 0) -> Any:
    """A tiny random ``QwenImageEditPipeline`` (the input image goes through the Qwen2.5-VL vision tower into the
    prompt, and its latents join the token sequence). It is a subclass whose only change is that the input image is
    resized to about the requested ``height × width`` area (stock: ~1024² whatever the size);
    ``isinstance(pipe, QwenImageEditPipeline)`` holds and ``save_pretrained`` writes a stock folder. The processor
    is an image-only ``Qwen2VLProcessor`` (the stock one wants a video processor, which needs torchvision)."""
    processor = _processor()
    pipe = _edit_class()(tokenizer=processor.tokenizer, processor=processor, **_components(seed))
    pipe.prompt_template_encode_start_idx = _prefix_tokens(pipe.tokenizer, pipe.prompt_template_encode,
                                                          "<|vision_start|>")
    return pipe
