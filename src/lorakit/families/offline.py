"""Module lists without weights: each family's real diffusers models built on the ``meta`` device from their
published configs, so that ``convert``, ``merge`` and ``inspect --model FAMILY`` resolve names (and check
shapes) without loading or downloading a checkpoint. Building takes seconds and no memory.

The configs are the released models' ``config.json`` values (sizes only; nothing here is a weight).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import UnknownFamilyError

__all__ = ["FAMILY_NAMES", "VARIANTS", "folder_denoiser", "meta_components", "variant_for"]


# -- text encoders (transformers configs) -------------------------------------------------------------------

def _clip(hidden: int, layers: int, heads: int, inter: int, projection: int | None, with_projection: bool) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=inter, projection_dim=projection or hidden, max_position_embeddings=77,
                         hidden_act="quick_gelu" if hidden == 768 else "gelu", vocab_size=49408)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _clip_l(with_projection: bool = False) -> nn.Module:
    return _clip(768, 12, 12, 3072, 768, with_projection)


def _clip_h() -> nn.Module:  # SD 2.x OpenCLIP ViT-H (penultimate layer kept: 23 layers)
    return _clip(1024, 23, 16, 4096, 512, False)


def _clip_bigg() -> nn.Module:  # SDXL / SD3 OpenCLIP ViT-bigG
    return _clip(1280, 32, 20, 5120, 1280, True)


def _t5_xxl() -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu", vocab_size=32128, relative_attention_num_buckets=32))


# -- denoisers -------------------------------------------------------------------------------------------

def _unet(**config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**config)
    return build


def _dit(cls_name: str, **config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import diffusers

        return getattr(diffusers, cls_name)(**config)
    return build


_SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
_SD3 = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
            joint_attention_dim=4096, pooled_projection_dim=2048)
_WAN = dict(patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6)
_COSMOS2 = dict(in_channels=16, out_channels=16, attention_head_dim=128, mlp_ratio=4.0, text_embed_dim=1024,
                adaln_lora_dim=256, max_size=(128, 240, 240), patch_size=(1, 2, 2), concat_padding_mask=True,
                extra_pos_embed_type=None)

#: variant -> {component: builder}; the pipeline's text encoders under lorakit's canonical component names
VARIANTS: dict[str, dict[str, Callable[[], nn.Module]]] = {
    # runwayml/stable-diffusion-v1-5 unet/config.json: sample_size 64, cross_attention_dim 768 (diffusers'
    # UNet2DConditionModel defaults are 1280 and None, which gave 32 attn2.to_k/to_v of the wrong shape)
    "sd15": {"denoiser": _unet(sample_size=64, cross_attention_dim=768), "text_encoder": _clip_l},
    "sd2": {"denoiser": _unet(sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                              use_linear_projection=True), "text_encoder": _clip_h},
    "sdxl": {"denoiser": _unet(**_SDXL_UNET), "text_encoder": _clip_l,
             "text_encoder_2": _clip_bigg},
    "sd3-medium": {"denoiser": _dit("SD3Transformer2DModel", **_SD3, num_layers=24, num_attention_heads=24,
                                    caption_projection_dim=1536, pos_embed_max_size=192),
                   "text_encoder": functools.partial(_clip_l, True), "text_encoder_2": _clip_bigg,
                   "text_encoder_3": _t5_xxl},
    "sd3.5-medium": {"denoiser": _dit("SD3Transformer2DModel", **_SD3, num_layers=24, num_attention_heads=24,
                                      caption_projection_dim=1536, pos_embed_max_size=384, qk_norm="rms_norm",
                                      dual_attention_layers=tuple(range(13))),
                     "text_encoder": functools.partial(_clip_l, True), "text_encoder_2": _clip_bigg,
                     "text_encoder_3": _t5_xxl},
    "sd3.5-large": {"denoiser": _dit("SD3Transformer2DModel", **_SD3, num_layers=38, num_attention_heads=38,
                                     caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm"),
                    "text_encoder": functools.partial(_clip_l, True), "text_encoder_2": _clip_bigg,
                    "text_encoder_3": _t5_xxl},
    # FLUX pipelines: text_encoder = CLIP-L, text_encoder_2 = T5-XXL
    "flux1-dev": {"denoiser": _dit("FluxTransformer2DModel", guidance_embeds=True), "text_encoder": _clip_l,
                  "text_encoder_2": _t5_xxl},
    "flux1-schnell": {"denoiser": _dit("FluxTransformer2DModel", guidance_embeds=False), "text_encoder": _clip_l,
                      "text_encoder_2": _t5_xxl},
    "wan2.1-t2v-1.3b": {"denoiser": _dit("WanTransformer3DModel", **_WAN, num_attention_heads=12, ffn_dim=8960,
                                         num_layers=30, in_channels=16, out_channels=16)},
    "wan2.1-t2v-14b": {"denoiser": _dit("WanTransformer3DModel", **_WAN, num_attention_heads=40, ffn_dim=13824,
                                        num_layers=40, in_channels=16, out_channels=16)},
    "wan2.1-i2v-14b": {"denoiser": _dit("WanTransformer3DModel", **_WAN, num_attention_heads=40, ffn_dim=13824,
                                        num_layers=40, in_channels=36, out_channels=16, image_dim=1280,
                                        added_kv_proj_dim=5120)},
    "wan2.2-ti2v-5b": {"denoiser": _dit("WanTransformer3DModel", **_WAN, num_attention_heads=24, ffn_dim=14336,
                                        num_layers=30, in_channels=48, out_channels=48)},
    "cosmos-predict2-2b": {"denoiser": _dit("CosmosTransformer3DModel", **_COSMOS2, num_attention_heads=16,
                                            num_layers=28, rope_scale=(1.0, 4.0, 4.0))},
    "cosmos-predict2-14b": {"denoiser": _dit("CosmosTransformer3DModel", **_COSMOS2, num_attention_heads=40,
                                             num_layers=36, rope_scale=(1.0, 4.0, 4.0))},
}
# Wan 2.2 A14B experts have the 2.1 14B shapes
VARIANTS["wan2.2-t2v-a14b"] = VARIANTS["wan2.1-t2v-14b"]
VARIANTS["wan2.2-i2v-a14b"] = VARIANTS["wan2.1-i2v-14b"]

# -- wave 2 image DiTs (denoiser only); values from each release's transformer/config.json --------------------
# FLUX.2-dev (black-forest-labs/FLUX.2-dev): diffusers' Flux2Transformer2DModel defaults are that config
# (8 double, 48 single blocks, 48 heads x 128, joint_attention_dim 15360, in_channels 128, guidance embedder).
VARIANTS["flux2-dev"] = {"denoiser": _dit("Flux2Transformer2DModel")}
# FLUX.2-klein-4B: 5 double, 20 single blocks, 24 heads x 128, mlp_ratio 3, joint_attention_dim 7680 (its
# config.json as quoted by downstream tests); step-distilled without a guidance embedder.
VARIANTS["flux2-klein-4b"] = {"denoiser": _dit("Flux2Transformer2DModel", num_layers=5, num_single_layers=20,
                                               num_attention_heads=24, joint_attention_dim=7680,
                                               guidance_embeds=False)}
# FLUX.1-Kontext-dev: the FLUX.1-dev transformer config (in_channels 64, guidance embedder); CLIP-L + T5
VARIANTS["flux1-kontext-dev"] = VARIANTS["flux1-dev"]
# Qwen/Qwen-Image and Qwen/Qwen-Image-Edit(-2509): 60 blocks, 24 heads x 128, joint_attention_dim 3584,
# in_channels 64, out_channels 16, axes_dims_rope (16, 56, 56) (= diffusers' defaults)
VARIANTS["qwen-image"] = {"denoiser": _dit("QwenImageTransformer2DModel", patch_size=2, in_channels=64,
                                           out_channels=16, num_layers=60, attention_head_dim=128,
                                           num_attention_heads=24, joint_attention_dim=3584,
                                           axes_dims_rope=(16, 56, 56))}
VARIANTS["qwen-image-edit"] = VARIANTS["qwen-image"]
# Tongyi-MAI/Z-Image-Turbo: dim 3840, 30 layers + 2 refiner layers, 30 heads, cap_feat_dim 2560 (Qwen3-4B)
VARIANTS["z-image-turbo"] = {"denoiser": _dit("ZImageTransformer2DModel", all_patch_size=(2,), all_f_patch_size=(1,),
                                              in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30,
                                              n_kv_heads=30, cap_feat_dim=2560, axes_dims=[32, 48, 48],
                                              axes_lens=[1536, 512, 512])}
# -- wave 2 video families (fam-b). Config values are the released transformer/config.json:
# hunyuanvideo-community/HunyuanVideo (= diffusers' HunyuanVideoTransformer3DModel defaults: 24 heads x 128, 20 double
# + 40 single blocks, 2 refiner blocks, text_embed_dim 4096, pooled 768, guidance embeds); HunyuanVideo-I2V (the
# same with in_channels 33, no guidance embedding, image_condition_type latent_concat); Lightricks/LTX-Video
# 0.9.0-0.9.5 (32 heads x 64, 28 layers, cross 2048, caption 4096, in 128) and LTX-Video 0.9.7 13B (32 x 128,
# 48 layers, cross 4096; the config LTX-Video-Trainer writes for it); Lightricks/LTX-2 (= diffusers'
# LTX2VideoTransformer3DModel defaults, 48 layers, video 32 x 128, audio 32 x 64) and LTX-2.5 (gated attention,
# prompt AdaLN, no video feed-forward bias: the configuration InvokeAI matched tensor for tensor against the
# released 2.5 file, invokeai/backend/ltx2/component_configs.py).
_LTXV = dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
             caption_channels=4096, qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6)
_LTX25 = dict(gated_attn=True, cross_attn_mod=True, audio_gated_attn=True, audio_cross_attn_mod=True,
              rope_type="split", use_prompt_embeddings=False, perturbed_attn=True, ff_bias=False, audio_ff_bias=True,
              use_prompt_adaln_single=True, use_keyframes_abs_pos_embedding=True)
VARIANTS.update({
    "hunyuanvideo-t2v": {"denoiser": _dit("HunyuanVideoTransformer3DModel")},
    "hunyuanvideo-i2v": {"denoiser": _dit("HunyuanVideoTransformer3DModel", in_channels=33, guidance_embeds=False,
                                          image_condition_type="latent_concat")},
    "ltx-video-2b": {"denoiser": _dit("LTXVideoTransformer3DModel", **_LTXV, attention_head_dim=64,
                                      cross_attention_dim=2048, num_layers=28)},
    "ltx-video-13b": {"denoiser": _dit("LTXVideoTransformer3DModel", **_LTXV, attention_head_dim=128,
                                       cross_attention_dim=4096, num_layers=48)},
    "ltx2": {"denoiser": _dit("LTX2VideoTransformer3DModel")},
    "ltx2.5": {"denoiser": _dit("LTX2VideoTransformer3DModel", **_LTX25)},
})

# -- wave 2b (fam): HiDream, Lumina 2, Krea 2; values from each release's transformer/config.json ----------------
# HiDream-ai/HiDream-I1-Full (Dev and Fast share it): 16 double + 32 single stream blocks, 20 heads x 128, patch 2,
# 16 latent channels, caption channels (T5-XXL, Llama-3.1-8B) 4096 and 4096, pooled CLIP-L + CLIP-G 2048, 4 routed
# experts of which 2 are active
VARIANTS["hidream-i1"] = {"denoiser": _dit("HiDreamImageTransformer2DModel", patch_size=2, in_channels=16,
                                           out_channels=16, num_layers=16, num_single_layers=32,
                                           attention_head_dim=128, num_attention_heads=20,
                                           caption_channels=[4096, 4096], text_emb_dim=2048, num_routed_experts=4,
                                           num_activated_experts=2, axes_dims_rope=(64, 32, 32),
                                           max_resolution=(128, 128), llama_layers=list(range(48)))}
# Alpha-VLLM/Lumina-Image-2.0: hidden 2304, 26 layers + 2 refiner layers, 24 query / 8 key-value heads, Gemma-2-2B
# captions (2304)
VARIANTS["lumina2"] = {"denoiser": _dit("Lumina2Transformer2DModel", sample_size=128, patch_size=2, in_channels=16,
                                        hidden_size=2304, num_layers=26, num_refiner_layers=2, num_attention_heads=24,
                                        num_kv_heads=8, multiple_of=256, norm_eps=1e-5, axes_dim_rope=(32, 32, 32),
                                        axes_lens=(300, 512, 512), cap_feat_dim=2304)}

# krea-ai/krea-2 (= diffusers' Krea2Transformer2DModel defaults): 28 blocks, 48 query / 12 key-value heads x 128
# (hidden 6144), SwiGLU 16384, text fusion over 12 tapped layers of a 2560-wide encoder (2 layerwise + 2 refiner
# blocks, 20 heads, SwiGLU 6912); the InvokeAI kohya fixture's shapes (wq 6144, wk 1536, mlp 16384) are these
VARIANTS["krea2"] = {"denoiser": _dit("Krea2Transformer2DModel")}

#: family name (as :func:`lorakit.families.detect_family` returns it) -> default variant
_FAMILY_DEFAULT = {
    "sd1": "sd15", "sd15": "sd15", "sdxl": "sdxl", "sd3": "sd3-medium", "sd3.5": "sd3.5-large",
    "flux1": "flux1-dev", "flux": "flux1-dev", "wan": "wan2.1-t2v-14b", "cosmos": "cosmos-predict2-2b",
    # wave 2 image DiTs
    "flux2": "flux2-dev", "flux-kontext": "flux1-kontext-dev", "z-image": "z-image-turbo",
    "hunyuanvideo": "hunyuanvideo-t2v", "ltx-video": "ltx-video-2b",
    "hidream": "hidream-i1",
}

#: every name ``meta_components`` accepts
FAMILY_NAMES: tuple[str, ...] = tuple(sorted({*VARIANTS, *_FAMILY_DEFAULT}))


def variant_for(name: str) -> str:
    """The variant a family or variant name stands for (``"flux1"`` -> ``"flux1-dev"``)."""
    key = name.strip().lower()
    key = _FAMILY_DEFAULT.get(key, key)
    if key not in VARIANTS:
        raise UnknownFamilyError(
            f"unknown model family {name!r}; known: {', '.join(FAMILY_NAMES)} (or pass a diffusers folder)"
        )
    return key


@functools.lru_cache(maxsize=12)
def _build(variant: str, component: str) -> nn.Module:
    try:
        with torch.device("meta"):
            return VARIANTS[variant][component]().eval()
    except ImportError as exc:
        raise ImportError(
            f"building the {variant} module list needs diffusers and transformers ({exc}); "
            "pip install 'lorakit[diffusers]'"
        ) from exc


def meta_components(name: str, components: tuple[str, ...] | None = None) -> dict[str, nn.Module]:
    """``{component: model}`` of a family/variant on the ``meta`` device (shapes, no data). Cached: treat the
    modules as read-only. ``components`` keeps only those (e.g. ``("denoiser",)``)."""
    variant = variant_for(name)
    wanted = [c for c in VARIANTS[variant] if components is None or c in components]
    return {c: _build(variant, c) for c in wanted}


def folder_denoiser(folder: str | os.PathLike[str]) -> nn.Module | None:
    """The denoiser of a diffusers folder on the meta device, built from its own ``config.json`` (exact sizes);
    ``None`` when ``folder`` is not a folder or names no diffusers class."""
    path = Path(folder)
    if not path.is_dir():
        return None
    for sub in ("transformer", "unet"):
        cfg_path = path / sub / "config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            import diffusers

            cls = getattr(diffusers, str(cfg.get("_class_name")), None)
            if cls is None:
                return None
            with torch.device("meta"):
                return cls.from_config(cfg).eval()
    return None
