"""Triton slab MoE == pure-torch reference.

On a machine without CUDA the kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``, switched on below before triton and the kernels are
imported), which executes the same kernel code on CPU tensors with numpy; shapes are
tiny to keep it fast.

Tolerances (relative to the largest output magnitude, ``max|ref|``):

* fp32: the kernel and the reference dequantize to the same fp32 weights and differ
  only in summation order -> 1e-5.
* GEMV path, fp16/bf16: all math in fp32 (intermediate included), so the only extra
  error is the final rounding to the output dtype: half an ulp, 2^-11 (fp16) /
  2^-8 (bf16), relative to each element; we allow 2 ulp of ``max|ref|``.
* sorted (tensor-core) path, fp16/bf16: the dequantized weights and the SiLU*up
  intermediate are rounded to the activation dtype before ``tl.dot`` (as in every
  fp16/bf16 GEMM kernel).  Each rounding is <= half an ulp relative; over K terms of
  random sign the errors add like a random walk and, after SiLU and two GEMMs, stay
  within a few ulp of ``max|ref|`` (measured: up to 2.5 ulp): we allow 4 ulp
  (fp16 2^-8 = 0.4%, bf16 2^-5 = 3%).
  A wrong slab, group, column or bit plane errs by O(100%).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from camera_kernels import SlabMoEWeights, slab_moe, slab_moe_reference
from camera_kernels.launch import slab_moe_triton
from camera_kernels.testing import random_slab_weights, slab_weights_from_dense
from camera_kernels.tuning import MoEConfig, TileConfig, get_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[2]
# False when this process already imported triton in compiled mode (e.g. through vLLM in
# another test module): the tests then run in a fresh process, see the last test.
IN_PROCESS = True

if DEVICE == "cpu":
    # Triton decides at import time (for its own tl.* helpers too) whether @triton.jit
    # functions are interpreted, so the flag must be on when triton and the kernels are
    # first imported.  It is then kept on through triton's knob and the environment
    # variable is restored, so subprocesses of other tests do not inherit it.
    _saved_flag = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        triton = pytest.importorskip("triton")
        from triton.runtime.jit import JITFunction

        if isinstance(triton.language.zeros, JITFunction) or not hasattr(triton, "knobs"):
            IN_PROCESS = False
        else:
            import camera_kernels.moe_slab as _moe_slab

            triton.knobs.runtime.interpret = True
            assert type(_moe_slab._w13_gemv_kernel).__name__ == "InterpretedFunction"
    finally:
        if _saved_flag is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _saved_flag
else:
    pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _runs_here(request):
    if not IN_PROCESS and request.node.originalname != "test_kernel_triton_in_fresh_interpreter":
        pytest.skip(
            "triton was imported in compiled mode earlier in this process; "
            "test_kernel_triton_in_fresh_interpreter runs this module in a fresh interpreter"
        )


H = 64

LAYERS = {
    "421-ragged": ((4, 2, 1), ((8, 20, 5), (0, 0, 0), (33, 0, 7), (0, 10, 0))),
    "8-uniform": ((8,), ((40,), (40,), (40,))),
    "3-odd": ((3,), ((17,), (1,), (0,), (39,))),
    "8431-mixed": ((8, 4, 3, 1), ((3, 5, 7, 9), (0, 12, 0, 30), (16, 0, 16, 0), (1, 1, 1, 1))),
    "21-wide8": ((2, 1), tuple((4 * e % 13, (7 * e + 3) % 19) for e in range(8))),
    # No expert uses the middle bit-width: the kernels get two slots, metadata columns 0 and 2.
    "4x1-unused-slot": ((4, 2, 1), ((8, 0, 5), (3, 0, 0), (0, 0, 36))),
    # CAMERA-P: one dense (16-bit, bf16) slab with ragged widths and a width-0 expert; P+Q beside it.
    "16-pruned": ((16,), ((40,), (0,), (17,), (33,))),
    "16-41-pq": ((16, 4, 1), ((8, 20, 5), (0, 0, 0), (33, 0, 7), (0, 10, 0))),
}

# Small tiles so that both GEMMs need several K and N tiles (H = 64, slabs up to 40).
GEMV = MoEConfig("gemv", TileConfig(1, 32, 32, 4, 1), TileConfig(1, 32, 32, 4, 1), "test")
SORTED = MoEConfig("sorted", TileConfig(16, 32, 32, 4, 1), TileConfig(16, 32, 64, 4, 1), "test")
# Split K as far as it goes (one K step per split: 2 for w13 at H = 64, up to 2 for w2).
GEMV_SPLIT = MoEConfig("gemv", TileConfig(1, 32, 32, 4, 1), TileConfig(1, 32, 32, 4, 1), "test", 10**6)
# The shipped prefill tiles (what a long prompt gets), forced onto this small layer.
SORTED_DEFAULT = get_config(2048, 8, 2048, 128, path="sorted")
CONFIGS = {
    "gemv": GEMV,
    "sorted": SORTED,
    "auto": None,
    "gemv_split": GEMV_SPLIT,
    "sorted_default": SORTED_DEFAULT,
}

ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # spacing at 1.0


def tolerance(dtype: torch.dtype, path: str) -> float:
    if dtype == torch.float32:
        return 1e-5
    return (4 if path == "sorted" else 2) * ULP[dtype]


def routing(num_tokens: int, top_k: int, num_experts: int, seed: int, drop: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    if drop:
        ids[torch.rand(ids.shape, generator=gen) < drop] = -1
    w = torch.rand(ids.shape, generator=gen)
    return (w / w.sum(1, keepdim=True)).to(DEVICE), ids.to(DEVICE)


def check(
    w: SlabMoEWeights,
    num_tokens: int,
    top_k: int,
    dtype: torch.dtype,
    path: str,
    seed: int = 0,
    drop: float = 0.0,
    ids_dtype: torch.dtype = torch.int64,
) -> None:
    x = torch.randn(num_tokens, H, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    tw, ids = routing(num_tokens, top_k, w.num_experts, seed + 1, drop)
    ids = ids.to(ids_dtype)
    got = slab_moe_triton(x, tw, ids, w, CONFIGS[path])
    want = slab_moe_reference(x, tw, ids, w).float()  # fp32 math from the same dtype-rounded x
    assert got.dtype == dtype and got.shape == x.shape
    scale = want.abs().max().item()
    err = (got.float() - want).abs().max().item()
    used = {
        "auto": get_config(num_tokens, top_k, H, w.num_experts).path,
        "gemv_split": "gemv",
        "sorted_default": "sorted",
    }.get(path, path)
    assert err <= tolerance(dtype, used) * scale + 1e-7, f"max err {err:.3g} vs max |ref| {scale:.3g}"


# Each layer on both paths, cycling dtypes, group sizes and top-k so that every value of
# each axis meets every bit mix at least once while the interpreter run stays short.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CASES = []
for li, name in enumerate(sorted(LAYERS)):
    for pi, path in enumerate(("gemv", "sorted")):
        for j in range(2):
            c = li * 4 + pi * 2 + j
            CASES.append((name, path, DTYPES[c % 3], (32, 64)[(c // 3) % 2], 1 + c % 4))


@pytest.mark.kernel
@pytest.mark.parametrize("name,path,dtype,group,top_k", CASES)
def test_kernel_triton_matches_reference(name, path, dtype, group, top_k):
    bits, sizes = LAYERS[name]
    w = random_slab_weights(sizes, bits, H, group, seed=len(name) * 7 + group, device=DEVICE)
    check(
        w,
        num_tokens=5,
        top_k=min(top_k, w.num_experts),
        dtype=dtype,
        path=path,
        seed=group + top_k,
        drop=0.15,
    )


@pytest.mark.kernel
@pytest.mark.parametrize("path", ["gemv", "sorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_triton_fp16_dense_slab(path, dtype):
    """A dense slab of fp16 weights (DENSE_FP16) beside quantized ones, -1 ids, both paths."""
    bits, sizes = LAYERS["16-41-pq"]
    w = random_slab_weights(sizes, bits, H, 32, seed=21, device=DEVICE, dense_dtype=torch.float16)
    check(w, num_tokens=5, top_k=2, dtype=dtype, path=path, seed=4, drop=0.2, ids_dtype=torch.int32)


@pytest.mark.kernel
@pytest.mark.parametrize("top_k", range(1, 9))
def test_kernel_triton_top_k_sweep(top_k):
    """E = 8 experts, top-k 1..8, both paths and the default (auto) tiles."""
    bits, sizes = LAYERS["21-wide8"]
    w = random_slab_weights(sizes, bits, H, 32, seed=top_k, device=DEVICE)
    path = ("gemv", "sorted", "auto")[top_k % 3]
    dtype = (torch.bfloat16, torch.float16, torch.float32)[top_k % 3]
    check(
        w,
        num_tokens=3 + top_k % 3,
        top_k=top_k,
        dtype=dtype,
        path=path,
        seed=top_k,
        ids_dtype=(torch.int32, torch.int64)[top_k % 2],
    )


@pytest.mark.kernel
@pytest.mark.parametrize(
    "name,dtype", [("421-ragged", torch.bfloat16), ("16-41-pq", torch.float32), ("3-odd", torch.float16)]
)
def test_kernel_triton_gemv_split_k(name, dtype):
    """Split-K GEMV (partial gate/up sums added in the w2 kernel, w2 splits added with the
    top-k slots): ragged, zero-width and dense slabs, -1 ids, against the reference."""
    from camera_kernels.launch import grid_sizes

    bits, sizes = LAYERS[name]
    w = random_slab_weights(sizes, bits, H, 32, seed=5, device=DEVICE)
    widths = [w.layout.max_slab(i) for i in range(w.layout.num_bits) if w.layout.max_slab(i) > 0]
    grids = grid_sizes(GEMV_SPLIT, 4, 2, H, w.num_experts, widths, 32)
    assert grids["w13"][2] == 2 and grids["w2"][2] == max(-(-n // 32) for n in widths)
    check(w, num_tokens=4, top_k=2, dtype=dtype, path="gemv_split", seed=3, drop=0.2)


@pytest.mark.kernel
@pytest.mark.parametrize("name", ["8431-mixed", "16-41-pq"])
def test_kernel_triton_fp32_sorted_runs_capped_tiles(monkeypatch, name):
    """fp32 on the sorted path runs the shipped tiles capped (tuning.fp32_sorted: no spills on
    sm_90) and stays exact: ragged, zero-width and dense slabs, bits 1/3/4/8/16, -1 ids."""
    from camera_kernels import launch, tuning

    seen = []
    monkeypatch.setattr(launch, "fp32_sorted", lambda c: seen.append(tuning.fp32_sorted(c)) or seen[-1])
    bits, sizes = LAYERS[name]
    w = random_slab_weights(sizes, bits, H, 32, seed=13, device=DEVICE)
    check(w, num_tokens=6, top_k=2, dtype=torch.float32, path="sorted_default", seed=8, drop=0.15)
    (cfg,) = seen
    assert cfg.w13.block_m < SORTED_DEFAULT.w13.block_m and cfg.w2.block_n < SORTED_DEFAULT.w2.block_n
    for tile in (cfg.w13, cfg.w2):
        assert tile.block_m <= tuning.FP32_MAX_BLOCK_M and tile.block_n <= tuning.FP32_MAX_BLOCK_N
        assert tile.block_k <= tuning.FP32_MAX_BLOCK_K


@pytest.mark.kernel
@pytest.mark.parametrize(
    "num_tokens,top_k,num_experts,block_m,drop,ids_dtype",
    [
        (5, 2, 4, 16, 0.2, torch.int64),  # few pairs, -1 ids
        (37, 8, 128, 16, 0.1, torch.int32),  # Qwen3-like E = 128, several pair chunks
        (300, 4, 16, 64, 0.0, torch.int64),  # chunks of 256 pairs, big blocks
        (9, 3, 1, 32, 0.3, torch.int32),  # one expert (slab_linear), E_PAD > E
        (40, 6, 600, 16, 0.05, torch.int64),  # E > 512: one-hot chunks of 16 pairs
    ],
)
def test_kernel_triton_moe_align_matches_torch(num_tokens, top_k, num_experts, block_m, drop, ids_dtype):
    """The routing kernel writes exactly what the torch moe_align does (order, padding, tail)."""
    from camera_kernels.launch import moe_align, moe_align_triton

    gen = torch.Generator().manual_seed(num_tokens * 7 + num_experts)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=gen)
    ids[torch.rand(ids.shape, generator=gen) < drop] = -1
    ids[0, 0] = num_experts  # another rank's expert: dropped
    ids = ids.to(DEVICE, ids_dtype)
    want_ids, want_blocks = moe_align(ids, num_experts, block_m)
    got_ids, got_blocks = moe_align_triton(ids, num_experts, block_m)
    assert got_ids.dtype == torch.int32 and got_blocks.dtype == torch.int32
    assert torch.equal(got_blocks.cpu(), want_blocks.cpu())
    assert torch.equal(got_ids.cpu(), want_ids.cpu())
    assert (want_blocks >= 0).any() and (want_ids == num_tokens * top_k).any()  # padding was exercised


@pytest.mark.kernel
@pytest.mark.parametrize("path", ["gemv", "gemv_split", "sorted"])
def test_kernel_triton_non_local_experts_contribute_nothing(path):
    w = random_slab_weights(((16, 4), (0, 9)), (4, 2), H, 32, seed=9, device=DEVICE)
    x = torch.randn(3, H, device=DEVICE)
    ids = torch.tensor([[-1, 7], [1, -1], [-1, -1]], device=DEVICE)  # 7 >= E: another rank's expert
    out = slab_moe_triton(x, torch.ones(3, 2, device=DEVICE), ids, w, CONFIGS[path])
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    one = slab_moe_reference(x[1:2], torch.ones(1, 1, device=DEVICE), ids[1:2, :1], w)
    torch.testing.assert_close(out[1:2], one, rtol=1e-5, atol=1e-6)
    assert out[1].abs().max() > 0


@pytest.mark.kernel
def test_kernel_triton_matches_dense_moe():
    """End to end against unquantized fp32 experts (8-bit RTN): the kernel is wired like a real MoE."""
    gen = torch.Generator().manual_seed(4)
    sizes = ((30, 2), (0, 0), (12, 1))
    gate = [torch.randn(sum(s), H, generator=gen) * 0.2 for s in sizes]
    up = [torch.randn(sum(s), H, generator=gen) * 0.2 for s in sizes]
    down = [torch.randn(H, sum(s), generator=gen) * 0.2 for s in sizes]
    w = slab_weights_from_dense(gate, up, down, sizes, (8, 4), 64).to(DEVICE)
    x = torch.randn(4, H, generator=gen)
    ids = torch.tensor([[0, 2], [2, 1], [0, 1], [2, 0]])
    tw = torch.rand(4, 2, generator=gen)
    want = torch.zeros(4, H)
    for t in range(4):
        for k in range(2):
            e = int(ids[t, k])
            if sum(sizes[e]):
                want[t] += tw[t, k] * (down[e] @ (F.silu(gate[e] @ x[t]) * (up[e] @ x[t])))
    for cfg in (GEMV, SORTED):
        got = slab_moe_triton(x.to(DEVICE), tw.to(DEVICE), ids.to(DEVICE), w, cfg).cpu()
        rel = (got - want).norm() / want.norm()
        assert rel < 0.04, rel  # RTN error (mostly 8-bit), see test_kernel_reference


class _RecordingKernel:
    """Stands in for a ``@triton.jit`` kernel: records ``kernel[grid](...)`` launches."""

    def __init__(self, launches: list):
        self.launches = launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, kwargs["BITS"], kwargs["COLS"]))


@pytest.mark.kernel
@pytest.mark.parametrize("path", ["gemv", "sorted"])
def test_kernel_triton_launcher_has_no_host_sync(monkeypatch, path):
    """The launcher decides everything from shapes; reading device data on the host is an error.

    (A CUDA graph cannot capture a host sync.)  The tensor-to-Python conversions a
    launcher could use raise while the launcher and ``moe_align`` run; the kernels are
    replaced by recorders so the check does not depend on the interpreter.
    """
    from camera_kernels import moe_slab

    w = random_slab_weights(LAYERS["421-ragged"][1], (4, 2, 1), H, 32, seed=1, device=DEVICE)
    x = torch.randn(4, H, device=DEVICE)
    tw, ids = routing(4, 2, w.num_experts, seed=3)
    launches: list = []
    for name in ("_w13_gemv_kernel", "_w2_gemv_kernel", "_w13_sorted_kernel", "_w2_sorted_kernel"):
        monkeypatch.setattr(moe_slab, name, _RecordingKernel(launches))

    def forbidden(self, *args, **kwargs):
        raise AssertionError("host sync in the launcher")

    for name in (
        "item",
        "tolist",
        "__bool__",
        "__int__",
        "__index__",
        "__float__",
        "nonzero",
        "cpu",
        "numpy",
    ):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    slab_moe_triton(x, tw, ids, w, CONFIGS[path])
    monkeypatch.undo()
    # Two launches for all three bit-widths; w13's grid axis 1 spans the column tiles of
    # each bit's widest slab (33, 20, 7 micro-experts), w2's the hidden size.
    assert [(b, c) for _, b, c in launches] == [((4, 2, 1), (0, 1, 2))] * 2
    bn = CONFIGS[path].w13.block_n
    assert launches[0][0][1] == sum(-(-n // bn) for n in (33, 20, 7))
    assert launches[1][0][1] == -(-H // CONFIGS[path].w2.block_n)


_PROBE = """
import torch

def setitem(t):
    t[1] = 0

def bool_mask(t):
    return t[t > 0]

def item(t):
    return t.sum().item()

def scatter_count(t):
    counts = torch.zeros(4, dtype=torch.int64)
    return counts.scatter_add_(0, t, torch.ones_like(t))
"""


@pytest.mark.kernel
def test_host_sync_recorder_flags_project_syncs():
    """The recorder sees what patching Tensor methods cannot (the setitem, a boolean mask), from
    project files only; the shape-only form of a count passes."""
    from host_sync import ROOT as PROJECT
    from host_sync import HostSyncRecorder

    probe: dict = {}
    exec(compile(_PROBE, str(PROJECT / "kernels" / "sync_probe.py"), "exec"), probe)
    t = torch.tensor([0, 3, 1, 2])
    for name, op in (("setitem", "lift_fresh"), ("bool_mask", "index"), ("item", "_local_scalar_dense")):
        with HostSyncRecorder() as rec:
            probe[name](t.clone())
        assert [c.op.split(".")[1] for c in rec.calls] == [op], (name, rec.calls)
        assert all(c.where.startswith("kernels/sync_probe.py:") for c in rec.calls)
    with HostSyncRecorder() as rec:
        probe["scatter_count"](t)
        t[1] = 0  # from the test, not from project code
    assert rec.calls == []


@pytest.mark.kernel
@pytest.mark.parametrize("path", ["gemv", "sorted", "auto"])
@pytest.mark.parametrize("num_tokens", [1, 5, 40])
@pytest.mark.parametrize("scheme", ["Q:8431-mixed", "P:16-pruned", "PQ:16-41-pq"])
def test_kernel_triton_path_has_no_host_sync(path, num_tokens, scheme):
    """The whole Triton path (dispatch, ``moe_align``, the launcher) makes no host sync, for
    CAMERA-Q, CAMERA-P (dense slab) and P+Q layouts, at decode and at batch sizes past the GEMV
    threshold, with ids of other ranks' experts (-1)."""
    from host_sync import HostSyncRecorder

    bits, sizes = LAYERS[scheme.split(":")[1]]
    w = random_slab_weights(sizes, bits, H, 32, seed=2, device=DEVICE)
    x = torch.randn(num_tokens, H, device=DEVICE)
    tw, ids = routing(num_tokens, 2, w.num_experts, seed=5, drop=0.25)
    with HostSyncRecorder() as rec:
        if path == "auto":
            got = slab_moe(x, tw, ids, w, backend="triton")
        else:
            got = slab_moe_triton(x, tw, ids, w, CONFIGS[path])
    assert rec.calls == [], "\n".join(map(str, rec.calls))
    want = slab_moe_reference(x, tw, ids, w)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def random_slab_linear(bits, in_sizes, n_out, seed, dense_dtype=torch.bfloat16):
    """A random slab linear layer (RTN at group 32), e.g. a shared expert's down or gate_up projection."""
    from camera_kernels.linear import SlabLinearWeights, slab_linear_meta
    from camera_kernels.testing import quantize_rtn

    gen = torch.Generator().manual_seed(seed)
    parts = [
        quantize_rtn(torch.randn(k, n_out, generator=gen) * 0.1, b, 32, dense_dtype)
        for b, k in zip(bits, in_sizes)
    ]
    return SlabLinearWeights(
        tuple(bits),
        tuple(in_sizes),
        n_out,
        32,
        *(tuple(t[j].to(DEVICE) for t in parts) for j in range(3)),
        slab_linear_meta(in_sizes, DEVICE),
        dense_dtype,
    )


# (bits, K per slab, N): a shared expert's down projection (slabs split K), a gate_up slab
# (K = H, N = 2 n), and dense slabs (a CAMERA-P projection).
LINEARS = {
    "down-4_2_1": ((4, 2, 1), (12, 40, 7), H),
    "gate_up-3": ((3,), (H,), 2 * 21),
    "dense-16_4": ((16, 4), (33, 17), H),
}


@pytest.mark.kernel
@pytest.mark.parametrize("path", ["gemv", "sorted"])
@pytest.mark.parametrize("name", sorted(LINEARS))
def test_kernel_triton_slab_linear_matches_reference(path, name):
    """The shared-expert projection on the down kernels (one expert, weight 1) equals the torch path."""
    from camera_kernels.launch import slab_linear_triton
    from camera_kernels.linear import slab_linear_reference

    bits, in_sizes, n_out = LINEARS[name]
    dtype = {"gemv": torch.float32, "sorted": torch.float16}[path] if name != "dense-16_4" else torch.bfloat16
    w = random_slab_linear(bits, in_sizes, n_out, seed=len(name))
    x = torch.randn(6, sum(in_sizes), generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    got = slab_linear_triton(x, w, CONFIGS[path])
    want = slab_linear_reference(x, w).float()
    assert got.dtype == dtype and got.shape == (6, n_out)
    err, scale = (got.float() - want).abs().max().item(), want.abs().max().item()
    assert err <= tolerance(dtype, path) * scale + 1e-7, f"max err {err:.3g} vs max |ref| {scale:.3g}"


@pytest.mark.kernel
@pytest.mark.parametrize("num_tokens", [1, 40])
def test_kernel_triton_slab_linear_has_no_host_sync(num_tokens):
    """The shared expert's projections (gate_up slab, split-K down) make no host sync on the Triton path."""
    from host_sync import HostSyncRecorder

    from camera_kernels.linear import slab_linear, slab_linear_reference

    for name in ("down-4_2_1", "gate_up-3", "dense-16_4"):
        bits, in_sizes, n_out = LINEARS[name]
        w = random_slab_linear(bits, in_sizes, n_out, seed=1)
        x = torch.randn(num_tokens, sum(in_sizes), device=DEVICE)
        with HostSyncRecorder() as rec:
            got = slab_linear(x, w, backend="triton")
        assert rec.calls == [], name + "\n" + "\n".join(map(str, rec.calls))
        want = slab_linear_reference(x, w)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


# vLLM's default CUDA-graph capture sizes (1, 2, 4, then every 8 up to 512).
CAPTURE_SIZES = (1, 2, 4, *range(8, 513, 8))


@pytest.mark.kernel
def test_kernel_triton_no_host_sync_at_every_capture_size(monkeypatch):
    """Every batch size vLLM captures a graph for, P, Q and P+Q layers with top-8 and -1 ids, and the
    shared-expert projection: the launcher's decisions and ``moe_align`` make no host sync (kernels
    replaced by recorders: the interpreter would take minutes at 512 tokens; the interpreted paths
    are covered above)."""
    from host_sync import HostSyncRecorder

    from camera_kernels import moe_slab
    from camera_kernels.launch import slab_linear_triton

    launches: list = []
    for name in ("_w13_gemv_kernel", "_w2_gemv_kernel", "_w13_sorted_kernel", "_w2_sorted_kernel"):
        monkeypatch.setattr(moe_slab, name, _RecordingKernel(launches))
    layers = {
        scheme: random_slab_weights(tuple(LAYERS[name][1]) * 3, LAYERS[name][0], H, 32, device=DEVICE)
        for scheme, name in (("Q", "8431-mixed"), ("P", "16-pruned"), ("PQ", "16-41-pq"))
    }
    linear = random_slab_linear(*LINEARS["down-4_2_1"], seed=0)
    paths = set()
    for num_tokens in CAPTURE_SIZES:
        for scheme, w in layers.items():
            tw, ids = routing(num_tokens, 8, w.num_experts, seed=num_tokens, drop=0.1)
            x = torch.randn(num_tokens, H, device=DEVICE)
            config = get_config(num_tokens, 8, H, w.num_experts)
            paths.add(config.path)
            with HostSyncRecorder() as rec:
                slab_moe_triton(x, tw, ids.to(torch.int32), w)
            assert rec.calls == [], f"{scheme} at {num_tokens} tokens:\n" + "\n".join(map(str, rec.calls))
        with HostSyncRecorder() as rec:
            slab_linear_triton(torch.randn(num_tokens, linear.in_features, device=DEVICE), linear)
        assert rec.calls == [], f"shared expert at {num_tokens} tokens:\n" + "\n".join(map(str, rec.calls))
    assert paths == {"gemv", "sorted"}  # both launch paths were exercised
    assert len(launches) == 2 * len(CAPTURE_SIZES) * (len(layers) + 0.5)  # 2 per MoE call, 1 per linear


@pytest.mark.kernel
def test_kernel_dispatch_runs_triton_when_asked():
    w = random_slab_weights(((8, 8),), (4, 1), H, 32, device=DEVICE)
    x = torch.randn(2, H, device=DEVICE)
    tw, ids = torch.ones(2, 1, device=DEVICE), torch.zeros(2, 1, dtype=torch.int64, device=DEVICE)
    got = slab_moe(x, tw, ids, w, backend="triton")
    torch.testing.assert_close(got, slab_moe_reference(x, tw, ids, w), rtol=1e-5, atol=1e-6)


def test_kernel_triton_in_fresh_interpreter():
    """Runs this module in a new process with ``TRITON_INTERPRET=1`` when this one cannot."""
    if IN_PROCESS:
        pytest.skip("the kernel tests ran in this process")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        cwd=ROOT,
        env=dict(os.environ, TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
