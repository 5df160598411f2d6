"""The compiled CPU slab MoE kernel against the pure-torch reference (fp32), and its dispatch.

The kernel computes on the packed codes (per-group ``scale * (sum x*q - zero * sum x)``;
exact bf16 products for bf16-valued activations), the reference dequantizes and
multiplies: the two agree up to fp32 summation order.
The first test builds the extension (about 30-60 s on a cold cache, then cached).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil

import pytest
import torch

from camera_kernels import (
    choose_backend,
    cpu_kernel_available,
    cpu_kernel_reason,
    cpu_slab,
    dispatch,
    slab_moe,
    slab_moe_cpu,
    slab_moe_reference,
)
from camera_kernels.testing import random_slab_weights

HAVE_TOOLCHAIN = shutil.which("c++") is not None and importlib.util.find_spec("ninja") is not None


@pytest.fixture(scope="module")
def kernel() -> None:
    """Build (or load) the extension once; with a compiler present a failed build is a failure."""
    if not cpu_kernel_available():
        if HAVE_TOOLCHAIN:
            pytest.fail(
                f"a C++ compiler and ninja are here but the CPU kernel did not build: {cpu_kernel_reason()}"
            )
        pytest.skip(f"no C++ toolchain: {cpu_kernel_reason()}")


@pytest.fixture(scope="module", params=["native", "avx2"])
def isa(request, kernel) -> str:
    """Each exactness test runs on the native build and on the AVX2 build (``-march=haswell``
    without AVX-512), so an AVX-512 machine tests the code path an AVX2-only CPU runs."""
    cpu_slab.load_cpu_kernel_variant(request.param)
    return request.param


def test_avx2_build_has_no_avx512(kernel) -> None:
    compiled = cpu_slab.load_cpu_kernel_variant("avx2").compiled_isa()
    assert {"avx2", "fma", "f16c"} <= set(compiled) and "avx512f" not in compiled, compiled


def test_unknown_isa_names_the_variable(monkeypatch) -> None:
    monkeypatch.setenv(cpu_slab.ISA_ENV, "sse2")
    with pytest.raises(ValueError, match="CAMERA_VLLM_CPU_ISA='sse2'"):
        cpu_slab.cpu_kernel_isa()
    with pytest.raises(ValueError, match="unknown CPU kernel ISA 'sse2'"):
        cpu_slab.load_cpu_kernel_variant("sse2")


def close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 agreement up to summation order (relative to the output's scale)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 + 2e-5 * scale)


def routing(num_tokens: int, top_k: int, num_experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random routing with some ids -1 and some past the last expert (both skipped)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, num_experts + 2, (num_tokens, top_k), generator=gen)
    if num_tokens > 2:
        ids[0, 0] = -1
        ids[1, -1] = num_experts + 7
    weights = torch.rand(num_tokens, top_k, generator=gen)
    return weights, ids


# (bits, per-expert slab sizes, hidden size, group size): ragged sizes that are not multiples
# of 32 or of G, 0-width slabs, whole 0-width experts, hidden sizes that are not multiples of
# 32 or G (short last group, padded last block), every supported bit-width.
LAYERS = [
    pytest.param((1,), [[45], [0], [32], [7]], 100, 32, id="b1-g32"),
    pytest.param((2,), [[70], [1], [0], [33]], 96, 64, id="b2-g64"),
    pytest.param((3,), [[31], [64], [130], [0]], 160, 128, id="b3-g128"),
    pytest.param((4,), [[16], [47], [0], [200]], 200, 64, id="b4-g64"),
    pytest.param((8,), [[9], [0], [65], [128]], 130, 32, id="b8-g32"),
    pytest.param(
        (3, 2, 1), [[40, 0, 7], [0, 0, 0], [33, 64, 1], [5, 150, 29], [0, 3, 0]], 100, 32, id="b321-g32"
    ),
    pytest.param((8, 4, 2), [[0, 12, 70], [129, 0, 3], [1, 1, 1]], 192, 128, id="b842-g128"),
    pytest.param((4, 3, 1), [[50, 20, 0], [0, 0, 100], [33, 0, 33]], 64, 64, id="b431-g64"),
]


@pytest.mark.parametrize("bits, sizes, hidden, group", LAYERS)
@pytest.mark.parametrize("num_tokens", [1, 3, 8, 40])
def test_cpu_kernel_matches_reference_fp32(isa, bits, sizes, hidden, group, num_tokens) -> None:
    w = random_slab_weights(sizes, bits, hidden, group, seed=len(sizes) * 31 + hidden)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(num_tokens))
    tw, ids = routing(num_tokens, 3, len(sizes), seed=num_tokens + hidden)
    ref = slab_moe_reference(x, tw, ids, w)
    got = slab_moe_cpu(x, tw, ids, w, isa=isa)
    assert got.abs().max() > 0 or ref.abs().max() == 0  # the layer is not trivially zero
    close(got, ref)


@pytest.mark.parametrize("bits, sizes, hidden, group", LAYERS)
def test_cpu_kernel_bf16_valued_activations_fp32(isa, bits, sizes, hidden, group) -> None:
    """fp32 activations that are bf16 values, many tokens per expert: the bf16 dot path (on
    CPUs with AVX512-BF16) must give the fp32 result too; 8-, 4- and 1-token chunks."""
    w = random_slab_weights(sizes, bits, hidden, group, seed=hidden + 5)
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(45, hidden, generator=gen).to(torch.bfloat16).float()
    tw, ids = routing(45, 2, len(sizes), seed=hidden + 1)
    close(slab_moe_cpu(x, tw, ids, w, isa=isa), slab_moe_reference(x, tw, ids, w))


def test_cpu_kernel_many_tokens_per_expert_int32_ids(isa) -> None:
    """More than one 8-token chunk per expert, int32 ids, repeated ids within a token."""
    w = random_slab_weights([[37, 70, 5], [64, 0, 96]], (4, 2, 1), 128, 64, seed=3)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(29, 128, generator=gen)
    ids = torch.randint(0, 2, (29, 4), generator=gen, dtype=torch.int32)
    tw = torch.rand(29, 4, generator=gen)
    close(slab_moe_cpu(x, tw, ids, w, isa=isa), slab_moe_reference(x, tw, ids, w))


@pytest.mark.parametrize("max_pairs", [1, 5, 64])
def test_cpu_kernel_bounded_passes(isa, monkeypatch, max_pairs) -> None:
    """Many pairs split into several passes (one expert's pairs across passes too): same result."""
    monkeypatch.setattr(cpu_slab, "MAX_PAIRS_PER_PASS", max_pairs)
    w = random_slab_weights([[40, 24, 8], [0, 0, 0], [0, 64, 33], [17, 0, 5]], (3, 2, 1), 96, 32, seed=8)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(37, 96, generator=gen).to(torch.bfloat16).float()
    tw, ids = routing(37, 3, 4, seed=13)
    close(slab_moe_cpu(x, tw, ids, w, isa=isa), slab_moe_reference(x, tw, ids, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernel_half_inputs(isa, dtype) -> None:
    """Low-precision activations: fp32 math inside, output in x.dtype."""
    w = random_slab_weights([[40, 24, 8], [0, 64, 33], [17, 0, 0]], (3, 2, 1), 160, 32, seed=7)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(8, 160, generator=gen).to(dtype)
    tw, ids = routing(8, 2, 3, seed=11)
    got = slab_moe_cpu(x, tw.to(dtype), ids, w, isa=isa)
    assert got.dtype == dtype
    ref32 = slab_moe_reference(x.float(), tw.to(dtype).float(), ids, w)
    # Both round the same fp32 result to dtype: at most one ulp of dtype apart.
    torch.testing.assert_close(got.float(), ref32, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
    torch.testing.assert_close(
        got, slab_moe_reference(x, tw.to(dtype), ids, w), rtol=2 * torch.finfo(dtype).eps, atol=1e-6
    )


def test_cpu_kernel_edge_cases(isa) -> None:
    w = random_slab_weights([[33, 0], [0, 0]], (2, 1), 64, 32, seed=1)
    # No tokens.
    x = torch.zeros(0, 64)
    assert slab_moe_cpu(x, torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long), w, isa=isa).shape == (
        0,
        64,
    )
    # Only skipped ids, or only the width-0 expert: exact zeros.
    x = torch.randn(4, 64)
    ids = torch.tensor([[-1, 2], [1, 1], [-5, 1], [9, -1]])
    out = slab_moe_cpu(x, torch.ones(4, 2), ids, w, isa=isa)
    assert torch.equal(out, torch.zeros_like(out))
    # Bad shapes name the tensor.
    with pytest.raises(ValueError, match="x must be"):
        slab_moe_cpu(torch.zeros(2, 63), torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), w, isa=isa)
    with pytest.raises(ValueError, match="topk_ids"):
        slab_moe_cpu(torch.zeros(2, 64), torch.ones(2, 1), torch.zeros(3, 1, dtype=torch.long), w, isa=isa)


def test_auto_picks_cpu_kernel_when_toolchain_present(kernel) -> None:
    """With g++ and ninja (as in CI) ``auto`` must run the compiled kernel on CPU, not the reference."""
    assert HAVE_TOOLCHAIN
    x = torch.randn(3, 96)
    assert choose_backend(x) == ("cpu", "CPU tensors and the compiled CPU kernel available")
    assert choose_backend(x, "cpu") == ("cpu", "requested")
    assert choose_backend(x, "reference") == ("reference", "requested")
    w = random_slab_weights([[40, 8], [0, 64]], (4, 1), 96, 32, seed=2)
    tw, ids = routing(3, 2, 2, seed=4)
    assert torch.equal(slab_moe(x, tw, ids, w), slab_moe_cpu(x, tw, ids, w))


def test_fallback_when_kernel_unavailable(kernel, monkeypatch, caplog) -> None:
    """A machine where the build failed: ``auto`` falls back with the reason, ``cpu`` refuses."""
    monkeypatch.setattr(cpu_slab, "_module", None)
    monkeypatch.setattr(cpu_slab, "_reason", "the CPU kernel could not be built (no compiler)")
    monkeypatch.setattr(dispatch, "_logged", set())
    x = torch.randn(2, 64)
    assert choose_backend(x) == ("reference", "the CPU kernel could not be built (no compiler)")
    with pytest.raises(ValueError, match="backend='cpu' cannot run: the CPU kernel could not be built"):
        choose_backend(x, "cpu")
    with pytest.raises(RuntimeError, match="could not be built"):
        slab_moe_cpu(
            x,
            torch.ones(2, 1),
            torch.zeros(2, 1, dtype=torch.long),
            random_slab_weights([[32]], (2,), 64, 32),
        )
    w = random_slab_weights([[32]], (2,), 64, 32)
    with caplog.at_level(logging.INFO, logger="camera_kernels.dispatch"):
        out = slab_moe(x, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), w)
    assert torch.equal(out, slab_moe_reference(x, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), w))
    assert any(
        "reference" in r.getMessage() and "could not be built" in r.getMessage() for r in caplog.records
    )
