"""The tensor-parallel split rule of camera_vllm.format.sharding (no vLLM).

Checks the rule itself (contiguous, complete, balanced, whole quantization groups) and
that it is exact: the sum over ranks of the expert outputs computed on each rank's share
equals the unsplit layer, for CAMERA-P (ragged experts) and CAMERA-Q (packed slabs).
"""

from __future__ import annotations

import pytest
import torch

from camera_kernels import SlabMoEWeights, SlabTensors, slab_moe_reference
from camera_kernels.packing import dequantize, num_groups, packed_rows
from camera_kernels.testing import quantize_rtn
from camera_vllm.format import sharding
from camera_vllm.vllm_plugin.ragged import RaggedLayout, ragged_moe_forward


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_balanced_range_is_a_contiguous_balanced_partition(tp: int) -> None:
    for count in range(0, 41):
        for first in range(tp):
            ranges = [sharding.balanced_range(count, tp, r, first) for r in range(tp)]
            assert ranges[0][0] == 0 and ranges[-1][1] == count
            for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
                assert hi == lo  # contiguous, in rank order
            sizes = [hi - lo for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1
            # The ranks with one more unit are the cyclic window starting at ``first``.
            extra = {(first + j) % tp for j in range(count % tp)}
            assert {r for r, n in enumerate(sizes) if n > count // tp} == extra


def test_odd_widths_lose_no_channel() -> None:
    # 7 = 4 + 3 over two ranks; then the cursor moves, so the next odd expert favours rank 1.
    assert sharding.prune_shares([7, 1, 1, 5], 2, 0) == [(0, 4), (0, 0), (0, 1), (0, 2)]
    assert sharding.prune_shares([7, 1, 1, 5], 2, 1) == [(4, 7), (0, 1), (1, 1), (2, 5)]


def _random_layer(seed: int, experts: int, slabs: int, top: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, top, (experts, slabs), generator=g).tolist()


@pytest.mark.parametrize("tp", [2, 3, 4, 8])
def test_layer_shares_partition_and_balance(tp: int) -> None:
    """Every item is split completely and contiguously.

    Experts and the layer are balanced within one unit per item.
    """
    for unit, seed in ((1, 0), (32, 1), (64, 2)):
        items = _random_layer(seed, experts=16, slabs=1 if unit == 1 else 3, top=5 * max(unit, 8))
        shares = [sharding.layer_shares(items, unit, tp, r) for r in range(tp)]
        layer_units = [0] * tp
        for e, sizes in enumerate(items):
            expert_units = [0] * tp
            for i, n in enumerate(sizes):
                ranges = sorted((shares[r][e][i] for r in range(tp)), key=lambda lh: (lh[0], lh[1]))
                nonempty = [(lo, hi) for lo, hi in ranges if hi > lo]
                covered = 0
                for lo, hi in nonempty:
                    assert lo == covered  # contiguous, nothing dropped or duplicated
                    covered = hi
                    assert lo % unit == 0 and (hi == n or hi % unit == 0)  # whole units (groups)
                assert covered == n
                for r in range(tp):
                    lo, hi = shares[r][e][i]
                    units = -(-(hi - lo) // unit)
                    expert_units[r] += units
                    layer_units[r] += units
            # The remainders of an expert's items went to consecutive ranks (one cyclic window).
            assert max(expert_units) - min(expert_units) <= 1, (items[e], expert_units)
        assert max(layer_units) - min(layer_units) <= 1, layer_units


def test_rank_order_is_kept_within_an_item() -> None:
    # 3 groups over 2 ranks, the cursor at 0: rank 0 takes 2; the next 3-group slab gives rank 1 the 2.
    shares = [sharding.mixed_shares([[96, 96]], 32, 2, r) for r in range(2)]
    assert shares[0] == [[(0, 64), (0, 32)]] and shares[1] == [[(64, 96), (32, 96)]]
    assert sharding.share_sizes(shares[1][0]) == (32, 64)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_down_rows_partition_the_packed_tensors(bits: int) -> None:
    group = 32
    for n in range(0, 5 * group + 7):
        for tp in (2, 3):
            shares = sorted(sharding.mixed_shares([[n]], group, tp, r)[0][0] for r in range(tp))
            rows = sorted(sharding.down_packed_rows(lo, hi, bits) for lo, hi in shares)
            grows = sorted(sharding.down_group_rows(lo, hi, group) for lo, hi in shares)
            for spans, total in ((rows, packed_rows(n, bits)), (grows, num_groups(n, group))):
                live = [sp for sp in spans if sp[1] > sp[0]]
                assert (live[0][0] if live else 0) == 0 and (live[-1][1] if live else 0) == total
                assert all(a[1] == b[0] for a, b in zip(live, live[1:]))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="rank 2 is not in"):
        sharding.balanced_range(4, 2, 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        sharding.mixed_shares([[40]], 48, 2, 0)
    with pytest.raises(ValueError, match="negative"):
        sharding.prune_shares([-1], 2, 0)
    with pytest.raises(ValueError, match="group boundary"):
        sharding.down_group_rows(16, 40, 32)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_down_shard_dequantizes_to_the_matching_rows(bits: int) -> None:
    """A rank's rows of a packed down slab decode to exactly its micro-experts' rows of W_down^T."""
    torch.manual_seed(0)
    n, hidden, group = 101, 48, 32  # 4 groups, the last one 5 wide
    w_t = torch.randn(n, hidden)
    q, s, z = quantize_rtn(w_t, bits, group)
    full = dequantize(q, s, z, bits, n, group)
    for tp in (2, 3):
        for r in range(tp):
            lo, hi = sharding.mixed_shares([[n]], group, tp, r)[0][0]
            p_lo, p_hi = sharding.down_packed_rows(lo, hi, bits)
            g_lo, g_hi = sharding.down_group_rows(lo, hi, group)
            part = dequantize(q[p_lo:p_hi], s[g_lo:g_hi], z[g_lo:g_hi], bits, hi - lo, group)
            assert torch.equal(part, full[lo:hi])


def _routing(
    tokens: int, experts: int, top_k: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 32, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g, dtype=torch.float64)
    return x, weights, ids


def test_ragged_shards_sum_to_the_full_layer() -> None:
    """CAMERA-P: odd widths, a width-0 expert and a width-1 expert, TP 2 and 3."""
    torch.manual_seed(1)
    hidden, widths = 32, [7, 0, 13, 1, 9, 5]
    gates = [torch.randn(w, hidden, dtype=torch.float64) for w in widths]
    ups = [torch.randn(w, hidden, dtype=torch.float64) for w in widths]
    downs = [torch.randn(hidden, w, dtype=torch.float64) for w in widths]
    x, tw, ids = _routing(11, len(widths), 2, seed=2)

    def layer(parts: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # As the plugin's loader does: a rank keeps rows [lo, hi) of gate/up and columns of down.
        layout = RaggedLayout(tuple(hi - lo for lo, hi in parts))
        w13 = torch.zeros(2 * layout.total, hidden, dtype=torch.float64)
        w2t = torch.zeros(layout.total, hidden, dtype=torch.float64)
        for e, (lo, hi) in enumerate(parts):
            w13[layout.gate_rows(e)] = gates[e][lo:hi]
            w13[layout.up_rows(e)] = ups[e][lo:hi]
            w2t[layout.down_rows(e)] = downs[e][:, lo:hi].t()
        return w13, w2t, layout.offsets_tensor()

    full = ragged_moe_forward(x, tw, ids, *layer([(0, w) for w in widths]))
    assert full.abs().max() > 0
    for tp in (2, 3):
        total = sum(
            ragged_moe_forward(x, tw, ids, *layer(sharding.prune_shares(widths, tp, r))) for r in range(tp)
        )
        torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-4)  # the op accumulates in fp32
        # Every rank really computes something different (the split is not degenerate).
        one = ragged_moe_forward(x, tw, ids, *layer(sharding.prune_shares(widths, tp, 0)))
        assert not torch.allclose(one, full)


def test_slab_shards_sum_to_the_full_layer() -> None:
    """CAMERA-Q: 4/2/1-bit slabs of several groups (short last groups), TP 2 and 3."""
    torch.manual_seed(3)
    hidden, group, bits = 32, 32, (4, 2, 1)
    slabs = [(40, 70, 0), (0, 33, 31), (96, 1, 64), (0, 0, 0), (5, 64, 65)]
    experts = []  # per expert, per bit: full checkpoint tensors
    for sizes in slabs:
        row = []
        for b, n in zip(bits, sizes):
            if n == 0:
                row.append(None)
                continue
            g_t, u_t, d_t = torch.randn(hidden, n), torch.randn(hidden, n), torch.randn(n, hidden)
            row.append(
                SlabTensors(
                    *quantize_rtn(g_t, b, group), *quantize_rtn(u_t, b, group), *quantize_rtn(d_t, b, group)
                )
            )
        experts.append(row)

    def shard(tp: int, r: int) -> SlabMoEWeights:
        # As the plugin's loader does: columns [lo, hi) of gate/up, whole groups of down.
        out = []
        shares = sharding.mixed_shares(slabs, group, tp, r)
        for expert_shares, row in zip(shares, experts):
            rank_row: list[SlabTensors | None] = []
            for b, (lo, hi), t in zip(bits, expert_shares, row):
                if t is None or hi == lo:
                    rank_row.append(None)
                    continue
                p_lo, p_hi = sharding.down_packed_rows(lo, hi, b)
                g_lo, g_hi = sharding.down_group_rows(lo, hi, group)
                rank_row.append(
                    SlabTensors(
                        *(m[:, lo:hi].contiguous() for m in t[:6]),
                        t.down_qweight[p_lo:p_hi].contiguous(),
                        t.down_scales[g_lo:g_hi].contiguous(),
                        t.down_zeros[g_lo:g_hi].contiguous(),
                    )
                )
            out.append(rank_row)
        weights = SlabMoEWeights.from_expert_tensors(out, bits, hidden, group)
        assert [list(s) for s in weights.layout.sizes] == [list(sharding.share_sizes(sh)) for sh in shares]
        return weights

    x, tw, ids = _routing(13, len(slabs), 2, seed=4)
    x, tw = x.float(), tw.float()
    full = slab_moe_reference(x, tw, ids, SlabMoEWeights.from_expert_tensors(experts, bits, hidden, group))
    assert full.abs().max() > 0
    for tp in (2, 3):
        total = sum(slab_moe_reference(x, tw, ids, shard(tp, r)) for r in range(tp))
        torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-4)
