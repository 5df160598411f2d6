"""Bit layout of CAMERA slab tensors: pack and unpack in plain torch.

A quantized matrix is stored K-major: the HF weight ``W [out, in]`` is stored as
``W^T [K=in, N=out]`` and packed along K, so one packed int32 row holds bits of 32
consecutive input channels for every output channel (N stays contiguous, which the
Triton kernel reads coalesced).

Packing of ``q [K, N]`` (integers in ``[0, 2**bits)``) at ``bits`` b:

* K is padded with zeros to a multiple of 32; each block of 32 K-rows becomes b
  int32 rows, so ``packed.shape == (ceil(K / 32) * b, N)``.
* b is split into power-of-two parts, highest first (3 -> 2 + 1, 8 -> 8). Part p
  holding bits ``[s, s + p)`` of each value uses p words of the block: value i of
  the block sits in word ``i // (32 // p)`` of that part at bit ``(i % (32 // p)) * p``.
  For b in {1, 2, 4, 8} this is ordinary little-endian stream packing; for 3 it is a
  2-bit plane followed by a 1-bit plane, so no value straddles two words.

Dequantization is ``w = (q - zeros[k // G]) * scales[k // G]`` with ``scales`` and
``zeros`` of shape ``[ceil(K / G), N]``: groups run along K and the last one may be
short (a slab of down-projection columns need not be a multiple of G).

Bit-width 16 is the *dense* slab (a CAMERA-P layer, or weights kept unquantized): the
codes are the raw bf16 or fp16 bit patterns of the weights, packed like any width (two
per word, the first in the low half), and there are no scales or zeros (their
tensors have 0 rows).  :func:`pack_dense` builds it from a 16-bit float tensor with a
view instead of the generic packing loop.
"""

from __future__ import annotations

import torch

# The geometry is torch-free (the checkpoint format uses it); re-exported here for callers.
from .geometry import (
    DENSE_BITS,
    PACK_BLOCK,
    QUANT_BITS,
    SUPPORTED_BITS,
    bit_parts,
    num_groups,
    packed_rows,
    scale_rows,
)

__all__ = [
    "DENSE_BITS",
    "DENSE_DTYPES",
    "PACK_BLOCK",
    "QUANT_BITS",
    "SUPPORTED_BITS",
    "bit_parts",
    "check_dense_dtype",
    "codes_to_dense",
    "dequantize",
    "num_groups",
    "pack",
    "pack_dense",
    "packed_rows",
    "scale_rows",
    "unpack",
]

#: What a dense (16-bit) slab may hold.
DENSE_DTYPES = (torch.bfloat16, torch.float16)


def check_dense_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if a dense slab can hold it (bf16, fp16), else ``ValueError``."""
    if dtype not in DENSE_DTYPES:
        raise ValueError(f"a 16-bit dense slab holds {DENSE_DTYPES}, not {dtype}")
    return dtype


def pack_dense(w_t: torch.Tensor) -> torch.Tensor:
    """Dense slab of ``w_t [K, N]`` (bf16 or fp16, kept bit for bit): int32 ``[ceil(K/32)*16, N]``.

    Equal to ``pack(codes, 16)`` of the raw bit patterns, built with one copy: pairs of
    K rows become the low and high halves of one little-endian word.
    """
    check_dense_dtype(w_t.dtype)
    if w_t.dim() != 2:
        raise ValueError(f"pack_dense expects a 2-D [K, N] tensor, got shape {tuple(w_t.shape)}")
    k, n = w_t.shape
    pad = (-k) % PACK_BLOCK
    if pad:
        w_t = torch.cat([w_t, w_t.new_zeros(pad, n)])
    pairs = w_t.view(torch.int16).reshape(-1, 2, n).transpose(1, 2).contiguous()  # [K/2, N, 2]
    return pairs.view(torch.int32).reshape(-1, n)


def codes_to_dense(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """16-bit codes (int32 in ``[0, 2**16)``) as the ``dtype`` values whose bit patterns they are, in fp32."""
    check_dense_dtype(dtype)
    if dtype == torch.bfloat16:
        # A bf16 is the high half of the fp32 with the same value.
        return (codes.to(torch.int32) << 16).view(torch.float32)
    return codes.to(torch.int16).view(torch.float16).to(torch.float32)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # Words are built in int64 as unsigned 32-bit values; fold them into int32's range.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``q [K, N]`` (0 <= q < 2**bits) into int32 ``[ceil(K/32)*bits, N]``."""
    if q.dim() != 2:
        raise ValueError(f"pack expects a 2-D [K, N] tensor, got shape {tuple(q.shape)}")
    q = q.to(torch.int64)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit packing: [{int(q.min())}, {int(q.max())}]")
    k, n = q.shape
    pad = (-k) % PACK_BLOCK
    if pad:
        q = torch.cat([q, q.new_zeros(pad, n)])
    blocks = q.view(-1, PACK_BLOCK, n)  # [nb, 32, N]
    out = []
    for width, shift in bit_parts(bits):
        per_word = PACK_BLOCK // width
        part = ((blocks >> shift) & ((1 << width) - 1)).view(blocks.shape[0], width, per_word, n)
        shifts = (torch.arange(per_word, dtype=torch.int64, device=q.device) * width).view(1, 1, -1, 1)
        out.append((part << shifts).sum(dim=2))  # [nb, width, N]
    words = torch.cat(out, dim=1).reshape(-1, n)
    return _to_int32(words)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 ``[ceil(k/32)*bits, N]`` -> int32 codes ``[k, N]``."""
    if packed.dim() != 2 or packed.shape[0] != packed_rows(k, bits):
        raise ValueError(
            f"packed tensor of shape {tuple(packed.shape)} does not hold K={k} values at {bits} bits "
            f"(expected {packed_rows(k, bits)} rows)"
        )
    n = packed.shape[1]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    blocks = words.view(-1, bits, n)  # [nb, bits, N]
    q = torch.zeros(blocks.shape[0], PACK_BLOCK, n, dtype=torch.int64, device=packed.device)
    row = 0
    for width, shift in bit_parts(bits):
        per_word = PACK_BLOCK // width
        part_words = blocks[:, row : row + width, :].unsqueeze(2)  # [nb, width, 1, N]
        shifts = (torch.arange(per_word, dtype=torch.int64, device=packed.device) * width).view(1, 1, -1, 1)
        vals = (part_words >> shifts) & ((1 << width) - 1)  # [nb, width, per_word, N]
        q |= vals.reshape(blocks.shape[0], PACK_BLOCK, n) << shift
        row += width
    return q.view(-1, n)[:k].to(torch.int32)


def dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    k: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
    dense_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantize one packed slab to ``[k, N]`` in ``dtype`` (math in fp32).

    A dense (16-bit) slab ignores ``scales``/``zeros`` and reads its codes as ``dense_dtype``.
    """
    if bits == DENSE_BITS:
        return codes_to_dense(unpack(packed, bits, k), dense_dtype).to(dtype)
    q = unpack(packed, bits, k).to(torch.float32)
    idx = torch.arange(k, device=packed.device) // group_size
    s = scales.to(torch.float32)[idx]
    z = zeros.to(torch.float32)[idx]
    return ((q - z) * s).to(dtype)
