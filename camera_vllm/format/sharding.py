"""How a CAMERA checkpoint is split across tensor-parallel ranks (part of the format spec).

Tensor parallelism splits every expert along its micro-expert (intermediate) axis: rank
``r`` of ``P`` keeps a contiguous range of each expert's kept micro-experts (its rows of
``W_gate``/``W_up`` and the same columns of ``W_down``), computes a partial expert
output, and vLLM's all-reduce adds the partials.  The sum over ranks is the full expert
because the down projection is linear in the micro-experts.  No micro-expert is
dropped, whatever the widths.

**Units.**  CAMERA-P (unquantized, ``bits == [16]``): one micro-expert; each expert is one
item of ``n`` micro-experts.  CAMERA-Q: one quantization group of the down projection,
``G = group_size`` micro-experts (the last group of a slab may be shorter); each slab is
an item of ``ceil(n / G)`` groups, and the slabs of an expert are split independently,
in bit order.  A group, with its scale and zero, is therefore never split across ranks,
and since ``G`` is a multiple of 32 (the packing block) neither is a packed ``int32``
row of the down projection.

**Rule.**  An item of ``k`` units is split contiguously in rank order: every rank takes
``floor(k / P)`` units, and ``k mod P`` ranks take one more.  Those ranks are a cyclic
window starting at a *cursor* ``c``: ranks ``c, c + 1, ..., c + (k mod P) - 1`` (mod
``P``); then ``c`` advances by ``k mod P``.  The cursor starts at 0 for each layer's
routed experts (experts in id order, slabs in bit order inside an expert) and at 0
again for the layer's shared expert.  So every expert and every layer is balanced
across ranks within one unit per item, instead of rank 0 taking every remainder.
A rank's share of an item may be empty (fewer units than ranks), and a rank's share of
an expert is again an ordinary (smaller) ragged expert or slab layout.

Expert parallelism needs no rule here: whole experts live on one rank, and vLLM's MoE
tensor-parallel size is 1 then.

Pure Python (the packing arithmetic only): no vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence

from camera_kernels.geometry import PACK_BLOCK, num_groups, packed_rows

from .quant_params import check_group_size


def _check_rank(tp_size: int, tp_rank: int) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tensor-parallel rank {tp_rank} is not in [0, {tp_size})")


def balanced_range(count: int, tp_size: int, tp_rank: int, first: int = 0) -> tuple[int, int]:
    """``[lo, hi)`` of ``count`` units held by ``tp_rank``.

    Contiguous in rank order; the ``count % tp_size`` ranks ``first, first + 1, ...``
    (cyclically) take one unit more than the others.
    """
    _check_rank(tp_size, tp_rank)
    if count < 0:
        raise ValueError(f"cannot split a negative count {count}")
    base, extra = divmod(count, tp_size)
    takes_extra = [(q - first) % tp_size < extra for q in range(tp_size)]
    lo = tp_rank * base + sum(takes_extra[:tp_rank])
    return lo, lo + base + (1 if takes_extra[tp_rank] else 0)


def layer_shares(
    items: Sequence[Sequence[int]], unit: int, tp_size: int, tp_rank: int
) -> list[list[tuple[int, int]]]:
    """``[lo, hi)`` micro-experts of every item held by ``tp_rank``, with the running cursor.

    :param items: per expert, the sizes (micro-experts) of its items: ``[[n_e]]`` for
        CAMERA-P, the slab sizes ``[[n_e0, n_e1, ...]]`` for CAMERA-Q.
    :param unit: 1 (CAMERA-P) or the group size (CAMERA-Q).
    """
    if unit <= 0:
        raise ValueError(f"the split unit must be positive, got {unit}")
    cursor, out = 0, []
    for sizes in items:
        row = []
        for n in sizes:
            if n < 0:
                raise ValueError(f"cannot split a negative size {n}")
            k = -(-int(n) // unit)
            u_lo, u_hi = balanced_range(k, tp_size, tp_rank, first=cursor)
            cursor = (cursor + k % tp_size) % tp_size
            row.append((min(u_lo * unit, n), min(u_hi * unit, n)))
        out.append(row)
    return out


def prune_shares(widths: Sequence[int], tp_size: int, tp_rank: int) -> list[tuple[int, int]]:
    """CAMERA-P: micro-experts ``[lo, hi)`` of every expert of ``widths`` held by ``tp_rank``."""
    return [row[0] for row in layer_shares([[w] for w in widths], 1, tp_size, tp_rank)]


def mixed_shares(
    expert_slabs: Sequence[Sequence[int]], group_size: int, tp_size: int, tp_rank: int
) -> list[list[tuple[int, int]]]:
    """CAMERA-Q: micro-experts ``[lo, hi)`` of every slab of every expert held by ``tp_rank``.

    Shares are whole groups.
    """
    check_group_size(group_size)
    return layer_shares(expert_slabs, group_size, tp_size, tp_rank)


def share_sizes(shares: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """Sizes ``hi - lo`` of a list of shares (a rank's slab sizes of one expert)."""
    return tuple(hi - lo for lo, hi in shares)


def down_packed_rows(lo: int, hi: int, bits: int) -> tuple[int, int]:
    """Rows of a down-projection ``qweight_bB [packed_rows(n, b), H]`` that hold micro-experts ``[lo, hi)``.

    ``lo`` must start a packing block (a share of :func:`mixed_shares` starts a group).
    """
    if lo % PACK_BLOCK and hi > lo:
        raise ValueError(f"a share of a packed slab must start on a {PACK_BLOCK}-row block, got {lo}")
    start = packed_rows(lo, bits)
    return start, start + packed_rows(hi - lo, bits)


def down_group_rows(lo: int, hi: int, group_size: int) -> tuple[int, int]:
    """Rows of a down-projection's scales / zeros for micro-experts ``[lo, hi)``.

    The tensors are ``scales_bB`` / ``zeros_bB [ceil(n / G), H]``.
    """
    if lo % group_size and hi > lo:
        raise ValueError(
            f"a share of a quantized slab must start on a group boundary, got {lo} (G={group_size})"
        )
    start = num_groups(lo, group_size)
    return start, start + num_groups(hi - lo, group_size)
