"""Case table: adapter type x layer kind x naming convention. Each file is read back through the formats layer
and its delta checked against reference math written independently here, exactly where the math allows."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from lorakit.formats import parse_state_dict

OUT, IN, R = 6, 4, 2
KINDS = {"linear": (OUT, IN), "conv1x1": (OUT, IN, 1, 1), "conv3x3": (OUT, IN, 3, 3)}


def ints(*shape: int, seed: int = 0, low: int = -3, high: int = 4) -> torch.Tensor:
    """Small integer-valued fp32 tensors: products and sums of them are exact in fp32."""
    g = torch.Generator().manual_seed(seed + 31 * len(shape) + sum(shape))
    return torch.randint(low, high, shape, generator=g).float()


def nonzero_ints(*shape: int, seed: int = 0) -> torch.Tensor:
    t = ints(*shape, seed=seed)
    return torch.where(t == 0, torch.ones_like(t), t)


@dataclasses.dataclass
class Built:
    fields: dict[str, torch.Tensor]  # canonical field -> tensor
    alpha: float | None
    delta: Callable[[torch.Tensor], torch.Tensor] | None  # base weight -> expected ΔW
    bias: torch.Tensor | None = None  # expected Δbias
    params: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    exact: bool = True


def _conv_taps(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[2:])


# -- reference math, written without the library's helpers ---------------------------------------------------

def ref_lora(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    up2 = up.reshape(up.shape[0], up.shape[1])
    if down.dim() == 4:
        # conv LoCon: each tap of ΔW is up @ down[..., h, w]
        return torch.einsum("or,rchw->ochw", up2, down) * scale
    return (up2 @ down).reshape(shape) * scale


def ref_tucker(up: torch.Tensor, mid: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    up2, down2 = up.flatten(1), down.flatten(1)
    taps = mid.permute(2, 3, 0, 1)  # [kh, kw, r, r]
    return (up2 @ taps @ down2).permute(2, 3, 0, 1) * scale


def ref_kron(w1: torch.Tensor, w2: torch.Tensor, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    """Kronecker product built index by index: ΔW[a*p + i, b*q + j, ...] = w1[a, b] * w2[i, j, ...]."""
    a, b = w1.shape
    p, q = w2.shape[:2]
    out = torch.zeros(a * p, b * q, *w2.shape[2:])
    for i in range(a):
        for j in range(b):
            out[i * p:(i + 1) * p, j * q:(j + 1) * q] = w1[i, j] * w2
    return out.reshape(shape) * scale


def ref_dora(base: torch.Tensor, delta: torch.Tensor, m: torch.Tensor, axis: str) -> torch.Tensor:
    w1 = base.double() + delta.double()
    if axis == "out":
        norm = w1.reshape(w1.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w1.dim() - 1))
        mag = m.double().reshape(-1, *[1] * (w1.dim() - 1))
    else:
        norm = w1.transpose(0, 1).reshape(w1.shape[1], -1).norm(dim=1).reshape(1, -1, *[1] * (w1.dim() - 2))
        mag = m.double().reshape(1, -1, *[1] * (w1.dim() - 2))
    return (mag * w1 / norm - base.double()).float()


# -- adapters ------------------------------------------------------------------------------------------------

def lora(shape, alpha=4.0):
    down = ints(R, *shape[1:], seed=1) if len(shape) == 4 else ints(R, IN, seed=1)
    up = ints(OUT, R, 1, 1, seed=2) if len(shape) == 4 else ints(OUT, R, seed=2)
    scale = 1.0 if alpha is None else alpha / R
    return Built({"down": down, "up": up}, alpha, lambda w: ref_lora(up, down, shape, scale))


def lora_tucker(shape):
    down, mid, up = ints(R, IN, 1, 1, seed=3), ints(R, R, *shape[2:], seed=4), ints(OUT, R, 1, 1, seed=5)
    return Built({"down": down, "up": up, "mid": mid}, 1.0, lambda w: ref_tucker(up, mid, down, 0.5))


def loha(shape):
    k = 1
    for s in shape[2:]:
        k *= s
    w1a, w1b, w2a, w2b = ints(OUT, R, seed=6), ints(R, IN * k, seed=7), ints(OUT, R, seed=8), ints(R, IN * k, seed=9)
    fields = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    return Built(fields, 1.0, lambda w: ((w1a @ w1b) * (w2a @ w2b)).reshape(shape) * 0.5)


def loha_tucker(shape):
    t1, t2 = ints(R, R, *shape[2:], seed=10), ints(R, R, *shape[2:], seed=11)
    w1a, w1b, w2a, w2b = ints(R, OUT, seed=12), ints(R, IN, seed=13), ints(R, OUT, seed=14), ints(R, IN, seed=15)
    fields = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "hada_t1": t1, "hada_t2": t2}

    def rebuild(t, wa, wb):  # m[p, c, h, w] = Σ_ij wa[i, p] t[i, j, h, w] wb[j, c], as explicit matmuls per tap
        return (wa.t() @ t.permute(2, 3, 0, 1) @ wb).permute(2, 3, 0, 1)

    return Built(fields, 4.0, lambda w: rebuild(t1, w1a, w1b) * rebuild(t2, w2a, w2b) * 2.0)


def _lokr(shape, w1_lowrank: bool, w2_lowrank: bool, tucker: bool = False):
    taps = tuple(shape[2:])
    fields: dict[str, torch.Tensor] = {}
    if w1_lowrank:
        fields["lokr_w1_a"], fields["lokr_w1_b"] = ints(2, R, seed=16), ints(R, 2, seed=17)
        w1 = fields["lokr_w1_a"] @ fields["lokr_w1_b"]
    else:
        w1 = fields["lokr_w1"] = ints(2, 2, seed=18)
    if tucker:
        t2, a, b = ints(R, R, *taps, seed=19), ints(R, 3, seed=20), ints(R, 2, seed=21)
        fields.update(lokr_t2=t2, lokr_w2_a=a, lokr_w2_b=b)
        w2 = (a.t() @ t2.permute(2, 3, 0, 1) @ b).permute(2, 3, 0, 1)
    elif w2_lowrank:
        k = 1
        for s in taps:
            k *= s
        a, b = ints(3, R, seed=22), ints(R, 2 * k, seed=23)
        fields.update(lokr_w2_a=a, lokr_w2_b=b)
        w2 = (a @ b).reshape(3, 2, *taps)
    else:
        w2 = fields["lokr_w2"] = ints(3, 2, *taps, seed=24)
    # LyCORIS: alpha/r applies when a factor is low-rank; full-matrix LoKr ignores alpha (scale 1)
    scale = 4.0 / R if (w1_lowrank or w2_lowrank or tucker) else 1.0
    return Built(fields, 4.0, lambda w: ref_kron(w1, w2, shape, scale))


def dora(axis: str, peft: bool):
    def build(shape):
        base = lora(shape, alpha=2.0)
        n = OUT if axis == "out" else IN
        m = nonzero_ints(n, seed=25).abs() + 1
        if peft:
            mag = m if len(shape) == 2 else m.reshape(1, -1, 1, 1)  # PEFT: [out] / [1, out, 1, 1]
            field = "magnitude"
        elif axis == "out":
            mag, field = m.reshape(-1, *[1] * (len(shape) - 1)), "dora_scale"
        else:
            mag, field = m.reshape(1, -1, *[1] * (len(shape) - 2)), "dora_scale"
        fields = {**base.fields, field: mag}
        return Built(fields, 2.0, lambda w: ref_dora(w, base.delta(w), m, axis), exact=False)

    return build


def diff(shape):
    d = ints(*shape, seed=26)
    return Built({"diff": d}, None, lambda w: d)


def diff_with_bias(shape):
    d, b = ints(*shape, seed=27), nonzero_ints(OUT, seed=28)
    return Built({"diff": d, "diff_b": b}, None, lambda w: d, bias=b)


def bias_only(shape):
    b = nonzero_ints(OUT, seed=29)
    return Built({"diff_b": b}, None, None, bias=b)


def norm(shape):
    w, b = nonzero_ints(OUT, seed=30), nonzero_ints(OUT, seed=31)
    return Built({"w_norm": w, "b_norm": b}, None, lambda base: w, bias=b)


def modulation(shape):
    m = nonzero_ints(1, 6, OUT, seed=32)
    return Built({"diff_m": m}, None, None, params={"modulation": m})


def lora_bias(shape):
    built = lora(shape, alpha=4.0)
    ub = nonzero_ints(OUT, seed=33)
    return Built({**built.fields, "up_bias": ub}, 4.0, built.delta, bias=ub * 2.0)


ADAPTERS: dict[str, tuple[Callable, tuple[str, ...], str]] = {
    # name: (builder, layer kinds, spelling family the adapter needs)
    "lora": (lora, tuple(KINDS), "pair"),
    "lora_no_alpha": (lambda s: lora(s, alpha=None), tuple(KINDS), "pair"),
    "lora_tucker": (lora_tucker, ("conv3x3",), "kohya"),
    "loha": (loha, tuple(KINDS), "kohya"),
    "loha_tucker": (loha_tucker, ("conv1x1", "conv3x3"), "kohya"),
    "lokr_full_full": (lambda s: _lokr(s, False, False), tuple(KINDS), "kohya"),
    "lokr_full_lowrank": (lambda s: _lokr(s, False, True), tuple(KINDS), "kohya"),
    "lokr_lowrank_full": (lambda s: _lokr(s, True, False), tuple(KINDS), "kohya"),
    "lokr_lowrank_lowrank": (lambda s: _lokr(s, True, True), tuple(KINDS), "kohya"),
    "lokr_tucker_t2": (lambda s: _lokr(s, False, False, tucker=True), ("conv1x1", "conv3x3"), "kohya"),
    "dora_out": (dora("out", False), tuple(KINDS), "kohya"),
    "dora_in": (dora("in", False), tuple(KINDS), "kohya"),
    "dora_peft": (dora("out", True), tuple(KINDS), "peft"),
    "diff": (diff, tuple(KINDS), "kohya"),
    "diff_diff_b": (diff_with_bias, ("linear", "conv3x3"), "kohya"),
    "diff_b": (bias_only, ("linear",), "kohya"),
    "w_norm_b_norm": (norm, ("linear",), "kohya"),
    "diff_m": (modulation, ("linear",), "kohya"),
    "lora_B_bias": (lora_bias, ("linear",), "peft"),
}

KOHYA_SUFFIX = {
    "down": ".lora_down.weight", "up": ".lora_up.weight", "mid": ".lora_mid.weight", "dora_scale": ".dora_scale",
}
PEFT_SUFFIX = {"down": ".lora_A.weight", "up": ".lora_B.weight", "up_bias": ".lora_B.bias",
               "magnitude": ".lora_magnitude_vector"}


@dataclasses.dataclass(frozen=True)
class Convention:
    stem: str
    spelling: str  # "kohya" (kohya/LyCORIS suffixes), "peft", or another pair spelling
    suffix: dict[str, str] | None = None
    alpha_in_metadata: bool = False
    component: str | None = "denoiser"
    path: str = ""
    flat: bool = False
    format: str = ""


CONVENTIONS = {
    "kohya": Convention("lora_unet_down_blocks_0_attentions_0_proj_in", "kohya", component="denoiser",
                        path="down_blocks_0_attentions_0_proj_in", flat=True, format="kohya"),
    "kohya_te": Convention("lora_te1_text_model_encoder_layers_0_mlp_fc1", "kohya", component="text_encoder",
                           path="text_model_encoder_layers_0_mlp_fc1", flat=True, format="kohya"),
    "lycoris": Convention("lycoris_blocks_0_attn_qkv", "kohya", path="blocks_0_attn_qkv", flat=True, format="lycoris"),
    "onetrainer": Convention("lora_transformer_transformer_blocks_0_attn_to_q", "kohya",
                             path="transformer_blocks_0_attn_to_q", flat=True, format="onetrainer"),
    "native": Convention("diffusion_model.blocks.0.self_attn.q", "kohya", path="blocks.0.self_attn.q", format="native"),
    "peft": Convention("unet.down_blocks.0.attentions.0.proj_in", "peft", PEFT_SUFFIX, True,
                       path="down_blocks.0.attentions.0.proj_in", format="peft"),
    "peft_wrapped": Convention("base_model.model.text_encoder_2.text_model.encoder.layers.0.mlp.fc1", "peft",
                               PEFT_SUFFIX, True, component="text_encoder_2",
                               path="text_model.encoder.layers.0.mlp.fc1", format="peft"),
    "peft_default": Convention("transformer.transformer_blocks.0.attn.to_q", "peft",
                               {"down": ".lora_A.default.weight", "up": ".lora_B.default.weight",
                                "up_bias": ".lora_B.default.bias",
                                "magnitude": ".lora_magnitude_vector.default.weight"}, True,
                               path="transformer_blocks.0.attn.to_q", format="peft"),
    "mochi": Convention("blocks.0.attn1.to_q", "pair", {"down": ".lora_A", "up": ".lora_B"}, component=None,
                        path="blocks.0.attn1.to_q", format="peft"),
    "diffusers": Convention("unet.mid_block.attentions.0.proj_in", "pair",
                            {"down": ".lora.down.weight", "up": ".lora.up.weight"},
                            path="mid_block.attentions.0.proj_in", format="diffusers"),
    "diffusers_te": Convention("text_encoder.text_model.encoder.layers.0.mlp.fc1", "pair",
                               {"down": ".lora_linear_layer.down.weight", "up": ".lora_linear_layer.up.weight"},
                               component="text_encoder", path="text_model.encoder.layers.0.mlp.fc1",
                               format="diffusers"),
    "diffusers_old": Convention("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out", "pair",
                                {"down": "_lora.down.weight", "up": "_lora.up.weight"},
                                path="mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
                                format="diffusers-old"),
    "xlabs": Convention("double_blocks.0.processor.qkv_lora1", "pair", {"down": ".down.weight", "up": ".up.weight"},
                        component=None, path="double_blocks.0.qkv_lora1", format="xlabs"),
}


def expected_format(built: Built, conv: Convention) -> str:
    """A kohya-prefixed or native file holding no low-rank pair is a LyCORIS file (LoHa, LoKr, diff, norm), or
    LightX2V's when it holds only ``diff``/``diff_b``/``diff_m`` on native names."""
    if conv.format not in ("kohya", "native") or {"down", "up"} & set(built.fields):
        return conv.format
    if conv.format == "native" and set(built.fields) <= {"diff", "diff_b", "diff_m", "alpha"}:
        return "lightx2v"
    return "lycoris"


def encode(conv: Convention, built: Built) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    state: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for field, t in built.fields.items():
        suffix = (conv.suffix or {}).get(field) or KOHYA_SUFFIX.get(field) or f".{field}"
        state[conv.stem + suffix] = t
    if built.alpha is not None:
        if conv.alpha_in_metadata:
            import json

            meta["lora_adapter_metadata"] = json.dumps({"r": R, "lora_alpha": built.alpha})
        elif conv.spelling == "kohya":
            state[conv.stem + ".alpha"] = torch.tensor(built.alpha)
    return state, meta


def _fits(adapter: str, conv: Convention) -> bool:
    _, _, needs = ADAPTERS[adapter]
    if needs == "pair":
        # pair spellings other than kohya/PEFT carry no alpha: only the no-alpha LoRA case applies
        return conv.spelling in ("kohya", "peft") or adapter == "lora_no_alpha"
    return needs == conv.spelling


CASES = [
    pytest.param(a, k, c, id=f"{a}-{k}-{c}")
    for a, (_, kinds, _) in ADAPTERS.items()
    for k in kinds
    for c, conv in CONVENTIONS.items()
    if _fits(a, conv)
]


@pytest.mark.parametrize(("adapter", "kind", "conv_name"), CASES)
def test_delta_matches_reference_math(adapter, kind, conv_name):
    shape = KINDS[kind]
    built = ADAPTERS[adapter][0](shape)
    conv = CONVENTIONS[conv_name]
    state, meta = encode(conv, built)
    lora = parse_state_dict(state, meta, strict=True)

    assert lora.report.ok and set(lora.report.consumed) == set(state)
    assert len(lora) == 1
    layer = next(iter(lora))
    assert (layer.component, layer.path, layer.flat) == (conv.component, conv.path, conv.flat)
    if built.delta is not None:
        assert lora.format == expected_format(built, conv)
    if "w_norm" in built.fields:
        shape = (OUT,)  # a norm layer's weight is one value per channel
    base = ints(*shape, seed=99) + 5  # offset keeps DoRA norms away from zero
    if built.delta is None:
        assert layer.delta_weight(base=base) is None
    else:
        expected = built.delta(base)
        got = layer.delta_weight(base=base)
        assert got.dtype == torch.float32 and got.shape == base.shape
        if built.exact:
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert got.abs().sum() > 0  # non-vacuous: the file changes the weight
    if built.bias is None:
        assert layer.delta_bias() is None
    else:
        assert torch.equal(layer.delta_bias(), built.bias) and built.bias.abs().sum() > 0
    assert set(layer.params) == set(built.params)
    for name, value in built.params.items():
        assert torch.equal(layer.params[name], value)


HOOK_CASES = [c for c in CASES if c.values[0] in ("lora", "lora_tucker", "loha", "lokr_tucker_t2", "diff")
              and c.values[2] == "kohya"]


@pytest.mark.parametrize(("adapter", "kind", "conv_name"), HOOK_CASES)
def test_unfused_output_equals_fused_delta(adapter, kind, conv_name):
    shape = KINDS[kind]
    built = ADAPTERS[adapter][0](shape)
    layer = next(iter(parse_state_dict(*encode(CONVENTIONS[conv_name], built))))
    if len(shape) == 2:
        module = torch.nn.Linear(IN, OUT, bias=False)
        x = ints(3, IN, seed=40)
        expected = F.linear(x, built.delta(module.weight))
    else:
        module = torch.nn.Conv2d(IN, OUT, shape[2], padding=shape[2] // 2, bias=False)
        x = ints(1, IN, 5, 5, seed=41)
        expected = F.conv2d(x, built.delta(module.weight), padding=shape[2] // 2)
    got = layer.weight.delta_output(x, module)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert expected.abs().sum() > 0


@pytest.mark.parametrize(
    ("metadata", "module", "expected_scale"),
    [
        ({}, "unet.a.to_q", 1.0),  # no config: alpha is baked into the factors (scale 1)
        ({"lora_alpha": 8, "r": 2}, "unet.a.to_q", 4.0),
        ({"unet.lora_alpha": 8, "unet.r": 2}, "unet.a.to_q", 4.0),  # diffusers prefixes the config per component
        ({"unet.lora_alpha": 8, "text_encoder.lora_alpha": 2}, "text_encoder.a.to_q", 1.0),
        # alpha_pattern: PEFT's regex rule (first match at a dot boundary), not a substring match
        ({"lora_alpha": 2, "alpha_pattern": {"a.to_q": 8}}, "unet.a.to_q", 4.0),
        ({"lora_alpha": 2, "alpha_pattern": {"a.to_q": 8}}, "unet.xa.to_q", 1.0),
        ({"lora_alpha": 2, "alpha_pattern": {"to_.": 8, "a.to_q": 16}}, "unet.a.to_q", 4.0),
        ({"lora_alpha": 2, "use_rslora": True}, "unet.a.to_q", 2 / 2 ** 0.5),  # rsLoRA: alpha / sqrt(r)
    ],
)
def test_peft_alpha_from_adapter_metadata(metadata, module, expected_scale):
    import json

    state = {f"{module}.lora_A.weight": ints(R, IN, seed=50), f"{module}.lora_B.weight": ints(OUT, R, seed=51)}
    lora = parse_state_dict(state, {"lora_adapter_metadata": json.dumps(metadata)} if metadata else {})
    layer = next(iter(lora))
    assert layer.weight.scale == pytest.approx(expected_scale, rel=1e-12)
    raw = state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]
    torch.testing.assert_close(layer.delta_weight(), raw * expected_scale)
