"""CAMERA-Q checkpoints for the vLLM serving tests (no vLLM import here).

Each is the tiny fp32 model quantized with RTN (fast) at group size 32 into 4/2/1-bit
slabs; the shared expert (Qwen2-MoE, DeepSeek-V2) is quantized with the routed ones.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import torch

from camera_vllm.compress.calibrate import CalibSpec
from camera_vllm.compress.quantize.pipeline import QuantSpec, run_camera_q
from camera_vllm.compress.run import RunOptions
from camera_vllm.testing.tiny_models import _CORPUS, build_tiny_moe

GROUP_SIZE = 32
BITS = (4, 2, 1)
FRACTIONS = (0.25, 0.5, 0.25)
CALIB = CalibSpec(num_seqs=2, seq_len=32, seed=1)

TIMEOUT_S = 1800

# case -> (arch, prune ratio, vLLM mode, max_num_seqs)
CASES: dict[str, tuple[str, float, str, int]] = {
    "qwen3_moe": ("qwen3_moe", 0.0, "compile", 4),
    "qwen2_moe": ("qwen2_moe", 0.0, "compile", 4),  # quantized shared expert under torch.compile
    "deepseek_v2": ("deepseek_v2", 0.0, "eager", 1),  # shared experts, dense first layer
    "mixtral": ("mixtral", 0.0, "eager", 4),  # w1/w2/w3 under block_sparse_moe
    "olmoe": ("olmoe", 0.0, "eager", 4),
    "qwen3_moe-p25": ("qwen3_moe", 0.25, "eager", 4),  # P+Q
}
# Compared with stock vLLM on the dense dequantized equivalent (see test_vllm_mixed.py).
STOCK_VLLM_ORACLE = {"deepseek_v2"}


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
            QuantSpec(
                bits=BITS,
                fractions=FRACTIONS,
                group_size=GROUP_SIZE,
                method="rtn",
                prune_ratio=prune_ratio,
            ),
            options=RunOptions(calib=CALIB, device="cpu", progress=False),
        )
    return original, out


def write_dequantized_dense(mixed_dir: Path, out_dir: Path) -> Path:
    """The dense fp32 equivalent of a CAMERA-Q checkpoint, for stock vLLM as an oracle.

    Every slab is dequantized (``(q - zero) * scale``, exactly what the plugin computes),
    slabs are concatenated in bit order and the pruned/missing micro-experts become zero
    rows/columns up to the original width (exact for SwiGLU).
    """
    import shutil

    from safetensors.torch import load_file, save_file

    from camera_kernels.packing import dequantize
    from camera_vllm.format import names

    cfg = json.loads((mixed_dir / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    arch, bits, group = qc["architecture"], qc["bits"], qc["group_size"]
    hidden = cfg["hidden_size"]
    tensors = load_file(mixed_dir / "model.safetensors")

    def dense(prefix: str, proj_names: tuple[str, str, str], slabs: list[int], size: int) -> None:
        for proj, pname in enumerate(proj_names):
            full = torch.zeros((size, hidden) if proj < 2 else (hidden, size))
            start = 0
            for n, b in zip(slabs, bits):
                if n == 0:
                    continue
                q, s, z = (tensors.pop(f"{prefix}.{pname}.{kind}_b{b}") for kind in names.QUANT_SUFFIXES)
                w_t = dequantize(q, s, z, b, hidden if proj < 2 else n, group, torch.float32)  # W^T
                if proj < 2:
                    full[start : start + n] = w_t.t()
                else:
                    full[:, start : start + n] = w_t.t()
                start += n
            tensors[f"{prefix}.{pname}.weight"] = full

    for layer, spec in qc["layers"].items():
        for e, slabs in enumerate(spec["expert_slabs"]):
            dense(
                names.expert_prefix(arch, int(layer), e),
                names.proj_names(arch),
                slabs,
                qc["original_intermediate_size"],
            )
        if spec.get("shared_slabs") is not None:
            dense(
                names.shared_prefix(arch, int(layer)),
                ("gate_proj", "up_proj", "down_proj"),
                spec["shared_slabs"],
                qc["original_shared_intermediate_size"],
            )
    shutil.copytree(mixed_dir, out_dir, ignore=shutil.ignore_patterns("*.safetensors*", "camera_report.json"))
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


def _engine(model_dir: Path, mode: str, seqs: int) -> dict[str, Any]:
    """One engine of these runs (keyed by its directory): ``mode`` eager or compile, with the memory probe."""
    return {
        "id": str(model_dir),
        "model": str(model_dir),
        "engine": {"enforce_eager": mode == "eager", "max_num_seqs": seqs},
        "probes": {"memory": "expert_memory"},
        "labels": {"mode": mode},
    }


@functools.cache
def run_mixed_cases(root: Path) -> dict[str, dict[str, Any]]:
    """Build every case's checkpoint and serve them all in ONE vLLM subprocess (once per session).

    Returns case -> {"dir", "original", "result" (the vLLM run), and for
    :data:`STOCK_VLLM_ORACLE` cases "dense" and "stock" (stock vLLM on the dense equivalent)}.
    Raises RuntimeError with the log tail if the subprocess fails.
    """
    from integration_helpers import run_engines, vllm_env

    root.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    engines = []
    for case, (arch, ratio, mode, seqs) in CASES.items():
        original, qdir = build_mixed(arch, root, prune_ratio=ratio)
        runs[case] = {"dir": qdir, "original": original}
        engines.append(_engine(qdir, mode, seqs))
        if case in STOCK_VLLM_ORACLE:
            dense = root / f"{qdir.name}-dense"
            if not dense.exists():
                write_dequantized_dense(qdir, dense)
            runs[case]["dense"] = dense
            engines.append(_engine(dense, mode, seqs))
    env = vllm_env("deepseek_v2")  # VLLM_MLA_DISABLE only affects MLA models
    env["VLLM_CACHE_ROOT"] = str(root / "vllm-cache")  # compile for real, no cached artifacts
    start = time.perf_counter()
    by_model = run_engines(engines, root, "results", env, TIMEOUT_S, "vLLM CAMERA-Q runs")["runs"]
    for info in runs.values():
        info["result"] = by_model[str(info["dir"])]
        if "dense" in info:
            info["stock"] = by_model[str(info["dense"])]
    runs["_process_s"] = {"seconds": round(time.perf_counter() - start, 1), "engines": len(engines)}
    return runs


def build_pruned_bf16(arch: str, root: Path, ratio: float = 0.5) -> Path:
    """A CAMERA-P checkpoint of a tiny ``arch`` model saved in bf16 (reused if present).

    Served with ``--dtype float32``, its weights are exact in bf16, so the plugin can hold
    them as a bf16 dense slab while the fp32 oracle computes on the very same values.
    """
    from integration_helpers import prune_checkpoint

    out = root / f"{arch}-bf16-p{int(ratio * 100)}"
    if not (out / "config.json").exists():
        original = build_tiny_moe(arch, root / f"{arch}-bf16-orig", dtype=torch.bfloat16)
        prune_checkpoint(original, out, ratio)
    return out


@functools.cache
def run_forced_backend(root: Path, backend: str) -> dict[str, Any]:
    """The tiny Qwen3-MoE CAMERA-Q and CAMERA-P (bf16) checkpoints served with
    ``CAMERA_VLLM_BACKEND=backend`` (eager, one subprocess).  ``triton`` on this CPU machine
    adds ``TRITON_INTERPRET=1``: the CUDA code path (the launcher, ``moe_align``, the kernels)
    inside a real vLLM engine.  Returns ``{"q": {...}, "p": {...}}`` with ``dir`` and ``result``."""
    from integration_helpers import run_engines, vllm_env

    root.mkdir(parents=True, exist_ok=True)
    _, qdir = build_mixed("qwen3_moe", root)
    pdir = build_pruned_bf16("qwen3_moe", root)
    env = vllm_env("qwen3_moe")
    env["CAMERA_VLLM_BACKEND"] = backend
    if backend == "triton" and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    raw = run_engines(
        [_engine(qdir, "eager", 4), _engine(pdir, "eager", 4)],
        root,
        f"results-{backend}",
        env,
        TIMEOUT_S,
        f"vLLM CAMERA-Q and CAMERA-P with CAMERA_VLLM_BACKEND={backend}",
    )["runs"]
    return {"q": {"dir": qdir, "result": raw[str(qdir)]}, "p": {"dir": pdir, "result": raw[str(pdir)]}}
