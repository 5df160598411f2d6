"""The ragged CAMERA-P expert compute (``camera_vllm.vllm_plugin.ragged``) and its ``moe_ragged`` op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camera_vllm.vllm_plugin.ragged import RaggedLayout, ragged_moe_forward

HIDDEN = 24


def _random_layer(widths: list[int], seed: int = 0, dtype: torch.dtype = torch.float32):
    """Per-expert (gate, up, down) weights and the same weights packed into the ragged layout."""
    g = torch.Generator().manual_seed(seed)
    experts = [
        (
            torch.randn(w, HIDDEN, generator=g) * 0.3,
            torch.randn(w, HIDDEN, generator=g) * 0.3,
            torch.randn(HIDDEN, w, generator=g) * 0.3,
        )
        for w in widths
    ]
    layout = RaggedLayout(tuple(widths))
    w13 = torch.zeros(2 * layout.total, HIDDEN)
    w2t = torch.zeros(layout.total, HIDDEN)
    for e, (gate, up, down) in enumerate(experts):
        w13[layout.gate_rows(e)] = gate
        w13[layout.up_rows(e)] = up
        w2t[layout.down_rows(e)] = down.t()
    return experts, w13.to(dtype), w2t.to(dtype), layout.offsets_tensor()


def _naive(x, topk_weights, topk_ids, experts, expert_map=None):
    """Token-by-token, slot-by-slot SwiGLU MoE in fp64 (the oracle)."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if expert_map is not None:
                e = int(expert_map[e])
                if e < 0:
                    continue
            gate, up, down = (w.double() for w in experts[e])
            xt = x[t].double()
            h = F.silu(gate @ xt) * (up @ xt)
            out[t] += float(topk_weights[t, k]) * (down @ h)
    return out


def _routing(num_tokens: int, num_experts: int, top_k: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return weights, ids.to(torch.int32)


@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_matches_naive_loop_with_ragged_and_zero_widths(num_tokens: int) -> None:
    widths = [5, 0, 12, 1, 7, 0, 3, 9]
    experts, w13, w2t, offsets = _random_layer(widths)
    x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(2))
    topk_weights, topk_ids = _routing(num_tokens, len(widths), top_k=3)
    got = ragged_moe_forward(x, topk_weights, topk_ids, w13, w2t, offsets)
    want = _naive(x, topk_weights, topk_ids, experts)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert got.abs().max() > 0.1  # the check above is not vacuous


def test_width_zero_expert_contributes_nothing() -> None:
    widths = [4, 0, 6]
    _, w13, w2t, offsets = _random_layer(widths)
    x = torch.randn(5, HIDDEN)
    ids = torch.tensor([[1, 0]] * 5, dtype=torch.int32)
    w = torch.tensor([[0.7, 0.3]] * 5)
    only_expert0 = ragged_moe_forward(x, w * torch.tensor([0.0, 1.0]), ids, w13, w2t, offsets)
    torch.testing.assert_close(ragged_moe_forward(x, w, ids, w13, w2t, offsets), only_expert0)


def test_expert_map_skips_non_local_experts() -> None:
    # 8 global experts, this rank holds 2, 5 and 7 (local ids 0, 1, 2).
    expert_map = torch.full((8,), -1, dtype=torch.int32)
    expert_map[torch.tensor([2, 5, 7])] = torch.tensor([0, 1, 2], dtype=torch.int32)
    widths = [6, 0, 4]
    experts, w13, w2t, offsets = _random_layer(widths, seed=3)
    x = torch.randn(11, HIDDEN, generator=torch.Generator().manual_seed(4))
    topk_weights, topk_ids = _routing(11, 8, top_k=2, seed=5)
    got = ragged_moe_forward(x, topk_weights, topk_ids, w13, w2t, offsets, expert_map)
    want = _naive(x, topk_weights, topk_ids, experts, expert_map)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert (topk_ids.flatten().unsqueeze(1) == torch.tensor([2, 5, 7])).any(1).sum() > 0


def test_empty_batch() -> None:
    _, w13, w2t, offsets = _random_layer([3, 2])
    out = ragged_moe_forward(
        torch.zeros(0, HIDDEN), torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.int32), w13, w2t, offsets
    )
    assert out.shape == (0, HIDDEN)


def test_bfloat16_accumulates_close_to_fp32() -> None:
    widths = [8, 3, 0, 16]
    _, w13, w2t, offsets = _random_layer(widths, seed=6)
    x = torch.randn(9, HIDDEN, generator=torch.Generator().manual_seed(7))
    topk_weights, topk_ids = _routing(9, 4, top_k=2, seed=8)
    ref = ragged_moe_forward(x, topk_weights, topk_ids, w13, w2t, offsets)
    got = ragged_moe_forward(x.bfloat16(), topk_weights, topk_ids, w13.bfloat16(), w2t.bfloat16(), offsets)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=3e-2, atol=3e-2)


def test_layout_offsets_and_rows() -> None:
    layout = RaggedLayout((3, 0, 2))
    assert layout.offsets == (0, 3, 3, 5) and layout.total == 5
    assert (layout.gate_rows(2), layout.up_rows(2), layout.down_rows(2)) == (
        slice(6, 8),
        slice(8, 10),
        slice(3, 5),
    )
    assert RaggedLayout.for_local_experts([4, 5, 6, 7], [3, 1]).widths == (7, 5)
    with pytest.raises(ValueError, match="non-negative"):
        RaggedLayout((1, -1))


def test_prepared_computations_refuse_malformed_static_arguments() -> None:
    from camera_vllm.vllm_plugin import ops

    with pytest.raises(ValueError, match="isa"):
        ops.CpuBucketsMoE("route", ("b0_w13", "b0_w2"), "prune_cpu:vec")
    with pytest.raises(ValueError, match="pairs"):
        ops.CpuBucketsMoE("route", ("b0_w13",), "vec")
    groups = tuple((g,) for g in ops.SLAB_TENSOR_GROUPS)
    with pytest.raises(ValueError, match="tensor groups"):
        ops.SlabMoE(groups[:-1], ops.SLAB_METADATA, HIDDEN, 32, (16,), (4,), torch.bfloat16)
    with pytest.raises(ValueError, match="sizes"):
        two = tuple((f"{g}_b4", f"{g}_b2") for g in ops.SLAB_TENSOR_GROUPS)
        ops.SlabMoE(two, ops.SLAB_METADATA, HIDDEN, 32, (4, 2), (4, 1, 3), torch.bfloat16)
    dense = ops.SlabMoE(groups, ops.SLAB_METADATA, HIDDEN, 32, (16,), (4, 0), torch.float16)
    assert dense.describe() == {"op": "moe_slab", "bits": [16], "group_size": 32, "dense_dtype": "float16"}
    assert ops.CpuBucketsMoE("r", ("a", "b"), "vec").describe() == {
        "op": "moe_cpu_buckets",
        "isa": "vec",
        "buckets": 1,
    }
    # Value objects: the same decision compares equal (a repeated process_weights_after_loading).
    assert ops.RaggedMoE("a", "b", "c") == ops.RaggedMoE("a", "b", "c") != ops.RaggedMoE("a", "b", "d")


@pytest.mark.vllm
def test_registered_op_compiles_fullgraph() -> None:
    """Under torch.compile(fullgraph=True) the op is one opaque node (vLLM's CPU MoE path needs this)."""
    pytest.importorskip("vllm")
    from camera_vllm.vllm_plugin import ops

    ops.ensure_registered()
    ops.ensure_registered()  # idempotent
    widths = [5, 0, 12, 1]
    _, w13, w2t, offsets = _random_layer(widths)

    layer = torch.nn.Module()
    for name, t in (("w13", w13), ("w2t", w2t), ("offsets", offsets)):
        layer.register_buffer(name, t)
    computation = ops.RaggedMoE("w13", "w2t", "offsets")

    def f(x, tw, ti):
        return computation(layer, x * 2.0, tw, ti, None) + 1.0

    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=backend)
    for n in (3, 8):
        x = torch.randn(n, HIDDEN)
        tw, ti = _routing(n, len(widths), top_k=2, seed=n)
        torch.testing.assert_close(compiled(x, tw, ti), f(x, tw, ti))
        torch.testing.assert_close(f(x, tw, ti), ragged_moe_forward(x * 2.0, tw, ti, w13, w2t, offsets) + 1.0)
    # One opaque node per graph: Dynamo did not trace into the ragged loop.
    op = torch.ops.camera_vllm.moe_ragged
    counts = [sum(node.target in (op, op.default) for node in gm.graph.nodes) for gm in graphs]
    assert counts and all(c == 1 for c in counts), [gm.graph for gm in graphs]
