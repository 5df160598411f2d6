"""CAMERA-Q core: group-wise RTN and GPTQ on K-major matrices, energy-based bit allocation,
and the slab tensors of one expert.  Pure tensor code: no model, no I/O, no vLLM.

Pipeline for one MoE layer::

    alloc = allocate_layer(energies, hidden, group_size, avg_bits=2.5)      # or bits/fractions
    for e, ea in enumerate(alloc.experts):
        tensors = build_expert_slabs(gate[e], up[e], down[e], ea, group_size, "gptq", hessians[e])
    # config: bits=alloc.bits, expert_slabs=alloc.expert_slabs, shared_slabs=alloc.shared_slabs
"""

from __future__ import annotations

from .allocate import (
    DEFAULT_CANDIDATE_BITS,
    DEFAULT_LEVEL_ERROR,
    ExpertAllocation,
    LayerAllocation,
    allocate_layer,
    bits_per_weight,
    drop_unused_bits,
)
from .gptq import HessianAccumulator, PreparedHessian, gptq_quantize, prepare_hessian
from .rtn import DEFAULT_CLIP_RATIOS, QuantizedMatrix, dequantize_codes, quantize_rtn
from .slabs import (
    ExpertHessians,
    SlabQuantOptions,
    build_down_slabs,
    build_expert_slabs,
    build_gate_up_slabs,
    dequantize_expert_slabs,
    permute_expert,
)

__all__ = [
    "DEFAULT_CANDIDATE_BITS",
    "DEFAULT_CLIP_RATIOS",
    "DEFAULT_LEVEL_ERROR",
    "ExpertAllocation",
    "ExpertHessians",
    "HessianAccumulator",
    "LayerAllocation",
    "PreparedHessian",
    "QuantizedMatrix",
    "SlabQuantOptions",
    "allocate_layer",
    "bits_per_weight",
    "build_down_slabs",
    "build_expert_slabs",
    "build_gate_up_slabs",
    "dequantize_codes",
    "dequantize_expert_slabs",
    "drop_unused_bits",
    "gptq_quantize",
    "permute_expert",
    "prepare_hessian",
    "quantize_rtn",
]
