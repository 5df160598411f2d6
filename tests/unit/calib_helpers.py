"""Calibration inputs shared by the CLI and pipeline tests."""

from __future__ import annotations

import json
from pathlib import Path

from camera_vllm.testing.tiny_models import _CORPUS


def write_calib_jsonl(path: Path) -> Path:
    """Ten rotated copies of the tiny corpus as JSON lines (field ``text``)."""
    path.write_text("\n".join(json.dumps({"text": _CORPUS[i:] + _CORPUS[:i]}) for i in range(0, 400, 40)))
    return path


def calib_args(calib: Path) -> list[str]:
    """CLI flags for a small, seeded, CPU calibration run."""
    return [
        "--calib",
        str(calib),
        "--num-seqs",
        "4",
        "--seq-len",
        "32",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--no-progress",
    ]
