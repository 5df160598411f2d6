"""Launcher of the Triton slab MoE: checks, expert sort, grids.  No host syncs.

Everything the launcher decides (path, tiles, grid sizes, buffer shapes) comes from
Python ints known before the call: tensor shapes and the layout's slab sizes.  No
``.item()``, ``.tolist()`` or ``nonzero`` touches device data, so a call can be
captured in a CUDA graph (vLLM captures one graph per batch size).

Per call (two kernel launches, whatever the number of bit-widths, plus one for the
sorted path's routing bookkeeping, :func:`moe_align_triton`): the ``w13``
kernel writes ``act [P, sum_s max_e n[e][s]]`` (``P = T * top_k``, one column range per
bit-width slot), the ``w2`` kernel writes ``out_buf [P, H]`` fp32 =
``topk_weight * sum_s act_s @ W_down_s``, and ``out = out_buf.view(T, top_k, H).sum(1)``
in ``x.dtype``.  Summing the top-k slots in torch (rather than with atomics) keeps
the result deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .linear import SlabLinearWeights
from .packing import DENSE_BITS
from .slab_weights import SlabMoEWeights, check_moe_inputs
from .tuning import MoEConfig, TileConfig, fp32_sorted, get_config

__all__ = [
    "SUPPORTED_DTYPES",
    "grid_sizes",
    "moe_align",
    "moe_align_triton",
    "slab_linear_triton",
    "slab_moe_triton",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group (token, slot) pairs by expert into blocks of ``block_m`` rows, without host syncs.

    :param topk_ids: ``[T, K]`` (or flat ``[P]``) expert ids; ids outside ``[0, E)`` are dropped.
    :returns: ``sorted_ids [num_blocks * block_m]`` int32: pair ids ``p = t * K + k``,
        expert by expert, each expert's run padded to a multiple of ``block_m`` with the
        sentinel ``P``; and ``block_expert [num_blocks]`` int32: the expert of each block,
        ``-1`` for the unused tail.  ``num_blocks`` is the static bound
        ``cdiv(P + min(E, P) * (block_m - 1), block_m)``: at most ``min(E, P)`` experts
        are non-empty and each wastes fewer than ``block_m`` padding rows.

    Torch ops only (about 40 small kernels): the reference of :func:`moe_align_triton`,
    which the launcher runs.
    """
    ids = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = ids.numel()
    device = ids.device
    num_blocks = _num_blocks(num_pairs, num_experts, block_m)
    capacity = num_blocks * block_m
    valid = (ids >= 0) & (ids < num_experts)
    key = torch.where(valid, ids, torch.full_like(ids, num_experts))  # invalid -> bucket E
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))  # not bincount: that syncs on CUDA
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    run_start = torch.cumsum(counts, 0) - counts  # first sorted position of each expert
    rank = torch.arange(num_pairs, device=device) - run_start[sorted_key]
    blocks = (counts + block_m - 1) // block_m
    # The invalid bucket gets no blocks.  (Not `blocks[E] = 0`: that lifts a host scalar and
    # copies it to the device, a sync that CUDA-graph capture refuses.)
    blocks[num_experts:].zero_()
    block_end = torch.cumsum(blocks, 0)
    block_start = block_end - blocks
    # Invalid pairs are scattered to one extra slot past the end and cut off.
    dest = torch.where(
        sorted_key < num_experts, block_start[sorted_key] * block_m + rank, torch.full_like(rank, capacity)
    )
    sorted_ids = torch.full((capacity + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_idx = torch.arange(num_blocks, device=device)
    block_expert = torch.searchsorted(block_end[:num_experts], block_idx, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, torch.full_like(block_expert, -1))
    return sorted_ids[:capacity], block_expert.to(torch.int32)


def moe_align_triton(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`moe_align` as one Triton launch (:func:`.moe_slab._moe_align_kernel`), same outputs.

    The torch version is about 40 small kernels; this is one program on a fixed ``(1,)``
    grid with static output shapes, no host sync (CUDA-graph capturable).
    """
    from . import moe_slab

    ids = topk_ids.reshape(-1).contiguous()
    num_pairs = ids.numel()
    num_blocks = _num_blocks(num_pairs, num_experts, block_m)
    sorted_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=ids.device)
    if num_blocks == 0:
        return sorted_ids, block_expert
    moe_slab._moe_align_kernel[(1,)](
        ids,
        sorted_ids,
        block_expert,
        num_pairs,
        num_experts,
        num_blocks,
        **moe_align_launch_options(num_experts, block_m),
    )
    return sorted_ids, block_expert


def moe_align_launch_options(num_experts: int, block_m: int) -> dict[str, int]:
    """Constexprs and ``num_warps`` of :func:`moe_align_triton`'s kernel (from E and ``block_m`` only,
    so one compile serves every batch size; ``tests/kernels/test_kernel_compile.py`` builds these).

    One-hot chunks of ~4096 values, and a warp per 32 experts (at least 4, at most 32): with
    more experts per thread ptxas puts the per-expert vectors on the stack.
    """
    e_pad = max(16, 1 << (num_experts - 1).bit_length())  # power of two >= E
    return dict(
        BLOCK_M=block_m,
        E_PAD=e_pad,
        BLOCK_P=max(16, 4096 // e_pad),
        BLOCK_B=max(16, 4096 // max(e_pad, block_m)),
        num_warps=min(32, max(4, e_pad // 32)),
    )


def grid_sizes(
    config: MoEConfig,
    num_tokens: int,
    top_k: int,
    hidden: int,
    num_experts: int,
    widths: Sequence[int],
    group_size: int,
) -> dict[str, tuple[int, int, int]]:
    """The launch grids of the ``w13`` and ``w2`` kernels: ``{"w13": (g0, g1, g2), "w2": ...}``.

    Static Python ints from shapes only (``widths``: ``max_e n[e][s]`` of each used slot), as
    :func:`slab_moe_triton` launches them.  GEMV path: axis 2 is the split-K factor, the
    smallest that brings the grid to ``config.min_ctas`` CTAs (at most one K step per split).
    Sorted path: axis 0 is ``moe_align``'s static block bound (programs of unused blocks
    return at once), axis 2 is 1.  Also used by ``bench/kernel_static.py`` to count CTAs.
    """
    c13, c2 = config.w13, config.w2
    num_pairs = num_tokens * top_k
    tiles13 = sum(_cdiv(n, c13.block_n) for n in widths)
    tiles2 = _cdiv(hidden, c2.block_n)
    if config.path == "gemv":
        steps13 = _cdiv(hidden, _block_k(c13, group_size))
        steps2 = max(_cdiv(n, _block_k(c2, group_size)) for n in widths)
        return {
            "w13": (num_pairs, tiles13, _split_k(num_pairs * tiles13, config.min_ctas, steps13)),
            "w2": (num_pairs, tiles2, _split_k(num_pairs * tiles2, config.min_ctas, steps2)),
        }
    return {
        "w13": (_num_blocks(num_pairs, num_experts, c13.block_m), tiles13, 1),
        "w2": (_num_blocks(num_pairs, num_experts, c2.block_m), tiles2, 1),
    }


def _split_k(ctas: int, min_ctas: int, steps: int) -> int:
    """Smallest split of ``steps`` K steps that gives ``ctas * split >= min_ctas`` (1 if none needed)."""
    return max(1, min(steps, _cdiv(min_ctas, max(ctas, 1))))


def _num_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """:func:`moe_align`'s static bound on the number of ``block_m``-row blocks."""
    return _cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m)


def _block_k(tile: TileConfig, group_size: int) -> int:
    """Largest K tile <= the configured one that the kernels accept.

    It must be a power of two of at least 32 (whole 32-value packing blocks) and divide
    the group size (one scale/zero row per tile).
    """
    for bk in (256, 128, 64, 32):
        if bk <= tile.block_k and group_size % bk == 0:
            return bk
    raise ValueError(f"no K tile fits BLOCK_K={tile.block_k} and group size {group_size} (need >= 32)")


def _check(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w: SlabMoEWeights) -> None:
    check_moe_inputs(x, topk_weights, topk_ids, w.hidden_size)
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x dtype {x.dtype} not supported; use one of {SUPPORTED_DTYPES}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    for name, t in (("x", x), ("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        if t.device != w.device:
            raise ValueError(f"{name} is on {t.device}, weights on {w.device}")


def slab_moe_triton(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w: SlabMoEWeights,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """Triton slab MoE: ``out[t] = sum_k topk_weights[t, k] * Expert_{topk_ids[t, k]}(x[t])``.

    :param x: ``[T, H]`` fp16, bf16 or fp32.
    :param topk_weights: ``[T, K]`` any float dtype (read as fp32).
    :param topk_ids: ``[T, K]`` int32/int64; ids outside ``[0, E)`` contribute nothing.
    :param w: the layer, on ``x``'s device.
    :param config: tiles and path; default :func:`.tuning.get_config` for this shape (fp32
        ``x`` on the sorted path runs it capped by :func:`.tuning.fp32_sorted`).
    :returns: ``[T, H]`` in ``x.dtype``.
    """
    from . import moe_slab  # triton is imported here only, so the package works without it

    _check(x, topk_weights, topk_ids, w)
    lay = w.layout
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    if config is None:
        device_name = torch.cuda.get_device_name(x.device) if x.is_cuda else None
        config = get_config(num_tokens, top_k, hidden, lay.num_experts, device_name)
    if config.path not in ("gemv", "sorted"):
        raise ValueError(f"unknown kernel path {config.path!r}; expected 'gemv' or 'sorted'")
    if x.dtype == torch.float32:
        config = fp32_sorted(config)  # the IEEE dot needs smaller tiles (tuning.fp32_sorted)
    x = x.contiguous()
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    gemv = config.path == "gemv"
    c13, c2 = config.w13, config.w2
    bk13 = _block_k(c13, lay.group_size)
    bk2 = _block_k(c2, lay.group_size)

    # Slots: the bit-widths some expert uses (empty per-bit tensors are never passed).
    slots = [i for i in range(lay.num_bits) if lay.max_slab(i) > 0]
    if not slots:
        return torch.zeros_like(x)
    widths = [lay.max_slab(i) for i in slots]
    act_cols = tuple(sum(widths[:j]) for j in range(len(slots)))
    tile_starts = tuple(sum(_cdiv(n, c13.block_n) for n in widths[:j]) for j in range(len(slots) + 1))
    kernel_args = dict(
        BITS=tuple(lay.bits[i] for i in slots),
        DENSE_FP16=lay.dense_dtype == torch.float16,
        COLS=tuple(slots),
        GROUP_SIZE=lay.group_size,
    )
    grids = grid_sizes(config, num_tokens, top_k, hidden, lay.num_experts, widths, lay.group_size)
    w13 = _slot_tensors(lay.bits, slots, w.w13_qweight, w.w13_scales, w.w13_zeros)
    w13_strides = tuple(w.w13_qweight[i].stride(0) for i in slots)
    w2 = _slot_tensors(lay.bits, slots, w.w2_qweight, w.w2_scales, w.w2_zeros)

    # GEMV: fp32 intermediate (free at decode sizes, one rounding fewer) and every
    # out row written by the w2 kernel; with split K the w13 kernel leaves partial gate/up
    # sums [split13, P, 2 W] that torch adds and puts through SiLU-and-mul (device ops, no
    # sync), and the w2 kernel's splits [split2, P, H] are added with the top-k slots below.
    # Sorted: activation-dtype intermediate (tl.dot operand) and rows of non-local pairs
    # left to the zero fill.
    split13, split2 = grids["w13"][2], grids["w2"][2]
    act_width = sum(widths)
    act = torch.empty(num_pairs, act_width, dtype=torch.float32 if gemv else x.dtype, device=x.device)
    out_buf = (torch.empty if gemv else torch.zeros)(
        split2, num_pairs, hidden, dtype=torch.float32, device=x.device
    )
    if gemv:
        part = act
        if split13 > 1:
            part = torch.empty(split13, num_pairs, 2 * act_width, dtype=torch.float32, device=x.device)
        moe_slab._w13_gemv_kernel[grids["w13"]](
            x,
            *w13,
            w13_strides,
            part,
            act_cols,
            tile_starts,
            ids,
            w.slab_sizes,
            w.col_offsets,
            hidden,
            lay.num_experts,
            top_k,
            lay.num_bits,
            x.stride(0),
            part.stride(-2),
            part.stride(0) if split13 > 1 else 0,
            act_width,
            BLOCK_N=c13.block_n,
            BLOCK_K=bk13,
            SPLIT_K=split13,
            num_warps=c13.num_warps,
            num_stages=c13.num_stages,
            **kernel_args,
        )
        if split13 > 1:
            # Columns past an expert's width hold garbage; the w2 kernel never reads them.
            gate, up = part.sum(dim=0).split(act_width, dim=1)
            act = torch.nn.functional.silu(gate) * up
        moe_slab._w2_gemv_kernel[grids["w2"]](
            act,
            *w2,
            act_cols,
            out_buf,
            ids,
            weights,
            w.slab_sizes,
            w.down_row_offsets,
            w.down_group_offsets,
            hidden,
            lay.num_experts,
            lay.num_bits,
            act.stride(0),
            out_buf.stride(1),
            out_buf.stride(0),
            BLOCK_N=c2.block_n,
            BLOCK_K=bk2,
            SPLIT_K=split2,
            num_warps=c2.num_warps,
            num_stages=c2.num_stages,
            **kernel_args,
        )
    else:
        # See moe_slab._dot: fp32 needs IEEE dots; the interpreter cannot multiply bf16.
        ieee = x.dtype == torch.float32 or (
            x.dtype == torch.bfloat16 and _interpreted(moe_slab._w13_sorted_kernel)
        )
        sorted_ids, block_expert = moe_align_triton(ids, lay.num_experts, c13.block_m)
        if c2.block_m == c13.block_m:
            sorted_ids2, block_expert2 = sorted_ids, block_expert
        else:
            sorted_ids2, block_expert2 = moe_align_triton(ids, lay.num_experts, c2.block_m)
        moe_slab._w13_sorted_kernel[grids["w13"]](
            x,
            *w13,
            w13_strides,
            act,
            act_cols,
            tile_starts,
            sorted_ids,
            block_expert,
            w.slab_sizes,
            w.col_offsets,
            hidden,
            num_pairs,
            top_k,
            lay.num_bits,
            x.stride(0),
            act.stride(0),
            BLOCK_M=c13.block_m,
            BLOCK_N=c13.block_n,
            BLOCK_K=bk13,
            IEEE=ieee,
            num_warps=c13.num_warps,
            num_stages=c13.num_stages,
            **kernel_args,
        )
        moe_slab._w2_sorted_kernel[grids["w2"]](
            act,
            *w2,
            act_cols,
            out_buf,
            sorted_ids2,
            block_expert2,
            weights,
            w.slab_sizes,
            w.down_row_offsets,
            w.down_group_offsets,
            hidden,
            num_pairs,
            lay.num_bits,
            act.stride(0),
            out_buf.stride(1),
            BLOCK_M=c2.block_m,
            BLOCK_N=c2.block_n,
            BLOCK_K=bk2,
            IEEE=ieee,
            num_warps=c2.num_warps,
            num_stages=c2.num_stages,
            **kernel_args,
        )
    # One reduction over the split-K partials and the top-k slots (in that order, deterministic).
    return out_buf.view(split2, num_tokens, top_k, hidden).sum(dim=(0, 2)).to(x.dtype)


def slab_linear_triton(
    x: torch.Tensor, w: SlabLinearWeights, config: MoEConfig | None = None
) -> torch.Tensor:
    """Triton ``y = sum_s x[:, k0_s : k0_s + K_s] @ W_s`` (:mod:`.linear`): the down kernels with one expert.

    One launch for all slabs (split-K over them inside the program), no host syncs:
    the expert id of every row is 0 and its router weight 1, both made on the device.
    """
    from . import moe_slab
    from .linear import _check as check_linear

    check_linear(x, w)
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x dtype {x.dtype} not supported; use one of {SUPPORTED_DTYPES}")
    num_tokens, n_out = x.shape[0], w.out_features
    if num_tokens == 0:
        return x.new_zeros(0, n_out)
    if config is None:
        device_name = torch.cuda.get_device_name(x.device) if x.is_cuda else None
        config = get_config(num_tokens, 1, n_out, 1, device_name)
    if x.dtype == torch.float32:
        config = fp32_sorted(config)
    c2 = config.w2
    bk = _block_k(c2, w.group_size)
    x = x.contiguous()
    nb = len(w.bits)
    q, scales, zeros = _slot_tensors(w.bits, range(nb), w.qweight, w.scales, w.zeros)
    act_cols = tuple(sum(w.in_sizes[:j]) for j in range(nb))
    ids = torch.zeros(num_tokens, dtype=torch.int32, device=x.device)
    ones = torch.ones(num_tokens, dtype=torch.float32, device=x.device)
    sizes, row_off, grp_off = w.meta[0], w.meta[1], w.meta[2]
    kernel_args = dict(
        BITS=tuple(w.bits),
        DENSE_FP16=w.dense_dtype == torch.float16,
        COLS=tuple(range(nb)),
        GROUP_SIZE=w.group_size,
        BLOCK_N=c2.block_n,
        BLOCK_K=bk,
        num_warps=c2.num_warps,
        num_stages=c2.num_stages,
    )
    if config.path == "gemv":
        out = torch.empty(num_tokens, n_out, dtype=torch.float32, device=x.device)
        moe_slab._w2_gemv_kernel[(num_tokens, _cdiv(n_out, c2.block_n))](
            x,
            q,
            scales,
            zeros,
            act_cols,
            out,
            ids,
            ones,
            sizes,
            row_off,
            grp_off,
            n_out,
            1,
            nb,
            x.stride(0),
            out.stride(0),
            0,
            **kernel_args,
        )
    else:
        ieee = x.dtype == torch.float32 or (
            x.dtype == torch.bfloat16 and _interpreted(moe_slab._w2_sorted_kernel)
        )
        sorted_ids, block_expert = moe_align_triton(ids, 1, c2.block_m)
        out = torch.zeros(num_tokens, n_out, dtype=torch.float32, device=x.device)
        moe_slab._w2_sorted_kernel[(block_expert.numel(), _cdiv(n_out, c2.block_n))](
            x,
            q,
            scales,
            zeros,
            act_cols,
            out,
            sorted_ids,
            block_expert,
            ones,
            sizes,
            row_off,
            grp_off,
            n_out,
            num_tokens,
            nb,
            x.stride(0),
            out.stride(0),
            BLOCK_M=c2.block_m,
            IEEE=ieee,
            **kernel_args,
        )
    return out.to(x.dtype)


def _slot_tensors(
    bits: Sequence[int],
    slots: Sequence[int],
    qweight: tuple[torch.Tensor, ...],
    scales: tuple[torch.Tensor, ...],
    zeros: tuple[torch.Tensor, ...],
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Per-slot ``(qweight, scales, zeros)`` tuples for the kernels.

    A dense slab's scales and zeros have 0 rows and are never read; its qweight stands
    in for them, since an empty CUDA tensor may have a null pointer that Triton refuses.
    """
    dense = [bits[i] == DENSE_BITS for i in slots]
    return (
        tuple(qweight[i] for i in slots),
        tuple(qweight[i] if d else scales[i] for i, d in zip(slots, dense)),
        tuple(qweight[i] if d else zeros[i] for i, d in zip(slots, dense)),
    )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _interpreted(kernel: object) -> bool:
    """Whether ``kernel`` runs in Triton's interpreter (decided when moe_slab was imported)."""
    return type(kernel).__name__ == "InterpretedFunction"
