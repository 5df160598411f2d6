"""Launcher of the Triton slab MoE: checks, expert sort, grids.  No host syncs.

Everything the launcher decides (path, tiles, grid sizes, buffer shapes) comes from
Python ints known before the call: tensor shapes and the layout's slab sizes.  No
``.item()``, ``.tolist()`` or ``nonzero`` touches device data, so a call can be
captured in a CUDA graph (vLLM captures one graph per batch size).

Per call (two kernel launches, whatever the number of bit-widths): the ``w13``
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
from .tuning import MoEConfig, TileConfig, get_config

__all__ = ["SUPPORTED_DTYPES", "moe_align", "slab_linear_triton", "slab_moe_triton"]

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
    """
    ids = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = ids.numel()
    device = ids.device
    num_blocks = -(-(num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m)
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
    :param config: tiles and path; default :func:`.tuning.get_config` for this shape.
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
    w13 = _slot_tensors(lay.bits, slots, w.w13_qweight, w.w13_scales, w.w13_zeros)
    w13_strides = tuple(w.w13_qweight[i].stride(0) for i in slots)
    w2 = _slot_tensors(lay.bits, slots, w.w2_qweight, w.w2_scales, w.w2_zeros)

    # GEMV: fp32 intermediate (free at decode sizes, one rounding fewer) and every
    # out row written by the w2 kernel.  Sorted: activation-dtype intermediate (tl.dot
    # operand) and rows of non-local pairs left to the zero fill.
    act = torch.empty(num_pairs, sum(widths), dtype=torch.float32 if gemv else x.dtype, device=x.device)
    out_buf = (torch.empty if gemv else torch.zeros)(num_pairs, hidden, dtype=torch.float32, device=x.device)
    if gemv:
        moe_slab._w13_gemv_kernel[(num_pairs, tile_starts[-1])](
            x,
            *w13,
            w13_strides,
            act,
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
            act.stride(0),
            BLOCK_N=c13.block_n,
            BLOCK_K=bk13,
            num_warps=c13.num_warps,
            num_stages=c13.num_stages,
            **kernel_args,
        )
        moe_slab._w2_gemv_kernel[(num_pairs, _cdiv(hidden, c2.block_n))](
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
            out_buf.stride(0),
            BLOCK_N=c2.block_n,
            BLOCK_K=bk2,
            num_warps=c2.num_warps,
            num_stages=c2.num_stages,
            **kernel_args,
        )
    else:
        # See moe_slab._dot: fp32 needs IEEE dots; the interpreter cannot multiply bf16.
        ieee = x.dtype == torch.float32 or (
            x.dtype == torch.bfloat16 and _interpreted(moe_slab._w13_sorted_kernel)
        )
        sorted_ids, block_expert = moe_align(ids, lay.num_experts, c13.block_m)
        if c2.block_m == c13.block_m:
            sorted_ids2, block_expert2 = sorted_ids, block_expert
        else:
            sorted_ids2, block_expert2 = moe_align(ids, lay.num_experts, c2.block_m)
        moe_slab._w13_sorted_kernel[(block_expert.numel(), tile_starts[-1])](
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
        moe_slab._w2_sorted_kernel[(block_expert2.numel(), _cdiv(hidden, c2.block_n))](
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
            out_buf.stride(0),
            BLOCK_M=c2.block_m,
            BLOCK_N=c2.block_n,
            BLOCK_K=bk2,
            IEEE=ieee,
            num_warps=c2.num_warps,
            num_stages=c2.num_stages,
            **kernel_args,
        )
    return out_buf.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)


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
            **kernel_args,
        )
    else:
        ieee = x.dtype == torch.float32 or (
            x.dtype == torch.bfloat16 and _interpreted(moe_slab._w2_sorted_kernel)
        )
        sorted_ids, block_expert = moe_align(ids, 1, c2.block_m)
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
