"""Adapter slots (lorakit.slots): every row of a mixed batch equals that input run alone with its LoRA fused by
lorakit.apply; -1 rows and unloaded slots are the base bit for bit; close() restores the model bit-exactly; a
failed load leaves the slot as it was; a torch.compile'd model is not recompiled by loads, unloads, strengths
and row patterns. Every numerical test also checks that the LoRA changed the output.

Tolerance: fp32 outputs, ``atol=rtol=1e-4``: the slot adds ``B @ (A @ x)`` in two small GEMMs while the fused
reference rounds ``W + s·B@A`` once, so the two differ by float rounding only (measured below 2e-6 here).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

torch.set_num_threads(1)

import lorakit  # noqa: E402
from lorakit.adapters import LoHaWeights, LoRAWeights  # noqa: E402
from lorakit.errors import MatchError, NonFiniteError, SlotError, UnsupportedAdapterError  # noqa: E402
from lorakit.model import Layer, LoRA  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)


def _lora(mods: dict[str, nn.Module], seed: int, rank: int, component: str | None = None) -> LoRA:
    """A random LoRA on ``mods`` (conv: ``down [r, in, kh, kw]``, ``up [out, r, 1, 1]``), alpha = rank / 2."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in mods.items():
        w = m.weight
        down = torch.randn(rank, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
        up = torch.randn(w.shape[0], rank, *([1] * (w.dim() - 2)), generator=g) * 0.5
        layers[name] = Layer(name, component, name, weight=LoRAWeights(down, up, alpha=rank / 2))
    return LoRA(layers, source=f"lora{seed}.safetensors")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _fused_row(model: nn.Module, lora: LoRA, strength: float, run) -> torch.Tensor:
    with torch.no_grad(), lorakit.apply(model, [(lora, strength)]):
        return run()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _bit_equal(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    sd = model.state_dict()
    return all(torch.equal(sd[k].view(torch.uint8), v.view(torch.uint8)) for k, v in snap.items())


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


# -- a small Linear model -------------------------------------------------------------------------------


def test_mixed_rows_equal_each_lora_fused_alone_linear():
    model = _mlp()
    snap = _snapshot(model)
    loras = [_lora(_linears(model), seed, rank) for seed, rank in ((1, 2), (2, 8), (3, 5))]
    strengths = [0.7, 1.0, -0.4]
    x = torch.randn(6, 3, 16)  # 3 tokens per row: the row map broadcasts over every dim but the first
    sl = lorakit.slots(model, k=4, max_rank=8)
    assert sl.nbytes == sum(4 * 8 * (m.in_features + m.out_features) * 4 for m in _linears(model).values()) + 256 * 8 + 8 + 4 * 4
    for i, (lora, s) in enumerate(zip(loras, strengths)):
        sl.load(i, lora, strength=s)
    rows = [0, 2, -1, 1, 2, 0]
    with torch.no_grad():
        base = model(x)
        with sl.rows(rows):
            out = model(x)
    sl.close()
    for r, slot in enumerate(rows):
        if slot < 0:
            assert torch.equal(out[r], base[r])  # -1: exactly the base
            continue
        ref = _fused_row(model, loras[slot], strengths[slot], lambda r=r: model(x[r:r + 1]))[0]
        torch.testing.assert_close(out[r], ref, **TOL)
        assert (ref - base[r]).abs().max() > 1e-2  # the LoRA changed this row
    assert _bit_equal(model, snap) and _no_hooks(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_buffers_follow_the_model(dtype):
    """Buffers take the weights' dtype; 16-bit tolerance: 1e-2 absolute on outputs below 1 (fused rounds W+ΔW to
    16 bits once, the slot rounds B@(A@x) and the sum)."""
    model = _mlp().to(dtype)
    loras = [_lora(_linears(model), seed, 4) for seed in (1, 2)]
    sl = lorakit.slots(model, k=2, max_rank=4)
    assert all(s.A.dtype == dtype and s.B.dtype == dtype for s in sl._sites.values())
    for i, lora in enumerate(loras):
        sl.load(i, lora)
    x = torch.randn(3, 16, dtype=dtype)
    with torch.no_grad():
        with sl.rows([0, 1, -1]):
            out = model(x)
        base = model(x)
    sl.close()
    assert torch.equal(out[2], base[2])
    for r in (0, 1):
        ref = _fused_row(model, loras[r], 1.0, lambda r=r: model(x[r:r + 1]))[0]
        torch.testing.assert_close(out[r], ref, atol=1e-2, rtol=0)
        assert (ref - base[r]).abs().max() > 0.1


def test_uniform_rows_fast_path_and_strength_change():
    model = _mlp()
    lora = _lora(_linears(model), 4, 4)
    x = torch.randn(3, 16)
    sl = lorakit.slots(model, k=2, max_rank=8)
    sl.load(1, lora, strength=0.5)
    with torch.no_grad():
        with sl.rows([1] * 3):
            out = model(x)
        ref = _fused_row(model, lora, 0.5, lambda: model(x))
        torch.testing.assert_close(out, ref, **TOL)
        sl.set_strength(1, 1.5)
        with sl.rows([1]):  # one entry maps onto every row of a larger call
            out = model(x)
        torch.testing.assert_close(out, _fused_row(model, lora, 1.5, lambda: model(x)), **TOL)
        assert (out - ref).abs().max() > 1e-2
    sl.close()


def test_conv_uniform_and_mixed_paths_equal_fused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.ReLU(),
                          nn.Conv2d(4, 5, 3, stride=2)).eval()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    loras = [_lora(convs, 51, 3), _lora(convs, 52, 2)]
    sl = lorakit.slots(model, k=2, max_rank=4)
    sl.load(0, loras[0], strength=0.6)
    sl.load(1, loras[1])
    x = torch.randn(3, 3, 9, 9)
    with torch.no_grad():
        with sl.rows([1, 1, 1]):  # eager fast path: no gather
            uniform = model(x)
        with sl.rows([0, 1, -1]):
            mixed = model(x)
        base = model(x)
    sl.close()
    torch.testing.assert_close(uniform, _fused_row(model, loras[1], 1.0, lambda: model(x)), **TOL)
    torch.testing.assert_close(mixed[0], _fused_row(model, loras[0], 0.6, lambda: model(x[:1]))[0], **TOL)
    torch.testing.assert_close(mixed[1], uniform[1], **TOL)
    assert torch.equal(mixed[2], base[2]) and (uniform - base).abs().max() > 1e-2


def test_row_map_over_cfg_doubled_and_smaller_calls():
    model = _mlp()
    loras = [_lora(_linears(model), seed, 4) for seed in (5, 6)]
    sl = lorakit.slots(model, k=2, max_rank=4)
    sl.load(0, loras[0])
    sl.load(1, loras[1])
    x = torch.randn(4, 16)
    with torch.no_grad():
        refs = [_fused_row(model, lora, 1.0, lambda: model(x)) for lora in loras]
        base = model(x)
        with sl.rows([0, 1]):  # CFG: [uncond p0, uncond p1, cond p0, cond p1] -> slots 0, 1, 0, 1
            doubled = model(x)
        with sl.rows([0, 0, 1, 1]):  # one entry per image, a 2-row call (one row per prompt) -> slots 0, 1
            smaller = model(x[:2])
    for r, slot in enumerate([0, 1, 0, 1]):
        torch.testing.assert_close(doubled[r], refs[slot][r], **TOL)
    torch.testing.assert_close(smaller[0], refs[0][0], **TOL)
    torch.testing.assert_close(smaller[1], refs[1][1], **TOL)
    assert (refs[0] - base).abs().max() > 1e-2 and (refs[1] - refs[0]).abs().max() > 1e-2
    sl.close()


def test_unload_and_outside_rows_are_base_and_close_restores():
    model = _mlp()
    snap = _snapshot(model)
    x = torch.randn(2, 16)
    with torch.no_grad():
        base = model(x)
        sl = lorakit.slots(model, k=2, max_rank=8)
        sl.load(0, _lora(_linears(model), 7, 8))
        assert torch.equal(model(x), base)  # outside rows(): no LoRA
        with sl.rows([0, 0]):
            changed = model(x)
        assert (changed - base).abs().max() > 1e-2
        sl.unload(0)
        with sl.rows([0, 0]):
            assert torch.equal(model(x), base)
        with sl.rows([0, -1]):
            assert torch.equal(model(x), base)
        # a smaller LoRA after a larger one: the columns it does not use were cleared
        small = _lora(_linears(model), 8, 2)
        sl.load(0, small)
        with sl.rows([0, 0]):
            got = model(x)
        torch.testing.assert_close(got, _fused_row(model, small, 1.0, lambda: model(x)), **TOL)
        sl.close()
        assert torch.equal(model(x), base)
    assert _bit_equal(model, snap) and _no_hooks(model)
    with pytest.raises(SlotError, match="closed"):
        sl.load(0, small)


def test_failed_load_leaves_the_slot_as_it_was():
    model = _mlp()
    sl = lorakit.slots(model, k=2, targets=["fc1", "fc2"], max_rank=4)
    good = _lora({n: m for n, m in _linears(model).items() if n != "fc3"}, 9, 4)
    sl.load(0, good)
    x = torch.randn(2, 16)
    with torch.no_grad(), sl.rows([0, 0]):
        before = model(x)
    buffers = [(s.A.clone(), s.B.clone()) for s in sl._sites.values()]
    too_big = _lora({n: m for n, m in _linears(model).items() if n != "fc3"}, 10, 8)
    with pytest.raises(SlotError, match=r"fc\d: rank 8 does not fit the 4 rank columns"):
        sl.load(0, too_big)
    outside = _lora(_linears(model), 11, 2)  # fc3 is not a prepared target
    with pytest.raises(SlotError, match="fc3 lands on generic:fc3, which is not among the 2 prepared"):
        sl.load(0, outside)
    g = torch.Generator().manual_seed(0)
    loha = LoRA({"fc1": Layer("fc1", None, "fc1", weight=LoHaWeights(*(torch.randn(s, generator=g) for s in
                                                                 ((32, 2), (2, 16), (32, 2), (2, 16))), alpha=2.0))})
    with pytest.raises(UnsupportedAdapterError, match="fc1 .*only LoRA factors"):
        sl.load(0, loha)
    with pytest.raises(MatchError):
        sl.load(0, _lora({"nope": model.fc1}, 12, 2))
    broken = _lora({n: m for n, m in _linears(model).items() if n != "fc3"}, 16, 2)
    broken.layers["fc2"].weight.up[3, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="fc2 has NaN/Inf in up"):
        sl.load(0, broken)
    with pytest.raises(SlotError, match="slot 5 does not exist"):
        sl.load(5, good)
    with pytest.raises(SlotError, match="not slots"):
        sl.rows([0, 2]).__enter__()
    for (a, b), s in zip(buffers, sl._sites.values()):
        assert torch.equal(a, s.A) and torch.equal(b, s.B)
    with torch.no_grad(), sl.rows([0, 0]):
        assert torch.equal(model(x), before)
    assert sl.labels == ["lora9.safetensors", None]
    sl.close()


def test_a_loaded_lora_object_is_planned_once_and_forgotten_with_it():
    import gc

    model = _mlp()
    sl = lorakit.slots(model, k=2, max_rank=4)
    lora = _lora(_linears(model), 17, 4)
    sl.load(0, lora)
    plan = sl._plans[id(lora)][1]
    sl.load(1, lora, strength=0.3)
    assert sl._plans[id(lora)][1] is plan  # the same plan: no second resolve or check
    lora.layers["fc2"] = _lora({"fc2": model.fc2}, 18, 2).layers["fc2"]  # a replaced layer: planned again
    sl.load(1, lora)
    assert sl._plans[id(lora)][1] is not plan and sl._sites[("generic", "fc2")].used == [4, 2]
    x = torch.randn(2, 16)
    with torch.no_grad(), sl.rows([1, 1]):
        got = model(x)
    torch.testing.assert_close(got, _fused_row(model, lora, 1.0, lambda: model(x)), **TOL)
    del lora
    gc.collect()
    assert not sl._plans
    sl.close()


def test_files_catalogue_sets_targets_and_rank():
    model = _mlp()
    mods = _linears(model)
    a = _lora({"fc1": mods["fc1"]}, 13, 3)
    b = _lora({"fc1": mods["fc1"], "fc3": mods["fc3"]}, 14, 6)
    sl = lorakit.slots(model, k=3, files=[a, b])
    assert sorted(sl.targets) == ["generic:fc1", "generic:fc3"]
    assert {str(s.ref): s.capacity for s in sl._sites.values()} == {"generic:fc1": 6, "generic:fc3": 6}
    sl.load(0, b)
    with pytest.raises(SlotError, match="fc2 lands on"):
        sl.load(1, _lora({"fc2": mods["fc2"]}, 15, 2))
    sl.close()
    with pytest.raises(ValueError, match="not both"):
        lorakit.slots(model, k=1, files=[a], targets="fc*")


# -- tiny UNet (Linear + Conv2d, 3x3 and 1x1) --------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return lorakit.tiny_pipeline()


@pytest.fixture(scope="module")
def unet(pipe):
    return pipe.unet.eval()


def test_mixed_rows_equal_each_lora_fused_alone_unet(unet):
    snap = _snapshot(unet)
    mods = {n: m for n, m in unet.named_modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)}
    assert any(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in mods.values())
    # LoRAs on different subsets: one on everything, one on the convs, one on the attention Linears
    convs = {n: m for n, m in mods.items() if isinstance(m, nn.Conv2d)}
    attn = {n: m for n, m in mods.items() if ".attn" in n}
    loras = [_lora(mods, 21, 4, "denoiser"), _lora(convs, 22, 2, "denoiser"), _lora(attn, 23, 8, "denoiser")]
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(4, 4, 32, 32, generator=g), torch.randn(4, 7, 32, generator=g)
    rows = [0, 2, -1, 1]
    sl = lorakit.slots(unet, k=3, max_rank=8)
    for i, lora in enumerate(loras):
        sl.load(i, lora, strength=0.8)
    with torch.no_grad():
        base = unet(x, 10, ctx).sample
        with sl.rows(rows):
            out = unet(x, 10, ctx).sample
    sl.close()
    for r, slot in enumerate(rows):
        if slot < 0:
            assert torch.equal(out[r], base[r])
            continue
        ref = _fused_row(unet, loras[slot], 0.8, lambda r=r: unet(x[r:r + 1], 10, ctx[r:r + 1]).sample)[0]
        torch.testing.assert_close(out[r], ref, **TOL)
        assert (ref - base[r]).abs().max() > 1e-2
    assert _bit_equal(unet, snap) and _no_hooks(unet)


def test_pipeline_rows_per_prompt_cover_cfg_and_text_encoder(pipe):
    """One entry per prompt: CFG's doubled UNet batch and both text-encoder calls (prompt, negative) map onto it."""
    def on(comp, root):
        return {n: m for n, m in root.named_modules() if isinstance(m, nn.Linear) or
                (isinstance(m, nn.Conv2d) and m.groups == 1)}

    def lora(seed):
        layers = {}
        for comp, root in (("denoiser", pipe.unet), ("text_encoder", pipe.text_encoder)):
            part = _lora(on(comp, root), seed, 4, comp)
            layers.update({f"{comp}.{k}": v for k, v in part.layers.items()})
        return LoRA(layers)

    loras = [lora(41), lora(42)]
    prompts = ["a red cube", "a blue sphere"]
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="latent")
    sl = lorakit.slots(pipe, k=2, max_rank=4)
    assert {t.component for t in sl.targets} == {"denoiser", "text_encoder"}
    sl.load(0, loras[0])
    sl.load(1, loras[1])
    with torch.no_grad():
        with sl.rows([1, 0]):
            out = pipe(prompts, latents=latents.clone(), **kw).images
        sl.close()
        for r, slot in enumerate([1, 0]):
            with lorakit.apply(pipe, [(loras[slot], 1.0)]):
                ref = pipe(prompts[r:r + 1], latents=latents[r:r + 1].clone(), **kw).images[0]
            base = pipe(prompts[r:r + 1], latents=latents[r:r + 1].clone(), **kw).images[0]
            torch.testing.assert_close(out[r], ref, **TOL)
            assert (ref - base).abs().max() > 1e-2


class _StubResolver:
    """Routes three split file layers q, k, v onto rows of one fused module (a model-fused, file-split layout)."""

    def __init__(self, real) -> None:
        self.real = real

    def resolve(self, lora):
        from lorakit.families import Target
        from lorakit.families.resolve import Resolution

        rows = {"q": (0, 16), "k": (16, 32), "v": (32, 48)}
        return Resolution([(layer, [Target("generic", "qkv", dst_rows=rows[layer.path])]) for layer in lora], [])


def test_split_file_layers_land_on_rows_of_a_fused_module():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("qkv", nn.Linear(16, 48))
    g = torch.Generator().manual_seed(5)
    layers = {n: Layer(n, None, n, weight=LoRAWeights(torch.randn(r, 16, generator=g), torch.randn(16, r, generator=g),
                                                      alpha=1.0)) for n, r in (("q", 2), ("k", 3), ("v", 1))}
    lora = LoRA(layers)
    sl = lorakit.slots(model, k=2, max_rank=6)
    sl._resolver = _StubResolver(sl._resolver)
    sl.load(1, lora, strength=0.5)
    expected_delta = torch.cat([lay.weight.delta_weight() for lay in layers.values()])
    x = torch.randn(2, 16)
    with torch.no_grad():
        with sl.rows([1, -1]):
            got = model(x)
        base = model(x)
    torch.testing.assert_close(got[0], base[0] + 0.5 * x[0] @ expected_delta.T, **TOL)
    assert torch.equal(got[1], base[1]) and (got[0] - base[0]).abs().max() > 1e-2
    site = next(iter(sl._sites.values()))
    assert site.used[1] == 6 and not site.B[1, 16:, :2].any() and not site.B[1, :16, 2:].any()
    wider_k = Layer("k", None, "k", weight=LoRAWeights(torch.randn(4, 16), torch.randn(16, 4)))
    with pytest.raises(SlotError, match=r"v: rank 1 \(after 6 columns of other layers"):
        sl.load(0, LoRA({"q": layers["q"], "k": wider_k, "v": layers["v"]}))  # 2 + 4 + 1 > 6
    sl.close()


# -- fused projections ---------------------------------------------------------------------------------


def test_fused_file_layer_lands_on_split_modules_flux():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
    g = torch.Generator().manual_seed(3)
    rows = 3 * 32 + 128  # single_blocks.0.linear1 = to_q | to_k | to_v | proj_mlp
    stem = "lora_unet_single_blocks_0_linear1"
    lora = lorakit.load({f"{stem}.lora_down.weight": torch.randn(4, 32, generator=g) * 0.3,
                         f"{stem}.lora_up.weight": torch.randn(rows, 4, generator=g) * 0.3,
                         f"{stem}.alpha": torch.tensor(2.0)}, strict=True)
    sl = lorakit.slots(model, k=2, files=[lora])
    blk = "single_transformer_blocks.0"
    parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    assert sorted(sl.targets) == sorted(f"denoiser:{blk}.{p}" for p in parts)
    sl.load(1, lora, strength=0.9)
    x = torch.randn(3, 5, 32, generator=g)
    mods = dict(model.named_modules())
    with torch.no_grad():
        base = {p: mods[f"{blk}.{p}"](x) for p in parts}
        with sl.rows([1, -1, 1]):
            got = {p: mods[f"{blk}.{p}"](x) for p in parts}
        sl.close()
        with lorakit.apply(model, [(lora, 0.9)]):
            ref = {p: mods[f"{blk}.{p}"](x) for p in parts}
    for p in parts:
        torch.testing.assert_close(got[p][[0, 2]], ref[p][[0, 2]], **TOL)
        assert torch.equal(got[p][1], base[p][1])
        assert (ref[p] - base[p]).abs().max() > 1e-2


# -- torch.compile -------------------------------------------------------------------------------------


def test_compiled_model_is_not_recompiled_by_loads_unloads_and_rows():
    model = _mlp()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    loras = [_lora(_linears(model), 30 + i, rank) for i, rank in enumerate((2, 4, 8, 3))]
    sl = lorakit.slots(model, k=4, max_rank=8)  # buffers exist before compiling
    compiled = torch.compile(model, backend=counting, fullgraph=True)
    x = torch.randn(4, 16)
    patterns = [[0, 1, 2, 3], [-1] * 4, [2], [1, 1, 1, 1], [3, -1], [0, 1, 2], [2, 2, -1, 0]]
    checked = 0
    with torch.no_grad():
        for step in range(20):
            slot = step % 4
            if step % 5 == 4:
                sl.unload(slot)
            else:
                sl.load(slot, loras[(step + slot) % 4], strength=0.5 + 0.1 * step)
            with sl.rows(patterns[step % len(patterns)]):
                got = compiled(x)
                want = model(x)  # eager: the fast / sliced paths
            torch.testing.assert_close(got, want, **TOL)
            checked += int((want - model(x)).abs().max() > 1e-3)
    assert len(graphs) == 1, f"{len(graphs)} dynamo compilations (expected 1: no recompile after the first)"
    assert checked >= 10  # most steps had a LoRA that changed the output
    sl.close()
