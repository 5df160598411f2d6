"""The one check of quantization bit-widths and group sizes.

Every layer that takes ``bits`` or ``group_size`` from a user or a config (the CAMERA-Q
spec, the bit allocator, the quantization_config schema, the sharding helpers) validates
through these two functions, so the rules and their messages live in one place:

* a bit-width is one of :data:`~camera_vllm.format.names.QUANT_BITS`; a list of them is
  non-empty and distinct (and, in a checkpoint config, descending);
* a group size is a positive multiple of :data:`GROUP_MULTIPLE`, the packing block, so a
  group never straddles two packed 32-row blocks.

Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from .names import QUANT_BITS

__all__ = ["GROUP_MULTIPLE", "check_bits", "check_group_size"]

#: Group sizes are multiples of the 32-row packing block (``camera_kernels.packing.PACK_BLOCK``).
GROUP_MULTIPLE = 32


def check_bits(bits: Sequence[int], *, descending: bool = False) -> list[int]:
    """``bits`` as a list, after checking every width is supported and the list is distinct.

    :param descending: also require descending order (how a checkpoint config lists them).
    :raises ValueError: naming the unsupported widths or the offending list.
    """
    out = list(bits)
    bad = [b for b in out if isinstance(b, bool) or b not in QUANT_BITS]
    if bad:
        raise ValueError(f"unsupported bit-width(s) {bad}; supported: {list(QUANT_BITS)}")
    if not out or len(set(out)) != len(out):
        raise ValueError(f"bit-widths must be a non-empty list of distinct values, got {out}")
    if descending and out != sorted(out, reverse=True):
        raise ValueError(f"bits must be distinct and in descending order, got {out}")
    return out


def check_group_size(group_size: object) -> int:
    """``group_size`` after checking it is a positive multiple of :data:`GROUP_MULTIPLE`.

    :raises ValueError: ``group_size must be a positive multiple of 32, got ...``.
    """
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size <= 0
        or group_size % GROUP_MULTIPLE
    ):
        raise ValueError(f"group_size must be a positive multiple of {GROUP_MULTIPLE}, got {group_size}")
    return group_size
