"""Energy-based bit allocation (camera_vllm.compress.quantize.allocate)."""

from __future__ import annotations

import itertools

import pytest
import torch

from camera_vllm.compress.quantize.allocate import (
    DEFAULT_LEVEL_ERROR,
    LayerAllocation,
    allocate_layer,
    bits_per_weight,
    drop_unused_bits,
)
from camera_vllm.format.layout import stored_bytes
from camera_vllm.format.schema import CameraQuantConfig

H = 512


def _energies(n_experts: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Heavy-tailed within an expert, and experts differ in how often they are routed.
    return [
        torch.exp(1.5 * torch.randn(width, generator=gen) + torch.randn((), generator=gen))
        for _ in range(n_experts)
    ]


def _check_structure(alloc: LayerAllocation) -> None:
    for e in alloc.all_experts():
        assert e.bits == alloc.bits and len(e.slabs) == len(e.bits)
        assert e.perm.numel() == sum(e.slabs) == e.width
        together = torch.cat([e.perm, e.pruned]).sort().values
        assert torch.equal(together, torch.arange(e.original_width))  # a partition of the micro-experts
        for i in range(len(e.bits)):
            idx = e.slab_indices(i)
            assert torch.equal(idx, idx.sort().values)  # original order inside a slab
        assert torch.equal(e.pruned, e.pruned.sort().values)


def _assert_monotone(energy: torch.Tensor, bits: torch.Tensor) -> None:
    """Higher energy never gets fewer bits (0 = pruned)."""
    order = torch.argsort(energy, descending=True)
    e, b = energy[order], bits[order]
    for i in range(len(e) - 1):
        if e[i] > e[i + 1]:
            assert b[i] >= b[i + 1], (float(e[i]), int(b[i]), float(e[i + 1]), int(b[i + 1]))


def _monotone_in_scope(alloc: LayerAllocation, energies: list[torch.Tensor], scope: str) -> None:
    members = alloc.all_experts()
    if scope == "layer":
        _assert_monotone(torch.cat(energies), torch.cat([m.bits_of() for m in members]))
    else:
        for m, e in zip(members, energies):
            _assert_monotone(e, m.bits_of())


def _objective(alloc: LayerAllocation, energies: list[torch.Tensor]) -> float:
    return sum(
        float((e.double() * torch.tensor([DEFAULT_LEVEL_ERROR[int(b)] for b in m.bits_of()])).sum())
        for m, e in zip(alloc.all_experts(), energies)
    )


def test_explicit_fractions_layer_scope_with_pruning() -> None:
    energies = _energies(6, 100)
    shared = torch.exp(torch.randn(150) + 3)
    alloc = allocate_layer(
        energies, H, 64, shared_energies=shared, bits=[2, 4, 1], fractions=[0.5, 0.2, 0.3], prune_ratio=0.25
    )
    _check_structure(alloc)
    assert alloc.bits == (4, 2, 1) and alloc.shared is not None
    total = 750
    n_pruned, kept = round(0.25 * total), total - round(0.25 * total)
    assert sum(e.pruned.numel() for e in alloc.all_experts()) == n_pruned
    per_bits = [sum(e.slabs[i] for e in alloc.all_experts()) for i in range(3)]
    assert per_bits == [round(0.2 * kept), round(0.7 * kept) - round(0.2 * kept), kept - round(0.7 * kept)]
    _monotone_in_scope(alloc, energies + [shared], "layer")
    # The shared expert's high energies put it mostly at 4 bits: layer scope is global.
    assert alloc.shared.slabs[0] > alloc.experts[0].slabs[0]
    assert alloc.fractions()[0] == pytest.approx(n_pruned / total)
    # Slab sizes are what the checkpoint config takes.
    CameraQuantConfig(
        scheme="mixed",
        bits=list(alloc.bits),
        group_size=64,
        architecture="Qwen2MoeForCausalLM",
        num_experts=6,
        original_intermediate_size=100,
        original_shared_intermediate_size=150,
        layers={0: {"expert_slabs": alloc.expert_slabs, "shared_slabs": alloc.shared_slabs}},
    )


def test_explicit_fractions_expert_scope() -> None:
    energies = _energies(5, 96, seed=1)
    alloc = allocate_layer(
        energies, H, 64, bits=[3, 2, 1], fractions=[0.25, 0.5, 0.25], scope="expert", prune_ratio=0.1
    )
    _check_structure(alloc)
    assert {e.slabs for e in alloc.experts} == {(22, 42, 22)}  # 86 kept of 96: round(21.5), round(64.5) - 22
    _monotone_in_scope(alloc, energies, "expert")


def test_ties_and_zero_energies_are_handled() -> None:
    energies = [torch.zeros(64), torch.ones(64)]
    alloc = allocate_layer(energies, H, 64, bits=[4, 2], fractions=[0.5, 0.5])
    assert alloc.experts[1].slabs == (64, 0) and alloc.experts[0].slabs == (0, 64)
    budget = allocate_layer(energies, H, 64, avg_bits=3.0)  # all-zero expert still gets bits when affordable
    assert budget.bits_per_weight(H, 64) <= 3.0 and budget.experts[0].width == 64


@pytest.mark.parametrize("scope,tol", [("layer", 0.01), ("expert", 0.06)])
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("avg_bits", [2.25, 2.5, 3.0])
def test_avg_bits_budget(scope: str, tol: float, group_size: int, avg_bits: float) -> None:
    energies = _energies(16, 256, seed=2)
    shared = torch.exp(torch.randn(512, generator=torch.Generator().manual_seed(3)) + 2)
    alloc = allocate_layer(energies, H, group_size, shared_energies=shared, avg_bits=avg_bits, scope=scope)
    _check_structure(alloc)
    got = alloc.bits_per_weight(H, group_size)
    assert avg_bits - tol <= got <= avg_bits, got
    assert alloc.info["bits_per_weight"] == got
    _monotone_in_scope(alloc, energies + [shared], scope)
    if scope == "expert":
        assert len({e.slabs for e in alloc.experts}) == 1


def test_bits_per_weight_counts_every_stored_byte() -> None:
    energies = _energies(4, 80, seed=4)
    alloc = allocate_layer(energies, H, 64, bits=[4, 1], fractions=[0.3, 0.7], prune_ratio=0.2)
    expected = 8 * sum(stored_bytes(list(e.slabs), [4, 1], H, 64) for e in alloc.experts) / (3 * H * 4 * 80)
    assert bits_per_weight(alloc, H, 64) == pytest.approx(expected)
    assert bits_per_weight([alloc, alloc], H, 64) == pytest.approx(expected)
    # Scales and zeros are not free: at least 32/G bits per kept weight on top of the codes.
    codes = sum(4 * e.slabs[0] + e.slabs[1] for e in alloc.experts) / (4 * 80)
    assert expected >= codes + 0.8 * 32 / 64


def test_budget_beats_every_fixed_three_level_split() -> None:
    energies = _energies(8, 256, seed=5)
    g, target = 128, 2.5
    best = allocate_layer(energies, H, g, avg_bits=target)
    obj = _objective(best, energies)
    tried = 0
    grid = [i / 8 for i in range(9)]
    for bits in itertools.combinations((4, 3, 2, 1), 3):
        for f0, f1 in itertools.product(grid, grid):
            if f0 + f1 > 1:
                continue
            alloc = allocate_layer(energies, H, g, bits=list(bits), fractions=[f0, f1, 1 - f0 - f1])
            if alloc.bits_per_weight(H, g) <= target:
                tried += 1
                assert obj <= _objective(alloc, energies) * (1 + 1e-9)
    assert tried > 20


def test_prune_options_and_errors() -> None:
    energies = _energies(4, 128, seed=6)
    with pytest.raises(ValueError, match="unreachable"):
        allocate_layer(energies, H, 128, avg_bits=1.0)  # 1 bit + scales > 1.0
    auto = allocate_layer(energies, H, 128, avg_bits=1.0, allow_prune=True)
    assert auto.bits_per_weight(H, 128) <= 1.0 and auto.fractions()[0] > 0
    _monotone_in_scope(auto, energies, "layer")
    fixed = allocate_layer(energies, H, 128, avg_bits=1.2, prune_ratio=0.3)
    assert fixed.fractions()[0] == pytest.approx(0.3, abs=1 / 512)
    _monotone_in_scope(fixed, energies, "layer")
    with pytest.raises(ValueError):
        allocate_layer(energies, H, 64, bits=[4, 5], fractions=[0.5, 0.5])
    with pytest.raises(ValueError):
        allocate_layer(energies, H, 64, bits=[4, 2], fractions=[0.5, 0.4])
    with pytest.raises(ValueError):
        allocate_layer(energies, H, 64, bits=[4, 2], fractions=[0.5, 0.5], avg_bits=3)
    with pytest.raises(ValueError):
        allocate_layer([torch.ones(8), torch.ones(9)], H, 64, avg_bits=3, scope="expert")
    with pytest.raises(ValueError):
        allocate_layer([torch.tensor([1.0, -1.0])], H, 64, avg_bits=3)


def test_drop_unused_bits() -> None:
    energies = _energies(3, 64, seed=7)
    a = allocate_layer(energies, H, 64, bits=[8, 4, 2], fractions=[0.0, 0.5, 0.5])
    (d,) = drop_unused_bits([a])
    assert d.bits == (4, 2) and d.expert_slabs == [list(e.slabs[1:]) for e in a.experts]
    assert d.bits_per_weight(H, 64) == a.bits_per_weight(H, 64)
