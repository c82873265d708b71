"""lorakit._quiet: the known start-up noise of the dependencies is silenced, real warnings are not."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lorakit import _quiet
from lorakit._quiet import silence_known_noise

NOISE = ("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` for "
         "backward compatibility. Install torchvision to use the default backend, or import "
         "`CLIPImageProcessorPil` directly to silence this warning.")
SRC = Path(__file__).resolve().parents[1] / "src"


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log(monkeypatch):
    """The transformers logger that emits the noise, captured; its filters restored afterwards."""
    monkeypatch.delenv("LORAKIT_SHOW_ALL_WARNINGS", raising=False)
    logger = logging.getLogger("transformers.utils.import_utils")
    filters, capture = list(logger.filters), _Capture()
    # start from a logger without lorakit's filter: the CLI or server may have installed it earlier in the run
    logger.filters[:] = [f for f in filters if not isinstance(f, _quiet._KnownNoise)]
    logger.addHandler(capture)
    try:
        yield logger, capture.messages
    finally:
        logger.removeHandler(capture)
        logger.filters[:] = filters


def test_known_noise_is_dropped_and_real_warnings_are_kept(transformers_log):
    logger, shown = transformers_log
    logger.warning(NOISE)
    assert shown == [NOISE]  # non-vacuity: shown before
    shown.clear()
    with warnings.catch_warnings(record=True) as caught:
        silence_known_noise()
        logger.warning(NOISE)
        logger.warning(NOISE.replace("CLIP", "Siglip"))
        logger.warning("Some weights of the model checkpoint were not used")  # same logger, another message
        logging.getLogger("transformers.modeling_utils").warning(NOISE)  # the text, from another logger
        warnings.warn("a real problem: 3 layers unmatched", UserWarning, stacklevel=1)
    assert shown == ["Some weights of the model checkpoint were not used"]
    assert [str(w.message) for w in caught] == ["a real problem: 3 layers unmatched"]


def test_idempotent_and_switchable(transformers_log, monkeypatch):
    logger, shown = transformers_log
    silence_known_noise()
    silence_known_noise()
    assert sum(isinstance(f, _quiet._KnownNoise) for f in logger.filters) == 1
    logger.filters[:] = [f for f in logger.filters if not isinstance(f, _quiet._KnownNoise)]
    monkeypatch.setenv("LORAKIT_SHOW_ALL_WARNINGS", "1")
    silence_known_noise()
    logger.warning(NOISE)
    assert shown == [NOISE]


def test_known_warning_noise_entries_name_their_module():
    """No blanket filters: every warnings entry names a message and the module that emits it."""
    for category, message, module in _quiet.KNOWN_WARNING_NOISE:
        assert issubclass(category, Warning) and message and module not in ("", ".*")
    for name, pattern in _quiet.KNOWN_LOG_NOISE:
        assert name.count(".") >= 1 and len(pattern) > 20


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="no noise: torchvision installed")
def test_real_transformers_import_is_quiet():
    """The real thing, in a fresh interpreter: transformers prints the torchvision fallback line unless
    silence_known_noise() ran first."""
    code = ("import sys\nif sys.argv[1] == 'quiet':\n    from lorakit._quiet import silence_known_noise\n"
            "    silence_known_noise()\nfrom transformers import CLIPImageProcessor\nprint(CLIPImageProcessor.__name__)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    env.pop("LORAKIT_SHOW_ALL_WARNINGS", None)
    procs = {mode: subprocess.Popen([sys.executable, "-c", code, mode], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for mode in ("noisy", "quiet")}
    runs = {mode: p.communicate(timeout=300) + (p.returncode,) for mode, p in procs.items()}
    assert all(r[2] == 0 for r in runs.values()), {m: r[1] for m, r in runs.items()}
    assert "requires torchvision (not installed)" in runs["noisy"][1]
    assert "requires torchvision" not in runs["quiet"][1]
    assert runs["quiet"][0].strip() == runs["noisy"][0].strip() == "CLIPImageProcessorPil"


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="no noise: torchvision installed")
def test_cli_with_a_pipeline_prints_no_dependency_noise(tmp_path):
    """``lorakit inspect FILE --model tiny`` builds the tiny pipeline (which loads transformers' image
    processors): its stderr carries none of the known noise, and the command still works."""
    from safetensors.torch import save_file

    lora = tmp_path / "l.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.ones(1, 4, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.ones(32, 1, 1, 1)}, str(lora))
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_SHOW_ALL_WARNINGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    code = "import sys; from lorakit.cli import main; main(sys.argv[1:])"
    run = subprocess.run([sys.executable, "-c", code, "inspect", str(lora), "--model", "tiny", "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert '"format": "kohya"' in run.stdout
    assert "requires torchvision" not in run.stderr, run.stderr
