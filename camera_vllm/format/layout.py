"""Slab layout: shapes of every tensor a CAMERA checkpoint stores for one expert.

Routed expert ``e`` of layer ``L`` and the shared expert hold their micro-experts in
slabs, widest bit-width first (``CameraQuantConfig.bits``).  For a slab of ``n``
micro-experts at ``b`` bits, hidden size ``H`` and group size ``G`` (bit layout:
:mod:`camera_kernels.packing`; the shape arithmetic, torch-free, is
:mod:`camera_kernels.geometry`):

=====================  ===========================  ==========================
tensor                 shape                         dtype
=====================  ===========================  ==========================
gate/up ``qweight_bB``  ``[ceil(H/32)*b, n]``       int32 (W^T packed along H)
gate/up ``scales_bB``   ``[ceil(H/G), n]``          float16
gate/up ``zeros_bB``    ``[ceil(H/G), n]``          float16
down ``qweight_bB``     ``[ceil(n/32)*b, H]``       int32 (W^T packed along n)
down ``scales_bB``      ``[ceil(n/G), H]``          float16
down ``zeros_bB``       ``[ceil(n/G), H]``          float16
=====================  ===========================  ==========================

Slabs of size 0 are not stored.  A CAMERA-P (``scheme: prune``) expert stores plain
HF tensors ``gate/up .weight [n, H]`` and ``down .weight [H, n]`` in the model dtype;
a width-0 expert stores nothing.  Permuting micro-experts inside an expert (the same
permutation on gate rows, up rows and down columns) is exact, which is why sorting
them into slabs costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from camera_kernels.geometry import num_groups, packed_rows

from .names import QWEIGHT, SCALES, ZEROS, slab_suffix
from .projection import PROJECTIONS, Projection

SCALE_DTYPE_NAME = "float16"
QWEIGHT_DTYPE_NAME = "int32"


@dataclass(frozen=True)
class TensorSpec:
    """Expected name suffix, shape and dtype of one stored tensor."""

    suffix: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, or "model" for the model's dtype


def slab_tensors(proj: int, n: int, bits: int, hidden: int, group_size: int) -> list[TensorSpec]:
    """Tensors of one quantized slab of projection ``proj`` (a :class:`Projection`, or 0/1/2)."""
    if n == 0:
        return []
    if Projection(proj).reads_hidden:
        k, cols = hidden, n
    else:
        k, cols = n, hidden
    g = num_groups(k, group_size)
    return [
        TensorSpec(slab_suffix(QWEIGHT, bits), (packed_rows(k, bits), cols), QWEIGHT_DTYPE_NAME),
        TensorSpec(slab_suffix(SCALES, bits), (g, cols), SCALE_DTYPE_NAME),
        TensorSpec(slab_suffix(ZEROS, bits), (g, cols), SCALE_DTYPE_NAME),
    ]


def expert_tensors(
    slabs: list[int], bits: list[int], hidden: int, group_size: int | None
) -> dict[int, list[TensorSpec]]:
    """All tensors of one expert keyed by :class:`Projection` (equal to 0 gate, 1 up, 2 down)."""
    width = sum(slabs)
    if bits == [16]:
        if width == 0:
            return {p: [] for p in PROJECTIONS}
        return {
            p: [TensorSpec("weight", (width, hidden) if p.reads_hidden else (hidden, width), "model")]
            for p in PROJECTIONS
        }
    if group_size is None:
        raise ValueError(f"a quantized expert (bits {bits}) needs a group size, got None")
    return {
        proj: [t for n, b in zip(slabs, bits) for t in slab_tensors(proj, n, b, hidden, group_size)]
        for proj in PROJECTIONS
    }


def stored_bytes(
    slabs: list[int], bits: list[int], hidden: int, group_size: int | None, model_bytes: int = 2
) -> int:
    """Bytes one expert occupies on disk (packed weights, scales and zeros all counted)."""
    total = 0
    for specs in expert_tensors(slabs, bits, hidden, group_size).values():
        for t in specs:
            elem = model_bytes if t.dtype == "model" else (4 if t.dtype == QWEIGHT_DTYPE_NAME else 2)
            n = 1
            for d in t.shape:
                n *= d
            total += n * elem
    return total
