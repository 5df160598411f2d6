"""The CAMERA-Q custom ops on their own: ``camera_vllm.moe_slab`` and ``camera_vllm.slab_linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camera_kernels import SlabMoEWeights
from camera_kernels.linear import slab_linear_meta
from camera_kernels.packing import dequantize
from camera_kernels.testing import dequantize_expert, quantize_rtn
from camera_kernels.testing import random_slab_weights as _random
from camera_vllm.vllm_plugin import ops

HIDDEN, GROUP = 64, 32
BITS = (4, 2, 1)
SIZES = ((8, 20, 4), (0, 0, 0), (0, 33, 1), (5, 0, 0))  # a width-0 expert, ragged slabs


def _slab_args(w: SlabMoEWeights, expert_map: torch.Tensor | None = None) -> tuple:
    """``moe_slab``'s arguments after ``(x, topk_weights, topk_ids)`` for the layer ``w``."""
    groups = [list(getattr(w, name)) for name in ops.SLAB_TENSOR_GROUPS]
    meta = [getattr(w, name) for name in ops.SLAB_METADATA]
    return (*groups, *meta, expert_map, *ops.slab_static_args(w.layout))


def _as_layer(w: SlabMoEWeights) -> tuple[torch.nn.Module, ops.SlabMoE]:
    """A module holding ``w``'s tensors as buffers and the computation naming them."""
    layer = torch.nn.Module()
    groups = []
    for name in ops.SLAB_TENSOR_GROUPS:
        groups.append(tuple(f"{name}_{i}" for i in range(w.layout.num_bits)))
        for buf, t in zip(groups[-1], getattr(w, name)):
            layer.register_buffer(buf, t)
    for name in ops.SLAB_METADATA:
        layer.register_buffer(name, getattr(w, name))
    return layer, ops.SlabMoE.of_layout(w.layout, tuple(groups), ops.SLAB_METADATA)


def _routing(num_tokens: int, num_experts: int, top_k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    weights, ids = torch.topk(torch.randn(num_tokens, num_experts, generator=g).softmax(-1), top_k, dim=-1)
    return weights, ids.to(torch.int32)


def _naive(x, tw, ti, w: SlabMoEWeights):
    """Token by token on the dequantized experts (fp64)."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ti.shape[1]):
            e = int(ti[t, k])
            if e < 0 or w.layout.expert_width(e) == 0:
                continue
            gate, up, down = (m.double() for m in dequantize_expert(w, e))
            xt = x[t].double()
            out[t] += float(tw[t, k]) * (down @ (F.silu(gate @ xt) * (up @ xt)))
    return out


@pytest.mark.parametrize("num_tokens", [1, 9])
def test_mixed_op_equals_naive(num_tokens: int) -> None:
    w = _random(SIZES, BITS, HIDDEN, GROUP, std=0.3, seed=3)
    x = torch.randn(num_tokens, HIDDEN)
    tw, ti = _routing(num_tokens, len(SIZES), 2, seed=num_tokens)
    got = ops.moe_slab_impl(x, tw, ti, *_slab_args(w))
    torch.testing.assert_close(got.double(), _naive(x, tw, ti, w), rtol=1e-5, atol=1e-5)
    # An expert map sending expert 0 to "another rank" drops exactly its contribution.
    emap = torch.tensor([-1, 1, 2, 3], dtype=torch.int32)
    masked = ops.moe_slab_impl(x, tw, ti, *_slab_args(w, emap))
    torch.testing.assert_close(
        masked.double(), _naive(x, tw, torch.where(ti == 0, -1, ti), w), rtol=1e-5, atol=1e-5
    )


def test_mixed_op_errors() -> None:
    w = _random(SIZES, BITS, HIDDEN, GROUP, seed=1)
    x, tw, ti = torch.randn(1, HIDDEN), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32)
    args = list(_slab_args(w))
    args[0] = args[0][:-1]  # w13_qweight without its last bit-width
    with pytest.raises(ValueError, match="one per bit-width"):
        ops.moe_slab_impl(x, tw, ti, *args)
    args = list(_slab_args(w))
    args[-2] = args[-2][:-1]  # sizes one short of [E][len(bits)]
    with pytest.raises(ValueError, match="slab sizes per expert"):
        ops.moe_slab_impl(x, tw, ti, *args)
    other = _random(((1, 1, 1),) * 4, BITS, HIDDEN, GROUP, seed=1)
    with pytest.raises(ValueError, match="expected"):  # tensors of another layout are refused
        ops.moe_slab_impl(x, tw, ti, *_slab_args(other)[:-5], *ops.slab_static_args(w.layout))


def _shared(slabs: tuple[int, ...], seed: int = 0):
    """Dense shared expert (gate/up [S, H], down [H, S], rows in slab order) and its slab tensors."""
    g = torch.Generator().manual_seed(seed)
    s = sum(slabs)
    gate, up, down = (
        torch.randn(*shape, generator=g) * 0.3 for shape in ((s, HIDDEN), (s, HIDDEN), (HIDDEN, s))
    )
    gu_w, down_w, deq = [], [], {"gate": [], "up": [], "down": []}
    start = 0
    for n, b in zip(slabs, BITS):
        if n == 0:
            continue
        sl = slice(start, start + n)
        start += n
        gq, uq, dq = (
            quantize_rtn(gate[sl].t(), b, GROUP),
            quantize_rtn(up[sl].t(), b, GROUP),
            quantize_rtn(down[:, sl].t(), b, GROUP),
        )
        gu_w += [torch.cat([gq[j], uq[j]], dim=1) for j in range(3)]
        down_w += list(dq)

        deq["gate"].append(dequantize(*gq, b, HIDDEN, GROUP).t())
        deq["up"].append(dequantize(*uq, b, HIDDEN, GROUP).t())
        deq["down"].append(dequantize(*dq, b, n, GROUP).t())
    dense = (torch.cat(deq["gate"]), torch.cat(deq["up"]), torch.cat(deq["down"], dim=1))
    # The metadata the linear method builds at load: K of gate_up's slabs (H), of down's (n_j).
    gu_w.append(slab_linear_meta([HIDDEN]))
    down_w.append(slab_linear_meta([n for n in slabs if n]))
    return gu_w, down_w, dense


def test_slab_linear_equals_dequantized_matmul() -> None:
    slabs = (12, 0, 37)
    gu_w, down_w, (gate, up, down) = _shared(slabs)
    x = torch.randn(3, 5, HIDDEN)
    s = sum(slabs)
    gu = ops.slab_linear_impl(x, gu_w, list(BITS), list(slabs), GROUP, True, 2 * s)
    torch.testing.assert_close(gu, torch.cat([x @ gate.t(), x @ up.t()], dim=-1), rtol=1e-5, atol=1e-5)
    act = F.silu(gu[..., :s]) * gu[..., s:]  # what vLLM's SiluAndMul does
    y = ops.slab_linear_impl(act, down_w, list(BITS), list(slabs), GROUP, False, HIDDEN)
    want = (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_slab_linear_has_no_host_sync() -> None:
    """The quantized shared expert runs inside vLLM's captured graph too: no host sync."""
    from host_sync import HostSyncRecorder

    slabs = (12, 0, 37)
    gu_w, down_w, _ = _shared(slabs)
    s = sum(slabs)
    for tokens in (1, 7):
        x = torch.randn(tokens, HIDDEN)
        with HostSyncRecorder() as rec:
            gu = ops.slab_linear_impl(x, gu_w, list(BITS), list(slabs), GROUP, True, 2 * s)
            ops.slab_linear_impl(
                F.silu(gu[:, :s]) * gu[:, s:], down_w, list(BITS), list(slabs), GROUP, False, HIDDEN
            )
        assert rec.calls == [], "\n".join(map(str, rec.calls))


@pytest.mark.vllm
def test_mixed_ops_compile_fullgraph() -> None:
    """Both ops are opaque nodes under torch.compile(fullgraph=True) (vLLM's CPU compile mode)."""
    pytest.importorskip("vllm")
    ops.ensure_registered()
    w = _random(SIZES, BITS, HIDDEN, GROUP, std=0.3, seed=5)
    layer, computation = _as_layer(w)
    slabs = (12, 0, 37)
    gu_w, down_w, _ = _shared(slabs, seed=2)
    s = sum(slabs)

    def f(x, tw, ti):
        routed = computation(layer, x, tw, ti, None)
        gu = ops.slab_linear(x, gu_w, list(BITS), list(slabs), GROUP, True, 2 * s)
        act = F.silu(gu[:, :s]) * gu[:, s:]
        return routed + ops.slab_linear(act, down_w, list(BITS), list(slabs), GROUP, False, HIDDEN)

    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=backend)
    for n in (3, 8):
        x = torch.randn(n, HIDDEN)
        tw, ti = _routing(n, len(SIZES), 2, seed=n)
        torch.testing.assert_close(compiled(x, tw, ti), f(x, tw, ti))
        want = _naive(x, tw, ti, w)
        torch.testing.assert_close(computation(layer, x, tw, ti, None).double(), want, rtol=1e-5, atol=1e-5)
    # One opaque node per op call: Dynamo traced into neither.
    moe, lin = torch.ops.camera_vllm.moe_slab, torch.ops.camera_vllm.slab_linear
    for gm in graphs:
        targets = [node.target for node in gm.graph.nodes]
        assert sum(t in (moe, moe.default) for t in targets) == 1, gm.graph
        assert sum(t in (lin, lin.default) for t in targets) == 2, gm.graph
    assert graphs
