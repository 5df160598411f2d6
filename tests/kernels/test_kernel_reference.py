"""Slab layout and the pure-torch reference against an independent naive MoE.

The naive oracle dequantizes whole experts with :func:`camera_kernels.packing.dequantize`
(the reference uses its own faster unpacking) and loops over tokens in fp64.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from camera_kernels import (
    SlabLayout,
    SlabMoEWeights,
    SlabTensors,
    choose_backend,
    slab_moe,
    slab_moe_reference,
)
from camera_kernels.launch import moe_align
from camera_kernels.packing import dequantize, num_groups, pack, packed_rows
from camera_kernels.reference import dequantize_fast
from camera_kernels.testing import (
    dequantize_expert,
    quantize_rtn,
    random_slab_weights,
    slab_weights_from_dense,
)

H = 64


def naive_moe(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w: SlabMoEWeights
) -> torch.Tensor:
    """Per-token, per-slot loop over fully dequantized experts, in fp64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    experts = {}
    for t in range(x.shape[0]):
        xt = x[t].double()
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if not 0 <= e < w.num_experts:
                continue
            if e not in experts:
                experts[e] = [m.double() for m in dequantize_expert(w, e)]
            gate, up, down = experts[e]
            out[t] += float(topk_weights[t, k]) * (down @ (F.silu(gate @ xt) * (up @ xt)))
    return out


def random_routing(num_tokens: int, top_k: int, num_experts: int, seed: int, drop: float = 0.0):
    """Distinct experts per token (like a router's top-k); a ``drop`` share of slots set to -1."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    if drop:
        ids[torch.rand(ids.shape, generator=gen) < drop] = -1
    weights = torch.rand(ids.shape, generator=gen)
    return weights / weights.sum(dim=1, keepdim=True), ids


# (bits, sizes[e][i]): ragged slabs, empty slabs, a width-0 expert, sizes off multiples of 32.
LAYERS = {
    "421-ragged": ((4, 2, 1), ((8, 20, 5), (0, 0, 0), (33, 0, 7), (0, 10, 0))),
    "8-uniform": ((8,), ((40,), (40,), (40,))),
    "3-odd": ((3,), ((17,), (1,), (0,), (39,))),
    "8431-mixed": ((8, 4, 3, 1), ((3, 5, 7, 9), (0, 12, 0, 30), (16, 0, 16, 0), (1, 1, 1, 1))),
    "21-wide8": ((2, 1), tuple((4 * e % 13, (7 * e + 3) % 19) for e in range(8))),
    # CAMERA-P: one dense (16-bit) slab, ragged widths and a width-0 expert; P+Q: dense beside quantized.
    "16-pruned": ((16,), ((40,), (0,), (17,), (33,))),
    "16-41-pq": ((16, 4, 1), ((8, 20, 5), (0, 0, 0), (33, 0, 7), (0, 10, 0))),
}


def test_kernel_layout_offsets_and_shapes():
    lay = SlabLayout(hidden_size=96, group_size=32, bits=(4, 1), sizes=((40, 0), (0, 0), (70, 33)))
    assert [lay.col_offset(e, 0) for e in range(3)] == [0, 40, 40]
    assert [lay.down_row_offset(e, 0) for e in range(3)] == [0, 8, 8]  # ceil(40/32)*4 = 8
    assert [lay.down_group_offset(e, 1) for e in range(3)] == [0, 0, 0]
    assert lay.w13_qweight_shape(0) == (packed_rows(96, 4), 2 * 110)
    assert lay.w2_qweight_shape(0) == (8 + 12, 96)
    assert lay.w2_scales_shape(0) == (2 + 3, 96)
    assert lay.w2_qweight_shape(1) == (2, 96)
    assert lay.up_cols(2, 0) == slice(80 + 70, 80 + 140)
    assert lay.down_groups(2, 0) == slice(2, 5)
    assert lay.max_slab(1) == 33 and lay.expert_width(1) == 0
    meta = lay.metadata()
    assert meta["slab_sizes"].tolist() == [[40, 0], [0, 0], [70, 33]]
    assert meta["col_offsets"].dtype == torch.int32


@pytest.mark.parametrize(
    "bits,sizes,group",
    [((4, 2), ((1, 1),), 32), ((4, 2), ((1, 2), (2, 1)), 64), ((8, 2, 1), ((1, 0, 1), (0, 0, 0)), 32)],
)
def test_kernel_layout_rejects_bad_specs(bits, sizes, group):
    bad = [
        dict(bits=tuple(reversed(bits)) if len(bits) > 1 else (5,), sizes=sizes),  # ascending / unsupported
        dict(bits=bits, sizes=tuple(row[:-1] for row in sizes)),  # wrong number of slabs
    ]
    for spec in bad:
        with pytest.raises(ValueError):
            SlabLayout(hidden_size=64, group_size=group, **spec)
    with pytest.raises(ValueError):
        SlabLayout(hidden_size=64, group_size=48, bits=bits, sizes=sizes)


def test_kernel_dense_slab_layout_has_no_scales():
    lay = SlabLayout(hidden_size=96, group_size=32, bits=(16, 4), sizes=((40, 7), (0, 0), (70, 33)))
    assert lay.w13_qweight_shape(0) == (packed_rows(96, 16), 2 * 110) == (48, 220)
    assert lay.w13_scales_shape(0) == (0, 220) and lay.w2_scales_shape(0) == (0, 96)
    assert lay.w2_qweight_shape(0) == (32 + 48, 96)  # ceil(40/32)*16 + ceil(70/32)*16
    assert [lay.down_group_offset(e, 0) for e in range(3)] == [0, 0, 0]
    assert lay.down_groups(2, 0) == slice(0, 0) and lay.down_groups(2, 1) == slice(1, 3)
    assert not lay.is_dense and SlabLayout(96, 32, (16,), ((8,),)).is_dense
    with pytest.raises(ValueError, match="dense slab"):
        SlabLayout(96, 32, (16,), ((8,),), dense_dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 32, 45, 130])
def test_kernel_dense_slab_keeps_weights_bit_for_bit(dtype, k):
    """A 16-bit slab stores the weights as they are: the generic 16-bit packing of their raw bit
    patterns, read back exactly by both dequantizers, with no scales."""
    w_t = torch.randn(k, 24, generator=torch.Generator().manual_seed(k)).to(dtype)
    packed, scales, zeros = quantize_rtn(w_t.float(), 16, 32, dtype)
    raw = w_t.view(torch.int16).to(torch.int64) & 0xFFFF
    assert torch.equal(packed, pack(raw, 16))
    assert scales.shape == zeros.shape == (0, 24)
    want = w_t.float()
    assert torch.equal(dequantize(packed, scales, zeros, 16, k, 32, dense_dtype=dtype), want)
    assert torch.equal(dequantize_fast(packed, scales, zeros, 16, k, 32, dtype), want)


@pytest.mark.parametrize("dense_dtype", [torch.bfloat16, torch.float16])
def test_kernel_reference_dense_layer_is_the_plain_moe(dense_dtype):
    """A CAMERA-P layer (one 16-bit slab) computes exactly the unquantized MoE on its weights:
    fp32 torch on the same 16-bit-rounded experts, ragged widths, a width-0 expert, -1 ids."""
    gen = torch.Generator().manual_seed(11)
    widths = (40, 0, 17, 33)
    gate = [(torch.randn(n, H, generator=gen) * 0.2).to(dense_dtype).float() for n in widths]
    up = [(torch.randn(n, H, generator=gen) * 0.2).to(dense_dtype).float() for n in widths]
    down = [(torch.randn(H, n, generator=gen) * 0.2).to(dense_dtype).float() for n in widths]
    w = slab_weights_from_dense(gate, up, down, [(n,) for n in widths], (16,), 32, dense_dtype)
    x = torch.randn(6, H, generator=gen)
    tw, ids = random_routing(6, 2, len(widths), seed=3, drop=0.2)
    want = torch.zeros(6, H)
    for t in range(6):
        for k in range(2):
            e = int(ids[t, k])
            if e >= 0:
                want[t] += tw[t, k] * (down[e] @ (F.silu(gate[e] @ x[t]) * (up[e] @ x[t])))
    got = slab_moe_reference(x, tw, ids, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kernel_from_ragged_dense_is_the_ragged_moe():
    """vLLM's ragged CAMERA-P tensors ([gate_e; up_e] rows, W_down^T rows per expert) repacked as one
    dense slab compute the plain MoE on those tensors."""
    gen = torch.Generator().manual_seed(12)
    widths = (40, 0, 17, 33)
    total = sum(widths)
    w13 = (torch.randn(2 * total, H, generator=gen) * 0.2).to(torch.bfloat16)
    w2t = (torch.randn(total, H, generator=gen) * 0.2).to(torch.bfloat16)
    w = SlabMoEWeights.from_ragged_dense(w13, w2t, widths, torch.bfloat16)
    assert w.layout.bits == (16,) and w.layout.sizes == tuple((n,) for n in widths)
    x = torch.randn(5, H, generator=gen)
    tw, ids = random_routing(5, 2, len(widths), seed=4, drop=0.2)
    want = torch.zeros(5, H)
    offs = [sum(widths[:e]) for e in range(len(widths))]
    for t in range(5):
        for k in range(2):
            e = int(ids[t, k])
            if e < 0 or widths[e] == 0:
                continue
            o, n = offs[e], widths[e]
            gate, up = w13[2 * o : 2 * o + n].float(), w13[2 * o + n : 2 * o + 2 * n].float()
            want[t] += tw[t, k] * (w2t[o : o + n].float().t() @ (F.silu(gate @ x[t]) * (up @ x[t])))
    torch.testing.assert_close(slab_moe_reference(x, tw, ids, w), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="w13 must be"):
        SlabMoEWeights.from_ragged_dense(w13[:-2], w2t, widths, torch.bfloat16)


def test_kernel_slab_linear_reference_is_the_dequantized_matmul():
    """The shared-expert projection: x split along K over the slabs, each slab dequantized
    independently (packing.dequantize) and multiplied; shape errors name the tensor."""
    from camera_kernels.linear import SlabLinearWeights, slab_linear_meta, slab_linear_reference

    gen = torch.Generator().manual_seed(13)
    bits, ks, n_out = (16, 4, 1), (33, 40, 7), 24
    parts = [quantize_rtn(torch.randn(k, n_out, generator=gen), b, 32) for b, k in zip(bits, ks)]
    w = SlabLinearWeights(
        bits, ks, n_out, 32, *(tuple(t[j] for t in parts) for j in range(3)), slab_linear_meta(ks)
    )
    x = torch.randn(5, sum(ks), generator=gen)
    dense = torch.cat([dequantize(*t, b, k, 32) for t, b, k in zip(parts, bits, ks)])  # [sum K, N]
    torch.testing.assert_close(slab_linear_reference(x, w), x @ dense, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"qweight\[1\]"):
        SlabLinearWeights(
            bits,
            ks,
            n_out,
            32,
            (parts[0][0], parts[0][0], parts[2][0]),
            *(tuple(t[j] for t in parts) for j in (1, 2)),
            slab_linear_meta(ks),
        )
    with pytest.raises(ValueError, match="x must be"):
        slab_linear_reference(x[:, 1:], w)


def test_kernel_slab_tensors_match_checkpoint_layout():
    """from_expert_tensors accepts exactly the tensors the checkpoint format stores per slab."""
    layout_mod = pytest.importorskip("camera_vllm.format.layout")
    hidden, group, bits = 96, 32, (4, 3, 1)
    sizes = ((40, 7, 0), (0, 0, 0), (0, 33, 65))
    experts = []
    for row in sizes:
        slabs = []
        for n, b in zip(row, bits):
            specs = [layout_mod.slab_tensors(proj, n, b, hidden, group) for proj in (0, 1, 2)]
            if n == 0:
                assert specs == [[], [], []]
                slabs.append(None)
                continue
            tensors = [
                torch.zeros(t.shape, dtype=getattr(torch, t.dtype))
                for proj_specs in specs
                for t in proj_specs
            ]
            slabs.append(SlabTensors(*tensors))
        experts.append(slabs)
    w = SlabMoEWeights.from_expert_tensors(experts, bits, hidden, group)
    assert w.layout.sizes == sizes
    assert w.w2_qweight[2].shape == (packed_rows(65, 1), hidden)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("k", [32, 45, 130])
def test_kernel_fast_dequant_matches_packing(bits, k):
    gen = torch.Generator().manual_seed(bits * 1000 + k)
    q = torch.randint(0, 2**bits, (k, 24), generator=gen)
    ng = num_groups(k, 64)
    scales = (torch.rand(ng, 24, generator=gen) + 0.1).half()
    zeros = torch.randint(0, 2**bits, (ng, 24), generator=gen).half()
    packed = pack(q, bits)
    want = dequantize(packed, scales, zeros, bits, k, 64)
    got = dequantize_fast(packed, scales, zeros, bits, k, 64)
    assert torch.equal(got, want)
    # ... and dequantization really is (q - zero) * scale.
    idx = torch.arange(k) // 64
    assert torch.equal(got, (q.float() - zeros.float()[idx]) * scales.float()[idx])


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_kernel_rtn_error_is_within_half_a_step(bits):
    w = torch.randn(100, 16, generator=torch.Generator().manual_seed(bits))
    packed, scales, zeros = quantize_rtn(w, bits, 32)
    deq = dequantize(packed, scales, zeros, bits, 100, 32)
    step = scales.float()[torch.arange(100) // 32]
    # Half a step from rounding, plus the shift of the range edges by the integer zero
    # point (up to another half step) and the fp16 rounding of the scale.
    assert ((deq - w).abs() <= step * 1.01 + 1e-6).all()
    assert (deq - w).abs().mean() < step.mean() / 2


def test_kernel_from_expert_tensors_validates_shapes():
    gen = torch.Generator().manual_seed(0)
    g = quantize_rtn(torch.randn(H, 10, generator=gen), 4, 32)
    d = quantize_rtn(torch.randn(10, H, generator=gen), 4, 32)
    good = SlabTensors(*g, *g, *d)
    w = SlabMoEWeights.from_expert_tensors([[good], []], (4,), H, 32)
    assert w.layout.sizes == ((10,), (0,))
    bad = good._replace(down_scales=good.down_scales[:, :-1])
    with pytest.raises(ValueError, match="down_scales"):
        SlabMoEWeights.from_expert_tensors([[bad]], (4,), H, 32)


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_kernel_reference_matches_naive(name, group, top_k):
    bits, sizes = LAYERS[name]
    w = random_slab_weights(sizes, bits, H, group, seed=zlib.crc32(f"{name}/{group}".encode()) % 1000)
    top_k = min(top_k, w.num_experts)
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(1))
    tw, ids = random_routing(5, top_k, w.num_experts, seed=2, drop=0.2)
    got = slab_moe_reference(x, tw, ids, w)
    want = naive_moe(x, tw, ids, w)
    # fp32 math vs fp64: only summation order and fp32 rounding differ.
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    assert want.abs().max() > 0 or all(
        w.layout.expert_width(e) == 0 for e in ids.flatten().tolist() if e >= 0
    )


def test_kernel_reference_top8_int32_ids_and_dtypes():
    bits, sizes = LAYERS["21-wide8"]
    w = random_slab_weights(sizes, bits, H, 32, seed=5)
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(6))
    tw, ids = random_routing(4, 8, 8, seed=7)
    want = naive_moe(x, tw, ids, w)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        got = slab_moe_reference(xd, tw, ids.to(torch.int32), w)
        assert got.dtype == dtype
        want_d = naive_moe(xd.float(), tw, ids, w)
        # Output rounding only: one half-ulp of the output dtype relative to the largest value.
        tol = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
        torch.testing.assert_close(got.double(), want_d, rtol=tol, atol=tol * want.abs().max().item())


def test_kernel_reference_skips_non_local_experts():
    w = random_slab_weights(((16,), (16,)), (4,), H, 32, seed=1)
    x = torch.randn(3, H)
    ids = torch.tensor([[-1, 5], [1, -1], [-1, -1]])  # 5 >= E: also not local
    tw = torch.ones(3, 2)
    out = slab_moe_reference(x, tw, ids, w)
    assert torch.equal(out[0], torch.zeros(H)) and torch.equal(out[2], torch.zeros(H))
    only_1 = slab_moe_reference(x[1:2], torch.ones(1, 1), torch.tensor([[1]]), w)
    torch.testing.assert_close(out[1:2], only_1)


def test_kernel_reference_tracks_dense_moe_at_8_bits():
    """Wiring check against the unquantized experts: gate/up swapped or slabs misordered would fail."""
    gen = torch.Generator().manual_seed(11)
    sizes = ((24, 3), (30, 2), (17, 0))  # mostly 8-bit, so RTN error stays small
    gate = [torch.randn(sum(s), H, generator=gen) * 0.2 for s in sizes]
    up = [torch.randn(sum(s), H, generator=gen) * 0.2 for s in sizes]
    down = [torch.randn(H, sum(s), generator=gen) * 0.2 for s in sizes]
    w = slab_weights_from_dense(gate, up, down, sizes, (8, 4), 32)
    x = torch.randn(6, H, generator=gen)
    tw, ids = random_routing(6, 2, 3, seed=12)
    got = slab_moe_reference(x, tw, ids, w)
    want = torch.zeros(6, H)
    for t in range(6):
        for k in range(2):
            e = int(ids[t, k])
            want[t] += tw[t, k] * (down[e] @ (F.silu(gate[e] @ x[t]) * (up[e] @ x[t])))
    rel = (got - want).norm() / want.norm()
    # Measured 2.1%: 8-bit RTN errs ~0.5% per matrix, the few 4-bit micro-experts ~8%.
    # A wiring bug (swapped gate/up, misplaced slab) gives tens of percent (see below).
    assert rel < 0.04, rel
    swapped = slab_weights_from_dense(up, gate, down, sizes, (8, 4), 32)
    assert (slab_moe_reference(x, tw, ids, swapped) - want).norm() / want.norm() > 0.3


def test_kernel_moe_align_groups_pairs_by_expert():
    ids = torch.tensor([[3, 0], [0, -1], [3, 2], [7, 0], [0, 3]])  # 7 >= E and -1: dropped
    sorted_ids, block_expert = moe_align(ids, num_experts=4, block_m=2)
    num_pairs = ids.numel()
    assert sorted_ids.numel() == block_expert.numel() * 2
    flat = ids.flatten()
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        rows = [p for p in sorted_ids[2 * b : 2 * b + 2].tolist() if p < num_pairs]
        if e < 0:
            assert rows == []
            continue
        assert all(int(flat[p]) == e for p in rows)
        seen += rows
    assert sorted(seen) == [p for p in range(num_pairs) if 0 <= int(flat[p]) < 4]
    # expert 0 has 4 pairs -> 2 full blocks; 2 and 3 one block each.
    assert block_expert.tolist()[:4] == [0, 0, 2, 3]


def test_kernel_backend_choice_is_explained():
    x = torch.zeros(2, H)
    # On CPU, auto never picks Triton: the compiled CPU kernel when it builds here, else the reference
    # with the build failure as the reason (both cases in tests/kernels/test_kernel_cpu.py).
    from camera_kernels.cpu_slab import cpu_kernel_available, cpu_kernel_reason

    want = (
        ("cpu", "CPU tensors and the compiled CPU kernel available")
        if cpu_kernel_available()
        else ("reference", cpu_kernel_reason())
    )
    assert choose_backend(x) == want
    assert choose_backend(x, "reference")[0] == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        choose_backend(x, "cuda")
    w = random_slab_weights(((8,),), (4,), H, 32)
    out = slab_moe(x, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int64), w)
    assert out.shape == x.shape
    # The compiled CPU kernel has no dense slabs: auto takes the reference for them, an explicit cpu refuses.
    dense = random_slab_weights(((8,),), (16,), H, 32)
    assert choose_backend(x, "auto", dense) == (
        "reference",
        "the compiled CPU kernel has no 16-bit (dense) slabs",
    )
    with pytest.raises(ValueError, match="16-bit"):
        choose_backend(x, "cpu", dense)
