"""camera_kernels: mixed-precision slab MoE kernels (torch reference, compiled CPU, Triton).

Installed as ``camera_kernels`` (never as a top-level ``kernels``); imports only
torch and triton so it runs on machines without vLLM.  Importing the package does
not import triton: the Triton modules (:mod:`.moe_slab`, :mod:`.launch`) load on
first use.

Public API:

* :class:`SlabMoEWeights`, :class:`SlabLayout`, :class:`SlabTensors` - the runtime layout;
* :func:`slab_moe` - the layer, choosing the backend (:func:`choose_backend`);
* :func:`slab_moe_reference` - the pure-torch path (fallback, oracle);
* :func:`slab_moe_cpu` - the compiled CPU kernel (C++ extension built on first use:
  :func:`ensure_cpu_kernel`, :func:`cpu_kernel_available`, :func:`cpu_kernel_reason`).
"""

from .cpu_slab import cpu_kernel_available, cpu_kernel_reason, ensure_cpu_kernel, slab_moe_cpu
from .dispatch import choose_backend, slab_moe
from .reference import slab_moe_reference
from .slab_weights import SlabLayout, SlabMoEWeights, SlabTensors, quantize_rtn

__all__ = [
    "SlabLayout",
    "SlabMoEWeights",
    "SlabTensors",
    "choose_backend",
    "cpu_kernel_available",
    "cpu_kernel_reason",
    "ensure_cpu_kernel",
    "quantize_rtn",
    "slab_moe",
    "slab_moe_cpu",
    "slab_moe_reference",
]
