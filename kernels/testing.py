"""Test and benchmark helpers for the slab kernels: random layers, min-max RTN, dequantization.

Outside the runtime contract (:mod:`.slab_weights`): nothing the plugin or the kernels run
imports this module.  Like the rest of ``camera_kernels`` it imports only torch.

* :func:`quantize_rtn` - min-max asymmetric RTN of one ``W^T`` into checkpoint tensors;
* :func:`random_slab_weights` - a random RTN-quantized layer of given slab sizes;
* :func:`slab_weights_from_dense` - a layer from given dense experts;
* :func:`dequantize_slab`, :func:`dequantize_expert` - fp32 weights back from a layer
  (an independent oracle: per-slab :func:`.packing.dequantize`, no kernel code).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .packing import DENSE_BITS, dequantize, num_groups, pack, pack_dense
from .slab_weights import SCALE_DTYPE, SlabMoEWeights, SlabTensors

__all__ = [
    "dequantize_expert",
    "dequantize_slab",
    "quantize_rtn",
    "random_slab_weights",
    "slab_weights_from_dense",
]


def quantize_rtn(
    w_t: torch.Tensor, bits: int, group_size: int, dense_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max asymmetric round-to-nearest of ``w_t [K, N]`` with groups along K.

    At ``bits == 16`` the slab is dense: ``w_t`` rounded to ``dense_dtype`` and packed
    (:func:`.packing.pack_dense`), with empty ``[0, N]`` scales and zeros.

    Each group's range is ``[min(w, 0), max(w, 0)]`` split into ``2**bits - 1`` steps.

    Returns ``(packed [packed_rows(K, bits), N] int32, scales [ceil(K/G), N] fp16,
    zeros [ceil(K/G), N] fp16)``.  Zeros are integers in ``[0, 2**bits)``.  Codes are
    computed from the fp16-rounded scale and zero, so dequantizing the stored tensors
    reproduces exactly the values this function rounded to.  Meant for tests and
    benchmarks; the compressor has its own RTN/GPTQ.
    """
    k, n = w_t.shape
    if bits == DENSE_BITS:
        empty = torch.empty(0, n, dtype=SCALE_DTYPE, device=w_t.device)
        return pack_dense(w_t.to(dense_dtype)), empty, empty.clone()
    ng = num_groups(k, group_size)
    w = w_t.to(torch.float32)
    padded = torch.full((ng * group_size, n), float("nan"), device=w.device)
    padded[:k] = w
    grouped = padded.view(ng, group_size, n)
    nan = torch.isnan(grouped)
    # The range must contain 0 so that an integer zero point exists (as in GPTQ).
    lo = torch.where(nan, float("inf"), grouped).amin(dim=1).clamp(max=0.0)
    hi = torch.where(nan, float("-inf"), grouped).amax(dim=1).clamp(min=0.0)
    qmax = (1 << bits) - 1
    # A constant group still needs a finite, representable scale.
    scale = ((hi - lo) / qmax).clamp(min=1e-5).to(SCALE_DTYPE).to(torch.float32)
    zero = torch.round(-lo / scale).clamp(0, qmax).to(SCALE_DTYPE).to(torch.float32)
    idx = torch.arange(k, device=w.device) // group_size
    q = torch.clamp(torch.round(w / scale[idx] + zero[idx]), 0, qmax).to(torch.int32)
    return pack(q, bits), scale.to(SCALE_DTYPE), zero.to(SCALE_DTYPE)


def slab_weights_from_dense(
    gate: Sequence[torch.Tensor],
    up: Sequence[torch.Tensor],
    down: Sequence[torch.Tensor],
    slab_sizes: Sequence[Sequence[int]],
    bits: Sequence[int],
    group_size: int,
    dense_dtype: torch.dtype = torch.bfloat16,
) -> SlabMoEWeights:
    """A layer from dense experts quantized with min-max asymmetric RTN (:func:`quantize_rtn`).

    :param gate: per expert ``[n_e, H]`` (HF layout), rows already in slab order:
        the first ``slab_sizes[e][0]`` rows are the ``bits[0]`` slab, and so on.
    :param up: per expert ``[n_e, H]``, same row order.
    :param down: per expert ``[H, n_e]``, same column order.
    :param slab_sizes: ``[E][len(bits)]`` with ``sum(slab_sizes[e]) == n_e``.
    """
    if not (len(gate) == len(up) == len(down) == len(slab_sizes)):
        raise ValueError("gate, up, down and slab_sizes must have one entry per expert")
    hidden = int(gate[0].shape[1])
    experts: list[list[SlabTensors | None]] = []
    for e, (g, u, d, sizes) in enumerate(zip(gate, up, down, slab_sizes)):
        width = sum(sizes)
        if g.shape != (width, hidden) or u.shape != (width, hidden) or d.shape != (hidden, width):
            raise ValueError(
                f"expert {e}: gate/up must be [{width}, {hidden}] and down [{hidden}, {width}], got "
                f"{tuple(g.shape)}, {tuple(u.shape)}, {tuple(d.shape)}"
            )
        row: list[SlabTensors | None] = []
        start = 0
        for n, b in zip(sizes, bits):
            if n == 0:
                row.append(None)
                continue
            sl = slice(start, start + n)
            start += n
            gq = quantize_rtn(g[sl].t(), b, group_size, dense_dtype)
            uq = quantize_rtn(u[sl].t(), b, group_size, dense_dtype)
            dq = quantize_rtn(d[:, sl].t(), b, group_size, dense_dtype)
            row.append(SlabTensors(*gq, *uq, *dq))
        experts.append(row)
    device = gate[0].device
    return SlabMoEWeights.from_expert_tensors(
        experts, bits, hidden, group_size, device=device, dense_dtype=dense_dtype
    )


def dequantize_slab(w: SlabMoEWeights, e: int, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``(gate [n, H], up [n, H], down [H, n])`` of expert ``e``'s slab ``i`` of ``w``."""
    lay = w.layout
    n, b, h, g = lay.sizes[e][i], lay.bits[i], lay.hidden_size, lay.group_size
    if n == 0:
        empty = torch.empty(0, h, dtype=torch.float32, device=w.device)
        return empty, empty.clone(), empty.t().clone()
    cols = slice(2 * lay.col_offset(e, i), 2 * lay.col_offset(e, i) + 2 * n)
    w13 = dequantize(
        w.w13_qweight[i][:, cols].contiguous(),
        w.w13_scales[i][:, cols],
        w.w13_zeros[i][:, cols],
        b,
        h,
        g,
        dense_dtype=lay.dense_dtype,
    )  # [H, 2n]
    rows, grps = lay.down_rows(e, i), lay.down_groups(e, i)
    w2 = dequantize(
        w.w2_qweight[i][rows],
        w.w2_scales[i][grps],
        w.w2_zeros[i][grps],
        b,
        n,
        g,
        dense_dtype=lay.dense_dtype,
    )  # [n, H]
    return w13[:, :n].t(), w13[:, n:].t(), w2.t()


def dequantize_expert(w: SlabMoEWeights, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``(gate [I_e, H], up [I_e, H], down [H, I_e])`` of expert ``e`` of ``w``, slabs in bit order."""
    parts = [dequantize_slab(w, e, i) for i in range(w.layout.num_bits)]
    return (
        torch.cat([p[0] for p in parts], dim=0),
        torch.cat([p[1] for p in parts], dim=0),
        torch.cat([p[2] for p in parts], dim=1),
    )


def random_slab_weights(
    sizes: Sequence[Sequence[int]],
    bits: Sequence[int],
    hidden_size: int,
    group_size: int,
    *,
    std: float = 0.05,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dense_dtype: torch.dtype = torch.bfloat16,
) -> SlabMoEWeights:
    """A random layer (Gaussian weights of ``std``, RTN-quantized) for tests and benchmarks.

    ``bits`` may include 16: those slabs hold the weights rounded to ``dense_dtype``.

    Experts are generated and quantized one at a time, so only one dense expert is
    ever held in memory (the benchmark shapes have about 10^9 weights per layer).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    experts: list[list[SlabTensors | None]] = []
    for row in sizes:
        slabs: list[SlabTensors | None] = []
        for n, b in zip(row, bits):
            if n == 0:
                slabs.append(None)
                continue
            g, u, d = (
                torch.randn(shape, generator=gen, device=device) * std
                for shape in ((hidden_size, n), (hidden_size, n), (n, hidden_size))
            )
            slabs.append(
                SlabTensors(
                    *quantize_rtn(g, b, group_size, dense_dtype),
                    *quantize_rtn(u, b, group_size, dense_dtype),
                    *quantize_rtn(d, b, group_size, dense_dtype),
                )
            )
        experts.append(slabs)
    return SlabMoEWeights.from_expert_tensors(
        experts, bits, hidden_size, group_size, device=device, dense_dtype=dense_dtype
    )
