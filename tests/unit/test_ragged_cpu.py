"""CAMERA-P's CPU fast path: ragged weights repacked in place (after loading) for vLLM's ``cpu_fused_moe``.

The oracle is the pure-torch ragged forward in fp32 on the same (bf16-rounded) weights.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm._custom_ops")  # loads torch.ops._C (vLLM's CPU kernels)

from camera_vllm.vllm_plugin import ops  # noqa: E402
from camera_vllm.vllm_plugin.ops import camera_moe_impl, prepare_cpu_weights_  # noqa: E402
from camera_vllm.vllm_plugin.ragged import (  # noqa: E402
    RaggedLayout,
    cpu_kernel_isa,
    cpu_pack_of,
    pack_for_cpu_,
    ragged_moe_forward,
)

if cpu_kernel_isa(torch.bfloat16) is None:
    pytest.skip("vLLM's CPU MoE kernel is not available here", allow_module_level=True)

HIDDEN = 128
# Heads and tails of every kind: empty, tail only, exact multiple of 32, head + tail.
WIDTHS = (70, 0, 32, 5, 64, 96, 31, 33)


def _layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layout = RaggedLayout(WIDTHS)
    w13 = (torch.randn(2 * layout.total, HIDDEN, generator=gen) * 0.1).to(torch.bfloat16)
    w2t = (torch.randn(layout.total, HIDDEN, generator=gen) * 0.1).to(torch.bfloat16)
    return w13, w2t, layout.offsets_tensor()


def _params(w13: torch.Tensor, w2t: torch.Tensor) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(w.clone(), requires_grad=False) for w in (w13, w2t)]


def _routing(tokens: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(len(WIDTHS), generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    return x, weights, ids


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_packed_path_matches_fp32_reference(tokens: int) -> None:
    w13, w2t, offsets = _layer()
    x, tw, ids = _routing(tokens, 3, seed=tokens)
    want = ragged_moe_forward(x.float(), tw, ids, w13.float(), w2t.float(), offsets)
    p13, p2 = _params(w13, w2t)
    assert prepare_cpu_weights_(p13, p2, offsets) is not None, "a bf16 CPU layer must take the kernel path"
    got = camera_moe_impl(x, tw, ids, [p13, p2, offsets], None, "prune")
    # The bf16 pure-torch path sets the scale of acceptable rounding error.
    plain = ragged_moe_forward(x, tw, ids, w13, w2t, offsets)
    err_plain = (plain.float() - want).abs().max().item()
    err = (got.float() - want).abs().max().item()
    assert err <= 3 * err_plain + 1e-2 * want.abs().max().item(), (err, err_plain)
    # Later calls reuse the pack and give the same result.
    assert torch.equal(camera_moe_impl(x, tw, ids, [p13, p2, offsets], None, "prune"), got)


def test_expert_map_skips_other_ranks() -> None:
    w13, w2t, offsets = _layer(1)
    # 12 global experts; locals 0..7 are globals 4..11, globals 0..3 live elsewhere.
    expert_map = torch.full((12,), -1, dtype=torch.int64)
    expert_map[4:] = torch.arange(8)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, HIDDEN, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(12, generator=gen)[:4] for _ in range(9)])
    tw = torch.rand(9, 4, generator=gen)
    want = ragged_moe_forward(x.float(), tw, ids, w13.float(), w2t.float(), offsets, expert_map)
    p13, p2 = _params(w13, w2t)
    assert prepare_cpu_weights_(p13, p2, offsets) is not None
    got = camera_moe_impl(x, tw, ids, [p13, p2, offsets], expert_map, "prune")
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.02 * want.abs().max().item())


def test_pack_keeps_storage_and_bytes_and_refuses_twice() -> None:
    w13, w2t, offsets = _layer(2)
    p13, p2 = _params(w13, w2t)
    ptr13, ptr2 = p13.data_ptr(), p2.data_ptr()
    pack = pack_for_cpu_(p13, p2, offsets, cpu_kernel_isa(torch.bfloat16))
    assert (p13.data_ptr(), p2.data_ptr()) == (ptr13, ptr2)
    assert p13.shape == w13.shape and p2.shape == w2t.shape
    assert pack.widths == WIDTHS
    assert not torch.equal(p13, w13)  # the 32-aligned heads were repacked
    # Tails of fewer than 32 micro-experts stay plain: expert 3 (width 5) is untouched.
    layout = RaggedLayout(WIDTHS)
    torch.testing.assert_close(p13[layout.gate_rows(3)], w13[layout.gate_rows(3)], rtol=0, atol=0)
    with pytest.raises(ValueError, match="already packed"):
        pack_for_cpu_(p13, p2, offsets, pack.isa)


def test_unpacked_layers_fp32_and_opt_out_keep_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    w13, w2t, offsets = _layer(3)
    x, tw, ids = _routing(6, 2, seed=7)
    # The op itself never repacks: weights not prepared after loading stay as they are.
    a, b = w13.clone(), w2t.clone()
    camera_moe_impl(x, tw, ids, [a, b, offsets], None, "prune")
    assert torch.equal(a, w13) and torch.equal(b, w2t) and cpu_pack_of(a) is None
    # fp32 layers keep the exact pure-torch path.
    p13, p2 = (torch.nn.Parameter(w.float(), requires_grad=False) for w in (w13, w2t))
    assert prepare_cpu_weights_(p13, p2, offsets) is None
    got = camera_moe_impl(x.float(), tw, ids, [p13, p2, offsets], None, "prune")
    assert torch.equal(got, ragged_moe_forward(x.float(), tw, ids, w13.float(), w2t.float(), offsets))
    # The opt-out switch.
    monkeypatch.setenv(ops.CPU_KERNEL_ENV, "0")
    q13, q2 = _params(w13, w2t)
    assert prepare_cpu_weights_(q13, q2, offsets) is None
    assert cpu_pack_of(q13) is None and torch.equal(q13, w13)


def test_prepare_twice_keeps_the_first_pack() -> None:
    w13, w2t, offsets = _layer(4)
    p13, p2 = _params(w13, w2t)
    first = prepare_cpu_weights_(p13, p2, offsets)
    packed = p13.clone()
    assert prepare_cpu_weights_(p13, p2, offsets) is first and torch.equal(p13, packed)
