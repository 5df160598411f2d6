"""camera_kernels: mixed-precision slab MoE kernels (torch reference, compiled CPU, Triton).

Installed as ``camera_kernels`` (never as a top-level ``kernels``); imports only
torch and triton so it runs on machines without vLLM.  Importing the package imports
neither torch nor triton: the public names below load their module on first access,
and the Triton modules (:mod:`.moe_slab`, :mod:`.launch`) load on first use.
:mod:`.geometry` (bit-widths, packed rows, groups) is plain Python.

Public API:

* :class:`SlabMoEWeights`, :class:`SlabLayout`, :class:`SlabTensors` - the runtime layout;
* :func:`slab_moe` - the layer, choosing the backend (:func:`choose_backend`);
* :func:`slab_moe_reference` - the pure-torch path (fallback, oracle);
* :func:`slab_moe_cpu` - the compiled CPU kernel (C++ extension built on first use:
  :func:`ensure_cpu_kernel`, :func:`cpu_kernel_available`, :func:`cpu_kernel_reason`).

Test and benchmark helpers (random layers, min-max RTN, dequantization) live in
:mod:`.testing`, outside the runtime contract.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> submodule that defines it.  Loaded on first access (PEP 562), so that
# ``import camera_kernels.geometry`` (the checkpoint format's shape arithmetic) does not
# import torch.
_EXPORTS = {
    "SlabLayout": "slab_weights",
    "SlabMoEWeights": "slab_weights",
    "SlabTensors": "slab_weights",
    "choose_backend": "dispatch",
    "cpu_kernel_available": "cpu_slab",
    "cpu_kernel_reason": "cpu_slab",
    "ensure_cpu_kernel": "cpu_slab",
    "slab_moe": "dispatch",
    "slab_moe_cpu": "cpu_slab",
    "slab_moe_reference": "reference",
}

__all__ = [
    "SlabLayout",
    "SlabMoEWeights",
    "SlabTensors",
    "choose_backend",
    "cpu_kernel_available",
    "cpu_kernel_reason",
    "ensure_cpu_kernel",
    "slab_moe",
    "slab_moe_cpu",
    "slab_moe_reference",
]

if TYPE_CHECKING:
    from .cpu_slab import cpu_kernel_available, cpu_kernel_reason, ensure_cpu_kernel, slab_moe_cpu
    from .dispatch import choose_backend, slab_moe
    from .reference import slab_moe_reference
    from .slab_weights import SlabLayout, SlabMoEWeights, SlabTensors


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
