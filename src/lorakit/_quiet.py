"""Silence the known, harmless start-up noise of lorakit's dependencies: for the CLI and the server only.

The library itself never calls this (``import lorakit`` leaves ``warnings`` and ``logging`` alone); the entry
points do: ``lorakit.cli.main`` and ``lorakit.server.app.create_app``. Every filter names one message from one
place (the logger or module that emits it, and the message's text), so everything else, from the same
dependency too, is still shown. Verbosity levels are not touched.

Silenced (checked against transformers 5.24.0 / diffusers 0.42.1):

- transformers, logger ``transformers.utils.import_utils``, WARNING (once per class), whenever diffusers'
  pipelines are imported without torchvision (every CLI command that loads a model, and the server)::

      `CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` for
      backward compatibility. Install torchvision to use the default backend, or import
      `CLIPImageProcessorPil` directly to silence this warning.

  and the same for ``SiglipImageProcessor`` (and any other ``<Name>ImageProcessor``). lorakit never needs an
  image processor's torchvision backend: the PIL fallback is what it would pick.

Set ``LORAKIT_SHOW_ALL_WARNINGS=1`` to keep everything.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# (logger name, message regex): log records silenced at the logger that emits them
KNOWN_LOG_NOISE: tuple[tuple[str, str], ...] = (
    ("transformers.utils.import_utils",
     r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`"),
)

# (category, message regex, module regex): warnings.warn noise, as for ``warnings.filterwarnings``. None is
# known today; an entry must name the emitting module, never a whole category.
KNOWN_WARNING_NOISE: tuple[tuple[type[Warning], str, str], ...] = ()


class _KnownNoise(logging.Filter):
    """Drops the records of one logger whose message matches a known-noise pattern."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def silence_known_noise() -> None:
    """Install the filters above (idempotent). A no-op when ``LORAKIT_SHOW_ALL_WARNINGS`` is set."""
    if os.environ.get("LORAKIT_SHOW_ALL_WARNINGS", "").strip() not in ("", "0"):
        return
    by_logger: dict[str, list[str]] = {}
    for name, pattern in KNOWN_LOG_NOISE:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNoise) for f in logger.filters):
            logger.addFilter(_KnownNoise(patterns))
    for category, message, module in KNOWN_WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
