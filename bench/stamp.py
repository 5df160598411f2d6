"""Machine, versions and commit recorded with every benchmark result."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

# The CPU features that pick code paths here (vLLM's CPU library, the slab kernel's build).
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "avx_vnni")


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


def stamp() -> dict[str, Any]:
    """Where and with what a benchmark ran."""
    import torch
    import transformers

    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception:  # the benchmark may run where vLLM is absent
        vllm_version = None
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        # Results and docs written by earlier benchmarks of the same run do not make the code dirty.
        dirty = bool(
            subprocess.run(
                [
                    "git",
                    "status",
                    "--porcelain",
                    "--untracked-files=no",
                    "--",
                    ".",
                    ":(exclude)bench/results",
                    ":(exclude)docs",
                ],
                cwd=root,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
    except Exception:
        commit, dirty = None, None
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpu": cpu_isa(),
            "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "vllm": vllm_version,
        },
        "commit": commit,
        "dirty_tree": dirty,
    }
