"""The lorakit error tree. Every error names the key or file at fault and says how to fix it.

Each subclass also inherits the builtin a caller would already catch, so ``except ValueError``
keeps working::

    LorakitError
    ├── FormatError (ValueError)            a file's keys or tensors do not form a valid adapter
    │   ├── IncompleteAdapterError          a key is missing its partner (lora_down without lora_up)
    │   ├── RankMismatchError               the pair's inner dimensions disagree
    │   ├── NonFiniteError                  NaN/Inf in a tensor or in a computed result
    │   └── UnknownFormatError              no naming convention recognises the keys
    ├── UnsupportedAdapterError (NotImplementedError)   recognised but not (yet) computable or writable
    ├── UnsafeFileError (ValueError)        a pickle that would run code, refused
    ├── SourceNotFoundError (FileNotFoundError)   a path / hub reference that does not resolve
    ├── OverwriteError (FileExistsError)    an output path equal to an input
    ├── MatchError (ValueError)             a LoRA matched nothing (or, strict, not everything)
    ├── OutputFormatError (ValueError)      an output suffix that does not fit what is generated (video to .png)
    ├── MediaError (ValueError)             an input image or video that does not decode
    ├── TaskInputError (ValueError)         inputs that do not fit the generation task (image to text-to-video)
    │   └── MissingInputError               a required input is missing (image-to-video without an image)
    ├── DeviceError (ValueError)            a device / dtype / offload choice this machine cannot run
    ├── ShapeMismatchError (ValueError)     a delta does not fit its target tensor
    ├── SlotError (ValueError)              a LoRA does not fit the prepared adapter slots (rank, target, slot)
    ├── UnknownFamilyError (KeyError)       a model family / variant name lorakit does not know
    ├── PatchOrderError (RuntimeError)      a patch removed while a later one on the model is active
    ├── ConcurrentPatchError (RuntimeError) another thread is applying/removing a patch on the same model
    ├── InternalError (RuntimeError)        an invariant of lorakit itself broke (a bug: please report it)
    └── ApiError                            the server's HTTP errors: status, machine code, message
"""

from __future__ import annotations

__all__ = [
    "ApiError",
    "ConcurrentPatchError",
    "DeviceError",
    "FormatError",
    "IncompleteAdapterError",
    "InternalError",
    "LorakitError",
    "MatchError",
    "MediaError",
    "MetaDeviceError",
    "MissingInputError",
    "NonFiniteError",
    "OutputFormatError",
    "OverwriteError",
    "PatchOrderError",
    "RankMismatchError",
    "ShapeMismatchError",
    "SlotError",
    "SourceNotFoundError",
    "TaskInputError",
    "UnknownFamilyError",
    "UnknownFormatError",
    "UnsafeFileError",
    "UnsupportedAdapterError",
]


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class FormatError(LorakitError, ValueError):
    """The keys or tensors of a file do not form a valid adapter."""


class IncompleteAdapterError(FormatError):
    """An adapter key is present without the keys it needs (e.g. ``lora_down`` without ``lora_up``)."""


class RankMismatchError(FormatError):
    """The factors of a low-rank pair have different inner dimensions."""


class NonFiniteError(FormatError):
    """A tensor (read from a file, or computed while applying) holds NaN or Inf."""


class UnknownFormatError(FormatError):
    """No known naming convention recognises the keys."""


class UnsupportedAdapterError(LorakitError, NotImplementedError):
    """An adapter type is recognised but cannot be computed or written here."""


class UnsafeFileError(LorakitError, ValueError):
    """A pickle-based file that needs code execution to load; refused, nothing was executed."""


class SourceNotFoundError(LorakitError, FileNotFoundError):
    """A path or hub reference does not resolve to a file."""


class OverwriteError(LorakitError, FileExistsError):
    """An output path would overwrite one of the inputs."""


class MatchError(LorakitError, ValueError):
    """A LoRA matched no module of the target (or, with ``strict=True``, not all of its layers)."""


class ShapeMismatchError(LorakitError, ValueError):
    """A delta's shape does not fit the tensor it targets."""


class SlotError(LorakitError, ValueError):
    """A LoRA does not fit the prepared adapter slots (rank above the capacity, a target outside the prepared
    set, a slot or row that does not exist); the slot keeps what it held."""


class UnknownFamilyError(LorakitError, KeyError):
    """A model family or variant name that lorakit does not know."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class PatchOrderError(LorakitError, RuntimeError):
    """A patch was removed while a later patch on the same model is still active."""


class ConcurrentPatchError(LorakitError, RuntimeError):
    """Another thread is applying or removing a patch on the same model; patches on one model are not concurrent."""


class InternalError(LorakitError, RuntimeError):
    """An invariant of lorakit itself does not hold (replaces ``assert`` in library code): a bug to report."""


class ApiError(LorakitError):
    """An error with an HTTP status and a machine-readable code, rendered by the server as its JSON envelope."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class MetaDeviceError(LorakitError, ValueError):
    """A model on the ``meta`` device (shapes, no weights) given where real weights are needed, e.g. to ``apply``."""


class OutputFormatError(LorakitError, ValueError):
    """An output path whose suffix does not fit what is generated (a video to ``.png``), or an unknown suffix."""


class MediaError(LorakitError, ValueError):
    """An input image or video (a file or bytes) that does not decode; the message names the file."""


class TaskInputError(LorakitError, ValueError):
    """Inputs that do not fit the generation task: an image given to text-to-video, a task the pipeline cannot run.

    ``flag`` is the command-line flag at fault (``"--image"``), ``field`` the library / server argument (``"image"``).
    """

    def __init__(self, message: str, *, flag: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.flag = flag
        self.field = field


class MissingInputError(TaskInputError):
    """A task's required input is missing (image-to-video without an image); the message names the flag."""


class DeviceError(LorakitError, ValueError):
    """A ``device`` / ``dtype`` / ``offload`` choice this machine cannot run (CUDA asked for on a CPU-only host)."""
