"""Which backend computes the experts of a served model: ``CAMERA_VLLM_BACKEND``.

``auto`` (the default) lets :func:`camera_kernels.choose_backend` pick per call: the Triton
kernels for CUDA tensors, the compiled CPU kernel for CPU tensors, the torch reference where
neither can run.  ``triton``, ``cpu`` or ``reference`` force one in every vLLM process (the
variable is inherited by the engine core and its workers); a forced backend that cannot run
raises instead of falling back.  ``triton`` on a CPU machine runs Triton's interpreter when
``TRITON_INTERPRET=1`` is set too: the CUDA code path inside a real vLLM engine without a GPU.

CAMERA-P layers (:func:`prune_on_slabs`): off CPU, and whenever ``triton`` or ``reference``
is forced, they become one 16-bit dense slab per layer and run on the same slab kernels as
CAMERA-Q (Triton on CUDA: fused, no host syncs, CUDA-graph capturable).  On CPU under
``auto`` or ``cpu`` they keep their CPU paths: vLLM's ``cpu_fused_moe`` on width buckets
(bf16) or the exact torch loop (fp32).
"""

from __future__ import annotations

import os

from camera_kernels.dispatch import BACKENDS

__all__ = ["BACKENDS", "BACKEND_ENV", "expert_backend", "prune_on_slabs"]

BACKEND_ENV = "CAMERA_VLLM_BACKEND"


def expert_backend() -> str:
    """The backend ``CAMERA_VLLM_BACKEND`` asks for (``auto`` when unset); raises ``ValueError``
    naming the variable for any other value."""
    value = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={os.environ[BACKEND_ENV]!r}: choose one of {', '.join(BACKENDS)}")
    return value


def prune_on_slabs(device_type: str) -> bool:
    """Whether CAMERA-P layers on ``device_type`` run as a dense slab on the slab kernels.

    Raises ``ValueError`` for ``CAMERA_VLLM_BACKEND=cpu`` off CPU (as the CAMERA-Q layers would).
    """
    setting = expert_backend()
    if setting == "cpu" and device_type != "cpu":
        raise ValueError(
            f"{BACKEND_ENV}=cpu: the CPU expert paths need CPU tensors, the model is on {device_type}"
        )
    return setting in ("triton", "reference") or (setting == "auto" and device_type != "cpu")
