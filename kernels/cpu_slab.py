"""Compiled CPU slab MoE: the math of :func:`.reference.slab_moe_reference` on the packed codes.

The C++ source is ``csrc/slab_moe_cpu.cpp``, built on first use with
``torch.utils.cpp_extension.load`` (g++ ``-O3 -march=native -fopenmp``, ninja) into torch's
extension cache, so a process pays the build once per machine and a cached load afterwards.
It never dequantizes a slab: codes are read with one AND per 16 weights and reduced per
quantization group (see the source's header), and one call runs the whole layer, so decode
pays no per-expert Python overhead.  On the speed model's layer (``bench/cpu_kernel_bench.py``,
CAMERA-Q 2.25 bit, cold caches, 1-2 threads) it runs 2.2-2.6x faster than vLLM's dense bf16
MoE kernel at 1 and 8 tokens and 1.1-1.3x at 64 with AVX-512; its AVX2 build runs 1.6-2.0x and
1.0-1.1x faster than vLLM's AVX2 library; the torch reference runs at 0.05-0.15x.
Call :func:`ensure_cpu_kernel` at model load to keep the build (or the cached load) off the
first request.

``CAMERA_VLLM_CPU_ISA`` picks the instruction set it is built for: ``native`` (default,
``-march=native``) or ``avx2`` (``-march=haswell`` without AVX-512: AVX2, FMA, F16C), which
runs on any x86-64 CPU from 2013 on and lets an AVX-512 machine test the AVX2 code path.
Each variant has its own extension cache name (ISA plus a hash of the CPU flags).

``CAMERA_VLLM_CPU_KERNEL=0`` disables it (the same switch turns off CAMERA-P's CPU kernel path
in the plugin).  If the extension cannot be built (no compiler, no ninja),
:func:`cpu_kernel_available` is False with the reason in :func:`cpu_kernel_reason` and
:func:`.dispatch.slab_moe` falls back to the reference; one warning says why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

from .packing import DENSE_BITS
from .slab_weights import SlabMoEWeights, check_moe_inputs

__all__ = [
    "ISA_CFLAGS",
    "ISA_ENV",
    "cpu_kernel_available",
    "cpu_kernel_isa",
    "cpu_kernel_build_seconds",
    "cpu_kernel_reason",
    "ensure_cpu_kernel",
    "load_cpu_kernel_variant",
    "slab_moe_cpu",
]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).resolve().parent / "csrc" / "slab_moe_cpu.cpp"
_COMMON_CFLAGS = ["-O3", "-fopenmp", "-std=c++17"]
#: ``CAMERA_VLLM_CPU_ISA`` values and their compiler flags.
ISA_CFLAGS: dict[str, list[str]] = {
    "native": ["-march=native"],
    "avx2": ["-march=haswell", "-mtune=native", "-mno-avx512f"],
}
ISA_ENV = "CAMERA_VLLM_CPU_ISA"
_LOCK = threading.Lock()
_variants: dict[str, ModuleType] = {}  # ISA -> module built by load_cpu_kernel_variant
_module: ModuleType | None = None
_reason: str | None = None  # None: not tried yet
_build_seconds: float | None = None
#: Most (token, expert) pairs the kernel holds scratch for at once (about 40 KB each at
#: H = 1024; the kernel also caps the scratch at 32 MB); larger batches (prefill) run in
#: several passes inside the one call.  The scratch is kept between calls.
MAX_PAIRS_PER_PASS = 1024


def _cpu_tag() -> str:
    """Short hash of this CPU's feature flags: ``-march=native`` builds must not be shared
    between CPUs with different instruction sets through one extension cache."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _first_error(message: str) -> str:
    """The line of a (long) build log that says what went wrong, else its first line."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    for ln in lines[1:]:
        if re.search(r"error|not found|no such file|cannot", ln, re.IGNORECASE):
            return ln[:200]
    return lines[0][:200] if lines else "no message"


def cpu_kernel_isa() -> str:
    """The ISA this process builds the kernel for (``CAMERA_VLLM_CPU_ISA``, default ``native``)."""
    isa = os.environ.get(ISA_ENV, "native").strip().lower() or "native"
    if isa not in ISA_CFLAGS:
        raise ValueError(f"{ISA_ENV}={isa!r} is not one of {sorted(ISA_CFLAGS)}")
    return isa


def _build(isa: str, verbose: bool) -> ModuleType:
    from torch.utils.cpp_extension import load

    if not _SOURCE.is_file():
        raise FileNotFoundError(f"C++ source {_SOURCE} is missing from the installed package")
    return load(
        name=f"camera_slab_moe_cpu_{isa}_{_cpu_tag()}",
        sources=[str(_SOURCE)],
        extra_cflags=_COMMON_CFLAGS + ISA_CFLAGS[isa],
        extra_ldflags=["-fopenmp"],
        verbose=verbose,
    )


def load_cpu_kernel_variant(isa: str) -> ModuleType:
    """Build or load the extension for ``isa`` (a key of :data:`ISA_CFLAGS`), whatever this
    process serves with; raises on a failed build.  Tests use it to run the AVX2 code path on
    an AVX-512 machine."""
    if isa not in ISA_CFLAGS:
        raise ValueError(f"unknown CPU kernel ISA {isa!r}; expected one of {sorted(ISA_CFLAGS)}")
    with _LOCK:
        if isa not in _variants:
            _variants[isa] = _build(isa, verbose=False)
        return _variants[isa]


def ensure_cpu_kernel() -> bool:
    """Build or load the extension once per process; True when it is usable.

    Cheap after the first call.  A failed build is not retried in the same process; its
    reason is in :func:`cpu_kernel_reason` and is logged once as a warning.
    """
    global _module, _reason, _build_seconds
    if _reason is not None:
        return _module is not None
    with _LOCK:
        if _reason is not None:
            return _module is not None
        if os.environ.get("CAMERA_VLLM_CPU_KERNEL", "1") == "0":
            _reason = "the compiled CPU kernel is disabled (CAMERA_VLLM_CPU_KERNEL=0)"
            logger.warning("camera slab MoE: %s", _reason)
            return False
        t0 = time.perf_counter()
        try:
            isa = cpu_kernel_isa()
            verbose = os.environ.get("CAMERA_VLLM_CPU_KERNEL_VERBOSE", "0") not in ("", "0")
            if isa not in _variants:
                # A first build on a machine is silent for a minute or more: say what is happening.
                logger.info(
                    "camera slab MoE: building the compiled CPU kernel (%s) with g++, or loading it from "
                    "torch's extension cache; a first build takes 1-3 minutes",
                    isa,
                )
            _module = _variants.get(isa) or _build(isa, verbose)
            _variants[isa] = _module
            _build_seconds = time.perf_counter() - t0
            _reason = f"compiled CPU kernel ({isa}) loaded in {_build_seconds:.1f} s"
            logger.info("camera slab MoE: %s", _reason)
        except Exception as exc:  # no compiler, no ninja, build error: fall back, say why once
            _module = None
            _reason = (
                f"the CPU kernel could not be built ({type(exc).__name__}: {_first_error(str(exc))}; "
                "CAMERA_VLLM_CPU_KERNEL_VERBOSE=1 shows the build log)"
            )
            logger.warning("camera slab MoE: %s; using the pure-torch reference", _reason)
        return _module is not None


def cpu_kernel_available() -> bool:
    """Whether the compiled CPU kernel can run here (builds or loads it on first call)."""
    return ensure_cpu_kernel()


def cpu_kernel_reason() -> str:
    """Why the kernel is or is not available (builds or loads it on first call)."""
    ensure_cpu_kernel()
    assert _reason is not None
    return _reason


def cpu_kernel_build_seconds() -> float | None:
    """Seconds the build (or cached load) took in this process; None if it failed or has not run."""
    return _build_seconds


def slab_moe_cpu(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    weights: SlabMoEWeights,
    isa: str | None = None,
) -> torch.Tensor:
    """``out[t] = sum_k topk_weights[t, k] * Expert_{topk_ids[t, k]}(x[t])`` on CPU, fp32 math.

    Same contract as :func:`.reference.slab_moe_reference`: ``x [T, H]`` (bf16/fp16/fp32),
    ``topk_weights``/``topk_ids [T, K]``; ids outside ``[0, E)`` contribute nothing; the
    output is ``[T, H]`` in ``x.dtype``.  Raises ``RuntimeError`` when the extension is not
    available (use :func:`.dispatch.slab_moe` for the fallback).  ``isa`` runs that variant
    (:func:`load_cpu_kernel_variant`) instead of the process's own build.
    """
    if isa is not None:
        module = load_cpu_kernel_variant(isa)
    elif not ensure_cpu_kernel():
        raise RuntimeError(f"slab_moe_cpu: {_reason}")
    else:
        module = _module
    check_moe_inputs(x, topk_weights, topk_ids, weights.hidden_size)
    if x.device.type != "cpu" or weights.device.type != "cpu":
        raise ValueError(
            f"slab_moe_cpu needs CPU tensors, got x on {x.device} and weights on {weights.device}"
        )
    lay = weights.layout
    if DENSE_BITS in lay.bits:
        raise ValueError(
            f"slab_moe_cpu has no 16-bit (dense) slabs; layer bits {lay.bits} (use the reference)"
        )
    assert module is not None
    out = module.slab_moe_forward(
        x.to(torch.float32).contiguous(),
        topk_weights.to(torch.float32).contiguous(),
        topk_ids.to(torch.int64).contiguous(),
        list(weights.w13_qweight),
        list(weights.w13_scales),
        list(weights.w13_zeros),
        list(weights.w2_qweight),
        list(weights.w2_scales),
        list(weights.w2_zeros),
        list(lay.bits),
        weights.slab_sizes,
        weights.col_offsets,
        weights.down_row_offsets,
        weights.down_group_offsets,
        lay.group_size,
        MAX_PAIRS_PER_PASS,
    )
    return out if x.dtype == torch.float32 else out.to(x.dtype)
