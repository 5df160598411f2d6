"""Pure-torch slab MoE: the correctness oracle and the CPU serving path.

Tokens are grouped by expert; each slab an expert needs is dequantized transiently
(fp32, freed right after its matmul) so no dequantized copy of the layer is ever
kept.  All math is fp32; only the output is cast back to ``x.dtype``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import DENSE_BITS, bit_parts, codes_to_dense, num_groups
from .slab_weights import SlabMoEWeights, check_moe_inputs

__all__ = ["dequantize_fast", "slab_moe_reference"]


def _unpack_codes(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Codes of ``packed [nb*bits, N]`` int32 as int32 ``[rows, N]`` with ``rows >= nb*32``.

    Same bit layout as :func:`packing.unpack` but in int32 and without copies of the
    words (arithmetic shifts are fine: the mask drops the sign bits).  Rows past the
    packed K are zero-padded so callers can view them as whole groups.
    """
    n = packed.shape[1]
    nb = packed.shape[0] // bits
    words = packed.reshape(nb, bits, 1, n)
    codes: torch.Tensor | None = None
    for width, shift in bit_parts(bits):
        per_word = 32 // width
        shifts = torch.arange(0, 32, width, dtype=torch.int32, device=packed.device).view(1, 1, per_word, 1)
        vals = (words[:, shift : shift + width] >> shifts) & ((1 << width) - 1)  # [nb, width, per_word, N]
        vals = vals.reshape(nb * 32, n)
        codes = vals if codes is None else codes | (vals << shift)
    assert codes is not None
    if rows > nb * 32:
        codes = F.pad(codes, (0, 0, 0, rows - nb * 32))
    return codes


def dequantize_fast(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    k: int,
    group_size: int,
    dense_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """fp32 ``[k, N]`` equal to :func:`packing.dequantize` (``(q - zero) * scale``), fewer passes.

    ``packed [ceil(k/32)*bits, N]`` int32, ``scales``/``zeros [ceil(k/G), N]``; a dense
    (16-bit) slab ignores them and reads its codes as ``dense_dtype``.
    """
    if bits == DENSE_BITS:
        return codes_to_dense(_unpack_codes(packed, bits, 0)[:k], dense_dtype)
    ng = num_groups(k, group_size)
    n = packed.shape[1]
    codes = _unpack_codes(packed, bits, ng * group_size).view(ng, group_size, n)
    # int32 - fp32 promotes to fp32: the conversion rides along with the subtraction.
    w = torch.sub(codes, zeros.to(torch.float32).unsqueeze(1)).mul_(scales.to(torch.float32).unsqueeze(1))
    return w.view(ng * group_size, n)[:k]


def slab_moe_reference(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w: SlabMoEWeights,
) -> torch.Tensor:
    """``out[t] = sum_k topk_weights[t, k] * Expert_{topk_ids[t, k]}(x[t])`` in fp32.

    :param x: ``[T, H]`` activations (any float dtype); the output has this dtype.
    :param topk_weights: ``[T, K]`` router weights.
    :param topk_ids: ``[T, K]`` integer expert ids; ids outside ``[0, E)`` (vLLM uses
        -1 for experts that live on another rank) contribute nothing.
    :param w: the layer (:class:`SlabMoEWeights`) on ``x``'s device.
    :returns: ``[T, H]`` in ``x.dtype``.

    This path syncs with the device (``tolist``) to group tokens per expert: it is
    meant for CPU and for checking the Triton kernel, not for CUDA graphs.
    """
    check_moe_inputs(x, topk_weights, topk_ids, w.hidden_size)
    lay = w.layout
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    if num_tokens == 0 or top_k == 0:
        return out.to(x.dtype)
    x32 = x.to(torch.float32)
    ids = topk_ids.reshape(-1).to(torch.int64)
    weights = topk_weights.reshape(-1).to(torch.float32)
    valid = (ids >= 0) & (ids < lay.num_experts)
    # Sort (token, slot) pairs by expert; invalid ones go to a last bucket, never read.
    key = torch.where(valid, ids, lay.num_experts)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=lay.num_experts + 1).tolist()
    start = 0
    for e in range(lay.num_experts):
        count = counts[e]
        pairs = order[start : start + count]
        start += count
        if count == 0 or lay.expert_width(e) == 0:
            continue
        tokens = pairs // top_k
        xe = x32.index_select(0, tokens)  # [c, H]
        ye = torch.zeros(count, hidden, dtype=torch.float32, device=x.device)
        for i, b in enumerate(lay.bits):
            n = lay.sizes[e][i]
            if n == 0:
                continue
            cols = slice(2 * lay.col_offset(e, i), 2 * lay.col_offset(e, i) + 2 * n)
            w13 = dequantize_fast(
                w.w13_qweight[i][:, cols],
                w.w13_scales[i][:, cols],
                w.w13_zeros[i][:, cols],
                b,
                hidden,
                lay.group_size,
                lay.dense_dtype,
            )  # [H, 2n]: gate columns then up columns
            gu = xe @ w13
            del w13
            act = F.silu(gu[:, :n]) * gu[:, n:]  # [c, n]
            rows, grps = lay.down_rows(e, i), lay.down_groups(e, i)
            w2 = dequantize_fast(
                w.w2_qweight[i][rows],
                w.w2_scales[i][grps],
                w.w2_zeros[i][grps],
                b,
                n,
                lay.group_size,
                lay.dense_dtype,
            )  # [n, H]
            ye.addmm_(act, w2)
            del w2
        ye.mul_(weights.index_select(0, pairs).unsqueeze(1))
        out.index_add_(0, tokens, ye)
    return out.to(x.dtype)
