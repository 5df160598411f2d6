"""Machine, versions and commit recorded with every benchmark result."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any


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
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True).stdout.strip())
    except Exception:
        commit, dirty = None, None
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "vllm": vllm_version},
        "commit": commit,
        "dirty_tree": dirty,
    }
