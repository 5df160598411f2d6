"""The rooms hold: who may import whom, read from every module's AST (function-local imports included).

* vLLM is imported only in ``camera_vllm/vllm_plugin``;
* ``kernels/`` (``camera_kernels``) imports only torch, triton, the standard library and itself;
* ``camera_vllm/format`` (the checkpoint spec) never imports the compressor, the plugin or
  vLLM, and imports torch only inside functions (so ``import camera_vllm.format`` stays light);
* ``camera_vllm/checkpoint`` (what both sides share) imports neither side, nor vLLM;
* ``camera_vllm/compress`` never imports ``camera_vllm.vllm_plugin``;
* ``camera_vllm/vllm_plugin`` never imports ``camera_vllm.compress``.

Every failure names the file, the line and the import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"camera_vllm": ROOT / "camera_vllm", "camera_kernels": ROOT / "kernels"}

# Modules outside camera_vllm/vllm_plugin allowed to import vLLM, each with why (module ->
# reason).  Empty today: camera_vllm/__init__.py's register() reaches vLLM only through
# camera_vllm.vllm_plugin.plugin, and `camera-vllm version` reads vLLM's version from the
# package metadata without importing it.  Keep this list tiny; an entry needs a comment.
VLLM_ALLOWED_OUTSIDE_PLUGIN: dict[str, str] = {}

KERNELS_THIRD_PARTY = {"torch", "triton"}


@dataclass(frozen=True)
class Import:
    """One imported module as written in a file, resolved to an absolute dotted name."""

    file: str
    line: int
    module: str  # absolute dotted name
    source: str  # the statement as written
    local: bool  # inside a function (runs on call, not at import)
    type_checking: bool  # under ``if TYPE_CHECKING:`` (never runs)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.source}"


def _module_name(package: str, root: Path, path: Path) -> tuple[str, bool]:
    """(dotted module name, is a package __init__) of ``path`` under ``root``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join([package, *parts]), is_pkg


def _resolve(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if level > 1:
        base = base[: -(level - 1)]
    return ".".join([*base, *([target] if target else [])])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(package: str, root: Path, path: Path) -> list[Import]:
    """Every import in ``path``: statements at any depth and ``importlib.import_module``/``__import__``
    calls with a literal name."""
    module, is_pkg = _module_name(package, root, path)
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(path))
    rel = str(path.relative_to(ROOT))
    out: list[Import] = []

    def add(node: ast.AST, name: str, local: bool, tc: bool) -> None:
        source = (ast.get_source_segment(text, node) or name).splitlines()[0].strip()
        out.append(Import(rel, node.lineno, name, source, local, tc))

    def visit(node: ast.AST, local: bool, tc: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name, local, tc)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_pkg, node.level, node.module)
            add(node, base, local, tc)
            for alias in node.names:  # `from .. import compress` imports the submodule
                if alias.name != "*":
                    add(node, f"{base}.{alias.name}", local, tc)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if (
                name in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                target = node.args[0].value
                level = len(target) - len(target.lstrip("."))
                add(node, _resolve(module, is_pkg, level, target.lstrip(".") or None), local, tc)
        for child in ast.iter_child_nodes(node):
            child_local = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            child_tc = tc or (
                isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body
            )
            visit(child, child_local, child_tc)

    visit(tree, False, False)
    return out


def _all_imports() -> dict[str, list[Import]]:
    """Module name -> its imports, for every module of camera_vllm/ and kernels/."""
    out: dict[str, list[Import]] = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            out[_module_name(package, root, path)[0]] = _imports(package, root, path)
    return out


IMPORTS = _all_imports()


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(room: str, bad) -> list[str]:
    """One line per offending statement (``from x import a, b`` yields a and b, reported once)."""
    found: dict[str, None] = {}
    for module, imports in sorted(IMPORTS.items()):
        if _within(module, room):
            for imp in imports:
                why = bad(module, imp)
                if why:
                    found.setdefault(f"{imp}  ({why})")
    return list(found)


def _report(rule: str, found: list[str]) -> str:
    return f"{rule}: {len(found)} violation(s)\n  " + "\n  ".join(found)


def test_the_walk_sees_every_room() -> None:
    """The walk covers the modules it must (a rule over no files would pass vacuously)."""
    for room in (
        "camera_vllm.format",
        "camera_vllm.checkpoint",
        "camera_vllm.compress",
        "camera_vllm.vllm_plugin",
        "camera_kernels",
    ):
        assert any(_within(m, room) for m in IMPORTS), f"no modules found for {room}"
    # Relative and function-local imports are resolved: the plugin's loader imports the
    # shared checkpoint room inside a method.
    loader = IMPORTS["camera_vllm.vllm_plugin.loader"]
    assert any(i.local and i.module == "camera_vllm.checkpoint.zero_mask" for i in loader)
    assert any(not i.local and i.module == "vllm.config" for i in loader)


def test_vllm_is_imported_only_by_the_plugin() -> None:
    def bad(module: str, imp: Import) -> str | None:
        if not _within(imp.module, "vllm") or _within(module, "camera_vllm.vllm_plugin"):
            return None
        return None if module in VLLM_ALLOWED_OUTSIDE_PLUGIN else "vllm outside camera_vllm/vllm_plugin"

    found = _violations("camera_vllm", bad) + _violations("camera_kernels", bad)
    assert not found, _report("only camera_vllm/vllm_plugin imports vllm", found)


def test_kernels_import_only_torch_triton_stdlib_and_themselves() -> None:
    allowed = KERNELS_THIRD_PARTY | set(sys.stdlib_module_names) | {"camera_kernels"}

    def bad(module: str, imp: Import) -> str | None:
        top = imp.module.split(".")[0]
        return None if top in allowed else f"{top} is not torch, triton, the stdlib or camera_kernels"

    found = _violations("camera_kernels", bad)
    assert not found, _report("kernels/ imports only torch, triton, the stdlib and itself", found)


def test_format_imports_no_compressor_plugin_vllm_nor_torch_at_import() -> None:
    never = ("camera_vllm.compress", "camera_vllm.vllm_plugin", "vllm", "camera_vllm.checkpoint")

    def bad(module: str, imp: Import) -> str | None:
        hit = next((p for p in never if _within(imp.module, p)), None)
        if hit is not None:
            return f"the checkpoint spec imports {hit}"
        if _within(imp.module, "torch") and not imp.local and not imp.type_checking:
            return "torch at module level (import it inside the function that needs it)"
        return None

    found = _violations("camera_vllm.format", bad)
    assert not found, _report("camera_vllm/format stays the light, standalone spec", found)


def test_checkpoint_room_imports_neither_side() -> None:
    never = ("camera_vllm.compress", "camera_vllm.vllm_plugin", "vllm")

    def bad(module: str, imp: Import) -> str | None:
        hit = next((p for p in never if _within(imp.module, p)), None)
        return None if hit is None else f"the shared checkpoint room imports {hit}"

    found = _violations("camera_vllm.checkpoint", bad)
    assert not found, _report("camera_vllm/checkpoint imports neither compress nor vllm_plugin", found)


def test_compress_never_imports_the_plugin() -> None:
    def bad(module: str, imp: Import) -> str | None:
        return "compress imports vllm_plugin" if _within(imp.module, "camera_vllm.vllm_plugin") else None

    found = _violations("camera_vllm.compress", bad)
    assert not found, _report("camera_vllm/compress never imports camera_vllm.vllm_plugin", found)


def test_plugin_never_imports_the_compressor() -> None:
    def bad(module: str, imp: Import) -> str | None:
        return "vllm_plugin imports compress" if _within(imp.module, "camera_vllm.compress") else None

    found = _violations("camera_vllm.vllm_plugin", bad)
    assert not found, _report("camera_vllm/vllm_plugin never imports camera_vllm.compress", found)


def test_resolve_reads_relative_imports() -> None:
    """The resolver the rules rely on: ``..`` from a module and from a package ``__init__``."""
    assert _resolve("camera_vllm.vllm_plugin.loader", False, 2, "compress.convert") == (
        "camera_vllm.compress.convert"
    )
    assert _resolve("camera_vllm.vllm_plugin.loader", False, 1, None) == "camera_vllm.vllm_plugin"
    assert _resolve("camera_kernels", True, 1, "packing") == "camera_kernels.packing"
    assert _resolve("camera_vllm.compress.quantize", True, 3, "format") == "camera_vllm.format"


def test_the_walk_finds_hidden_imports(tmp_path: Path, monkeypatch) -> None:
    """Function-local, relative, ``from .. import x``, TYPE_CHECKING and import_module imports: all seen."""
    plugin = tmp_path / "camera_vllm" / "vllm_plugin"
    plugin.mkdir(parents=True)
    path = plugin / "sneaky.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "import importlib\n"
        "from .. import compress\n"
        "if TYPE_CHECKING:\n"
        "    import torch\n"
        "def f():\n"
        "    from ..compress.prune import select_keep\n"
        "    return importlib.import_module('vllm.config')\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = {
        (i.line, i.module, i.local, i.type_checking)
        for i in _imports("camera_vllm", tmp_path / "camera_vllm", path)
    }
    assert (3, "camera_vllm.compress", False, False) in found
    assert (5, "torch", False, True) in found
    assert (7, "camera_vllm.compress.prune", True, False) in found
    assert (8, "vllm.config", True, False) in found


@pytest.mark.parametrize(
    "module",
    [
        "camera_vllm.format",
        "camera_vllm.format.layout",
        "camera_vllm.format.summary",
        "camera_vllm.format.validate",
        "camera_vllm.format.sharding",
        "camera_vllm.format.inspect",
        "camera_kernels",
    ],
)
def test_importing_the_format_leaves_torch_out(module: str) -> None:
    """In a fresh interpreter, importing the spec (or the kernels package) loads no torch or vLLM."""
    code = (
        f"import sys, {module}; "
        "heavy = sorted(m for m in ('torch', 'triton', 'vllm', 'camera_vllm.compress', "
        "'camera_vllm.vllm_plugin') if m in sys.modules); print(heavy)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"import {module} loaded {done.stdout.strip()}"


def test_kernels_public_names_resolve_lazily() -> None:
    """Every name camera_kernels.__all__ promises loads (from the module PEP 562 maps it to)."""
    code = (
        "import camera_kernels as ck; "
        "missing = [n for n in ck.__all__ if getattr(ck, n, None) is None]; "
        "print(missing, sorted(ck.__all__) == sorted(ck._EXPORTS))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] True", done.stdout
