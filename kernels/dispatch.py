"""The one backend chooser: ``slab_moe`` runs the Triton kernel on CUDA, the compiled CPU kernel on CPU.

The pure-torch reference runs where neither can (no triton, no C++ compiler) or on request.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

import torch

from .packing import DENSE_BITS
from .slab_weights import SlabMoEWeights

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "cpu", "reference")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_logged: set[tuple[str, str]] = set()


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    """Triton's interpreter is on: by environment, or by ``triton.knobs`` once triton is imported."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    knobs = getattr(sys.modules.get("triton"), "knobs", None)
    return bool(getattr(getattr(knobs, "runtime", None), "interpret", False))


def choose_backend(
    x: torch.Tensor, backend: str = "auto", weights: SlabMoEWeights | None = None
) -> tuple[str, str]:
    """``(backend, reason)`` for activations ``x``.

    ``backend``: ``"auto"``, ``"triton"``, ``"cpu"``, ``"reference"``.

    ``auto`` picks ``cpu`` (the compiled kernel of :mod:`.cpu_slab`) for CPU tensors when it
    builds here, ``triton`` for CUDA tensors of a supported dtype when triton is installed,
    else ``reference`` with the reason.  An explicit ``triton`` or ``cpu`` that cannot run
    raises ``ValueError`` with the reason instead of falling back silently (``triton`` on CPU
    runs only under ``TRITON_INTERPRET=1``, for tests).  On CPU, ``auto`` builds or loads
    the extension on first use (see :func:`.cpu_slab.ensure_cpu_kernel`).  With ``weights``
    given, a layer with 16-bit (dense) slabs does not go to the compiled CPU kernel, which
    has none (``auto`` on CPU picks the reference for it).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "reference":
        return "reference", "requested"
    if backend == "cpu" or (backend == "auto" and x.device.type == "cpu"):
        from .cpu_slab import cpu_kernel_available, cpu_kernel_reason

        cpu_problem = None
        if x.device.type != "cpu":
            cpu_problem = f"tensors are on {x.device.type}, the compiled CPU kernel needs CPU tensors"
        elif not x.is_floating_point():
            cpu_problem = f"x must be a floating-point tensor, got {x.dtype}"
        elif weights is not None and DENSE_BITS in weights.bits:
            cpu_problem = "the compiled CPU kernel has no 16-bit (dense) slabs"
        elif not cpu_kernel_available():
            cpu_problem = cpu_kernel_reason()
        if backend == "cpu":
            if cpu_problem:
                raise ValueError(f"backend='cpu' cannot run: {cpu_problem}")
            return "cpu", "requested"
        if cpu_problem is None:
            return "cpu", "CPU tensors and the compiled CPU kernel available"
        return "reference", cpu_problem
    problem = None
    if not _triton_available():
        problem = "triton is not installed"
    elif x.dtype not in _TRITON_DTYPES:
        problem = f"the Triton kernel takes {', '.join(str(d) for d in _TRITON_DTYPES)}, not {x.dtype}"
    elif not x.is_cuda and not (backend == "triton" and _interpreting()):
        problem = f"tensors are on {x.device.type}, the Triton kernel needs CUDA"
    if backend == "triton":
        if problem:
            raise ValueError(f"backend='triton' cannot run: {problem}")
        return "triton", "requested" + (" (TRITON_INTERPRET=1)" if not x.is_cuda else "")
    if problem:
        return "reference", problem
    return "triton", "CUDA tensors and triton available"


def slab_moe(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    weights: SlabMoEWeights,
    backend: str = "auto",
) -> torch.Tensor:
    """Mixed-precision slab MoE layer: ``out[t] = sum_k topk_weights[t, k] * Expert_{topk_ids[t, k]}(x[t])``.

    :param x: ``[T, H]`` activations; the output has the same shape and dtype.
    :param topk_weights: ``[T, K]`` router weights.
    :param topk_ids: ``[T, K]`` int32/int64 expert ids (``-1`` or any id outside
        ``[0, E)``: not a local expert, skipped).
    :param weights: the layer (:class:`SlabMoEWeights`) on ``x``'s device.
    :param backend: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"reference"`` (see
        :func:`choose_backend`; the choice and its reason are logged once per distinct pair;
        a failed CPU build warns once from :mod:`.cpu_slab`).
    """
    name, reason = choose_backend(x, backend, weights)
    if (name, reason) not in _logged:
        _logged.add((name, reason))
        # A failed CPU build already warned once (camera_kernels.cpu_slab); a CUDA fallback has not.
        level = logging.WARNING if (name == "reference" and x.is_cuda) else logging.INFO
        logger.log(level, "camera slab MoE backend: %s (%s)", name, reason)
    if name == "triton":
        from .launch import slab_moe_triton

        return slab_moe_triton(x, topk_weights, topk_ids, weights)
    if name == "cpu":
        from .cpu_slab import slab_moe_cpu

        return slab_moe_cpu(x, topk_weights, topk_ids, weights)
    from .reference import slab_moe_reference

    return slab_moe_reference(x, topk_weights, topk_ids, weights)
