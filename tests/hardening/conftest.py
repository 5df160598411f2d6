"""Hardening fixtures: one good tiny CAMERA-P and one good tiny CAMERA-Q checkpoint per session.

Both come from the same random tiny Qwen2-MoE (routed experts of width 64 and a shared
expert of width 96, so every rule about shared experts is exercised).  The P checkpoint
is written by the compressor's writer from fixed keep-sets (expert 5 of layer 0 pruned
to width 0); the Q checkpoint is a real ``run_camera_q`` (RTN, bits 4/2, group size 32).
Tests copy them and never modify the originals.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hardening_catalogue import Q_ARGS, ZERO_WIDTH_EXPERT

from camera_vllm.checkpoint.source import SourceCheckpoint
from camera_vllm.compress.calibrate import CalibSpec
from camera_vllm.compress.prune import select_keep, write_pruned_checkpoint
from camera_vllm.compress.quantize.pipeline import QuantSpec, run_camera_q
from camera_vllm.compress.run import RunOptions
from camera_vllm.testing.tiny_models import _CORPUS, build_tiny_moe

CALIB = CalibSpec(num_seqs=4, seq_len=32, seed=1)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs; avoid OpenMP spin-waits on a shared machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def hroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="session")
def source(hroot: Path) -> Path:
    return build_tiny_moe("qwen2_moe", hroot / "source", seed=7)


@pytest.fixture(scope="session")
def calib_file(hroot: Path) -> Path:
    f = hroot / "calib.txt"
    f.write_text(_CORPUS * 4)
    return f


@pytest.fixture(scope="session")
def good_p(hroot: Path, source: Path) -> Path:
    src = SourceCheckpoint(source)
    g = torch.Generator().manual_seed(0)
    keeps = {}
    for layer in src.arch.moe_layers:
        scores = [torch.rand(64, generator=g) + 1 for _ in range(8)]
        if layer == 0:
            scores[ZERO_WIDTH_EXPERT] -= 1  # below every other score: pruned away entirely
        keeps[layer] = select_keep(scores, 0.4, shared_scores=torch.rand(96, generator=g) + 1)
    return write_pruned_checkpoint(
        src, hroot / "good-p", keeps, compression={"method": "camera-p", "test": True}
    )


@pytest.fixture(scope="session")
def good_q(hroot: Path, source: Path, calib_file: Path) -> Path:
    spec = QuantSpec(**{**Q_ARGS, "bits": tuple(Q_ARGS["bits"]), "fractions": tuple(Q_ARGS["fractions"])})
    options = RunOptions(calib=CALIB, device="cpu", progress=False)
    return run_camera_q(source, hroot / "good-q", [calib_file], spec, options=options)


@pytest.fixture(scope="session")
def good(good_p: Path, good_q: Path) -> dict[str, Path]:
    return {"P": good_p, "Q": good_q}
