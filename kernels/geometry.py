"""Slab geometry in plain Python: bit-widths, packed rows and quantization groups.

The arithmetic of the bit layout (:mod:`.packing` describes it) without torch, so the
checkpoint format (``camera_vllm.format``) can compute tensor shapes and tensor-parallel
splits without importing torch.  :mod:`.packing` re-exports every name here.
"""

from __future__ import annotations

__all__ = [
    "DENSE_BITS",
    "PACK_BLOCK",
    "QUANT_BITS",
    "SUPPORTED_BITS",
    "bit_parts",
    "num_groups",
    "packed_rows",
    "scale_rows",
]

#: K values per packing block: each block of 32 K-rows becomes ``bits`` int32 rows.
PACK_BLOCK = 32
#: Bit-widths with a quantization grid (codes, per-group scales and zeros).
QUANT_BITS = (1, 2, 3, 4, 8)
#: The dense slab: raw 16-bit float weights, no scales.
DENSE_BITS = 16
SUPPORTED_BITS = QUANT_BITS + (DENSE_BITS,)


def bit_parts(bits: int) -> tuple[tuple[int, int], ...]:
    """Power-of-two parts of ``bits`` as ``(width, shift)`` pairs, widest first."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit-width {bits}; supported: {SUPPORTED_BITS}")
    parts, shift, rest = [], 0, bits
    for width in (16, 8, 4, 2, 1):
        if rest >= width:
            parts.append((width, shift))
            shift += width
            rest -= width
    return tuple(parts)


def packed_rows(k: int, bits: int) -> int:
    """Number of int32 rows that hold ``k`` values of ``bits`` bits along K."""
    return -(-k // PACK_BLOCK) * bits


def num_groups(k: int, group_size: int) -> int:
    """Number of quantization groups along a K of length ``k`` (last may be short)."""
    return -(-k // group_size)


def scale_rows(k: int, bits: int, group_size: int) -> int:
    """Rows of the scale/zero tensors of a slab with K = ``k``: its groups, none when dense."""
    return 0 if bits == DENSE_BITS else num_groups(k, group_size)
