"""Static security checks of the package source (camera_vllm/ and kernels/), by AST.

Refused anywhere in the package:

* importing ``pickle`` (or ``_pickle``, ``cPickle``, ``dill``, ``cloudpickle``, ``shelve``, ``marshal``);
* ``torch.load`` without ``weights_only=True`` (the converter's ``.pt`` reader passes it: allowed);
* ``trust_remote_code=True`` (keyword or dict entry): the compressor and the reference
  build models from config.json only and never run code shipped with a checkpoint;
* the builtins ``eval`` / ``exec``;
* ``allow_pickle=True`` (numpy) and ``shell=True`` (subprocess).

The scanner is tested on snippets first, so a scan that finds nothing means something.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("camera_vllm", "kernels")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal"}


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def scan(source: str, filename: str = "<snippet>") -> list[str]:
    """Every violation in ``source`` as ``file:line: what``."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    torch_names = {"torch"}  # names bound to the torch module
    load_names: set[str] = set()  # names bound to torch.load itself

    def hit(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    hit(node, f"imports {alias.name}")
                if alias.name == "torch":
                    torch_names.add(alias.asname or "torch")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                hit(node, f"imports from {node.module}")
            if node.module == "torch":
                load_names |= {a.asname or a.name for a in node.names if a.name == "load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and _is_true(value):
                    hit(node, "trust_remote_code=True")
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        if isinstance(f, ast.Name) and f.id in ("eval", "exec"):
            hit(node, f"calls {f.id}()")
        is_torch_load = (
            isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name)
            and f.value.id in torch_names
        ) or (isinstance(f, ast.Name) and f.id in load_names)  # fmt: skip
        if is_torch_load and not _is_true(kwargs.get("weights_only", ast.Constant(None))):
            hit(node, "torch.load without weights_only=True")
        for name in ("trust_remote_code", "allow_pickle", "shell"):
            if name in kwargs and _is_true(kwargs[name]):
                hit(node, f"{name}=True")
    return found


@pytest.mark.parametrize(
    "snippet, what",
    [
        ("import pickle\n", "imports pickle"),
        ("import cloudpickle as cp\n", "imports cloudpickle"),
        ("from pickle import loads\n", "imports from pickle"),
        ("import torch\ntorch.load('x.pt')\n", "torch.load without weights_only=True"),
        ("import torch\ntorch.load('x.pt', weights_only=False)\n", "torch.load without weights_only=True"),
        ("import torch as T\nT.load(f, map_location='cpu')\n", "torch.load without weights_only=True"),
        ("from torch import load as L\nL(f)\n", "torch.load without weights_only=True"),
        ("AutoModel.from_pretrained(p, trust_remote_code=True)\n", "trust_remote_code=True"),
        ("kw = {'trust_remote_code': True}\n", "trust_remote_code=True"),
        ("eval('1 + 1')\n", "calls eval()"),
        ("exec(code)\n", "calls exec()"),
        ("np.load(f, allow_pickle=True)\n", "allow_pickle=True"),
        ("subprocess.run(cmd, shell=True)\n", "shell=True"),
    ],
)
def test_scanner_finds(snippet: str, what: str) -> None:
    assert [v.split(": ", 1)[1] for v in scan(snippet)] == [what]


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load(p, map_location='cpu', weights_only=True)\n",
        "model.eval()\n",  # nn.Module.eval, not the builtin
        "AutoModel.from_pretrained(p, trust_remote_code=False)\n",
        "json.load(fh)\n",
        "from safetensors.torch import load_file\nload_file(p)\n",
    ],
)
def test_scanner_allows(snippet: str) -> None:
    assert scan(snippet) == []


def _package_files() -> list[Path]:
    files = sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 20, files
    return files


def test_package_source_is_clean() -> None:
    violations = [v for f in _package_files() for v in scan(f.read_text(), str(f.relative_to(ROOT)))]
    assert violations == [], "\n".join(violations)


def test_the_converters_torch_load_is_seen_and_safe() -> None:
    """The one torch.load in the package (compress/convert.py) is found by the scan and passes."""
    convert = ROOT / "camera_vllm" / "compress" / "convert.py"
    tree = ast.parse(convert.read_text())
    loads = [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "load"
        and isinstance(n.func.value, ast.Name) and n.func.value.id == "torch"
    ]  # fmt: skip
    assert len(loads) == 1
    assert any(k.arg == "weights_only" and _is_true(k.value) for k in loads[0].keywords)
    broken = convert.read_text().replace("weights_only=True", "weights_only=False")
    assert [v.split(": ", 1)[1] for v in scan(broken)] == ["torch.load without weights_only=True"]
