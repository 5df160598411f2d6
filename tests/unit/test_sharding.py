"""The tensor-parallel split rule of camera_vllm.format.sharding (no vLLM).

Checks the rule itself (contiguous, complete, balanced, whole quantization groups) and
that it is exact: the sum over ranks of the expert outputs computed on each rank's share
equals the unsplit layer, for CAMERA-P (ragged experts) and CAMERA-Q (packed slabs).
"""

from __future__ import annotations

import pytest
import torch

from camera_kernels import SlabMoEWeights, SlabTensors, quantize_rtn, slab_moe_reference
from camera_kernels.packing import dequantize, num_groups, packed_rows
from camera_vllm.format import sharding
from camera_vllm.vllm_plugin.ragged import RaggedLayout, ragged_moe_forward


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_balanced_range_is_a_contiguous_balanced_partition(tp: int) -> None:
    for count in range(0, 41):
        ranges = [sharding.balanced_range(count, tp, r) for r in range(tp)]
        assert ranges[0][0] == 0 and ranges[-1][1] == count
        for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
            assert hi == lo  # contiguous, in rank order
        sizes = [hi - lo for lo, hi in ranges]
        assert max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # the first ranks take the extra unit


def test_odd_widths_lose_no_channel() -> None:
    # 7 = 4 + 3 over two ranks; 5 = 2 + 2 + 1 over three.
    assert [sharding.channel_range(7, 2, r) for r in range(2)] == [(0, 4), (4, 7)]
    assert [sharding.shard_width(5, 3, r) for r in range(3)] == [2, 2, 1]
    assert [sharding.shard_width(1, 2, r) for r in range(2)] == [1, 0]


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("tp", [2, 3])
def test_slab_range_keeps_groups_whole(group: int, tp: int) -> None:
    for n in range(0, 5 * group + 7):
        ranges = [sharding.slab_range(n, group, tp, r) for r in range(tp)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
            assert hi == lo
        for lo, hi in ranges:
            assert lo % group == 0 or lo == hi == n  # a share starts on a group boundary (or is empty)
            assert hi == n or hi % group == 0  # and ends on one, or at the slab's end
        groups = [num_groups(hi - lo, group) for lo, hi in ranges]
        assert sum(groups) == num_groups(n, group)
        assert max(groups) - min(groups) <= 1
        # Packed rows and group rows partition the checkpoint tensors the same way.
        for bits in (1, 2, 3, 4, 8):
            rows = [sharding.down_packed_rows(n, bits, group, tp, r) for r in range(tp)]
            assert rows[0][0] == 0 and rows[-1][1] == packed_rows(n, bits)
            assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
        grows = [sharding.down_group_rows(n, group, tp, r) for r in range(tp)]
        assert grows[0][0] == 0 and grows[-1][1] == num_groups(n, group)
        assert all(a[1] == b[0] for a, b in zip(grows, grows[1:]))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="rank 2 is not in"):
        sharding.balanced_range(4, 2, 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        sharding.slab_range(40, 48, 2, 0)
    with pytest.raises(ValueError, match="negative"):
        sharding.channel_range(-1, 2, 0)


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
            lo, hi = sharding.slab_range(n, group, tp, r)
            p_lo, p_hi = sharding.down_packed_rows(n, bits, group, tp, r)
            g_lo, g_hi = sharding.down_group_rows(n, group, tp, r)
            part = dequantize(q[p_lo:p_hi], s[g_lo:g_hi], z[g_lo:g_hi], bits, hi - lo, group)
            assert torch.equal(part, full[lo:hi])


def _routing(tokens: int, experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
            ragged_moe_forward(x, tw, ids, *layer([sharding.channel_range(w, tp, r) for w in widths]))
            for r in range(tp)
        )
        torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-4)  # the op accumulates in fp32
        # Every rank really computes something different (the split is not degenerate).
        one = ragged_moe_forward(x, tw, ids, *layer([sharding.channel_range(w, tp, 0) for w in widths]))
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
            row.append(SlabTensors(*quantize_rtn(g_t, b, group), *quantize_rtn(u_t, b, group), *quantize_rtn(d_t, b, group)))
        experts.append(row)

    def shard(tp: int, r: int) -> SlabMoEWeights:
        # As the plugin's loader does: columns [lo, hi) of gate/up, whole groups of down.
        out = []
        for sizes, row in zip(slabs, experts):
            rank_row: list[SlabTensors | None] = []
            for b, n, t in zip(bits, sizes, row):
                lo, hi = sharding.slab_range(n, group, tp, r)
                if t is None or hi == lo:
                    rank_row.append(None)
                    continue
                p_lo, p_hi = sharding.down_packed_rows(n, b, group, tp, r)
                g_lo, g_hi = sharding.down_group_rows(n, group, tp, r)
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
        assert [list(s) for s in weights.layout.sizes] == [list(sharding.shard_slabs(s, group, tp, r)) for s in slabs]
        return weights

    x, tw, ids = _routing(13, len(slabs), 2, seed=4)
    x, tw = x.float(), tw.float()
    full = slab_moe_reference(x, tw, ids, SlabMoEWeights.from_expert_tensors(experts, bits, hidden, group))
    assert full.abs().max() > 0
    for tp in (2, 3):
        total = sum(slab_moe_reference(x, tw, ids, shard(tp, r)) for r in range(tp))
        torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-4)
