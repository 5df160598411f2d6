"""Which backend computes CAMERA-Q experts in a served model: ``CAMERA_VLLM_BACKEND``.

``auto`` (the default) lets :func:`camera_kernels.choose_backend` pick per call: the Triton
kernels for CUDA tensors, the compiled CPU kernel for CPU tensors, the torch reference where
neither can run.  ``triton``, ``cpu`` or ``reference`` force one in every vLLM process (the
variable is inherited by the engine core and its workers); a forced backend that cannot run
raises instead of falling back.  ``triton`` on a CPU machine runs Triton's interpreter when
``TRITON_INTERPRET=1`` is set too: the CUDA code path inside a real vLLM engine without a GPU.

CAMERA-P layers keep their own paths (vLLM's ``cpu_fused_moe`` on width buckets, or the
exact torch loop); the variable does not apply to them.
"""

from __future__ import annotations

import os

from camera_kernels.dispatch import BACKENDS

__all__ = ["BACKENDS", "BACKEND_ENV", "expert_backend"]

BACKEND_ENV = "CAMERA_VLLM_BACKEND"


def expert_backend() -> str:
    """The backend ``CAMERA_VLLM_BACKEND`` asks for (``auto`` when unset); raises ``ValueError``
    naming the variable for any other value."""
    value = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={os.environ[BACKEND_ENV]!r}: choose one of {', '.join(BACKENDS)}")
    return value
