"""CAMERA-Q checkpoints for the vLLM serving tests (no vLLM import here).

Each is the tiny fp32 model quantized with RTN (fast) at group size 32 into 4/2/1-bit
slabs; the shared expert (Qwen2-MoE, DeepSeek-V2) is quantized with the routed ones.
"""

from __future__ import annotations

from pathlib import Path

import torch

from camera_vllm.compress.calibrate import CalibSpec
from camera_vllm.compress.quantize.pipeline import run_camera_q
from camera_vllm.testing.tiny_models import _CORPUS, build_tiny_moe

GROUP_SIZE = 32
BITS = (4, 2, 1)
FRACTIONS = (0.25, 0.5, 0.25)
CALIB = CalibSpec(num_seqs=2, seq_len=32, seed=1)


def build_mixed(arch: str, root: Path, *, prune_ratio: float = 0.0) -> tuple[Path, Path]:
    """(original dir, CAMERA-Q dir) of a tiny fp32 ``arch`` model under ``root`` (reused if present)."""
    original = root / f"{arch}-orig"
    if not (original / "config.json").exists():
        build_tiny_moe(arch, original, dtype=torch.float32)
    calib = root / "calib.txt"
    if not calib.exists():
        calib.write_text(_CORPUS * 4)
    out = root / f"{arch}-q{'-p' + str(int(prune_ratio * 100)) if prune_ratio else ''}"
    if not (out / "config.json").exists():
        torch.set_num_threads(1)  # tiny GEMMs on a shared machine
        run_camera_q(
            original,
            out,
            [calib],
            bits=BITS,
            fractions=FRACTIONS,
            group_size=GROUP_SIZE,
            method="rtn",
            prune_ratio=prune_ratio,
            calib=CALIB,
            device="cpu",
            progress=False,
        )
    return original, out
