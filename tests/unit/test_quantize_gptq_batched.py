"""Batched GPTQ and the vectorised clipping search against the one-matrix, one-ratio-at-a-time
implementations they replaced (kept below as slow references)."""

from __future__ import annotations

import pytest
import torch

from camera_vllm.compress.quantize.gptq import (
    HessianAccumulator,
    gptq_quantize,
    gptq_quantize_batch,
    prepare_hessian,
    prepare_hessians,
)
from camera_vllm.compress.quantize.rtn import _grid_from_range, fit_group_grid, quantize_to_grid


# -- references: the previous implementations, verbatim in substance ------------------------------
def _ref_fit(wg, bits, clip_ratios=None):
    wg = wg.to(torch.float32)
    lo, hi = wg.amin(dim=1), wg.amax(dim=1)
    scale, zero = _grid_from_range(lo, hi, bits)
    if not clip_ratios:
        return scale, zero
    mid, half = (hi + lo) * 0.5, (hi - lo) * 0.5

    def sq_err(s, z):
        s3, z3 = s.unsqueeze(1), z.unsqueeze(1)
        err = (quantize_to_grid(wg, s3, z3, bits).to(torch.float32) - z3) * s3 - wg
        return (err * err).sum(dim=1)

    best = sq_err(scale, zero)
    for ratio in clip_ratios:
        if ratio >= 1.0:
            continue
        s, z = _grid_from_range(mid - half * ratio, mid + half * ratio, bits)
        err = sq_err(s, z)
        better = err < best
        scale, zero, best = (
            torch.where(better, s, scale),
            torch.where(better, z, zero),
            torch.minimum(err, best),
        )
    return scale, zero


def _ref_gptq(wt, h, bits, g, block=128, act_order=False, static_groups=False, clip=None):
    """The per-row loop GPTQ, one matrix at a time."""
    prep = prepare_hessian(h, 0.01, act_order)
    k, n = wt.shape
    u = prep.hinv_chol
    w = wt.to(torch.float32).clone()
    ng = -(-k // g)
    scales, zeros = torch.empty(ng, n), torch.empty(ng, n)
    static = prep.perm is not None or static_groups
    if static:
        perm = prep.perm if prep.perm is not None else torch.arange(k)
        for gi in range(ng):
            s, z = _ref_fit(w[gi * g : (gi + 1) * g].unsqueeze(0), bits, clip)
            scales[gi], zeros[gi] = s[0], z[0]
        w = w[perm]
        group_of = (perm // g).tolist()
    else:
        block = max(1, block // g) * g
    q = torch.empty(k, n, dtype=torch.int32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, u1 = w[i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            row = i1 + i
            if static:
                cs, cz = scales[group_of[row]], zeros[group_of[row]]
            elif row % g == 0:
                s, z = _ref_fit(w1[i : i + g].unsqueeze(0), bits, clip)
                scales[row // g], zeros[row // g] = s[0], z[0]
                cs, cz = s[0], z[0]
            qr = quantize_to_grid(w1[i], cs, cz, bits)
            err = (w1[i] - (qr.to(torch.float32) - cz) * cs) / u1[i, i]
            if i + 1 < i2 - i1:
                w1[i + 1 :].addr_(u1[i, i + 1 :], err, alpha=-1.0)
            err1[i], q[row] = err, qr
        if i2 < k:
            w[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1.0)
    if static:
        q = q[torch.argsort(perm)]
    return q, scales, zeros


# -- helpers --------------------------------------------------------------------------------------
def _hessian(t: int, k: int, seed: int, scale_cols: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=gen) @ (torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k))
    if scale_cols:
        x = x * torch.linspace(0.1, 3, k)
    acc = HessianAccumulator(k)
    acc.add(x)
    return acc.hessian()


def _agree(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean())


def _deq(q, s, z, g):
    idx = torch.arange(q.shape[-2]) // g
    return (q.float() - z[..., idx, :]) * s[..., idx, :]


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_vectorised_clip_search_matches_sequential(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    wg = torch.randn(6, 64, 40, generator=gen)
    wg[2] = 0.5  # constant groups
    wg[3, :, :5] *= 1e-6
    from camera_vllm.compress.quantize.rtn import DEFAULT_CLIP_RATIOS

    s, z = fit_group_grid(wg, bits, clip_ratios=DEFAULT_CLIP_RATIOS)
    rs, rz = _ref_fit(wg, bits, DEFAULT_CLIP_RATIOS)
    assert torch.equal(s, rs) and torch.equal(z, rz)


@pytest.mark.parametrize(
    ("bits", "act_order", "static_groups", "clip"),
    [(4, False, False, False), (2, False, False, True), (3, True, False, True), (2, False, True, False)],
)
def test_single_matrix_matches_per_row_reference(bits, act_order, static_groups, clip) -> None:
    from camera_vllm.compress.quantize.rtn import DEFAULT_CLIP_RATIOS

    k, n, g = 200, 48, 64  # a short last group, K not a multiple of the block
    h = _hessian(600, k, seed=bits, scale_cols=act_order).float()
    wt = torch.randn(k, n, generator=torch.Generator().manual_seed(11)) * 0.1
    ratios = DEFAULT_CLIP_RATIOS if clip else None
    rq, rs, rz = _ref_gptq(wt, h, bits, g, 96, act_order, static_groups, ratios)
    got = gptq_quantize(
        wt, h, bits, g, block_size=96, act_order=act_order, static_groups=static_groups, clip_search=clip
    )
    # fp32 rounding order in the batched matmuls may flip a rare near-tie code.
    assert _agree(got.q, rq) > 0.995
    assert _agree(got.scales.float(), rs) > 0.99
    ref_deq, deq = _deq(rq, rs, rz, g), got.dequantize()
    e_ref = float(((wt - ref_deq) * (h @ (wt - ref_deq))).sum())
    e_got = float(((wt - deq) * (h @ (wt - deq))).sum())
    assert abs(e_got - e_ref) < 0.01 * e_ref, (e_got, e_ref)


def test_batch_with_per_column_bits_equals_separate_matrices() -> None:
    k, g, e = 128, 32, 3
    hs = torch.stack([_hessian(300, k, seed=s) for s in range(e)])
    gen = torch.Generator().manual_seed(3)
    wt = torch.randn(e, k, 30, generator=gen)
    bits = torch.tensor([4] * 10 + [2] * 12 + [1] * 8)  # three slabs of one expert
    prep = prepare_hessians(hs)
    got = gptq_quantize_batch(wt, prep, bits.view(1, 1, -1), g, clip_search=True)
    for i in range(e):
        for b, sl in ((4, slice(0, 10)), (2, slice(10, 22)), (1, slice(22, 30))):
            one = gptq_quantize(wt[i, :, sl], hs[i], b, g, clip_search=True)
            assert _agree(got.q[i, :, sl], one.q) > 0.995, (i, b)
            assert _agree(got.scales[i, :, sl].half(), one.scales) > 0.99


def test_padded_rows_equal_the_unpadded_matrix() -> None:
    # Down slabs of different widths in one batch: element i is its leading rows[i] rows.
    g, kmax, n = 32, 90, 24
    rows = [90, 57, 33]
    gen = torch.Generator().manual_seed(4)
    wts, hs = [], []
    for i, r in enumerate(rows):
        wts.append(torch.randn(r, n, generator=gen))
        hs.append(_hessian(400, r, seed=10 + i))
    wt = torch.zeros(len(rows), kmax, n)
    hp = torch.zeros(len(rows), kmax, kmax, dtype=torch.float64)
    for i, r in enumerate(rows):
        wt[i, :r], hp[i, :r, :r] = wts[i], hs[i]
    for act_order in (False, True):
        prep = prepare_hessians(hp, act_order=act_order, rows=torch.tensor(rows))
        got = gptq_quantize_batch(wt, prep, 3, g, clip_search=True)
        for i, r in enumerate(rows):
            one = gptq_quantize(wts[i], hs[i], 3, g, act_order=act_order, clip_search=True)
            assert _agree(got.q[i, :r], one.q) > 0.995, (act_order, i)
            ng = -(-r // g)
            assert _agree(got.scales[i, :ng].half(), one.scales) > 0.99
            # The sweep's own error statistic is the calibration error tr(E^T H E).
            e = wts[i] - _deq(got.q[i, :r], got.scales[i, :ng], got.zeros[i, :ng], g)
            direct = (e.double() * (hs[i] @ e.double())).sum(0)
            torch.testing.assert_close(got.calib_error[i], direct, rtol=2e-3, atol=1e-6 * float(direct.max()))


def test_calib_error_with_dead_inputs_and_damping_retry() -> None:
    k, n, g = 64, 16, 32
    h = _hessian(20, k, seed=5)  # rank deficient
    h[:, 3] = 0
    h[3, :] = 0
    wt = torch.randn(1, k, n, generator=torch.Generator().manual_seed(5))
    prep = prepare_hessians(h.unsqueeze(0), damp=0.0)
    assert bool(prep.dead[0, 3]) and int(prep.dead.sum()) == 1
    got = gptq_quantize_batch(wt, prep, 2, g)
    e = wt[0] - _deq(got.q[0], got.scales[0], got.zeros[0], g)
    direct = (e.double() * (h @ e.double())).sum(0)
    torch.testing.assert_close(got.calib_error[0], direct, rtol=5e-3, atol=1e-5 * float(direct.abs().max()))


def test_flipped_cholesky_equals_three_factorisation_chain() -> None:
    # U with H^-1 = U^T U is unique; the reference is the chain it replaced (Cholesky of H,
    # its inverse, Cholesky of that), in fp64.  Sizes cover one and several column blocks.
    from camera_vllm.compress.quantize.gptq import _lower_tri_inverse

    gen = torch.Generator().manual_seed(12)
    for k in (1, 7, 128, 300):
        a = torch.randn(3, k, k + 16, generator=gen, dtype=torch.float64)
        h = a @ a.transpose(1, 2) / k + 0.01 * torch.eye(k, dtype=torch.float64)
        ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
        lower = torch.linalg.cholesky(h.flip(1, 2))
        u = _lower_tri_inverse(lower, block=64).flip(1, 2)
        assert torch.equal(u, u.triu())
        rel = float((u - ref).abs().max() / ref.abs().max())
        assert rel < 1e-10, (k, rel)
        torch.testing.assert_close(u.transpose(1, 2) @ u, torch.linalg.inv(h), rtol=1e-8, atol=1e-10)
    # Through prepare_hessians (damping added in fp64, fp32 U as the sweep uses).
    h = _hessian(500, 96, seed=13).unsqueeze(0)
    prep = prepare_hessians(h, damp=0.01)
    hd = h[0] + 0.01 * torch.diagonal(h[0]).mean() * torch.eye(96, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    torch.testing.assert_close(prep.hinv_chol[0].double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    p32 = prepare_hessians(h, damp=0.01, factor_dtype=torch.float32)
    torch.testing.assert_close(p32.hinv_chol[0].double(), ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="factor_dtype"):
        prepare_hessians(h, factor_dtype=torch.float16)
