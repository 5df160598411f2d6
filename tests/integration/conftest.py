"""Session-wide fixtures: tiny checkpoints built once, vLLM engines started once per configuration."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from integration_helpers import build_pruned, run_engines, vllm_env

ENGINE_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("camera-ckpts")


@pytest.fixture(scope="session")
def checkpoints(ckpt_root: Path) -> Callable[[str], tuple[Path, Path]]:
    """``get(arch) -> (original dir, CAMERA-P 0.5 dir)``, built on first use."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in cache:
            cache[arch] = build_pruned(arch, ckpt_root)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def vllm_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A fresh torch.compile cache: the compile-mode tests must trace and compile, not
    # reload an artifact from an earlier run.
    return tmp_path_factory.mktemp("vllm-cache")


@pytest.fixture(scope="session")
def vllm_greedy(ckpt_root: Path, vllm_cache_root: Path) -> Callable[..., dict]:
    """``run(arch, model_dir, eager=..., quantization=...) -> result dict`` (one engine in its own
    subprocess, see ``vllm_driver.py``), cached."""
    cache: dict[tuple, dict] = {}

    def run(
        arch: str, model_dir: Path, *, eager: bool, quantization: str | None = None, max_num_seqs: int = 4
    ) -> dict:
        key = (str(model_dir), eager, quantization, max_num_seqs)
        if key in cache:
            return cache[key]
        tag = (
            f"{model_dir.name}-{'eager' if eager else 'compile'}-{quantization or 'auto'}-seqs{max_num_seqs}"
        )
        engine = {"enforce_eager": eager, "quantization": quantization, "max_num_seqs": max_num_seqs}
        env = vllm_env(arch)
        env["VLLM_CACHE_ROOT"] = str(vllm_cache_root)
        start = time.perf_counter()
        out = run_engines(
            [{"id": tag, "model": str(model_dir), "engine": engine}],
            ckpt_root,
            tag,
            env,
            ENGINE_TIMEOUT_S,
            f"vLLM run {tag}",
        )
        result = out["runs"][tag]
        result["process_s"] = round(time.perf_counter() - start, 1)
        cache[key] = result
        return result

    return run
