"""The package's shape, checked on its source: modules import only layers below them (ARCHITECTURE.md), and no
function is longer than 80 lines. Walks the AST of every module under src/lorakit; imports inside functions
count too (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"

# bottom to top; a module may import a lower layer or its own package, never a higher or a sibling layer
LAYERS: list[tuple[str, ...]] = [
    ("errors", "_quiet"),  # _quiet: standard library only (filters for dependencies' known noise)
    ("io",),
    ("adapters",),
    ("model",),
    ("formats",),
    ("families",),
    ("placement",),
    ("saving",),  # lorakit.save: resolve names, then write
    ("quant",),  # quantized layers and tensors: recognised by the runtime, written by lorakit quantize
    ("runtime", "ops", "inspection"),
    ("pipelines",),
    ("media",),  # image / video encoders and decoders (Pillow, PyAV) for generation, the CLI and the server
    ("generation",),
    ("train",),  # lorakit.train: training loops over pipelines, validation through generation
    ("lorakit",),  # the package itself (its lazy __init__): the public library API, which cli and server wrap
    ("server",),
    ("cli",),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
FACADE = RANK["lorakit"]
MAX_FUNCTION_LINES = 80


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p != SRC / "__init__.py")


def _unit(path: Path) -> str:
    """The layer unit a file belongs to: its top-level package or module under lorakit."""
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _package_parts(path: Path) -> list[str]:
    rel = path.relative_to(SRC).with_suffix("")
    parts = ["lorakit", *rel.parts]
    return parts[:-1] if parts[-1] == "__init__" else parts[:-1]


def _imported(path: Path, tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every lorakit import in the file."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lorakit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_parts(path)
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "lorakit":
                continue
            if mod == "lorakit":  # ``from lorakit import x``: x may be a layer unit or a facade name
                out += [(node.lineno, f"lorakit.{a.name}" if a.name in RANK else "lorakit") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return out


def _rank_of(module: str) -> int:
    parts = module.split(".")
    return FACADE if len(parts) == 1 else RANK[parts[1]]


def test_every_module_has_a_layer():
    assert {_unit(p) for p in _modules()} <= set(RANK), "add new top-level modules to LAYERS"


def test_modules_import_only_layers_below_them():
    wrong = []
    for path in _modules():
        unit = _unit(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for line, module in _imported(path, tree):
            target = module.split(".")[1] if "." in module else "lorakit"
            if target == unit:
                continue
            if _rank_of(module) >= RANK[unit]:
                wrong.append(f"{path.relative_to(SRC.parent)}:{line}: {unit} imports {module}")
    assert not wrong, "imports against the layer order:\n  " + "\n  ".join(wrong)


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in [*_modules(), SRC / "__init__.py"]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                n = node.end_lineno - start + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {node.name} has {n} lines")
    assert not long, "\n".join(long)


def test_library_code_has_no_assert():
    found = [f"{p.relative_to(SRC.parent)}:{n.lineno}" for p in _modules()
             for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))) if isinstance(n, ast.Assert)]
    assert not found, "use a typed error from lorakit.errors instead of assert: " + ", ".join(found)


def test_errors_are_defined_in_errors_py():
    stray = []
    for path in _modules():
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Name) and (b.id.endswith("Error") or b.id == "Exception") for b in node.bases
            ):
                stray.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {node.name}")
    assert not stray, "define errors in lorakit/errors.py: " + ", ".join(stray)


@pytest.mark.parametrize("bad", ["from ..cli import x", "from lorakit.server import app"])
def test_the_layer_check_catches_an_upward_import(tmp_path, bad):
    # non-vacuity: the walker resolves relative and absolute imports to the layer that would be violated
    fake = SRC / "formats" / "_probe_not_a_module.py"
    tree = ast.parse(bad)
    imported = _imported(fake, tree)
    assert imported and all(_rank_of(m) > RANK["formats"] for _, m in imported)
