"""Asymmetric group-wise round-to-nearest (RTN) quantization of K-major matrices.

Every quantizer in this package works on ``W^T [K, N]``: the HF weight ``W [out, in]``
transposed, so K is the input dim (the dim the checkpoint packs along and the dim
quantization groups run along, see :mod:`camera_kernels.packing`).  Group ``g`` holds
rows ``[g*G, (g+1)*G)`` of ``W^T``; the last group may be short.  For each group and
each output column there is one fp16 ``scale`` and one fp16 ``zero`` and

    w ~= (q - zero) * scale,   q in [0, 2**bits - 1]

``zero`` is a float (fractional zero-points are allowed), which lets the grid sit
exactly on ``[min, max]`` of the group instead of being widened to include 0.

The grid is rounded to fp16 *before* the codes are chosen, so the codes are optimal
for the values the checkpoint actually stores (rounding afterwards would shift every
reconstruction point by the fp16 rounding error of ``zero``, up to 1/16 of a step at
8 bits).  All arithmetic is fp32 whatever the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from camera_kernels.packing import QUANT_BITS, num_groups, pack

__all__ = [
    "DEFAULT_CLIP_RATIOS",
    "QuantizedMatrix",
    "check_bits",
    "dequantize_codes",
    "fit_group_grid",
    "quantize_rtn",
    "quantize_to_grid",
]

# Shrink factors of the [min, max] range tried by the optional clipping search.  The grid
# reaches down to 0.2 because the MSE-optimal 1-bit levels of a Gaussian group of 128
# sit near +-0.8 sigma while min/max sit near +-2.6 sigma.
DEFAULT_CLIP_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(17))

# Smallest positive fp16 (subnormal 2**-24): the scale of an all-zero group, and the
# floor for scales that would underflow to 0 in fp16.
_TINY_SCALE = 2.0**-24
# Beyond this |zero| the fp16 spacing of the zero-point exceeds 1/2 code (it is 1 from
# 1024 on), so the grid could no longer be placed precisely: such groups (a narrow range
# far from 0) fall back to a grid that includes 0, whose zero lies in [0, 2**bits - 1].
_MAX_ABS_ZERO = 1024.0


def check_bits(bits: int) -> int:
    """Validate a bit-width against the ones the packed format supports."""
    if bits not in QUANT_BITS:
        raise ValueError(f"unsupported bit-width {bits}; supported: {QUANT_BITS}")
    return bits


@dataclass(frozen=True)
class QuantizedMatrix:
    """Codes and grid of one quantized K-major matrix ``W^T [K, N]``.

    :param q: int32 codes ``[K, N]`` in ``[0, 2**bits)``.
    :param scales: float16 ``[ceil(K / group_size), N]``, all > 0.
    :param zeros: float16 ``[ceil(K / group_size), N]`` (fractional allowed).
    """

    q: Tensor
    scales: Tensor
    zeros: Tensor
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.q.shape[0]), int(self.q.shape[1]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(q - zero) * scale`` as ``[K, N]`` in ``dtype`` (math in fp32)."""
        return dequantize_codes(self.q, self.scales, self.zeros, self.group_size, dtype)

    def packed(self) -> Tensor:
        """The checkpoint's ``qweight``: codes packed along K (:func:`camera_kernels.packing.pack`)."""
        return pack(self.q, self.bits)


def dequantize_codes(
    q: Tensor, scales: Tensor, zeros: Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Dequantize unpacked codes ``q [K, N]`` with per-group ``scales``/``zeros`` ``[ceil(K/G), N]``."""
    idx = torch.arange(q.shape[0], device=q.device) // group_size
    s = scales.to(torch.float32)[idx]
    z = zeros.to(torch.float32)[idx]
    return ((q.to(torch.float32) - z) * s).to(dtype)


def quantize_to_grid(w: Tensor, scales: Tensor, zeros: Tensor, bits: int) -> Tensor:
    """Nearest codes of ``w`` on the grid ``(q - zeros) * scales``, clamped to ``[0, 2**bits)``.

    ``scales``/``zeros`` broadcast against ``w`` and should already hold fp16-representable
    values (as returned by :func:`fit_group_grid`).  Returns int32.
    """
    levels = (1 << bits) - 1
    q = torch.round(w.to(torch.float32) / scales.to(torch.float32) + zeros.to(torch.float32))
    return q.clamp_(0, levels).to(torch.int32)


def _fp16_round(x: Tensor) -> Tensor:
    return x.to(torch.float16).to(torch.float32)


def _grid_from_range(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """fp16-representable (scale, zero) of an asymmetric grid spanning ``[lo, hi]`` (fp32 in/out)."""
    levels = float((1 << bits) - 1)
    span = hi - lo
    const = span <= 0

    scale = _fp16_round(span / levels)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, _TINY_SCALE))
    zero = -lo / scale
    # Narrow ranges far from 0 (or fp16-underflowing scales): widen the range to include 0
    # so the zero-point stays in [0, levels] where fp16 resolves it to <= 1/16 code.
    far = ~const & (zero.abs() > _MAX_ABS_ZERO)
    if bool(far.any()):
        lo0, hi0 = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        s0 = _fp16_round((hi0 - lo0) / levels)
        s0 = torch.where(s0 > 0, s0, torch.full_like(s0, _TINY_SCALE))
        scale = torch.where(far, s0, scale)
        zero = torch.where(far, -lo0 / s0, zero)
    zero = _fp16_round(zero)

    # Constant groups: represent the constant c exactly (when c is fp16) with scale |c|:
    # c > 0 -> code 1, zero 0;  c < 0 -> code 0, zero 1;  c == 0 -> tiny scale, zero 0.
    if bool(const.any()):
        c = lo
        c_scale = _fp16_round(c.abs())
        c_scale = torch.where(c_scale > 0, c_scale, torch.full_like(c_scale, _TINY_SCALE))
        c_zero = (c < 0).to(torch.float32)
        scale = torch.where(const, c_scale, scale)
        zero = torch.where(const, c_zero, zero)
    if not bool(torch.isfinite(scale).all()):
        # fp16 rounding of anything above 65504 gives inf.
        raise ValueError("weights too large for fp16 scales (a quantization step or constant exceeds 65504)")
    return scale, zero


def fit_group_grid(
    wg: Tensor,
    bits: int,
    *,
    valid: Tensor | None = None,
    clip_ratios: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Min-max grid of groups ``wg [num_groups, G, N]``, one (scale, zero) per group and column.

    :param valid: optional bool ``[num_groups, G, 1]`` marking real rows (padding rows of a
        short last group are excluded from the clipping error; for min/max they must be
        copies of real rows).
    :param clip_ratios: if given, each group's ``[min, max]`` is shrunk around its midpoint by
        every ratio and the ratio with the least squared error is kept, per group and column.
    :return: fp32 ``(scales, zeros)`` of shape ``[num_groups, N]`` holding fp16 values.
    """
    check_bits(bits)
    wg = wg.to(torch.float32)
    lo, hi = wg.amin(dim=1), wg.amax(dim=1)
    scale, zero = _grid_from_range(lo, hi, bits)
    if not clip_ratios:
        return scale, zero

    mid, half = (hi + lo) * 0.5, (hi - lo) * 0.5

    def sq_err(s: Tensor, z: Tensor) -> Tensor:
        s3, z3 = s.unsqueeze(1), z.unsqueeze(1)
        err = (quantize_to_grid(wg, s3, z3, bits).to(torch.float32) - z3) * s3 - wg
        err = err * err
        if valid is not None:
            err = err * valid
        return err.sum(dim=1)

    best = sq_err(scale, zero)
    for ratio in clip_ratios:
        if ratio >= 1.0:
            continue  # the unclipped grid is the starting point
        s, z = _grid_from_range(mid - half * ratio, mid + half * ratio, bits)
        err = sq_err(s, z)
        better = err < best
        scale, zero, best = (
            torch.where(better, s, scale),
            torch.where(better, z, zero),
            torch.minimum(err, best),
        )
    return scale, zero


def _grouped(wt: Tensor, group_size: int) -> tuple[Tensor, Tensor | None]:
    """``wt [K, N]`` -> ``[ceil(K/G), G, N]``; a short last group is padded with copies of its last row."""
    k, n = wt.shape
    pad = (-k) % group_size
    if not pad:
        return wt.reshape(-1, group_size, n), None
    padded = torch.cat([wt, wt[-1:].expand(pad, n)])
    valid = torch.ones(padded.shape[0], 1, dtype=torch.float32, device=wt.device)
    valid[k:] = 0
    return padded.reshape(-1, group_size, n), valid.reshape(-1, group_size, 1)


def quantize_rtn(
    wt: Tensor,
    bits: int,
    group_size: int,
    *,
    clip_search: bool = False,
    clip_ratios: Sequence[float] = DEFAULT_CLIP_RATIOS,
) -> QuantizedMatrix:
    """Asymmetric group-wise min-max RTN of a K-major matrix ``wt = W^T [K, N]``.

    :param bits: one of 1, 2, 3, 4, 8.
    :param group_size: rows of ``wt`` per group (the last group may be shorter).
    :param clip_search: search ``clip_ratios`` per group and column for the least squared
        error instead of using the plain ``[min, max]`` range (costs ``len(clip_ratios)`` x).
    :return: codes, fp16 scales (> 0) and fp16 zeros such that every element is within
        half a step of its reconstruction (``scale / 2``) when ``clip_search`` is off.
    """
    check_bits(bits)
    if wt.dim() != 2:
        raise ValueError(f"quantize_rtn expects a 2-D [K, N] tensor, got shape {tuple(wt.shape)}")
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    k, n = wt.shape
    w = wt.to(torch.float32)
    if k == 0 or n == 0:
        g = num_groups(k, group_size)
        empty = torch.zeros(g, n, dtype=torch.float16, device=wt.device)
        return QuantizedMatrix(
            torch.zeros(k, n, dtype=torch.int32, device=wt.device), empty + 1, empty, bits, group_size
        )
    wg, valid = _grouped(w, group_size)
    scale, zero = fit_group_grid(wg, bits, valid=valid, clip_ratios=clip_ratios if clip_search else None)
    q = quantize_to_grid(wg, scale.unsqueeze(1), zero.unsqueeze(1), bits).reshape(-1, n)[:k]
    return QuantizedMatrix(q.contiguous(), scale.to(torch.float16), zero.to(torch.float16), bits, group_size)
