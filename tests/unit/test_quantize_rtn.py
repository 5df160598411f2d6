"""Group-wise asymmetric RTN on K-major matrices (camera_vllm.compress.quantize.rtn)."""

from __future__ import annotations

import pytest
import torch

from camera_kernels.packing import dequantize, unpack
from camera_vllm.compress.quantize.rtn import QuantizedMatrix, quantize_rtn

BITS = (1, 2, 3, 4, 8)


def _weights(k: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Columns of different magnitude, rows with a few outliers: groups see varied ranges.
    w = torch.randn(k, n, generator=g) * torch.logspace(-3, 0, n).unsqueeze(0)
    w[torch.rand(k, n, generator=g) < 0.01] *= 8
    return w


def _expand(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    return t.to(torch.float32)[torch.arange(k) // group_size]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,group_size", [(200, 64), (128, 128), (40, 64)])
def test_error_within_half_step(bits: int, k: int, group_size: int) -> None:
    w = _weights(k, 48, seed=bits)
    qm = quantize_rtn(w, bits, group_size)
    ng = -(-k // group_size)
    assert qm.q.shape == (k, 48) and qm.q.dtype == torch.int32
    assert qm.scales.shape == (ng, 48) and qm.scales.dtype == torch.float16
    assert qm.zeros.shape == (ng, 48) and qm.zeros.dtype == torch.float16
    assert int(qm.q.min()) >= 0 and int(qm.q.max()) <= 2**bits - 1
    assert bool((qm.scales > 0).all())
    err = (w - qm.dequantize()).abs()
    s = _expand(qm.scales, k, group_size)
    # Half a step, plus fp32 rounding slack of the division (far below an fp16 ulp of the step).
    assert bool((err <= s * 0.5 * (1 + 1e-3) + 1e-7).all()), float((err / s).max())
    # Min-max grids use the whole code range in (almost) every group-column.
    assert int(qm.q.max()) == 2**bits - 1 and int(qm.q.min()) == 0


@pytest.mark.parametrize("bits", BITS)
def test_codes_are_nearest_on_the_stored_fp16_grid(bits: int) -> None:
    k, g = 192, 64
    w = _weights(k, 32, seed=10 + bits)
    qm = quantize_rtn(w, bits, g)
    s, z = _expand(qm.scales, k, g), _expand(qm.zeros, k, g)
    q = qm.q.to(torch.float32)
    err = (w - (q - z) * s).abs()
    for step in (-1, 1):
        nb = q + step
        ok = (nb >= 0) & (nb <= 2**bits - 1)
        err_nb = (w - (nb - z) * s).abs()
        assert bool((err[ok] <= err_nb[ok] + 1e-6 * s[ok]).all())


@pytest.mark.parametrize("bits", BITS)
def test_matrix_built_from_codes_is_exact(bits: int) -> None:
    k, n, g = 160, 24, 32
    gen = torch.Generator().manual_seed(bits)
    levels = 2**bits - 1
    ng = k // g
    q = torch.randint(0, levels + 1, (k, n), generator=gen)
    # Every group-column uses the extreme codes, so min-max recovers the grid.
    q[0::g] = 0
    q[1::g] = levels
    scales = (torch.rand(ng, n, generator=gen) * 0.1 + 1e-3).to(torch.float16)
    zeros = (torch.rand(ng, n, generator=gen) * levels).to(torch.float16)  # fractional zero-points
    w = (q.float() - _expand(zeros, k, g)) * _expand(scales, k, g)
    qm = quantize_rtn(w, bits, g)
    assert torch.equal(qm.dequantize(), w)
    assert torch.equal(qm.q, q.to(torch.int32))
    assert torch.equal(qm.scales, scales) and torch.equal(qm.zeros, zeros)


@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_dequantize_exactly(bits: int) -> None:
    k, g = 100, 32  # groups of 32, 32, 32, 4
    w = _weights(k, 6, seed=3)
    w[:32, 0] = 0.0
    w[32:64, 1] = 0.5
    w[64:96, 2] = -0.375
    w[96:, 3] = 3.0517578125e-05  # an fp16 subnormal-range value
    w[:, 4] = -1.25  # a whole constant column
    w[:, 5] = 0.0
    qm = quantize_rtn(w, bits, g)
    deq = qm.dequantize()
    assert bool((qm.scales > 0).all())
    for rows, col in ((slice(0, 32), 0), (slice(32, 64), 1), (slice(64, 96), 2), (slice(96, 100), 3)):
        assert torch.equal(deq[rows, col], w[rows, col])
    assert torch.equal(deq[:, 4], w[:, 4]) and torch.equal(deq[:, 5], w[:, 5])


def test_narrow_range_far_from_zero_keeps_bound() -> None:
    gen = torch.Generator().manual_seed(0)
    w = 100.0 + 1e-3 * torch.randn(128, 16, generator=gen)
    for bits in BITS:
        qm = quantize_rtn(w, bits, 64)
        assert bool(torch.isfinite(qm.zeros.float()).all())
        s = _expand(qm.scales, 128, 64)
        assert bool(((w - qm.dequantize()).abs() <= s * 0.5 * (1 + 1e-3) + 1e-5).all())


def test_input_dtype_and_tiny_shapes() -> None:
    w = _weights(70, 5).to(torch.bfloat16)
    qm = quantize_rtn(w, 4, 128)  # a single short group
    assert qm.scales.shape == (1, 5)
    s = _expand(qm.scales, 70, 128)
    assert bool(((w.float() - qm.dequantize()).abs() <= s * 0.5 * (1 + 1e-3) + 1e-7).all())
    one = quantize_rtn(torch.tensor([[0.25, -2.0]]), 2, 64)  # K = 1: constant groups
    assert torch.equal(one.dequantize(), torch.tensor([[0.25, -2.0]]))
    with pytest.raises(ValueError):
        quantize_rtn(w, 5, 64)
    with pytest.raises(ValueError):
        quantize_rtn(w.flatten(), 4, 64)


@pytest.mark.parametrize("bits", BITS)
def test_packed_round_trip(bits: int) -> None:
    k, g = 200, 64
    qm = quantize_rtn(_weights(k, 20, seed=bits), bits, g)
    packed = qm.packed()
    assert packed.shape == (-(-k // 32) * bits, 20) and packed.dtype == torch.int32
    assert torch.equal(unpack(packed, bits, k), qm.q)
    assert torch.equal(dequantize(packed, qm.scales, qm.zeros, bits, k, g), qm.dequantize())


def test_clip_search_never_worse_and_helps_low_bits() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(256, 64, generator=gen)
    for bits in BITS:
        plain = quantize_rtn(w, bits, 64)
        clip = quantize_rtn(w, bits, 64, clip_search=True)
        e_plain = (w - plain.dequantize()).pow(2).reshape(4, 64, 64).sum(1)
        e_clip = (w - clip.dequantize()).pow(2).reshape(4, 64, 64).sum(1)
        assert bool((e_clip <= e_plain * (1 + 1e-6)).all())  # per group and column
        if bits <= 2:
            assert float(e_clip.sum()) < 0.6 * float(e_plain.sum())
    # 1-bit min-max RTN is worse than pruning; clipped it keeps most of the energy.
    rel = lambda m: float((w - m.dequantize()).pow(2).sum() / w.pow(2).sum())  # noqa: E731
    assert rel(quantize_rtn(w, 1, 64)) > 1.0 > 0.5 > rel(quantize_rtn(w, 1, 64, clip_search=True))


def test_quantized_matrix_shape_property() -> None:
    qm = quantize_rtn(_weights(33, 7), 3, 32)
    assert isinstance(qm, QuantizedMatrix) and qm.shape == (33, 7) and qm.bits == 3 and qm.group_size == 32
