"""Per-expert slab tensors (camera_vllm.compress.quantize.slabs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camera_kernels.packing import dequantize
from camera_vllm.compress.quantize import (
    ExpertAllocation,
    ExpertHessians,
    HessianAccumulator,
    SlabQuantOptions,
    allocate_layer,
    build_expert_slabs,
    build_gate_up_slabs,
    dequantize_expert_slabs,
    permute_expert,
    quantize_rtn,
)
from camera_vllm.format.layout import expert_tensors

H, INTER, G = 128, 80, 32


def _expert(seed: int = 0, width: int = INTER) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(width, H, generator=gen) * 0.1,
        torch.randn(width, H, generator=gen) * 0.1,
        torch.randn(H, width, generator=gen) * 0.1,
    )


def _mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def _inputs(t: int = 256, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(H, H, generator=gen) / H**0.5 + torch.eye(H)
    return torch.randn(t, H, generator=gen) @ mix


def _allocation(width: int = INTER, **kw):
    gen = torch.Generator().manual_seed(5)
    energies = [torch.rand(width, generator=gen) for _ in range(2)]
    kw.setdefault("bits", [4, 2, 1])
    kw.setdefault("fractions", [0.3, 0.45, 0.25])
    return allocate_layer(energies, H, G, **kw).experts[0]


def _assert_layout(tensors, alloc) -> None:
    spec = expert_tensors(list(alloc.slabs), list(alloc.bits), H, G)
    dtypes = {"int32": torch.int32, "float16": torch.float16}
    for proj in (0, 1, 2):
        assert list(tensors[proj]) == [t.suffix for t in spec[proj]]
        for t in spec[proj]:
            got = tensors[proj][t.suffix]
            assert tuple(got.shape) == t.shape and got.dtype == dtypes[t.dtype], (proj, t)
            assert got.is_contiguous()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_tensors_match_layout(method: str) -> None:
    alloc = _allocation(prune_ratio=0.1)  # 72 kept: slabs (22, 32, 18), none a multiple of G
    assert 0 not in alloc.slabs and any(n % G for n in alloc.slabs)
    gate, up, down = _expert()
    hess = None
    if method == "gptq":
        x = _inputs()
        hg, hd = HessianAccumulator(H), HessianAccumulator(INTER)
        hg.add(x)
        hd.add(F.silu(x @ gate.T) * (x @ up.T))
        hess = ExpertHessians(hg.hessian(), hd.hessian())
    tensors = build_expert_slabs(gate, up, down, alloc, G, method, hess)
    _assert_layout(tensors, alloc)


def test_empty_slabs_and_zero_width_expert() -> None:
    alloc = _allocation(bits=[8, 3, 2], fractions=[0.0, 1.0, 0.0])
    assert alloc.slabs == (0, INTER, 0)
    gate, up, down = _expert()
    tensors = build_expert_slabs(gate, up, down, alloc, G)
    _assert_layout(tensors, alloc)
    assert all(k.endswith("_b3") for p in (0, 1, 2) for k in tensors[p])
    gone = ExpertAllocation((4,), (0,), torch.zeros(0, dtype=torch.long), torch.arange(INTER), INTER)
    empty = build_expert_slabs(gate, up, down, gone, G)
    assert empty == {0: {}, 1: {}, 2: {}}
    g, u, d = dequantize_expert_slabs(empty, [0], [4], H, G)
    assert g.shape == (0, H) and u.shape == (0, H) and d.shape == (H, 0)


def test_permutation_is_exact_in_fp32() -> None:
    alloc = _allocation()
    gate, up, down = _expert(2)
    x = _inputs(64)
    pg, pu, pd = permute_expert(gate, up, down, alloc.perm)
    assert not torch.equal(pg, gate)  # really permuted
    torch.testing.assert_close(_mlp(x, pg, pu, pd), _mlp(x, gate, up, down), rtol=1e-5, atol=1e-5)
    # With pruning, the permuted kept part equals the original with pruned channels zeroed.
    pruned = _allocation(prune_ratio=0.3)
    mask = torch.ones(INTER)
    mask[pruned.pruned] = 0
    kg, ku, kd = permute_expert(gate, up, down, pruned.perm)
    torch.testing.assert_close(_mlp(x, kg, ku, kd), _mlp(x, gate, up, down * mask), rtol=1e-5, atol=1e-5)


def test_eight_bit_slabs_reproduce_the_expert() -> None:
    alloc = _allocation(bits=[8], fractions=[1.0])
    gate, up, down = _expert(3)
    tensors = build_expert_slabs(gate, up, down, alloc, G, options=SlabQuantOptions(clip_search=False))
    g, u, d = dequantize_expert_slabs(tensors, alloc.slabs, alloc.bits, H, G)
    x = _inputs(64)
    ref = _mlp(x, gate, up, down)
    rel = float((_mlp(x, g, u, d) - ref).norm() / ref.norm())
    # 8-bit min-max steps are range/255: ~0.6% RMS error per matrix, ~1% through the MLP.
    assert rel < 2e-2, rel
    # The dequantized slabs are the permuted matrices, row for row.
    pg, pu, pd = permute_expert(gate, up, down, alloc.perm)
    assert float((g - pg).abs().max()) < 2e-3 and float((d - pd).abs().max()) < 2e-3


def test_slabs_are_rtn_of_the_permuted_rows() -> None:
    alloc = _allocation()
    gate, up, down = _expert(4)
    opts = SlabQuantOptions(clip_search=False)
    tensors = build_expert_slabs(gate, up, down, alloc, G, options=opts)
    for b, s, e in alloc.slab_ranges():
        idx = alloc.perm[s:e]
        qg = quantize_rtn(gate[idx].T, b, G)
        qd = quantize_rtn(down[:, idx].T, b, G)
        assert torch.equal(tensors[0][f"qweight_b{b}"], qg.packed())
        assert torch.equal(tensors[0][f"scales_b{b}"], qg.scales)
        assert torch.equal(tensors[2][f"zeros_b{b}"], qd.zeros)
        assert torch.equal(tensors[2][f"qweight_b{b}"], qd.packed())
    g, u, d = dequantize_expert_slabs(tensors, alloc.slabs, alloc.bits, H, G)
    assert g.shape == (INTER, H) and u.shape == (INTER, H) and d.shape == (H, INTER)


def test_gptq_slabs_lower_calibration_error() -> None:
    alloc = _allocation(bits=[3, 2], fractions=[0.5, 0.5])
    gate, up, down = _expert(6)
    x = _inputs(512, seed=7)
    hg, hd = HessianAccumulator(H), HessianAccumulator(INTER)
    hg.add(x)
    hd.add(F.silu(x @ gate.T) * (x @ up.T))
    hess = ExpertHessians(hg.hessian(), hd.hessian())
    pg, pu, pd = permute_expert(gate, up, down, alloc.perm)
    act = F.silu(x @ pg.T) * (x @ pu.T)

    def errors(tensors):
        g, u, d = dequantize_expert_slabs(tensors, alloc.slabs, alloc.bits, H, G)
        return (
            float((x @ (pg - g).T).norm()),
            float((x @ (pu - u).T).norm()),
            float((act @ (pd - d).T).norm()),  # down slabs use sub-blocks of the activation Hessian
        )

    opts = SlabQuantOptions(rtn_guard=False)
    rtn = errors(build_expert_slabs(gate, up, down, alloc, G, "rtn", options=opts))
    gptq = errors(build_expert_slabs(gate, up, down, alloc, G, "gptq", hess, options=opts))
    # Gate/up inputs are strongly correlated; random-weight activations much less, so the
    # down slabs (Hessian sub-blocks) gain less but must still gain.
    assert gptq[0] < 0.9 * rtn[0] and gptq[1] < 0.9 * rtn[1], (rtn, gptq)
    assert gptq[2] < rtn[2], (rtn, gptq)


def test_gate_up_accepts_prepared_hessian_and_validates() -> None:
    from camera_vllm.compress.quantize import prepare_hessian

    alloc = _allocation()
    gate, up, down = _expert(8)
    x = _inputs(300)
    h = HessianAccumulator(H)
    h.add(x)
    opts = SlabQuantOptions(rtn_guard=False)
    a = build_gate_up_slabs(gate, up, alloc, G, "gptq", h.hessian(), opts)
    b = build_gate_up_slabs(gate, up, alloc, G, "gptq", prepare_hessian(h.hessian()), opts)
    assert all(torch.equal(a[p][k], b[p][k]) for p in (0, 1) for k in a[p])
    with pytest.raises(ValueError):
        build_gate_up_slabs(gate, up, alloc, G, "gptq", None)
    with pytest.raises(ValueError):
        build_expert_slabs(
            gate, up, down, alloc, G, "gptq", ExpertHessians(h.hessian(), torch.eye(INTER - 1))
        )
    with pytest.raises(ValueError):
        build_expert_slabs(gate[:-1], up[:-1], down, alloc, G)
    with pytest.raises(ValueError):
        build_expert_slabs(gate, up, down, alloc, G, "awq")  # type: ignore[arg-type]


def test_shared_expert_allocation_builds() -> None:
    gen = torch.Generator().manual_seed(9)
    routed = [torch.rand(INTER, generator=gen) for _ in range(3)]
    shared_e = torch.rand(2 * INTER, generator=gen) + 1
    alloc = allocate_layer(routed, H, G, shared_energies=shared_e, avg_bits=3.0)
    gate, up, down = _expert(10, width=2 * INTER)
    tensors = build_expert_slabs(gate, up, down, alloc.shared, G)
    _assert_layout(tensors, alloc.shared)


def test_rtn_guard_keeps_the_better_of_gptq_and_rtn() -> None:
    # Plain min-max 1-bit grids fitted during the GPTQ sweep can diverge on badly scaled
    # inputs; the guard falls back to RTN wherever RTN has the lower calibration error.
    alloc = _allocation(bits=[1], fractions=[1.0])
    gate, up, _ = _expert(11)
    x = _inputs(512, seed=12) * torch.linspace(0.05, 4.0, H)
    h = HessianAccumulator(H)
    h.add(x)
    plain = SlabQuantOptions(clip_search=False, rtn_guard=False)
    guarded = SlabQuantOptions(clip_search=False, rtn_guard=True)
    rtn = build_gate_up_slabs(gate, up, alloc, G, "rtn", options=plain)
    gptq = build_gate_up_slabs(gate, up, alloc, G, "gptq", h.hessian(), plain)
    safe = build_gate_up_slabs(gate, up, alloc, G, "gptq", h.hessian(), guarded)

    def err(t: tuple[dict, dict]) -> float:
        # Calibration error of gate and up together: they are quantized (and guarded) as one matrix.
        total = 0.0
        for w, d in ((gate, t[0]), (up, t[1])):
            deq = dequantize(d["qweight_b1"], d["scales_b1"], d["zeros_b1"], 1, H, G)
            total += float((x @ (w[alloc.perm].T - deq)).pow(2).sum())
        return total

    assert err(gptq) > err(rtn)  # the case the guard exists for
    assert err(safe) == pytest.approx(min(err(gptq), err(rtn)), rel=1e-6)
