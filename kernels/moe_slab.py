"""Triton kernels of the mixed-precision slab MoE (``@triton.jit`` only; launch in :mod:`.launch`).

A layer is ``len(B)`` uniform-bit problems with ragged per-expert sizes (see
:mod:`.slab_weights`).  Each kernel covers all bit-widths in one launch: per-bit
tensors come as tuples (one entry per *slot*, i.e. per bit-width that some expert
uses), ``BITS`` is a constexpr tuple so every slot's unpacking is specialised at
compile time (16 is the dense slab of raw bf16/fp16 weights, ``DENSE_FP16`` says which),
and ``COLS`` gives each slot's column in the int32 ``[E, META_COLS]`` metadata
(``slab_sizes``, ``col_offsets``, ``down_row_offsets``, ``down_group_offsets``).

* ``w13`` kernels: ``act[p, act_cols[s] + c] = SiLU(x[t] . gate_c) * (x[t] . up_c)`` for the
  columns ``c < n[e][s]`` of each slot ``s``, pair ``p = t * top_k + k`` routed to expert
  ``e``.  Grid axis 1 enumerates column tiles of all slots back to back
  (``tile_starts[s] <= pid < tile_starts[s + 1]``), so one launch fills the GPU even
  when each slab alone is narrow.
* ``w2`` kernels: ``out[p, :] = topk_weight[p] * sum_s act_s[p, :n] @ W_down_s``: the
  down GEMM's K (the expert's intermediate) is split over slabs, each at its own
  bits, summed in one fp32 accumulator inside the program; one store per tile.

Two variants of each:

* ``*_gemv`` (decode, few pairs): one program per (pair, column tile); dot products as
  broadcast-multiply + reduction, fp32 throughout, no sorting.
* ``*_sorted`` (prefill): pairs sorted by expert into blocks of ``BLOCK_M`` rows
  (:func:`.launch.moe_align`); one program per (block, column tile); ``tl.dot``
  tensor-core tiles with the weights dequantized to the activation dtype.

Weights are unpacked in registers: each packed int32 word of a tile is loaded once
(``BLOCK_K * BITS / 32`` rows of ``BN`` words, coalesced along N) and expanded with
shifts and a reshape (:func:`_codes_part`; bit layout in :mod:`.packing`).  Loading
the codes row by row instead (one gathered int32 per K row) would stage
``32 / width`` times more bytes in shared memory when pipelined - too much for a
3-bit ``BLOCK_K = 128`` tile on an H100.

Constraints: ``BLOCK_K`` is a multiple of 32 that divides ``GROUP_SIZE`` (one
scale/zero row per K tile); ``BLOCK_M``, ``BLOCK_N`` >= 16 for ``tl.dot``; all
block sizes powers of two; weight tensors contiguous.  fp32 accumulation everywhere.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _codes_part(
    q_ptr,
    row_base,
    k0,
    k_limit,
    cols,
    col_ok,
    stride_q,
    BLOCK_K: tl.constexpr,
    BITS: tl.constexpr,
    WIDTH: tl.constexpr,
    SHIFT: tl.constexpr,
):
    """int32 ``[BLOCK_K, BN]``: bits ``[SHIFT, SHIFT + WIDTH)`` of the codes of K rows ``k0 + [0, BLOCK_K)``.

    Loads each packed word once (``[BLOCK_K / 32, WIDTH, BN]`` words) and expands it in
    registers: word ``w`` of a 32-value block holds values ``w * (32 // WIDTH) + p`` at
    bit ``p * WIDTH``, so ``[blocks, WIDTH, 32 // WIDTH, BN]`` flattens to K order.
    Blocks starting at or past ``k_limit`` are masked (their rows do not exist).
    """
    blk = tl.arange(0, BLOCK_K // 32)
    word = tl.arange(0, WIDTH)
    rows = row_base + (k0 // 32 + blk)[:, None] * BITS + SHIFT + word[None, :]  # [NB, WIDTH]
    block_ok = (k0 + blk * 32) < k_limit
    words = tl.load(
        q_ptr + rows[:, :, None] * stride_q + cols[None, None, :],
        mask=block_ok[:, None, None] & col_ok[None, None, :],
        other=0,
    )  # [NB, WIDTH, BN]
    shifts = tl.arange(0, 32 // WIDTH) * WIDTH
    # Arithmetic shift of int32 is fine: the mask keeps only the WIDTH wanted bits.
    vals = (words[:, :, None, :] >> shifts[None, None, :, None]) & ((1 << WIDTH) - 1)
    return tl.reshape(vals, [BLOCK_K, cols.shape[0]])


@triton.jit
def _dequant_tile(
    q_ptr,
    s_ptr,
    z_ptr,
    row_base,
    group_row,
    k0,
    k_limit,
    cols,
    col_ok,
    stride_q,
    stride_s,
    BLOCK_K: tl.constexpr,
    BITS: tl.constexpr,
    DENSE_FP16: tl.constexpr,
):
    """fp32 ``[BLOCK_K, BN]`` ``(q - zero) * scale`` of K rows ``k0 + [0, BLOCK_K)`` of a slab.

    A dense slab (``BITS == 16``) reads its codes as bf16 (or fp16 with ``DENSE_FP16``)
    bit patterns and has no scale or zero: ``s_ptr``/``z_ptr`` are not read.

    ``row_base``: the slab's first packed row; ``k_limit``: the slab's K (rows past it
    in the last 32-block are the packing's zero padding and get finite values, which
    callers multiply by masked-to-zero activations); ``group_row``: the scale/zero row
    of this K tile (one per tile since ``BLOCK_K`` divides the group size).
    """
    if BITS == 16:
        q = _codes_part(q_ptr, row_base, k0, k_limit, cols, col_ok, stride_q, BLOCK_K, 16, 16, 0)
        if DENSE_FP16:
            w = q.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            # A bf16 is the high half of the fp32 with the same value.
            w = (q << 16).to(tl.float32, bitcast=True)
    else:
        if BITS == 3:
            # 3 bits = a 2-bit plane (words 0-1 of each 32-value block) + a 1-bit plane (word 2).
            q = _codes_part(q_ptr, row_base, k0, k_limit, cols, col_ok, stride_q, BLOCK_K, 3, 2, 0)
            q = q | (_codes_part(q_ptr, row_base, k0, k_limit, cols, col_ok, stride_q, BLOCK_K, 3, 1, 2) << 2)
        else:
            q = _codes_part(q_ptr, row_base, k0, k_limit, cols, col_ok, stride_q, BLOCK_K, BITS, BITS, 0)
        scale = tl.load(s_ptr + group_row * stride_s + cols, mask=col_ok, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + group_row * stride_s + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) - zero[None, :]) * scale[None, :]
    return w


@triton.jit
def _gemv_dot_tile(
    a,
    q_ptr,
    s_ptr,
    z_ptr,
    row_base,
    group_row,
    k0,
    k_limit,
    cols,
    col_ok,
    stride_q,
    stride_s,
    BLOCK_K: tl.constexpr,
    BITS: tl.constexpr,
    DENSE_FP16: tl.constexpr,
    FOLD: tl.constexpr = True,
):
    """fp32 ``[BN]`` ``sum_k a[k] * w[k, c]`` over K rows ``k0 + [0, BLOCK_K)`` of a slab (GEMV math).

    With ``FOLD`` quantized slabs never dequantize per element: the scale and zero are applied once per
    group and column, ``sum a (q - z) s = s * (2^B * sum a f - (2^B + z) * sum a)`` with
    ``f = 1 + q / 2^B``, and ``f`` is made by moving the code into the top mantissa bits of
    1.0 (a shift and one LOP3 per weight, no int-to-float convert).  ``f`` has ``B + 1``
    significant bits, so ``a * f`` is exact for bf16/fp16 ``a`` and the result differs from
    per-element dequantization by fp32 rounding only.  Masked activations must be 0 (rows
    past ``k_limit`` hold finite padding codes).  Without ``FOLD`` (and for dense slabs) the
    tile is dequantized per element (:func:`_dequant_tile`): the w2 GEMV does so at 4 and 8
    bits, where its fp32 activations make the extra ``sum a`` reduction cost more than the
    fold saves (measured with ``bench/kernel_static.py``).
    """
    if (BITS == 16) | (not FOLD):
        w = _dequant_tile(
            q_ptr, s_ptr, z_ptr, row_base, group_row, k0, k_limit, cols, col_ok, stride_q, stride_s,
            BLOCK_K, BITS, DENSE_FP16,
        )  # fmt: skip
        return tl.sum(a[:, None] * w, axis=0)
    if BITS == 3:
        q = _codes_part(q_ptr, row_base, k0, k_limit, cols, col_ok, stride_q, BLOCK_K, 3, 2, 0)
        q = q | (_codes_part(q_ptr, row_base, k0, k_limit, cols, col_ok, stride_q, BLOCK_K, 3, 1, 2) << 2)
    else:
        q = _codes_part(q_ptr, row_base, k0, k_limit, cols, col_ok, stride_q, BLOCK_K, BITS, BITS, 0)
    f = ((q << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + q / 2^BITS
    saf = tl.sum(a[:, None] * f, axis=0)
    sa = tl.sum(a, axis=0)
    scale = tl.load(s_ptr + group_row * stride_s + cols, mask=col_ok, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + group_row * stride_s + cols, mask=col_ok, other=0.0).to(tl.float32)
    return scale * ((1 << BITS) * saf - ((1 << BITS) + zero) * sa)


@triton.jit
def _w13_weight_tile(
    q_ptr,
    s_ptr,
    z_ptr,
    k0,
    hidden,
    cols,
    col_ok,
    stride_w,
    GROUP_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BITS: tl.constexpr,
    DENSE_FP16: tl.constexpr,
):
    """Gate or up weights ``[BLOCK_K, BN]`` at K rows ``k0 + [0, BLOCK_K)`` of a slab's ``[K, 2R]`` matrix."""
    return _dequant_tile(
        q_ptr,
        s_ptr,
        z_ptr,
        0,
        k0 // GROUP_SIZE,
        k0,
        hidden,
        cols,
        col_ok,
        stride_w,
        stride_w,
        BLOCK_K,
        BITS,
        DENSE_FP16,
    )


@triton.jit
def _w2_weight_tile(
    q_ptr,
    s_ptr,
    z_ptr,
    row0,
    grp0,
    k0,
    n,
    cols,
    col_ok,
    hidden,
    GROUP_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BITS: tl.constexpr,
    DENSE_FP16: tl.constexpr,
):
    """Down weights ``[BLOCK_K, BN]`` at K rows ``k0 + [0, BLOCK_K)`` of one expert's block.

    The block has ``n`` rows starting at packed row ``row0`` and scale group ``grp0`` of a
    slab's ``[sum n, H]`` matrix.
    """
    return _dequant_tile(
        q_ptr,
        s_ptr,
        z_ptr,
        row0,
        grp0 + k0 // GROUP_SIZE,
        k0,
        n,
        cols,
        col_ok,
        hidden,
        hidden,
        BLOCK_K,
        BITS,
        DENSE_FP16,
    )


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b``; ``IEEE``: multiply in fp32 with IEEE precision.

    The launcher sets ``IEEE`` for fp32 activations (tl.dot would otherwise use TF32 on
    GPUs) and for bf16 under ``TRITON_INTERPRET=1``, whose ``tl.dot`` multiplies the raw
    uint16 storage of bf16 operands.  Operands are already rounded to the activation
    dtype, and products of bf16 values are exact in fp32, so the upcast only changes
    the summation order.
    """
    if IEEE:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _w13_gemv_tile(
    x_row_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    stride_w,
    act_row_ptr,
    up_col,
    c0,
    n,
    tile,
    split,
    hidden,
    BITS: tl.constexpr,
    DENSE_FP16: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """One pair, one column tile of one slab, K steps ``split, split + SPLIT_K, ...``.

    ``SPLIT_K == 1``: stores ``act[c] = SiLU(x . gate_c) * (x . up_c)``; otherwise the partial
    sums, gate at ``act_row_ptr[c]`` and up at ``act_row_ptr[up_col + c]`` (the launcher
    adds the splits and applies SiLU-and-mul).
    """
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    gate_cols = 2 * c0 + cols
    up_cols = gate_cols + n
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(split * BLOCK_K, hidden, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_row_ptr + offs_k, mask=offs_k < hidden, other=0.0).to(tl.float32)
        grp = k0 // GROUP_SIZE
        acc_g += _gemv_dot_tile(
            a, q_ptr, s_ptr, z_ptr, 0, grp, k0, hidden, gate_cols, col_ok, stride_w, stride_w,
            BLOCK_K, BITS, DENSE_FP16,
        )  # fmt: skip
        acc_u += _gemv_dot_tile(
            a, q_ptr, s_ptr, z_ptr, 0, grp, k0, hidden, up_cols, col_ok, stride_w, stride_w,
            BLOCK_K, BITS, DENSE_FP16,
        )  # fmt: skip
    if SPLIT_K == 1:
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(act_row_ptr + cols, h.to(act_row_ptr.dtype.element_ty), mask=col_ok)
    else:
        tl.store(act_row_ptr + cols, acc_g, mask=col_ok)
        tl.store(act_row_ptr + up_col + cols, acc_u, mask=col_ok)


@triton.jit
def _w13_gemv_kernel(
    x_ptr,
    q_ptrs,
    s_ptrs,
    z_ptrs,
    w_strides,
    act_ptr,
    act_cols,
    tile_starts,
    topk_ids_ptr,
    sizes_ptr,
    col_off_ptr,
    hidden,
    num_experts,
    top_k,
    meta_cols,
    stride_x,
    stride_act,
    stride_split,
    up_col,
    BITS: tl.constexpr,
    DENSE_FP16: tl.constexpr,
    COLS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr = 1,
):
    """Decode gate/up GEMV with fused SiLU-and-mul (or split-K partials), all slots in one launch.

    Grid ``(P, tile_starts[-1], SPLIT_K)``, ``P = T * top_k``.  ``x [T, H]``; per slot ``s``:
    ``q_ptrs[s] [packed_rows(H, BITS[s]), 2 R]`` int32, ``s_ptrs[s]``/``z_ptrs[s] [ceil(H/G),
    2 R]`` fp16, all with row stride ``w_strides[s] = 2 R``; ``topk_ids [P]`` int32/int64
    (ids outside ``[0, E)`` skipped); ``sizes``/``col_off [E, meta_cols]`` int32.
    ``SPLIT_K == 1``: ``act [P, sum_s max n]`` (slot ``s`` at column ``act_cols[s]``, written
    for ``c < n[e][s]``).  ``SPLIT_K > 1``: ``act [SPLIT_K, P, 2 * up_col]`` fp32 (split
    stride ``stride_split``), gate partials at ``act_cols[s] + c``, up at ``up_col +
    act_cols[s] + c`` (the launcher adds them and applies SiLU-and-mul): program ``(p, t, j)``
    sums the K steps ``j, j + SPLIT_K, ...``, so batch 1 launches ``SPLIT_K`` times the CTAs.
    """
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    e = tl.load(topk_ids_ptr + pair).to(tl.int32)
    if (e < 0) | (e >= num_experts):
        return
    x_row_ptr = x_ptr + (pair // top_k).to(tl.int64) * stride_x
    act_row_ptr = act_ptr + split.to(tl.int64) * stride_split + pair.to(tl.int64) * stride_act
    for s in tl.static_range(len(BITS)):
        tile = pid_n - tile_starts[s]
        if (tile >= 0) & (pid_n < tile_starts[s + 1]):
            n = tl.load(sizes_ptr + e * meta_cols + COLS[s])
            if tile * BLOCK_N < n:
                c0 = tl.load(col_off_ptr + e * meta_cols + COLS[s])
                _w13_gemv_tile(
                    x_row_ptr,
                    q_ptrs[s],
                    s_ptrs[s],
                    z_ptrs[s],
                    w_strides[s],
                    act_row_ptr + act_cols[s],
                    up_col,
                    c0,
                    n,
                    tile,
                    split,
                    hidden,
                    BITS[s],
                    DENSE_FP16,
                    GROUP_SIZE,
                    BLOCK_N,
                    BLOCK_K,
                    SPLIT_K,
                )


@triton.jit
def _w2_gemv_kernel(
    act_ptr,
    q_ptrs,
    s_ptrs,
    z_ptrs,
    act_cols,
    out_ptr,
    topk_ids_ptr,
    topk_w_ptr,
    sizes_ptr,
    row_off_ptr,
    grp_off_ptr,
    hidden,
    num_experts,
    meta_cols,
    stride_act,
    stride_out,
    stride_out_split,
    BITS: tl.constexpr,
    DENSE_FP16: tl.constexpr,
    COLS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr = 1,
):
    """Decode down GEMV, split-K over the slots: ``out[p] = w[p] * sum_s act_s[p, :n] @ W_down_s``.

    Grid ``(P, cdiv(H, BLOCK_N), SPLIT_K)``.  Per slot: ``q_ptrs[s] [sum_e packed_rows(n,
    BITS[s]), H]`` int32, ``s_ptrs[s]``/``z_ptrs[s] [sum_e ceil(n/G), H]`` fp16 (row stride
    ``H``); ``act [P, sum_s max n]`` as written by :func:`_w13_gemv_kernel` without split
    (the launcher combines a split one's partials); ``out [SPLIT_K, P, H]`` fp32 (split
    stride ``stride_out_split``), fully written (zeros for pairs of non-local or width-0
    experts): program ``(p, t, j)`` sums the K steps ``j, j + SPLIT_K, ...`` of every slot,
    the caller adds the splits; ``topk_w [P]``;
    ``row_off``/``grp_off [E, meta_cols]`` int32.
    """
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    e = tl.load(topk_ids_ptr + pair).to(tl.int32)
    valid = (e >= 0) & (e < num_experts)
    e = tl.where(valid, e, 0)  # keeps the metadata loads in bounds
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    act_row_ptr = act_ptr + pair.to(tl.int64) * stride_act
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(len(BITS)):
        n = tl.where(valid, tl.load(sizes_ptr + e * meta_cols + COLS[s]), 0)
        row0 = tl.load(row_off_ptr + e * meta_cols + COLS[s])
        grp0 = tl.load(grp_off_ptr + e * meta_cols + COLS[s])
        for k0 in range(split * BLOCK_K, n, SPLIT_K * BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(act_row_ptr + act_cols[s] + offs_k, mask=offs_k < n, other=0.0).to(tl.float32)
            acc += _gemv_dot_tile(
                a, q_ptrs[s], s_ptrs[s], z_ptrs[s], row0, grp0 + k0 // GROUP_SIZE, k0, n, cols, col_ok,
                hidden, hidden, BLOCK_K, BITS[s], DENSE_FP16, BITS[s] < 4,
            )  # fmt: skip
    acc *= tl.load(topk_w_ptr + pair).to(tl.float32)
    out_row = out_ptr + split.to(tl.int64) * stride_out_split + pair.to(tl.int64) * stride_out
    tl.store(out_row + cols, acc, mask=col_ok)


@triton.jit
def _w13_sorted_tile(
    x_ptr,
    tokens,
    row_ok,
    q_ptr,
    s_ptr,
    z_ptr,
    stride_w,
    act_ptrs,
    c0,
    n,
    tile,
    hidden,
    stride_x,
    BITS: tl.constexpr,
    DENSE_FP16: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One block of rows, one column tile of one slab, on tensor cores."""
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    gate_cols = 2 * c0 + cols
    up_cols = gate_cols + n
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            x_ptr + tokens[:, None] * stride_x + offs_k[None, :],
            mask=row_ok[:, None] & (offs_k < hidden)[None, :],
            other=0.0,
        )
        wg = _w13_weight_tile(
            q_ptr,
            s_ptr,
            z_ptr,
            k0,
            hidden,
            gate_cols,
            col_ok,
            stride_w,
            GROUP_SIZE,
            BLOCK_K,
            BITS,
            DENSE_FP16,
        )
        acc_g = _dot(a, wg.to(a.dtype), acc_g, IEEE)
        wu = _w13_weight_tile(
            q_ptr, s_ptr, z_ptr, k0, hidden, up_cols, col_ok, stride_w, GROUP_SIZE, BLOCK_K, BITS, DENSE_FP16
        )
        acc_u = _dot(a, wu.to(a.dtype), acc_u, IEEE)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(
        act_ptrs + cols[None, :], h.to(act_ptrs.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :]
    )


@triton.jit
def _w13_sorted_kernel(
    x_ptr,
    q_ptrs,
    s_ptrs,
    z_ptrs,
    w_strides,
    act_ptr,
    act_cols,
    tile_starts,
    sorted_ids_ptr,
    block_expert_ptr,
    sizes_ptr,
    col_off_ptr,
    hidden,
    num_pairs,
    top_k,
    meta_cols,
    stride_x,
    stride_act,
    BITS: tl.constexpr,
    DENSE_FP16: tl.constexpr,
    COLS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Prefill gate/up GEMM with fused SiLU-and-mul, all slots in one launch.

    Grid ``(num_blocks, tile_starts[-1])``.  ``sorted_ids [num_blocks * BLOCK_M]`` int32
    pair ids grouped by expert, padded with ``num_pairs``; ``block_expert [num_blocks]``
    int32 expert of each block (-1: unused block).  Other tensors as in
    :func:`_w13_gemv_kernel`; ``act`` has ``x``'s dtype.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    tokens = (pairs // top_k).to(tl.int64)
    act_ptrs = act_ptr + pairs.to(tl.int64)[:, None] * stride_act
    for s in tl.static_range(len(BITS)):
        tile = pid_n - tile_starts[s]
        if (tile >= 0) & (pid_n < tile_starts[s + 1]):
            n = tl.load(sizes_ptr + e * meta_cols + COLS[s])
            if tile * BLOCK_N < n:
                c0 = tl.load(col_off_ptr + e * meta_cols + COLS[s])
                _w13_sorted_tile(
                    x_ptr,
                    tokens,
                    row_ok,
                    q_ptrs[s],
                    s_ptrs[s],
                    z_ptrs[s],
                    w_strides[s],
                    act_ptrs + act_cols[s],
                    c0,
                    n,
                    tile,
                    hidden,
                    stride_x,
                    BITS[s],
                    DENSE_FP16,
                    GROUP_SIZE,
                    BLOCK_M,
                    BLOCK_N,
                    BLOCK_K,
                    IEEE,
                )


@triton.jit
def _w2_sorted_kernel(
    act_ptr,
    q_ptrs,
    s_ptrs,
    z_ptrs,
    act_cols,
    out_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    topk_w_ptr,
    sizes_ptr,
    row_off_ptr,
    grp_off_ptr,
    hidden,
    num_pairs,
    meta_cols,
    stride_act,
    stride_out,
    BITS: tl.constexpr,
    DENSE_FP16: tl.constexpr,
    COLS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Prefill down GEMM, split-K over the slots: ``out[p] = w[p] * sum_s act_s[p, :n] @ W_down_s``.

    Grid ``(num_blocks, cdiv(H, BLOCK_N))``; tensors as in :func:`_w2_gemv_kernel` and
    :func:`_w13_sorted_kernel`.  Rows of pairs that no block holds (non-local experts)
    are not written: the launcher zero-fills ``out``.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    pairs64 = pairs.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(len(BITS)):
        n = tl.load(sizes_ptr + e * meta_cols + COLS[s])
        row0 = tl.load(row_off_ptr + e * meta_cols + COLS[s])
        grp0 = tl.load(grp_off_ptr + e * meta_cols + COLS[s])
        for k0 in range(0, n, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(
                act_ptr + pairs64[:, None] * stride_act + act_cols[s] + offs_k[None, :],
                mask=row_ok[:, None] & (offs_k < n)[None, :],
                other=0.0,
            )
            w = _w2_weight_tile(
                q_ptrs[s],
                s_ptrs[s],
                z_ptrs[s],
                row0,
                grp0,
                k0,
                n,
                cols,
                col_ok,
                hidden,
                GROUP_SIZE,
                BLOCK_K,
                BITS[s],
                DENSE_FP16,
            )
            acc = _dot(a, w.to(a.dtype), acc, IEEE)
    acc *= tl.load(topk_w_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(
        out_ptr + pairs64[:, None] * stride_out + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :]
    )


@triton.jit
def _moe_align_kernel(
    ids_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_pairs,
    num_experts,
    num_blocks,
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """The sorted path's routing bookkeeping in one program: :func:`.launch.moe_align` on the GPU.

    Grid ``(1,)``.  ``ids [P]`` int32/int64 expert ids (outside ``[0, E)``: dropped);
    writes ``sorted_ids [num_blocks * BLOCK_M]`` int32 (each expert's pairs in ascending
    pair order, its run padded to whole blocks with ``P``) and ``block_expert
    [num_blocks]`` int32 (-1 past the used blocks).  No sort: pass 1 counts the pairs of
    every expert (one-hot ``[BLOCK_P, E_PAD]`` chunks summed), a prefix sum of the block
    counts gives each expert's first slot, pass 2 ranks each pair among the earlier pairs
    of its expert (a cumulative sum down the chunk plus a running count) and scatters it.
    Padding slots and ``block_expert`` are written from the block table, so no slot is
    written twice and no barrier is needed.  ``E_PAD``: a power of two >= ``E``.
    """
    experts = tl.arange(0, E_PAD)
    expert_ok = experts < num_experts
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        e = tl.load(ids_ptr + p, mask=p < num_pairs, other=-1)
        hit = (e[:, None] == experts[None, :]) & expert_ok[None, :]
        counts += tl.sum(hit.to(tl.int32), axis=0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, axis=0)
    start = (block_end - blocks) * BLOCK_M  # first slot of each expert's run
    used = tl.sum(blocks, axis=0)
    for b0 in range(0, num_blocks, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        # Owner of block b: the number of experts whose runs end at or before it.
        owner = tl.sum(((block_end[None, :] <= b[:, None]) & expert_ok[None, :]).to(tl.int32), axis=1)
        owner = tl.where(b < used, owner, -1)
        tl.store(block_expert_ptr + b, owner, mask=b < num_blocks)
        mine = experts[None, :] == owner[:, None]  # [BLOCK_B, E_PAD], no row set for unused blocks
        run_end = tl.sum(tl.where(mine, start + counts, 0), axis=1)  # first padding slot of the run
        slot = b[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        pad = (owner[:, None] < 0) | (slot >= run_end[:, None])
        tl.store(sorted_ids_ptr + slot, num_pairs, mask=pad & (b < num_blocks)[:, None])
    seen = tl.zeros([E_PAD], dtype=tl.int32)  # pairs of each expert in earlier chunks
    for p0 in range(0, num_pairs, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        e = tl.load(ids_ptr + p, mask=p < num_pairs, other=-1)
        hit = ((e[:, None] == experts[None, :]) & expert_ok[None, :]).to(tl.int32)
        rank = tl.cumsum(hit, axis=0) - 1 + seen[None, :] + start[None, :]
        dest = tl.sum(tl.where(hit > 0, rank, 0), axis=1)
        valid = tl.sum(hit, axis=1) > 0
        tl.store(sorted_ids_ptr + dest, p, mask=valid)
        seen += tl.sum(hit, axis=0)
