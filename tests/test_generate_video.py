"""Video and image-conditioned generation: lorakit.media's encoders decoded back (frame count, size, fps), output
suffix checks before any work, tasks and their required inputs, device selection, and ``lorakit generate`` on the
tiny Wan pipelines (formats, --batch-input, LightX2V --config with expert routing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import lorakit
import lorakit.pipelines
from lorakit import media
from lorakit.cli import cli
from lorakit.errors import (
    DeviceError,
    FormatError,
    MediaError,
    MissingInputError,
    OutputFormatError,
    TaskInputError,
)
from lorakit.generation import (
    Job,
    LoraEntry,
    apply_loras,
    check_inputs,
    generate,
    group_by_stack,
    infer_task,
    parse_lora_arg,
    place_pipeline,
    read_batch,
    read_config,
    resolve_device,
    resolve_dtype,
)


def _frames(n: int = 5, size: tuple[int, int] = (32, 32), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize(("fmt", "fps", "want_fps"), [("mp4", 16, 16.0), ("mp4", 23.976, 23.976),
                                                      ("webp", 20, 20.0), ("gif", 20, 20.0), ("gif", 16, 100 / 6)])
def test_encode_video_decodes_back(fmt, fps, want_fps, tmp_path) -> None:
    frames = _frames()
    data = media.encode_video(frames, fmt, fps)
    n, size, got_fps = media.probe(data)
    assert (n, size) == (5, (32, 32)) and got_fps == pytest.approx(want_fps, rel=1e-3)
    path = media.write_atomic(tmp_path / f"out.{fmt}", data)
    assert media.output_kind(path) == "video" and len(media.read_video(path)) == 5
    if fmt != "mp4":  # lossless WebP / 256 colours of GIF: close to the input; MP4 is lossy H.264
        decoded = np.asarray(media.read_video(data)[2], dtype=float)
        assert np.abs(decoded - np.asarray(frames[2], dtype=float)).mean() < (1 if fmt == "webp" else 40)


def test_mp4_pads_odd_sizes_to_even() -> None:
    n, size, _ = media.probe(media.encode_video(_frames(3, (31, 33)), "mp4", 8))
    assert (n, size) == (3, (32, 34))


def test_output_kinds_and_mismatch() -> None:
    assert [media.output_kind(p) for p in ("a.png", "b.JPG", "c.mp4", "d.webp", "e.gif")] == \
        ["image", "image", "video", "video", "video"]
    assert media.check_output("video", "x.mp4") == "mp4" and media.check_output("image", "x.jpg") == "jpeg"
    with pytest.raises(OutputFormatError, match=r"x\.png.*video.*\.mp4"):
        media.check_output("video", "x.png")
    with pytest.raises(OutputFormatError, match="an image"):
        media.check_output("image", "x.gif")
    with pytest.raises(OutputFormatError, match="unknown output suffix '.txt'"):
        media.output_kind("x.txt")


def test_read_errors_name_the_file(tmp_path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(MediaError, match="broken.png"):
        media.read_image(bad)
    with pytest.raises(MediaError, match="broken.png"):
        media.read_video(bad)
    with pytest.raises(MediaError, match="missing.png"):
        media.read_image(tmp_path / "missing.png")
    image = _frames(1)[0]
    assert np.array_equal(np.asarray(media.read_image(media.encode_image(image))), np.asarray(image))


# -- tasks, inputs, devices (no pipeline built) ------------------------------------------------------------------

FAMILY_TASKS = {"StableDiffusionPipeline": "t2i", "StableDiffusionXLPipeline": "t2i", "StableDiffusion3Pipeline": "t2i",
                "FluxPipeline": "t2i", "FluxKontextPipeline": "i2i", "WanPipeline": "t2v",
                "WanImageToVideoPipeline": "i2v", "Cosmos2VideoToWorldPipeline": "v2w",
                "Flux2Pipeline": "t2i", "QwenImagePipeline": "t2i", "QwenImageEditPipeline": "i2i",
                "HunyuanVideoPipeline": "t2v", "LTX2Pipeline": "t2v", "Krea2Pipeline": "t2i",
                "HiDreamImagePipeline": "t2i", "Lumina2Pipeline": "t2i", "ZImagePipeline": "t2i"}
SMALL = ["--steps", "2", "--width", "32", "--height", "32", "--prompt", "a cat"]


@pytest.mark.parametrize(("name", "task"), FAMILY_TASKS.items())
def test_task_comes_from_the_pipeline_class(name, task) -> None:
    import diffusers

    assert infer_task(getattr(diffusers, name)) == task


def test_flux2_reference_images_are_optional(tmp_path) -> None:
    """FLUX.2 takes reference images as an option: text alone is its default task (t2i), and ``--task i2i`` with
    ``--image`` runs the same pipeline with the image as a reference."""
    out = tmp_path / "f2.png"
    _invoke(["generate", "--model", "tiny-flux2", *SMALL, "-o", str(out)])
    ref = tmp_path / "ref.png"
    _frames(1, size=(64, 64))[0].save(ref)  # FLUX.2 refuses references under 64 px
    out2 = tmp_path / "f2-ref.png"
    _invoke(["generate", "--model", "tiny-flux2", *SMALL, "--task", "i2i", "--image", str(ref), "-o", str(out2)])
    a, b = np.asarray(Image.open(out)), np.asarray(Image.open(out2))
    assert a.shape == b.shape == (32, 32, 3) and not np.array_equal(a, b)  # the reference image changed the image


def test_missing_and_unexpected_inputs_name_the_flag() -> None:
    with pytest.raises(MissingInputError, match="--image") as info:
        check_inputs("i2v", None, None)
    assert info.value.flag == "--image" and info.value.field == "image"
    with pytest.raises(MissingInputError, match="--image PATH or --video PATH"):
        check_inputs("v2w")
    check_inputs("v2w", video=[object()])
    with pytest.raises(TaskInputError, match="drop --image"):
        check_inputs("t2v", image=object())
    with pytest.raises(TaskInputError, match="drop --video"):
        check_inputs("i2v", image=object(), video=[object()])


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="a CPU-only machine")
def test_device_auto_is_the_cpu_here_and_absent_devices_are_errors() -> None:
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(DeviceError, match="--device cuda"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu9")
    with pytest.raises(DeviceError, match="drop --offload"):
        place_pipeline(torch.nn.Linear(2, 2), "cpu", None, "model")
    moved = place_pipeline(torch.nn.Linear(2, 2), "cpu", torch.float64)
    assert moved.weight.dtype == torch.float64


def test_lora_args_and_job_files(tmp_path) -> None:
    assert parse_lora_arg("a.safetensors:0.5@low_noise") == LoraEntry("a.safetensors", 0.5, "low_noise")
    assert parse_lora_arg("a@b.safetensors") == LoraEntry("a@b.safetensors", 1.0, None)
    assert parse_lora_arg("a.safetensors@high_noise_model") == LoraEntry("a.safetensors", 1.0, "high_noise")
    with pytest.raises(FormatError, match="unknown expert 'lo'"):
        parse_lora_arg("a.safetensors:1@lo")
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"lora_path": ["a", "b"], "strength_model": 0.5, "sample_guide_scale": [4.0, 3.0],
                               "target_video_length": 9, "attention_type": "flash"}))
    parsed, unknown = read_config(job)
    assert parsed.loras == (LoraEntry("a", 0.5), LoraEntry("b", 0.5)) and unknown == ["attention_type"]
    assert (parsed.guidance, parsed.guidance_2, parsed.frames) == (4.0, 3.0, 9)
    job.write_text(json.dumps({"infer_steps": "four"}))
    with pytest.raises(FormatError, match="job.json: 'infer_steps' must be an integer"):
        read_config(job)
    lines = tmp_path / "jobs.jsonl"
    lines.write_text('{"prompt": "a"}\n\n{"prompt": 3}\n')
    with pytest.raises(FormatError, match=r"jobs.jsonl:3: 'prompt' must be a string"):
        read_batch(lines)


def test_batch_jobs_group_by_lora_stack_in_first_seen_order() -> None:
    a, b = (LoraEntry("a", 1.0),), (LoraEntry("b", 0.5, "low_noise"),)
    jobs = [Job(loras=a), Job(), Job(loras=a), Job(loras=b), Job(loras=()), Job(loras=(LoraEntry("a", 0.9),))]
    assert group_by_stack(jobs) == [[0, 2], [1, 4], [3], [5]]


# -- the tiny Wan pipelines through the library and the CLI ------------------------------------------------------


@pytest.fixture(scope="module")
def wan():
    return lorakit.tiny_pipeline("wan-t2v")


@pytest.fixture(scope="module")
def wan22(wan):
    """A tiny Wan 2.2 A14B-style pipeline: two experts (transformer_2 a copy of transformer), boundary 0.875; with
    2 steps the first runs on ``transformer`` (t=1000), the second on ``transformer_2`` (t=750)."""
    import copy

    from diffusers import WanPipeline

    parts = {k: v for k, v in wan.components.items() if k != "transformer_2"}
    pipe = WanPipeline(**parts, transformer_2=copy.deepcopy(wan.transformer), boundary_ratio=0.875)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _wan_lora(path, pipe, seed: int = 0, scale: float = 0.3):
    """A PEFT-named LoRA with random non-zero factors on the self-attention q/k/v of the tiny Wan transformer."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in pipe.transformer.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v")):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, mod.in_features, generator=g) * scale
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, 4, generator=g) * scale
    assert sd
    save_file(sd, str(path))
    return str(path)


def _invoke(args, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture
def served(monkeypatch):
    """Make ``load_pipeline`` in the CLI return a given pipeline (and record that it was called)."""
    calls = []

    def use(pipe):
        def load(model, dtype=None):
            calls.append(model)
            return pipe
        monkeypatch.setattr(lorakit.pipelines, "load_pipeline", load)
        return calls
    return use


@pytest.mark.parametrize(("suffix", "fps", "want"), [("mp4", None, 16.0), ("webp", 20, 20.0), ("gif", 25, 25.0)])
def test_each_video_format_decodes_back(wan, served, tmp_path, suffix, fps, want) -> None:
    served(wan)
    out = tmp_path / f"cat.{suffix}"
    extra = ["--fps", fps] if fps else []
    result = _invoke(["generate", "--model", "tiny-wan-t2v", *SMALL, "--frames", 5, *extra, "--json", "-o", out])
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert (summary["task"], summary["kind"], summary["frames"], summary["size"]) == ("t2v", "video", 5, [32, 32])
    n, size, got_fps = media.probe(out)
    assert (n, size) == (5, (32, 32)) and got_fps == pytest.approx(want, rel=1e-3)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(("model", "args", "error", "needle"), [
    ("tiny-wan-i2v", ["-o", "{tmp}/v.mp4"], MissingInputError, "--image"),
    ("tiny-wan-t2v", ["-o", "{tmp}/v.png"], OutputFormatError, ".mp4"),
    ("tiny-sd3", ["-o", "{tmp}/v.gif"], OutputFormatError, ".png"),
    ("tiny-cosmos", ["--video", "{tmp}/broken.mp4", "-o", "{tmp}/v.mp4"], MediaError, "broken.mp4"),
    ("tiny-wan-t2v", ["--device", "cpu", "--offload", "model", "-o", "{tmp}/v.mp4"], DeviceError, "--offload"),
])
def test_bad_requests_fail_before_the_pipeline_loads(served, tmp_path, model, args, error, needle) -> None:
    calls = served(None)
    (tmp_path / "broken.mp4").write_bytes(b"\0\0\0\x18ftypisom garbage")
    result = _invoke(["generate", "--model", model, *SMALL, *(a.format(tmp=tmp_path) for a in args)], ok=False)
    assert isinstance(result.exception, error) and needle in str(result.exception), result.exception
    assert calls == [] and not list(tmp_path.glob("v.*"))


def test_image_to_video_and_video2world_count_steps_and_frames() -> None:
    image = _frames(1)[0]
    for family, inputs in [("wan-i2v", {"image": image}), ("cosmos", {"video": _frames(5)})]:
        steps: list[int] = []
        result = generate(lorakit.tiny_pipeline(family), "a cat", steps=2, guidance_scale=3.0, seed=0, width=32,
                          height=32, num_frames=5, on_step=steps.append, **inputs)
        assert steps == [0, 1] and result.kind == "video" and len(result.frames[0]) == 5
        assert result.images[0] is result.frames[0][0] and result.fps == 16.0


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_expert_routing_changes_only_transformer_2(wan22, tmp_path) -> None:
    lora = _wan_lora(tmp_path / "low.safetensors", wan22)
    first, second = _params(wan22.transformer), _params(wan22.transformer_2)
    patches = apply_loras(wan22, [(lora, 1.0, "low_noise")])
    try:
        assert all(torch.equal(first[k], v) for k, v in wan22.transformer.state_dict().items())
        changed = [k for k, v in wan22.transformer_2.state_dict().items() if not torch.equal(second[k], v)]
        assert changed and all("attn1.to_" in k for k in changed)
        assert list(patches.report.counts()) == ["low_noise/0:low.safetensors"]
    finally:
        patches.remove()
    assert all(torch.equal(second[k], v) for k, v in wan22.transformer_2.state_dict().items())
    with pytest.raises(TaskInputError, match="has no transformer_2"):
        apply_loras(lorakit.tiny_pipeline("sd1"), [(lora, 1.0, "low_noise")])


def test_lightx2v_job_file_with_expert_routing(wan22, served, tmp_path) -> None:
    served(wan22)
    lora = _wan_lora(tmp_path / "distill.safetensors", wan22)
    job = {"model_cls": "wan2.2_moe_distill", "task": "t2v", "model_path": "tiny-wan-t2v", "infer_steps": 2,
           "target_video_length": 5, "target_height": 32, "target_width": 32, "sample_guide_scale": [4.0, 3.0],
           "seed": 7, "prompt": "a cat", "negative_prompt": "blurry", "save_video_path": str(tmp_path / "none.mp4"),
           "sample_shift": 5.0, "enable_cfg": False}
    outputs = {}
    # LightX2V's own spelling ("name": "low_noise_model"), and the CLI's (@high_noise) over the job file
    for name, loras, extra in [("none", [], []), ("low", [{"name": "low_noise_model", "path": lora, "strength": 1.0}], []),
                               ("high", [], ["--lora", f"{lora}:1@high_noise"])]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**job, "lora_configs": loras, "save_video_path": str(tmp_path / f"{name}.mp4")}))
        result = _invoke(["generate", "--config", path, "--json", *extra])
        warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
        assert warnings == [f"warning: {path}: ignoring keys lorakit does not use: enable_cfg, sample_shift"]
        summary = json.loads(result.output.strip().splitlines()[-1])
        assert (summary["frames"], summary["steps"], summary["seed"]) == (5, 2, 7)
        outputs[name] = np.stack([np.asarray(f) for f in media.read_video(tmp_path / f"{name}.mp4")])
        if name != "none":
            assert list(summary["report"]) == [f"{name}_noise/0:distill.safetensors"]
    # non-vacuity: each expert's LoRA changes the video, and the two experts differently
    assert not np.array_equal(outputs["none"], outputs["low"]) and not np.array_equal(outputs["none"], outputs["high"])
    assert not np.array_equal(outputs["low"], outputs["high"])


def test_batch_input_applies_each_stack_once_in_grouped_order(wan, served, tmp_path, monkeypatch) -> None:
    import lorakit.generation.core as core

    served(wan)
    lora = _wan_lora(tmp_path / "style.safetensors", wan)
    applied = []
    real_apply = core.apply
    monkeypatch.setattr(core, "apply", lambda target, loras, **kw: applied.append(loras) or real_apply(target, loras, **kw))
    lines = [{"prompt": "a cat", "seed": 1, "loras": [{"path": lora, "strength": 0.8}], "output": "a.webp"},
             {"prompt": "a cat", "seed": 1, "output": "b.webp"},
             {"prompt": "a dog", "seed": 2, "loras": [{"path": lora, "strength": 0.8}], "output": "c.webp"}]
    batch = tmp_path / "jobs.jsonl"
    batch.write_text("\n".join(json.dumps({**x, "output": str(tmp_path / x["output"])}) for x in lines) + "\n")
    result = _invoke(["generate", "--model", "tiny-wan-t2v", "--batch-input", batch, "--steps", 2, "--frames", 5,
                      "--width", 32, "--height", 32, "--json"])
    done = [json.loads(line)["output"] for line in result.output.splitlines() if line.startswith("{")]
    assert [Path(p).name for p in done] == ["a.webp", "c.webp", "b.webp"]  # the LoRA stack's two jobs together
    assert len(applied) == 1  # one apply for both LoRA jobs, none for the plain one
    a, b = (np.stack([np.asarray(f) for f in media.read_video(tmp_path / n)]) for n in ("a.webp", "b.webp"))
    assert a.shape == (5, 32, 32, 3) and not np.array_equal(a, b)  # non-vacuity: the LoRA changed job a


def test_the_cli_knows_every_tiny_family_class_before_loading() -> None:
    """``generate`` checks the inputs against the task before it loads anything: every tiny family has its class."""
    import diffusers

    from lorakit.cli.generate_cmd import _TINY_CLASSES

    assert set(_TINY_CLASSES) == set(lorakit.pipelines.TINY_FAMILIES)
    for name in _TINY_CLASSES.values():
        assert getattr(diffusers, name, None) is not None, name
