"""The public API is small and deliberate: __all__ is sorted, complete and importable."""

from __future__ import annotations

import lorakit
from lorakit import errors


def test_all_is_sorted_and_resolves():
    assert list(lorakit.__all__) == sorted(lorakit.__all__)
    for name in lorakit.__all__:
        assert getattr(lorakit, name) is not None, name


def test_public_names_are_exactly_all():
    public = {n for n in dir(lorakit) if not n.startswith("_")}
    # submodules imported as a side effect and typing helpers are not API
    modules = {n for n in public if type(getattr(lorakit, n)).__name__ == "module"}
    assert public - modules - {"Any", "annotations"} == set(lorakit.__all__) - {"__version__"}


def test_errors_inherit_builtins():
    assert issubclass(errors.FormatError, ValueError)
    assert issubclass(errors.UnsafeFileError, ValueError)
    assert issubclass(errors.SourceNotFoundError, FileNotFoundError)
    assert issubclass(errors.OverwriteError, FileExistsError)
    assert issubclass(errors.UnsupportedAdapterError, NotImplementedError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.LorakitError)
