"""GPTQ on K-major matrices and the Hessian accumulator (camera_vllm.compress.quantize.gptq)."""

from __future__ import annotations

import pytest
import torch

from camera_vllm.compress.quantize.gptq import HessianAccumulator, gptq_quantize, prepare_hessian
from camera_vllm.compress.quantize.rtn import fit_group_grid, quantize_rtn, quantize_to_grid


def _correlated(t: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    return torch.randn(t, k, generator=gen) @ mix


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    return acc.hessian()


def _out_err(x: torch.Tensor, wt: torch.Tensor, deq: torch.Tensor) -> float:
    ref = x @ wt
    return float((ref - x @ deq).pow(2).sum() / ref.pow(2).sum())


def _reference_gptq(
    wt: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, damp: float = 0.01
) -> torch.Tensor:
    """Unblocked OBS, written independently: after rounding row k, update every later row
    with the inverse Hessian of the remaining rows, then drop row k from it (fp64)."""
    w = wt.to(torch.float64).clone()
    k = w.shape[0]
    hd = h.to(torch.float64) + damp * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(hd)
    deq = torch.empty_like(w)
    for r in range(k):
        if r % group_size == 0:
            s, z = fit_group_grid(w[r : r + group_size].to(torch.float32).unsqueeze(0), bits)
            s, z = s[0].double(), z[0].double()
        q = quantize_to_grid(w[r].to(torch.float32), s.float(), z.float(), bits).double()
        deq[r] = (q - z) * s
        err = (w[r] - deq[r]) / hinv[r, r]
        w[r + 1 :] -= hinv[r + 1 :, r : r + 1] * err.unsqueeze(0)
        # Remove row/column r from the inverse (Schur complement): the inverse Hessian of the rest.
        hinv = hinv - hinv[:, r : r + 1] @ hinv[r : r + 1, :] / hinv[r, r]
    return deq.to(torch.float32)


def test_accumulator_matches_definition() -> None:
    x = _correlated(300, 24)
    wts = torch.rand(300)
    acc = HessianAccumulator(24)
    acc.add(x[:100], wts[:100])
    other = HessianAccumulator(24)
    other.add(x[100:].reshape(4, 50, 24), wts[100:].reshape(4, 50))  # leading dims are flattened
    acc.merge(other)
    expected = 2 * (x.double() * wts.double().unsqueeze(1)).T @ x.double() / 300
    assert acc.count == 300 and acc.sum.dtype == torch.float64
    assert abs(acc.weight_sum - float(wts.sum())) < 1e-3
    torch.testing.assert_close(acc.hessian(), expected, rtol=1e-5, atol=1e-6)
    plain = HessianAccumulator(24, dtype=torch.float32)
    plain.add(x)
    torch.testing.assert_close(
        plain.hessian().double(), 2 * x.double().T @ x.double() / 300, rtol=1e-4, atol=1e-4
    )
    with pytest.raises(ValueError):
        acc.add(x[:, :10])
    with pytest.raises(ValueError):
        acc.add(x[:5], -torch.ones(5))
    assert torch.equal(HessianAccumulator(3).hessian(), torch.zeros(3, 3, dtype=torch.float64))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("clip", [False, True])
def test_gptq_beats_rtn_on_layer_output(bits: int, clip: bool) -> None:
    k, n = 256, 96
    x = _correlated(1024, k, seed=bits)
    wt = torch.randn(k, n, generator=torch.Generator().manual_seed(7)) * 0.05
    h = _hessian(x)
    e_rtn = _out_err(x, wt, quantize_rtn(wt, bits, 64, clip_search=clip).dequantize())
    e_gptq = _out_err(x, wt, gptq_quantize(wt, h, bits, 64, clip_search=clip).dequantize())
    e_act = _out_err(x, wt, gptq_quantize(wt, h, bits, 64, act_order=True, clip_search=clip).dequantize())
    assert e_gptq < 0.85 * e_rtn, (e_gptq, e_rtn)
    assert e_act < 0.85 * e_rtn, (e_act, e_rtn)


def test_matches_unblocked_reference() -> None:
    k, n, g = 96, 40, 32
    x = _correlated(400, k, seed=3)
    wt = torch.randn(k, n, generator=torch.Generator().manual_seed(4)) * 0.1
    h = _hessian(x)
    ref = _reference_gptq(wt, h, 4, g)
    for block in (32, 64, 1000):
        got = gptq_quantize(wt, h, 4, g, block_size=block).dequantize()
        step = quantize_rtn(wt, 4, g).scales.float().mean()
        # fp32 vs fp64 may flip a rare near-tie code; everything else agrees.
        same = ((got - ref).abs() < 1e-3 * step).float().mean()
        assert float(same) > 0.99, float(same)
        assert abs(_out_err(x, wt, got) - _out_err(x, wt, ref)) < 0.02 * _out_err(x, wt, ref)


def test_diagonal_hessian_is_rtn() -> None:
    wt = torch.randn(200, 30, generator=torch.Generator().manual_seed(5))
    h = torch.diag(torch.rand(200) + 0.5)
    for bits in (1, 3, 8):
        a, b = gptq_quantize(wt, h, bits, 64), quantize_rtn(wt, bits, 64)
        assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    # A zero Hessian (an expert calibration never routed to) is RTN too, not zeroed weights.
    z = gptq_quantize(wt, torch.zeros(200, 200), 4, 64)
    assert torch.equal(z.q, quantize_rtn(wt, 4, 64).q)


def test_dead_inputs_keep_their_weights() -> None:
    k, n, g = 128, 32, 64
    x = _correlated(500, k, seed=6)
    dead = torch.tensor([0, 5, 70, 127])
    x[:, dead] = 0
    wt = torch.randn(k, n, generator=torch.Generator().manual_seed(6))
    qm = gptq_quantize(wt, _hessian(x), 3, g, act_order=True)
    deq = qm.dequantize()
    assert bool(torch.isfinite(deq).all())
    # Dead rows are neither zeroed nor moved by error feedback: RTN on the static grid.
    s = qm.scales.float()[dead // g]
    assert bool(((deq[dead] - wt[dead]).abs() <= s * 0.5 * (1 + 1e-3)).all())
    prep = prepare_hessian(_hessian(x))
    assert prep.dead.nonzero().flatten().tolist() == dead.tolist()


def test_act_order_uses_static_rtn_grid_and_short_groups() -> None:
    k, n, g = 200, 16, 64  # last group has 8 rows; K not a multiple of the block
    x = _correlated(600, k, seed=8) * torch.linspace(0.1, 3, k)
    wt = torch.randn(k, n, generator=torch.Generator().manual_seed(8))
    h = _hessian(x)
    qm = gptq_quantize(wt, h, 4, g, act_order=True, block_size=48)
    rtn = quantize_rtn(wt, 4, g)
    assert torch.equal(qm.scales, rtn.scales) and torch.equal(qm.zeros, rtn.zeros)
    assert _out_err(x, wt, qm.dequantize()) < 0.8 * _out_err(x, wt, rtn.dequantize())
    dyn = gptq_quantize(wt, h, 4, g, block_size=48)
    assert dyn.scales.shape == (4, n) and _out_err(x, wt, dyn.dequantize()) < _out_err(
        x, wt, rtn.dequantize()
    )


def test_prepared_hessian_reuse_and_rank_deficient() -> None:
    k = 64
    x = _correlated(20, k, seed=9)  # T < K: singular X^T X, as for a rarely-routed expert
    h = _hessian(x)
    prep = prepare_hessian(h, 0.01)
    wt1 = torch.randn(k, 8, generator=torch.Generator().manual_seed(1))
    wt2 = torch.randn(k, 12, generator=torch.Generator().manual_seed(2))
    for wt in (wt1, wt2):
        a, b = gptq_quantize(wt, prep, 2, 32), gptq_quantize(wt, h, 2, 32)
        assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales)
        assert bool(torch.isfinite(a.dequantize()).all())
    with pytest.raises(ValueError):
        gptq_quantize(torch.randn(32, 4), prep, 2, 32)
