"""How a CAMERA checkpoint is split across tensor-parallel ranks (part of the format spec).

Tensor parallelism splits every expert along its micro-expert (intermediate) axis: rank
``r`` of ``P`` keeps a contiguous range of each expert's kept micro-experts (its rows of
``W_gate``/``W_up`` and the same columns of ``W_down``), computes a partial expert
output, and vLLM's all-reduce adds the partials.  The sum over ranks is the full expert
because the down projection is linear in the micro-experts.  No micro-expert is
dropped, whatever the widths.

The rules (``balanced(k, P, r)``: the first ``k mod P`` ranks take ``ceil(k / P)`` units,
the others ``floor(k / P)``, in rank order, contiguously):

* **CAMERA-P** (unquantized, ``bits == [16]``): the unit is one micro-expert.  An expert
  of width ``n`` gives rank ``r`` the micro-experts ``balanced(n, P, r)``.  The shared
  expert is split the same way.
* **CAMERA-Q** (slabs): the unit is one quantization group of the down projection,
  ``G = group_size`` micro-experts (the last group of a slab may be shorter).  Each slab
  of ``n`` micro-experts has ``ceil(n / G)`` groups; rank ``r`` takes groups
  ``balanced(ceil(n / G), P, r)``, i.e. micro-experts ``[g_lo * G, min(g_hi * G, n))`` of
  that slab.  A group, with its scale and zero, is therefore never split across ranks;
  since ``G`` is a multiple of 32 (the packing block), neither is a packed ``int32`` row
  of the down projection.  Every slab of an expert is split independently, and a rank's
  slabs keep the bit order, so each rank holds an ordinary (smaller) slab layout.  A
  rank may get an empty share of a slab (fewer groups than ranks).

Expert parallelism needs no rule here: whole experts live on one rank, and vLLM's MoE
tensor-parallel size is 1 then.

Pure Python: no torch, no vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence

from camera_kernels.packing import PACK_BLOCK, num_groups, packed_rows


def _check_rank(tp_size: int, tp_rank: int) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tensor-parallel rank {tp_rank} is not in [0, {tp_size})")


def balanced_range(count: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """``[lo, hi)`` of ``count`` units held by ``tp_rank``: contiguous, first ``count % tp_size`` ranks get one more."""
    _check_rank(tp_size, tp_rank)
    if count < 0:
        raise ValueError(f"cannot split a negative count {count}")
    base, extra = divmod(count, tp_size)
    lo = tp_rank * base + min(tp_rank, extra)
    return lo, lo + base + (1 if tp_rank < extra else 0)


def channel_range(width: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """CAMERA-P: micro-experts ``[lo, hi)`` of an expert of ``width`` held by ``tp_rank``."""
    return balanced_range(width, tp_size, tp_rank)


def slab_groups(size: int, group_size: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """CAMERA-Q: quantization groups ``[g_lo, g_hi)`` of a slab of ``size`` held by ``tp_rank``."""
    if group_size <= 0 or group_size % PACK_BLOCK:
        raise ValueError(f"group_size must be a positive multiple of {PACK_BLOCK}, got {group_size}")
    return balanced_range(num_groups(size, group_size), tp_size, tp_rank)


def slab_range(size: int, group_size: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """CAMERA-Q: micro-experts ``[lo, hi)`` of a slab of ``size`` held by ``tp_rank`` (whole groups)."""
    g_lo, g_hi = slab_groups(size, group_size, tp_size, tp_rank)
    return min(g_lo * group_size, size), min(g_hi * group_size, size)


def shard_width(width: int, tp_size: int, tp_rank: int) -> int:
    """CAMERA-P: how many micro-experts of an expert of ``width`` ``tp_rank`` holds."""
    lo, hi = channel_range(width, tp_size, tp_rank)
    return hi - lo


def shard_slabs(slabs: Sequence[int], group_size: int, tp_size: int, tp_rank: int) -> tuple[int, ...]:
    """CAMERA-Q: the slab sizes (same bit order) of ``tp_rank``'s share of one expert."""
    out = []
    for n in slabs:
        lo, hi = slab_range(int(n), group_size, tp_size, tp_rank)
        out.append(hi - lo)
    return tuple(out)


def down_packed_rows(size: int, bits: int, group_size: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a down-projection ``qweight_bB [packed_rows(size, b), H]`` held by ``tp_rank``."""
    g_lo, _ = slab_groups(size, group_size, tp_size, tp_rank)
    lo, hi = slab_range(size, group_size, tp_size, tp_rank)
    # A group is group_size // 32 whole packing blocks of ``bits`` rows each.
    # (An empty share sits at the end.)
    start = min(g_lo * (group_size // PACK_BLOCK) * bits, packed_rows(size, bits))
    return start, start + packed_rows(hi - lo, bits)


def down_group_rows(size: int, group_size: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a down-projection ``scales_bB`` / ``zeros_bB [ceil(size / G), H]`` held by ``tp_rank``."""
    return slab_groups(size, group_size, tp_size, tp_rank)
