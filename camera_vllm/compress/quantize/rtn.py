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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from camera_kernels.packing import num_groups, pack
from camera_vllm.format.quant_params import check_bits as check_bit_widths
from camera_vllm.format.quant_params import check_group_size

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
    """One bit-width, checked by :func:`camera_vllm.format.quant_params.check_bits`."""
    return check_bit_widths([bits])[0]


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
    return _codes(w, scales, zeros, float((1 << bits) - 1)).to(torch.int32)


def _codes(w: Tensor, scales: Tensor, zeros: Tensor, levels: float | Tensor) -> Tensor:
    """fp32 codes of :func:`quantize_to_grid`; ``levels`` (``2**bits - 1``) may be a tensor
    broadcasting against ``w`` (one bit-width per column)."""
    q = torch.round(w.to(torch.float32) / scales.to(torch.float32) + zeros.to(torch.float32))
    if isinstance(levels, Tensor):
        return torch.minimum(q.clamp_(min=0), levels)
    return q.clamp_(0, levels)


def levels_of(bits: int | Tensor) -> float | Tensor:
    """``2**bits - 1`` as the float (or fp32 tensor) the grid functions take."""
    if isinstance(bits, Tensor):
        return (torch.ones_like(bits, dtype=torch.float32) * 2).pow_(bits.to(torch.float32)).sub_(1)
    return float((1 << bits) - 1)


def _fp16_round(x: Tensor) -> Tensor:
    return x.to(torch.float16).to(torch.float32)


def _grid_from_range(
    lo: Tensor,
    hi: Tensor,
    bits: int | None = None,
    *,
    levels: float | Tensor | None = None,
    check: bool = True,
) -> tuple[Tensor, Tensor]:
    """fp16-representable (scale, zero) of an asymmetric grid spanning ``[lo, hi]`` (fp32 in/out).

    Give ``bits`` or ``levels`` (``2**bits - 1``, possibly a tensor broadcasting against
    ``lo``).  Every branch is computed with ``torch.where`` (no host sync); ``check=False``
    leaves the finiteness check (the one sync) to the caller.
    """
    lv = levels if levels is not None else float((1 << bits) - 1)  # type: ignore[operator]
    span = hi - lo
    const = span <= 0

    scale = _fp16_round(span / lv)
    tiny = torch.full_like(scale, _TINY_SCALE)
    scale = torch.where(scale > 0, scale, tiny)
    zero = -lo / scale
    # Narrow ranges far from 0 (or fp16-underflowing scales): widen the range to include 0
    # so the zero-point stays in [0, levels] where fp16 resolves it to <= 1/16 code.
    far = ~const & (zero.abs() > _MAX_ABS_ZERO)
    lo0, hi0 = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    s0 = _fp16_round((hi0 - lo0) / lv)
    s0 = torch.where(s0 > 0, s0, tiny)
    scale = torch.where(far, s0, scale)
    zero = torch.where(far, -lo0 / s0, zero)
    zero = _fp16_round(zero)

    # Constant groups: represent the constant c exactly (when c is fp16) with scale |c|:
    # c > 0 -> code 1, zero 0;  c < 0 -> code 0, zero 1;  c == 0 -> tiny scale, zero 0.
    c_scale = _fp16_round(lo.abs())
    c_scale = torch.where(c_scale > 0, c_scale, tiny)
    c_zero = (lo < 0).to(torch.float32)
    scale = torch.where(const, c_scale, scale)
    zero = torch.where(const, c_zero, zero)
    if check:
        check_finite_scales(scale)
    return scale, zero


def check_finite_scales(scales: Tensor) -> None:
    """Raise if a scale overflowed fp16 (one host sync)."""
    if not bool(torch.isfinite(scales).all()):
        # fp16 rounding of anything above 65504 gives inf.
        raise ValueError("weights too large for fp16 scales (a quantization step or constant exceeds 65504)")


# Elements of one clipping-search chunk (candidates x group elements): bounds its temporaries.
# On a GPU big chunks mean few launches; on a CPU the chunk should stay in cache (a chunk of
# many candidates is memory-bound and slower than one candidate at a time).
_CLIP_CHUNK_ELEMS = {"cpu": 1 << 18}
_CLIP_CHUNK_DEFAULT = 1 << 24


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
    scale, zero = fit_grid(wg, float((1 << bits) - 1), valid=valid, clip_ratios=clip_ratios)
    check_finite_scales(scale)
    return scale, zero


def fit_grid(
    wg: Tensor,
    levels: float | Tensor,
    *,
    valid: Tensor | None = None,
    clip_ratios: Sequence[float] | None = None,
    masked_range: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`fit_group_grid` for any leading dims ``wg [..., G, N]``, without host syncs.

    :param levels: ``2**bits - 1``: a float, or a tensor broadcasting against ``[..., N]``
        (a bit-width per column, e.g. several slabs in one matrix).
    :param valid: bool/float ``[..., G, 1]`` of real rows.  With ``masked_range`` the rows
        outside it are also left out of min/max (they may hold anything; a group with no
        real row gets the grid of 0).
    :return: ``(scales, zeros)`` ``[..., N]``; finiteness is not checked
        (:func:`check_finite_scales`).

    The clipping search prices every ratio in one batched computation (in chunks of ratios
    bounding the temporaries) and keeps, per group and column, the first ratio with the
    least error, like a sequential strict-improvement search starting from ``[min, max]``.
    """
    wg = wg.to(torch.float32)
    if valid is not None and masked_range:
        vb = valid.to(torch.bool)
        lo = torch.where(vb, wg, torch.full_like(wg, math.inf)).amin(dim=-2)
        hi = torch.where(vb, wg, torch.full_like(wg, -math.inf)).amax(dim=-2)
        empty = ~vb.any(dim=-2)
        lo = torch.where(empty, torch.zeros_like(lo), lo)
        hi = torch.where(empty, torch.zeros_like(hi), hi)
    else:
        lo, hi = wg.amin(dim=-2), wg.amax(dim=-2)
    scale, zero = _grid_from_range(lo, hi, levels=levels, check=False)
    ratios = [r for r in (clip_ratios or ()) if r < 1.0]  # the unclipped grid is the start
    if not ratios:
        return scale, zero

    lv = levels.unsqueeze(-2) if isinstance(levels, Tensor) and levels.dim() else levels
    vmask = None if valid is None else valid.to(torch.float32)

    def sq_err(s: Tensor, z: Tensor) -> Tensor:  # s, z [R, ..., N] -> [R, ..., N]
        s3, z3 = s.unsqueeze(-2), z.unsqueeze(-2)
        err = (_codes(wg, s3, z3, lv) - z3) * s3 - wg
        err = err * err
        if vmask is not None:
            err = err * vmask
        return err.sum(dim=-2)

    mid, half = (hi + lo) * 0.5, (hi - lo) * 0.5
    best_s, best_z = scale, zero
    best = sq_err(scale.unsqueeze(0), zero.unsqueeze(0))[0]
    chunk = _CLIP_CHUNK_ELEMS.get(wg.device.type, _CLIP_CHUNK_DEFAULT)
    step = max(1, chunk // max(wg.numel(), 1))
    all_r = torch.tensor(ratios, dtype=torch.float32, device=wg.device)  # one host->device copy
    for c in range(0, len(ratios), step):
        r = all_r[c : c + step].view(-1, *([1] * mid.dim()))
        s, z = _grid_from_range(mid - half * r, mid + half * r, levels=levels, check=False)
        err = sq_err(s, z)
        # First candidate with the least error (argmin keeps the first of equal values);
        # it replaces the best so far only if strictly better, as the sequential search.
        i = err.argmin(dim=0, keepdim=True)
        e_min = err.gather(0, i)[0]
        better = e_min < best
        best_s = torch.where(better, s.gather(0, i)[0], best_s)
        best_z = torch.where(better, z.gather(0, i)[0], best_z)
        best = torch.minimum(e_min, best)
    return best_s, best_z


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
    :param group_size: rows of ``wt`` per group, a positive multiple of 32 (the last group
        may be shorter).
    :param clip_search: search ``clip_ratios`` per group and column for the least squared
        error instead of using the plain ``[min, max]`` range (costs ``len(clip_ratios)`` x).
    :return: codes, fp16 scales (> 0) and fp16 zeros such that every element is within
        half a step of its reconstruction (``scale / 2``) when ``clip_search`` is off.
    """
    check_bits(bits)
    if wt.dim() != 2:
        raise ValueError(f"quantize_rtn expects a 2-D [K, N] tensor, got shape {tuple(wt.shape)}")
    check_group_size(group_size)
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
