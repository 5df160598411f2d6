"""camera_kernels: mixed-precision slab MoE kernels (torch reference and Triton).

Installed as ``camera_kernels`` (never as a top-level ``kernels``); imports only
torch and triton so it runs on machines without vLLM.  Importing the package does
not import triton: the Triton modules (:mod:`.moe_slab`, :mod:`.launch`) load on
first use.

Public API:

* :class:`SlabMoEWeights`, :class:`SlabLayout`, :class:`SlabTensors` - the runtime layout;
* :func:`slab_moe` - the layer, choosing the backend (:func:`choose_backend`);
* :func:`slab_moe_reference` - the pure-torch path (CPU serving, oracle).
"""

from .dispatch import choose_backend, slab_moe
from .reference import slab_moe_reference
from .slab_weights import SlabLayout, SlabMoEWeights, SlabTensors, quantize_rtn

__all__ = [
    "SlabLayout",
    "SlabMoEWeights",
    "SlabTensors",
    "choose_backend",
    "quantize_rtn",
    "slab_moe",
    "slab_moe_reference",
]
