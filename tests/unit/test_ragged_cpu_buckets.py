"""CAMERA-P's CPU fast path: experts bucketed by width for vLLM's ``cpu_fused_moe`` (ragged_cpu.py).

The oracle is the pure-torch ragged forward in fp32 on the same (bf16-rounded) weights.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("vllm._custom_ops")  # loads torch.ops._C (vLLM's CPU kernels)

from camera_vllm.vllm_plugin import ops  # noqa: E402
from camera_vllm.vllm_plugin.ops import PackedBuckets, moe_cpu_buckets_impl, prepare_cpu_buckets  # noqa: E402
from camera_vllm.vllm_plugin.ragged import RaggedLayout, ragged_moe_forward  # noqa: E402
from camera_vllm.vllm_plugin.ragged_cpu import (  # noqa: E402
    CPU_KERNEL_ALIGN,
    BucketPlan,
    cpu_kernel_isa,
    plan_buckets,
)

if cpu_kernel_isa(torch.bfloat16) is None:
    pytest.skip("vLLM's CPU MoE kernel is not available here", allow_module_level=True)

HIDDEN = 128
# Every kind of width: empty, below one tile, exact tiles, just over a tile, wide.
WIDTHS = (70, 0, 32, 5, 64, 96, 31, 33, 200, 7)


def _align(n: int) -> int:
    return -(-n // CPU_KERNEL_ALIGN) * CPU_KERNEL_ALIGN


def _layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layout = RaggedLayout(WIDTHS)
    w13 = (torch.randn(2 * layout.total, HIDDEN, generator=gen) * 0.1).to(torch.bfloat16)
    w2t = (torch.randn(layout.total, HIDDEN, generator=gen) * 0.1).to(torch.bfloat16)
    return w13, w2t, layout.offsets_tensor()


def _run(packed: PackedBuckets, x, tw, ids, expert_map=None) -> torch.Tensor:
    """The ``moe_cpu_buckets`` op's implementation on a prepared layer."""
    return moe_cpu_buckets_impl(x, tw, ids, packed.route, list(packed.buckets), packed.isa, expert_map)


def _routing(tokens: int, top_k: int, seed: int, experts: int = len(WIDTHS)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    return x, weights, ids


def _check_plan(plan: BucketPlan, widths: tuple[int, ...], max_buckets: int) -> None:
    members = sorted(e for m in plan.members for e in m)
    assert members == [e for e, w in enumerate(widths) if w > 0], "every kept expert in exactly one bucket"
    assert 0 < len(plan.widths) <= max_buckets or not members
    for width, group in zip(plan.widths, plan.members):
        assert width % CPU_KERNEL_ALIGN == 0 and width == _align(max(widths[e] for e in group))
    route, stride = plan.route(), len(widths) + 1
    assert route.shape == (stride,)
    for j, group in enumerate(plan.members):
        for i, e in enumerate(group):
            assert divmod(route[e].item(), stride) == (j, i)
    skipped = [e for e, w in enumerate(widths) if w == 0] + [len(widths)]
    assert all(route[e].item() == len(plan.widths) * stride for e in skipped)


def _brute_force_best(widths: tuple[int, ...], buckets: int) -> int:
    """Fewest padded slots over every way to cut the sorted kept widths into <= ``buckets`` runs."""
    kept = sorted(_align(w) for w in widths if w > 0)
    best = None
    for k in range(1, min(buckets, len(kept)) + 1):
        for cuts in itertools.combinations(range(1, len(kept)), k - 1):
            bounds = (0, *cuts, len(kept))
            cost = sum((b - a) * kept[b - 1] for a, b in zip(bounds, bounds[1:]))
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("buckets", [1, 2, 3, 5])
def test_plan_is_optimal_for_its_bucket_count(buckets: int) -> None:
    plan = plan_buckets(WIDTHS, max_buckets=buckets, max_padding=0.0)
    _check_plan(plan, WIDTHS, buckets)
    assert plan.padded_total == _brute_force_best(WIDTHS, buckets)


def test_plan_stops_at_the_padding_limit_and_skips_empty_layers() -> None:
    widths = (100, 90, 500, 480, 0, 95, 510)
    loose = plan_buckets(widths, max_padding=0.5)
    tight = plan_buckets(widths, max_padding=0.0)
    _check_plan(loose, widths, 8)
    _check_plan(tight, widths, 8)
    aligned = sum(_align(w) for w in widths)
    assert loose.padded_total <= 1.5 * aligned and len(loose.widths) < len(tight.widths)
    assert tight.padded_total == aligned  # no padding beyond the tile: one bucket per distinct width
    empty = plan_buckets((0, 0, 0))
    assert empty.widths == () and empty.route().tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="max_buckets"):
        plan_buckets(widths, max_buckets=0)


@pytest.mark.parametrize("tokens", [1, 2, 5, 40])
def test_bucketed_path_matches_fp32_reference(tokens: int) -> None:
    w13, w2t, offsets = _layer()
    x, tw, ids = _routing(tokens, 3, seed=tokens)
    want = ragged_moe_forward(x.float(), tw, ids, w13.float(), w2t.float(), offsets)
    before = (w13.clone(), w2t.clone())
    prepared = prepare_cpu_buckets(w13, w2t, list(WIDTHS))
    assert prepared is not None, "a bf16 CPU layer must take the kernel path"
    assert torch.equal(w13, before[0]) and torch.equal(w2t, before[1]), (
        "the ragged inputs are left as they are"
    )
    assert len(prepared.buckets) == 2 * len(prepared.plan.widths)
    assert torch.equal(prepared.route, prepared.plan.route()) and prepared.isa == cpu_kernel_isa(w13.dtype)
    got = _run(prepared, x, tw, ids)
    # The bf16 pure-torch path sets the scale of acceptable rounding error.
    plain = ragged_moe_forward(x, tw, ids, w13, w2t, offsets)
    err_plain = (plain.float() - want).abs().max().item()
    err = (got.float() - want).abs().max().item()
    assert err <= 3 * err_plain + 1e-2 * want.abs().max().item(), (err, err_plain)


def test_slots_of_empty_experts_and_other_ranks_contribute_nothing() -> None:
    w13, w2t, offsets = _layer(1)
    # 14 global experts; locals 0..9 are globals 4..13, globals 0..3 live elsewhere.
    expert_map = torch.full((14,), -1, dtype=torch.int64)
    expert_map[4:] = torch.arange(len(WIDTHS))
    x, tw, ids = _routing(9, 4, seed=3, experts=14)
    ids[0] = torch.tensor([0, 1, 2, 3])  # a token routed only to other ranks
    ids[1, 0] = 4 + 1  # local expert 1 has width 0
    want = ragged_moe_forward(x.float(), tw, ids, w13.float(), w2t.float(), offsets, expert_map)
    prepared = prepare_cpu_buckets(w13, w2t, list(WIDTHS))
    got = _run(prepared, x, tw, ids, expert_map)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.02 * want.abs().max().item())
    # One token: all of its slots elsewhere, then some local (the single-token shortcut).
    for row in (0, 2):
        one = _run(prepared, x[row : row + 1], tw[row : row + 1], ids[row : row + 1], expert_map)
        torch.testing.assert_close(
            one.float(), want[row : row + 1], rtol=0.05, atol=0.02 * want.abs().max().item()
        )


def test_fp32_layers_and_the_opt_out_keep_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    w13, w2t, _ = _layer(3)
    assert prepare_cpu_buckets(w13.float(), w2t.float(), list(WIDTHS)) is None
    assert prepare_cpu_buckets(w13[:, :100].contiguous(), w2t[:, :100].contiguous(), list(WIDTHS)) is None
    monkeypatch.setenv(ops.CPU_KERNEL_ENV, "0")
    assert prepare_cpu_buckets(w13, w2t, list(WIDTHS)) is None


def test_op_rejects_a_malformed_bucket_list() -> None:
    w13, w2t, _ = _layer(4)
    prepared = prepare_cpu_buckets(w13, w2t, list(WIDTHS))
    x, tw, ids = _routing(2, 2, seed=1)
    route, buckets = prepared.route, list(prepared.buckets)
    with pytest.raises(ValueError, match=r"moe_cpu_buckets: buckets are \(w13, w2\) pairs"):
        moe_cpu_buckets_impl(x, tw, ids, route, buckets[:-1], prepared.isa, None)
    with pytest.raises(ValueError, match="moe_cpu_buckets: isa must be one of"):
        moe_cpu_buckets_impl(x, tw, ids, route, buckets, "prune_cpu:" + prepared.isa, None)


def test_truncation_midpoint_is_within_half_an_ulp() -> None:
    """Values truncated to bf16 are restored to within half an ulp, as round-to-nearest gives."""
    from camera_vllm.vllm_plugin.ragged_cpu import _truncation_midpoint

    exact = torch.randn(4096, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 10.0
    bits = exact.to(torch.float32).view(torch.int32)
    truncated = (bits & ~0xFFFF).view(torch.float32)  # round toward zero to bf16
    ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact)[1] - 8)
    restored = _truncation_midpoint(truncated).double()
    assert ((truncated.double() - exact).abs() <= ulp).all()
    assert ((restored - exact).abs() <= ulp / 2 * (1 + 1e-6)).all()
    nearest = exact.to(torch.bfloat16).double()
    assert (restored - exact).abs().mean() <= 1.05 * (nearest - exact).abs().mean() + 1e-12
    assert abs((restored - exact).mean()) < 0.05 * (truncated.double() - exact).abs().mean()  # no bias left


def test_kernel_rounding_probe_names_a_mode() -> None:
    from camera_vllm.vllm_plugin.ragged_cpu import ROUND_NEAREST, ROUND_TOWARD_ZERO, cpu_kernel_rounding

    assert cpu_kernel_rounding(cpu_kernel_isa(torch.bfloat16)) in (ROUND_NEAREST, ROUND_TOWARD_ZERO)
