#!/usr/bin/env python
"""Benchmark the mixed-precision slab MoE Triton kernels against bf16 torch baselines.

For the MoE layer shapes of Qwen3-30B-A3B, DeepSeek-MoE-16B and Qwen2-57B-A14B, at
1, 16, 64, 256 and 2048 tokens, it times three kinds of rows (``layer``/``scheme``):

* ``routed``/``camera-q``: the routed experts, random RTN-quantized slabs at about 2.25
  and 2.5 stored bits per weight (4/2/1-bit mixes, scales and zeros counted) through
  ``camera_kernels.launch.slab_moe_triton`` (default tiles);
* ``routed``/``camera-p``: CAMERA-P 50 %, one 16-bit dense slab (raw bf16, no scales)
  with ragged per-expert widths spread over 0.3-0.7 I (mean I/2), same kernel and
  same routings;
* ``shared``/``camera-q``: the shared expert where the model has one (DeepSeek-MoE-16B:
  2 x 1408 = 2816 wide; Qwen2-57B-A14B: 20480; its sigmoid gate is not timed) at the
  2.25-bit mix through ``slab_linear_triton``: gate_up (one launch per bit-width),
  SiLU*up, down (one split-K launch), as the vLLM plugin runs it.

Each row's ``bf16_ms`` is the bf16 baseline of the full-width layer on the same tokens:
for routed rows the same routing through ``torch._grouped_mm`` (sort by expert, grouped
gate/up GEMM, SiLU*up, grouped down GEMM, weighted scatter-add; the fastest plain-torch
bf16 MoE on Hopper), for shared rows a dense bf16 MLP (two ``F.linear``).
``roofline_frac`` is (compressed weight bytes the call reads / time) / measured
device-to-device copy bandwidth, ``bf16_roofline_frac`` likewise.  Every scheme is
checked against the pure-torch reference (``slab_moe_reference``,
``slab_linear_reference``) on both kernel paths.

Timing: CUDA graphs, each replay running ``--reps`` calls with different random
routings (so the next call does not find its experts in L2, as in real serving where
the other layers run in between).  A kernel call that cannot be captured is an error
(``GraphCaptureError``, the run stops with ``error`` in the JSON): under CUDA graphs a
host sync inside the op aborts vLLM's engine start, so an eager number would hide the
bug.  ``--no-graph`` times eagerly on purpose (``timing: "eager"``).  A bf16 baseline
that cannot be captured (the ``mm_loop`` fallback syncs to read counts; a failed
capture of ``_grouped_mm``) is timed eagerly and says so (``bf16_timing: "eager"``,
``bf16_eager_reason``).  ``--dry-run`` runs tiny shapes on CPU under
``TRITON_INTERPRET=1`` to prove the script end to end without a GPU (the test suite runs
it); there are no graphs there, so it times eagerly by wall clock (``clock: "cpu_wall"``).

It imports ``kernels/`` by path as the package ``camera_kernels`` (the GPU machine
has torch and triton but no camera packages) and uses no Triton feature newer than
3.6.  ``--tune`` times a few candidate tile configs per shape and token count instead
and writes ``kernels/configs/<device>.json`` (read by ``camera_kernels.tuning``; commit it).

Output: ``bench/results/gpu-kernels-<device>.json`` (or ``--out``): ``{"device",
"stamp" (bench/stamp.py; a dirty tree is refused without ``--allow-dirty``, except for a
dry run), "dry_run", "clock", "graphs", "kinds",
"copy_bandwidth_GBps", "complete", "error", "correctness": [...], "rows": [...]}``
(rewritten after each shape; ``complete`` is false if cut short, ``error`` names what
stopped it; ``--kinds q,p,shared`` picks the row kinds).  A correctness entry has
``shape, layer, scheme, bits_target, tokens, path, max_rel_err, ok``.  Each row has
``shape, layer, scheme, H, I, E, top_k, tokens, bits_target, avg_bits, keep_frac,
group_size, bits, path, config_source, ms, bf16_ms, speedup_vs_bf16, weight_bytes,
achieved_GBps, roofline_frac, bf16_roofline_frac, tflops, bf16_impl, experts_touched,
timing, bf16_timing`` (plus ``gemv_ms``/``sorted_ms`` where both paths were timed, and
``bf16_eager_reason`` when the baseline was timed eagerly while graphs were on).

* ``bits_target`` is the target stored bits per *kept* weight (16.0 for camera-p),
  ``avg_bits`` the measured one, ``keep_frac`` the fraction of the full width kept
  (about 0.5 for camera-p, else 1.0): bits per weight of the original layer are
  ``avg_bits * keep_frac``.
* A shared row has ``I`` = the shared width, ``E = top_k = 1``, and ``weight_copies`` /
  ``bf16_weight_copies``: the same weights serve every call, so a replay cycles through
  enough copies of them to cover twice the L2, and neither side is timed from cache.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from stamp import add_stamp_args, stamp  # bench/stamp.py: stdlib only at import

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    """One MoE layer: routed experts, and the width of its shared expert (0: none)."""

    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int
    shared: int = 0


SHAPES = (
    Shape("Qwen3-30B-A3B", 2048, 768, 128, 8),
    # DeepSeek-MoE's 2 shared experts of 1408 are one MLP of width 2816 in HF and vLLM.
    Shape("DeepSeek-MoE-16B", 2048, 1408, 64, 6, shared=2816),
    Shape("Qwen2-57B-A14B", 3584, 2560, 64, 8, shared=20480),
)
TOKENS = (1, 16, 64, 256, 2048)
# Target stored bits -> fractions of micro-experts at 4/2/1 bits.  With G = 128 the
# fp16 scale + zero add 32 / 128 = 0.25 bits per weight: 2.0 + 0.25 and 2.25 + 0.25.
MIXES = {"2.25": (0.25, 0.25, 0.50), "2.5": (0.25, 0.50, 0.25)}
BITS = (4, 2, 1)
GROUP = 128
SHARED_MIX = "2.25"  # the shared expert at the lower of the two mixes
PRUNE_LABEL = "P50"  # CAMERA-P keeping half the micro-experts, per expert ragged
KINDS = ("q", "p", "shared")  # --kinds: routed CAMERA-Q mixes, routed CAMERA-P 50 %, shared expert

DRY_SHAPES = (Shape("tiny-dry-run", 64, 96, 8, 2, shared=96),)
DRY_TOKENS = (1, 12)  # 2 and 24 pairs: GEMV by default, the sorted path timed as well
DRY_GROUP = 32


class GraphCaptureError(RuntimeError):
    """A call could not be captured in a CUDA graph (it would break vLLM's graph mode)."""


def load_kernels() -> ModuleType:
    """Import ``kernels/`` from this checkout as the package ``camera_kernels``."""
    spec = importlib.util.spec_from_file_location(
        "camera_kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["camera_kernels"] = module
    spec.loader.exec_module(module)
    return module


def slab_sizes(shape: Shape, fractions: tuple[float, ...], seed: int, align: int) -> list[tuple[int, ...]]:
    """Ragged per-expert slab sizes around ``fractions`` (CAMERA gives each expert its own mix).

    Each expert's 4- and 2-bit shares are jittered by up to +-30% (rounded to ``align``
    micro-experts); the 1-bit slab takes the rest, so every expert keeps width ``I``.
    """
    import random

    rng = random.Random(seed)
    sizes = []
    for _ in range(shape.experts):
        n4 = round(shape.inter * fractions[0] * (1 + rng.uniform(-0.3, 0.3)) / align) * align
        n2 = round(shape.inter * fractions[1] * (1 + rng.uniform(-0.3, 0.3)) / align) * align
        n4 = min(n4, shape.inter)
        n2 = min(n2, shape.inter - n4)
        sizes.append((n4, n2, shape.inter - n4 - n2))
    return sizes


def pruned_widths(shape: Shape, seed: int, align: int = 8) -> list[int]:
    """CAMERA-P 50 % widths: spread evenly over [0.3 I, 0.7 I] (multiples of ``align``), shuffled.

    The mean is I / 2 (the sum about E * I / 2), but no two neighbours are alike, as after
    real CAMERA-P pruning, where each expert keeps what its own scores say.
    """
    import random

    e, i = shape.experts, shape.inter
    widths = [max(align, round((0.3 + 0.4 * j / max(e - 1, 1)) * i / align) * align) for j in range(e)]
    random.Random(seed).shuffle(widths)
    return widths


def shared_sizes(width: int, fractions: tuple[float, ...], align: int) -> tuple[int, ...]:
    """Micro-experts of the shared expert at each of ``BITS`` (the last takes the rest)."""
    n = [round(width * f / align) * align for f in fractions[:-1]]
    return (*n, width - sum(n))


def expert_bytes(layout, e: int) -> int:
    """Compressed bytes of expert ``e`` (packed weights, scales, zeros of gate/up/down)."""
    from camera_kernels.packing import packed_rows, scale_rows

    total = 0
    for i, b in enumerate(layout.bits):
        n = layout.sizes[e][i]
        if n == 0:
            continue
        # scale_rows is 0 for a dense (16-bit) slab: it has no scales or zeros.
        total += (
            packed_rows(layout.hidden_size, b) * 2 * n * 4
            + scale_rows(layout.hidden_size, b, layout.group_size) * 2 * n * 4
        )
        total += (
            packed_rows(n, b) * layout.hidden_size * 4
            + scale_rows(n, b, layout.group_size) * layout.hidden_size * 4
        )
    return total


class GroupedBF16MoE:
    """bf16 MoE baseline on ``torch._grouped_mm``; no host syncs (graph capturable).

    If ``_grouped_mm`` is missing or rejects these operands, a per-expert ``mm`` loop is
    used instead (it syncs to read the counts, so it is timed eagerly); ``impl`` says which.
    """

    def __init__(self, shape: Shape, device, dtype) -> None:
        import torch

        gen = torch.Generator(device=device).manual_seed(1)
        e, h, i = shape.experts, shape.hidden, shape.inter
        # HF layout [out, in]; _grouped_mm wants the K x N operand column-major.
        self.w13 = (torch.randn(e, 2 * i, h, generator=gen, device=device) * 0.02).to(dtype)
        self.w2 = (torch.randn(e, h, i, generator=gen, device=device) * 0.02).to(dtype)
        self.shape = shape
        self.impl = "grouped_mm"
        try:
            probe = torch.zeros(2, h, device=device, dtype=dtype)
            self(probe, torch.ones(2, 1, device=device), torch.zeros(2, 1, dtype=torch.int64, device=device))
        except (AttributeError, RuntimeError, NotImplementedError) as err:
            print(f"  torch._grouped_mm unusable ({type(err).__name__}: {err}); bf16 baseline = mm loop")
            self.impl = "mm_loop"

    def __call__(self, x, topk_weights, topk_ids):
        import torch
        import torch.nn.functional as F

        if self.impl == "mm_loop":
            return self._loop(x, topk_weights, topk_ids)
        k = topk_ids.shape[1]
        e, i = self.shape.experts, self.shape.inter
        flat = topk_ids.reshape(-1).to(torch.int64)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(e, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32)
        )
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        tokens = order // k
        h = torch._grouped_mm(x[tokens], self.w13.transpose(-2, -1), offs=offs)
        a = F.silu(h[:, :i]) * h[:, i:]
        y = torch._grouped_mm(a, self.w2.transpose(-2, -1), offs=offs)
        y = y * topk_weights.reshape(-1)[order].unsqueeze(1).to(y.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, y)

    def _loop(self, x, topk_weights, topk_ids):
        import torch
        import torch.nn.functional as F

        k, i = topk_ids.shape[1], self.shape.inter
        flat = topk_ids.reshape(-1).to(torch.int64)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.shape.experts).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, c in enumerate(counts):
            if c:
                pairs = order[start : start + c]
                tokens = pairs // k
                h = x[tokens] @ self.w13[e].t()
                y = (F.silu(h[:, :i]) * h[:, i:]) @ self.w2[e].t()
                out.index_add_(0, tokens, y * topk_weights.reshape(-1)[pairs].unsqueeze(1).to(y.dtype))
            start += c
        return out

    @property
    def eager_reason(self) -> str | None:
        """Why this baseline cannot be captured in a CUDA graph (None: it can)."""
        return "mm_loop syncs to read the expert counts" if self.impl == "mm_loop" else None

    def weight_bytes(self, experts_used: float) -> float:
        return experts_used * 3 * self.shape.hidden * self.shape.inter * 2


class DenseBF16MLP:
    """bf16 shared-expert baseline: ``down(SiLU(gate x) * up x)`` with plain ``F.linear`` (capturable)."""

    eager_reason = None
    impl = "linear"

    def __init__(self, hidden: int, width: int, device, dtype) -> None:
        import torch

        gen = torch.Generator(device=device).manual_seed(2)
        self.width = width
        self.w13 = (torch.randn(2 * width, hidden, generator=gen, device=device) * 0.02).to(dtype)
        self.w2 = (torch.randn(hidden, width, generator=gen, device=device) * 0.02).to(dtype)

    def __call__(self, x):
        import torch.nn.functional as F

        h = F.linear(x, self.w13)
        return F.linear(F.silu(h[:, : self.width]) * h[:, self.width :], self.w2)

    def weight_bytes(self) -> int:
        return self.w13.numel() * self.w13.element_size() + self.w2.numel() * self.w2.element_size()

    def clone(self) -> DenseBF16MLP:
        other = copy.copy(self)
        other.w13, other.w2 = self.w13.clone(), self.w2.clone()
        return other


@dataclass
class SharedExpert:
    """A slab-quantized shared expert as the vLLM plugin holds it (``camera_kernels.linear``).

    ``gate_up``: one single-slab layer per non-empty bit-width (K = H, N = 2 n_b, gate
    columns then up); ``down``: one layer whose slabs split K (K_s = n_b, N = H).
    """

    gate_up: list
    down: object
    sizes: tuple[int, ...]
    nbytes: int

    @classmethod
    def random(cls, hidden: int, sizes, bits, group: int, seed: int, device) -> SharedExpert:
        import torch

        from camera_kernels.linear import SlabLinearWeights, slab_linear_meta
        from camera_kernels.testing import quantize_rtn

        gen = torch.Generator(device=device).manual_seed(seed)
        live = [(b, n) for b, n in zip(bits, sizes) if n > 0]
        gate_up, down_parts = [], []
        for b, n in live:
            gq = quantize_rtn(torch.randn(hidden, 2 * n, generator=gen, device=device) * 0.05, b, group)
            meta = slab_linear_meta((hidden,), device)
            gate_up.append(SlabLinearWeights((b,), (hidden,), 2 * n, group, *((t,) for t in gq), meta))
            d = torch.randn(n, hidden, generator=gen, device=device) * 0.05
            down_parts.append(quantize_rtn(d, b, group))
        down = SlabLinearWeights(
            tuple(b for b, _ in live),
            tuple(n for _, n in live),
            hidden,
            group,
            *(tuple(part[j] for part in down_parts) for j in range(3)),
            slab_linear_meta([n for _, n in live], device),
        )
        nbytes = sum(
            t.numel() * t.element_size() for w in (*gate_up, down) for t in (*w.qweight, *w.scales, *w.zeros)
        )
        return cls(gate_up, down, tuple(sizes), nbytes)

    def clone(self) -> SharedExpert:
        """The same weights in new memory (see :func:`weight_copies`)."""

        def c(w):
            return dataclasses.replace(
                w,
                qweight=tuple(t.clone() for t in w.qweight),
                scales=tuple(t.clone() for t in w.scales),
                zeros=tuple(t.clone() for t in w.zeros),
                meta=w.meta.clone(),
            )

        return SharedExpert([c(w) for w in self.gate_up], c(self.down), self.sizes, self.nbytes)

    def __call__(self, x, linear, configs=None):
        """The whole expert; ``linear(x, w[, config])`` is ``slab_linear_triton`` or the reference."""
        import torch
        import torch.nn.functional as F

        layers = (*self.gate_up, self.down)
        cfgs = configs if configs is not None else (None,) * len(layers)
        gates, ups = [], []
        for w, c in zip(self.gate_up, cfgs):
            y = linear(x, w) if c is None else linear(x, w, c)
            n = w.out_features // 2
            gates.append(y[:, :n])
            ups.append(y[:, n:])
        # Gates of every slab first, then ups: what vLLM's SiluAndMul splits in half.
        act = F.silu(torch.cat(gates, 1)) * torch.cat(ups, 1)
        return linear(act, self.down) if cfgs[-1] is None else linear(act, self.down, cfgs[-1])


def weight_copies(nbytes: int, device) -> int:
    """Copies of a weight set that one replay cycles through so that it does not run from L2.

    The routed rows get that from their distinct routings; a shared expert (or its bf16
    MLP) reads the same weights on every call, and DeepSeek-MoE-16B's (about 5 MiB at
    2.25 bits, 33 MiB in bf16) would stay in a 50 MiB L2, which serving never sees: the
    other layers run in between.  Enough copies to cover twice the L2.
    """
    import torch

    if device.type != "cuda":
        return 1
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20)
    return max(1, -(-2 * l2 // max(nbytes, 1)))


def time_calls(
    calls: list[Callable[[], object]], device, iters: int, use_graph: bool, what: str = "calls"
) -> tuple[float, str]:
    """Mean ms per call of ``calls`` (run round-robin) and the timing mode.

    With ``use_graph`` on CUDA the calls are replayed from one CUDA graph
    (``"cuda_graph"``); a failed capture raises :class:`GraphCaptureError` naming ``what``,
    never a quiet eager number.  Otherwise (``--no-graph``, or CPU in a dry run, which has
    no graphs) they run eagerly (``"eager"``).
    """
    import torch

    def run_all() -> None:
        for c in calls:
            c()

    if device.type != "cuda":  # dry run: the interpreter has nothing to warm up
        start = time.perf_counter()
        for _ in range(iters):
            run_all()
        return (time.perf_counter() - start) * 1e3 / (iters * len(calls)), "eager"
    run_all()
    torch.cuda.synchronize()
    mode = "eager"
    replay = run_all
    if use_graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run_all()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run_all()
        except Exception as err:  # whatever broke the capture: name it and stop
            with contextlib.suppress(Exception):  # the capture error is the one to report
                torch.cuda.synchronize()
            raise GraphCaptureError(
                f"CUDA-graph capture failed for {what}: {type(err).__name__}: {err} "
                "(a host sync or other uncapturable op in this call would abort vLLM's engine start "
                "under CUDA graphs; --no-graph times eagerly on purpose)"
            ) from err
        replay = graph.replay
        mode = "cuda_graph"
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (iters * len(calls)), mode


def time_baseline(
    baseline, calls, device, iters: int, use_graph: bool, what: str
) -> tuple[float, str, str | None]:
    """``(ms, timing, eager_reason)`` of a bf16 baseline.

    The baseline is not what is under test: one that cannot be captured (``eager_reason``
    says why in advance, or the capture fails) is timed eagerly, and the row says so.
    """
    import torch

    graphs = use_graph and device.type == "cuda"
    if graphs and baseline.eager_reason:
        ms, mode = time_calls(calls, device, iters, False, what)
        return ms, mode, baseline.eager_reason
    try:
        ms, mode = time_calls(calls, device, iters, use_graph, what)
        return ms, mode, None
    except GraphCaptureError as err:
        print(f"  bf16 baseline: {err}; timing it eagerly (recorded as bf16_timing)", flush=True)
        torch.cuda.synchronize()
        ms, mode = time_calls(calls, device, iters, False, what)
        return ms, mode, f"capture failed: {type(err.__cause__).__name__}: {err.__cause__}"


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    import torch

    if device.type != "cuda":
        return 0.0
    n = 1 << 28  # 1 GiB of fp32
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    ms, _ = time_calls([lambda: b.copy_(a)], device, iters=20, use_graph=False)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def routings(num_tokens: int, shape: Shape, reps: int, device, seed: int):
    """``reps`` random routings (distinct experts per token, normalised weights)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(reps):
        scores = torch.rand(num_tokens, shape.experts, generator=gen, device=device)
        w, ids = scores.topk(shape.top_k, dim=1)
        out.append(((w / w.sum(1, keepdim=True)).float(), ids))
    return out


def git_commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


GEMV_CANDIDATES = (  # (w13 BLOCK_N, BLOCK_K, warps), (w2 BLOCK_N, BLOCK_K, warps)
    ((64, 128, 4), (128, 64, 4)),
    ((32, 128, 4), (64, 128, 4)),
    ((32, 64, 2), (128, 128, 4)),
    ((128, 128, 8), (256, 64, 8)),
)
SORTED_CANDIDATES = (  # BLOCK_M, (w13 BLOCK_N, BLOCK_K, warps, stages), (w2 BLOCK_N, BLOCK_K, warps, stages)
    (16, (64, 128, 4, 3), (128, 64, 4, 3)),
    (16, (128, 64, 4, 4), (128, 128, 4, 3)),
    (32, (64, 64, 4, 3), (128, 64, 4, 3)),
    (64, (64, 64, 4, 3), (128, 64, 8, 3)),
    (64, (128, 64, 8, 3), (128, 128, 8, 3)),
    (128, (64, 64, 8, 3), (128, 64, 8, 4)),
)


def candidate_configs(path: str, group: int):
    """MoEConfigs to try for ``path``; BLOCK_K is capped at the group size (as the launcher does)."""
    from camera_kernels.tuning import MoEConfig, TileConfig

    out = []
    if path == "gemv":
        for (n13, k13, w13), (n2, k2, w2) in GEMV_CANDIDATES:
            cfg = MoEConfig(
                "gemv",
                TileConfig(1, n13, min(k13, group), w13, 2),
                TileConfig(1, n2, min(k2, group), w2, 2),
                "tune",
            )
            if cfg not in out:
                out.append(cfg)
    else:
        for bm, (n13, k13, w13, s13), (n2, k2, w2, s2) in SORTED_CANDIDATES:
            cfg = MoEConfig(
                "sorted",
                TileConfig(bm, n13, min(k13, group), w13, s13),
                TileConfig(bm, n2, min(k2, group), w2, s2),
                "tune",
            )
            if cfg not in out:
                out.append(cfg)
    return out


def tune_table(results: dict[int, dict[str, tuple[float, object]]], top_k: int) -> dict:
    """A configs/<device>.json table from ``{tokens: {path: (best ms, MoEConfig)}}``."""
    gemv_max_pairs = 0
    for nt, by_path in sorted(results.items()):
        if "gemv" in by_path and ("sorted" not in by_path or by_path["gemv"][0] <= by_path["sorted"][0]):
            gemv_max_pairs = nt * top_k
        else:
            break
    from camera_kernels.tuning import FALLBACK

    # The GEMV tiles of the smallest token count (decode is what the GEMV path is for).
    gemv_runs = [results[nt]["gemv"] for nt in sorted(results) if "gemv" in results[nt]]
    table: dict = {"gemv_max_pairs": gemv_max_pairs, "gemv": FALLBACK["gemv"], "sorted": FALLBACK["sorted"]}
    if gemv_runs:
        table["gemv"] = {"w13": gemv_runs[0][1].w13.to_dict(), "w2": gemv_runs[0][1].w2.to_dict()}
    sorted_entries = []
    token_counts = sorted(nt for nt, v in results.items() if "sorted" in v)
    for j, nt in enumerate(token_counts):
        cfg = results[nt]["sorted"][1]
        # Bucket boundaries halfway (geometrically) between the measured token counts.
        limit = None if j == len(token_counts) - 1 else int((nt * token_counts[j + 1]) ** 0.5)
        sorted_entries.append({"max_tokens": limit, "w13": cfg.w13.to_dict(), "w2": cfg.w2.to_dict()})
    if sorted_entries:
        table["sorted"] = sorted_entries
    return table


def run_tune(args, shapes, tokens_list, group, device, device_name, dtype) -> int:
    """Time candidate tiles per shape and token count; write kernels/configs/<device>.json."""
    import torch

    from camera_kernels.launch import slab_moe_triton
    from camera_kernels.testing import random_slab_weights
    from camera_kernels.tuning import CONFIG_DIR, FALLBACK, device_file_name, shape_key

    started = time.time()
    doc: dict = {
        "_comment": f"Tuned by bench/gpu_kernels.py --tune on {device_name}, torch {torch.__version__}, "
        f"git {git_commit()}; mix {MIXES['2.5']} of {BITS}-bit, group {group}.",
        "shapes": {},
    }
    for shape in shapes:
        sizes = slab_sizes(shape, MIXES["2.5"], seed=7, align=32 if not args.dry_run else 8)
        w = random_slab_weights(sizes, BITS, shape.hidden, group, seed=3, device=device)
        results: dict[int, dict[str, tuple[float, object]]] = {}
        for nt in tokens_list:
            x = torch.randn(nt, shape.hidden, device=device, dtype=dtype)
            routes = routings(nt, shape, args.reps, device, seed=nt)
            paths = ["gemv", "sorted"] if nt * shape.top_k <= args.both_paths_max_pairs else ["sorted"]
            results[nt] = {}
            for path in paths:
                best = None
                for cfg in candidate_configs(path, group):
                    calls = [
                        lambda x=x, w=w, tw=tw, ids=ids, c=cfg: slab_moe_triton(x, tw, ids, w, c)
                        for tw, ids in routes
                    ]
                    what = f"{shape.name} T={nt} {path} {cfg.w13} {cfg.w2}"
                    try:
                        ms, _ = time_calls(calls, device, args.iters, not args.no_graph, what)
                    except GraphCaptureError:
                        raise  # the op, not the tile, is at fault: no config would be capturable
                    except Exception as err:  # noqa: BLE001 - a tile that does not fit is skipped, not fatal
                        print(f"  {shape.name} T={nt} {path} {cfg.w13} failed: {type(err).__name__}: {err}")
                        continue
                    if best is None or ms < best[0]:
                        best = (ms, cfg)
                if best is not None:
                    results[nt][path] = best
                    print(
                        f"  {shape.name} T={nt:5d} {path:6s} best {best[0]:.4f} ms: "
                        f"w13 {best[1].w13.to_dict()} "
                        f"w2 {best[1].w2.to_dict()}",
                        flush=True,
                    )
        doc["shapes"][shape_key(shape.hidden, shape.experts, shape.top_k)] = tune_table(results, shape.top_k)
        del w
    # The top level serves shapes that were not tuned: the fallback tiles, untouched.
    doc.update({k: v for k, v in FALLBACK.items()})
    out = Path(args.out) if args.out else CONFIG_DIR / device_file_name(device_name)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out} in {time.time() - started:.0f} s")
    return 0


class Bench:
    """The benchmark rows and correctness checks of one run (state shared by the three kinds)."""

    def __init__(
        self, args, device, dtype, dev_name, copy_bw, use_graph, tokens, group, rows, checks
    ) -> None:
        self.args, self.device, self.dtype, self.dev_name = args, device, dtype, dev_name
        self.copy_bw, self.use_graph, self.tokens, self.group = copy_bw, use_graph, tokens, group
        self.rows, self.checks = rows, checks
        self.align = 8 if args.dry_run else 32  # micro-experts per slab rounded to this
        self.failed = False

    # ---- shared pieces ------------------------------------------------------------------
    def inputs(self, shape: Shape, nt: int):
        """Activations and ``--reps`` routings for ``nt`` tokens: the same for every scheme and baseline."""
        import torch

        gen = torch.Generator(device=self.device).manual_seed(1000 + nt)
        x = torch.randn(nt, shape.hidden, generator=gen, device=self.device).to(self.dtype)
        return x, routings(nt, shape, self.args.reps, self.device, seed=nt)

    def check(self, entry: dict, got, want) -> None:
        """Record ``max|got - want| / max|want|`` (bf16; tolerance as in tests/kernels/test_kernel_triton.py:
        4 bf16 ulp of max|ref|)."""
        got, want = got.float(), want.float()
        rel = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        ok = rel <= 4 * 2.0**-7
        self.failed |= not ok
        self.checks.append({**entry, "max_rel_err": rel, "ok": ok})
        print(
            f"  check {entry['layer']} {entry['scheme']} {entry['path']}: max err / max |ref| = {rel:.2e} "
            f"{'ok' if ok else 'FAILED'}",
            flush=True,
        )

    def frac(self, nbytes: float, ms: float) -> float | None:
        return (nbytes / (ms * 1e-3) / 1e9) / self.copy_bw if self.copy_bw else None

    def bf16_fields(self, timed: tuple[float, str, str | None], bf16_bytes: float, ms: float) -> dict:
        b_ms, b_mode, reason = timed
        d = {
            "bf16_ms": b_ms,
            "speedup_vs_bf16": b_ms / ms,
            "bf16_roofline_frac": self.frac(bf16_bytes, b_ms),
            "bf16_timing": b_mode,
        }
        if reason and self.use_graph and self.device.type == "cuda":
            d["bf16_eager_reason"] = reason
        return d

    # ---- one shape -----------------------------------------------------------------------
    def shape(self, shape: Shape, kinds: tuple[str, ...]) -> None:
        import torch

        from camera_kernels.packing import DENSE_BITS
        from camera_kernels.slab_weights import DENSE_GROUP_SIZE
        from camera_kernels.testing import random_slab_weights

        if "q" in kinds or "p" in kinds:
            baseline = GroupedBF16MoE(shape, self.device, self.dtype)
            bf16: dict[int, tuple[float, str, str | None]] = {}
            variants = []
            if "q" in kinds:
                variants += [("camera-q", name) for name in MIXES]
            if "p" in kinds:
                variants.append(("camera-p", PRUNE_LABEL))
            for scheme, label in variants:
                t0 = time.time()
                if scheme == "camera-q":
                    sizes = slab_sizes(shape, MIXES[label], seed=7, align=self.align)
                    w = random_slab_weights(sizes, BITS, shape.hidden, self.group, seed=3, device=self.device)
                    bits_target, check = float(label), label == next(iter(MIXES))
                else:
                    # One 16-bit slab: the layout the plugin repacks a CAMERA-P layer into.
                    widths = pruned_widths(shape, seed=7)
                    w = random_slab_weights(
                        [(n,) for n in widths],
                        (DENSE_BITS,),
                        shape.hidden,
                        DENSE_GROUP_SIZE,
                        seed=3,
                        device=self.device,
                        dense_dtype=torch.bfloat16,
                    )
                    bits_target, check = float(DENSE_BITS), True
                lay = w.layout
                keep = sum(lay.expert_width(e) for e in range(shape.experts)) / (shape.experts * shape.inter)
                print(
                    f"{shape.name} {scheme} {label}: avg {lay.avg_bits():.3f} bits/weight, keep {keep:.3f}, "
                    f"{lay.nbytes() / 2**20:.1f} MiB (built in {time.time() - t0:.1f}s)",
                    flush=True,
                )
                if check:
                    self.check_moe(shape, w, scheme, bits_target)
                for nt in self.tokens:
                    self.moe_row(shape, w, scheme, label, bits_target, keep, nt, baseline, bf16)
                del w
            del baseline
        if "shared" in kinds and shape.shared:
            self.shared(shape)

    def check_moe(self, shape: Shape, w, scheme: str, bits_target: float) -> None:
        """Both kernel paths against ``slab_moe_reference``."""
        import camera_kernels as ck
        from camera_kernels.launch import slab_moe_triton
        from camera_kernels.tuning import get_config

        nt = 16 if not self.args.dry_run else 8
        x, _ = self.inputs(shape, nt)
        tw, ids = routings(nt, shape, 1, self.device, seed=99)[0]
        want = ck.slab_moe_reference(x, tw, ids, w)
        for path in ("gemv", "sorted"):
            cfg = get_config(nt, shape.top_k, shape.hidden, shape.experts, self.dev_name, path=path)
            entry = {"shape": shape.name, "layer": "routed", "scheme": scheme, "bits_target": bits_target}
            self.check({**entry, "tokens": nt, "path": path}, slab_moe_triton(x, tw, ids, w, cfg), want)

    def moe_row(self, shape: Shape, w, scheme, label, bits_target, keep, nt, baseline, bf16) -> None:
        from camera_kernels.launch import slab_moe_triton
        from camera_kernels.tuning import get_config

        args, lay = self.args, w.layout
        x, routes = self.inputs(shape, nt)
        per_expert = [expert_bytes(lay, e) for e in range(shape.experts)]
        touched = [sorted(set(ids.flatten().tolist())) for _, ids in routes]
        used = sum(len(t) for t in touched) / len(touched)
        wbytes = sum(sum(per_expert[e] for e in t) for t in touched) / len(touched)
        # FLOPs of the widths the pairs actually hit (all I wide for camera-q).
        widths = [sum(lay.expert_width(e) for e in ids.flatten().tolist()) for _, ids in routes]
        flops = 2 * 3 * shape.hidden * sum(widths) / len(widths)
        cfg = get_config(nt, shape.top_k, shape.hidden, shape.experts, self.dev_name)
        paths = {cfg.path: cfg}
        if nt * shape.top_k <= args.both_paths_max_pairs:
            alt = "sorted" if cfg.path == "gemv" else "gemv"
            paths[alt] = get_config(nt, shape.top_k, shape.hidden, shape.experts, self.dev_name, path=alt)
        timed = {}
        for path, pcfg in paths.items():
            calls = [
                lambda x=x, w=w, tw=tw, ids=ids, c=pcfg: slab_moe_triton(x, tw, ids, w, c)
                for tw, ids in routes
            ]
            what = f"slab_moe_triton {scheme} {label}, shape {shape.name}, {nt} tokens, {path} path"
            timed[path] = time_calls(calls, self.device, args.iters, self.use_graph, what)
        ms, mode = timed[cfg.path]
        if nt not in bf16:
            calls = [lambda f=baseline, x=x, tw=tw, ids=ids: f(x, tw, ids) for tw, ids in routes]
            what = f"bf16 {baseline.impl} baseline, shape {shape.name}, {nt} tokens"
            bf16[nt] = time_baseline(baseline, calls, self.device, args.iters, self.use_graph, what)
        row = {
            "shape": shape.name,
            "layer": "routed",
            "scheme": scheme,
            "H": shape.hidden,
            "I": shape.inter,
            "E": shape.experts,
            "top_k": shape.top_k,
            "tokens": nt,
            "bits_target": bits_target,
            "avg_bits": round(lay.avg_bits(), 4),
            "keep_frac": round(keep, 4),
            "group_size": lay.group_size,
            "bits": list(lay.bits),
            "path": cfg.path,
            "config_source": cfg.source,
            "ms": ms,
            **self.bf16_fields(bf16[nt], baseline.weight_bytes(used), ms),
            "weight_bytes": wbytes,
            "achieved_GBps": wbytes / (ms * 1e-3) / 1e9,
            "roofline_frac": self.frac(wbytes, ms),
            "tflops": flops / (ms * 1e-3) / 1e12,
            "bf16_impl": baseline.impl,
            "experts_touched": used,
            "timing": mode,
        }
        for path, (p_ms, _) in timed.items():
            row[f"{path}_ms"] = p_ms
        self.rows.append(row)
        self.print_row(label, row, timed)

    def print_row(self, label: str, row: dict, timed: dict) -> None:
        frac = f"{row['roofline_frac']:.2f}" if row["roofline_frac"] is not None else "n/a"
        ms, b_ms = row["ms"], row["bf16_ms"]
        print(
            f"  {label:>9s} T={row['tokens']:5d} {row['path']:6s} {ms:8.4f} ms  bf16 {b_ms:8.4f} ms "
            f"({row['bf16_timing']})  x{b_ms / ms:5.2f}  roofline {frac}  "
            + " ".join(f"{p}={v[0]:.4f}" for p, v in timed.items()),
            flush=True,
        )

    def shared(self, shape: Shape) -> None:
        """The shared expert at the ``SHARED_MIX`` mix on ``slab_linear_triton`` vs a dense bf16 MLP."""
        from camera_kernels.launch import slab_linear_triton
        from camera_kernels.linear import slab_linear_reference
        from camera_kernels.tuning import get_config

        args, width, hidden = self.args, shape.shared, shape.hidden
        sizes = shared_sizes(width, MIXES[SHARED_MIX], self.align)
        t0 = time.time()
        se = SharedExpert.random(hidden, sizes, BITS, self.group, seed=5, device=self.device)
        baseline = DenseBF16MLP(hidden, width, self.device, self.dtype)
        avg_bits = 8.0 * se.nbytes / (3 * hidden * width)
        copies = weight_copies(se.nbytes, self.device)
        ses = [se] + [se.clone() for _ in range(copies - 1)]
        b_copies = weight_copies(baseline.weight_bytes(), self.device)
        bases = [baseline] + [baseline.clone() for _ in range(b_copies - 1)]
        label = f"shared Q{SHARED_MIX}"
        print(
            f"{shape.name} shared expert (width {width}, slabs {dict(zip(BITS, sizes))}): avg {avg_bits:.3f} "
            f"bits/weight, {se.nbytes / 2**20:.1f} MiB x {copies} copies (bf16 x {b_copies}; built in "
            f"{time.time() - t0:.1f}s)",
            flush=True,
        )
        layers = (*se.gate_up, se.down)

        def configs(nt: int, path: str | None):
            # What slab_linear_triton picks itself (path None), or the forced path: per layer,
            # since the lookup is keyed by N (untuned N fall back to the device's or default table).
            return tuple(get_config(nt, 1, w.out_features, 1, self.dev_name, path=path) for w in layers)

        nt = 16 if not args.dry_run else 8
        x = self.inputs(shape, nt)[0]
        want = se(x, slab_linear_reference)
        entry = {"shape": shape.name, "layer": "shared", "scheme": "camera-q"}
        entry["bits_target"] = float(SHARED_MIX)
        for path in ("gemv", "sorted"):
            got = se(x, slab_linear_triton, configs(nt, path))
            self.check({**entry, "tokens": nt, "path": path}, got, want)

        for nt in self.tokens:
            x = self.inputs(shape, nt)[0]
            default = configs(nt, None)
            paths = {default[-1].path: default}
            if nt <= args.both_paths_max_pairs:
                alt = "sorted" if default[-1].path == "gemv" else "gemv"
                paths[alt] = configs(nt, alt)
            timed = {}
            for path, cfgs in paths.items():
                calls = [
                    lambda s=ses[r % copies], c=cfgs, x=x: s(x, slab_linear_triton, c)
                    for r in range(max(args.reps, copies))
                ]
                what = f"shared expert on slab_linear_triton, shape {shape.name}, {nt} tokens, {path} path"
                timed[path] = time_calls(calls, self.device, args.iters, self.use_graph, what)
            ms, mode = timed[default[-1].path]
            calls = [lambda f=bases[r % b_copies], x=x: f(x) for r in range(max(args.reps, b_copies))]
            what = f"bf16 dense shared-expert baseline, shape {shape.name}, {nt} tokens"
            b = time_baseline(baseline, calls, self.device, args.iters, self.use_graph, what)
            flops = 2 * nt * 3 * hidden * width
            row = {
                "shape": shape.name,
                "layer": "shared",
                "scheme": "camera-q",
                "H": hidden,
                "I": width,
                "E": 1,
                "top_k": 1,
                "tokens": nt,
                "bits_target": float(SHARED_MIX),
                "avg_bits": round(avg_bits, 4),
                "keep_frac": 1.0,
                "group_size": self.group,
                "bits": list(BITS),
                "path": default[-1].path,
                "config_source": default[-1].source,
                "ms": ms,
                **self.bf16_fields(b, baseline.weight_bytes(), ms),
                "weight_bytes": se.nbytes,
                "achieved_GBps": se.nbytes / (ms * 1e-3) / 1e9,
                "roofline_frac": self.frac(se.nbytes, ms),
                "tflops": flops / (ms * 1e-3) / 1e12,
                "bf16_impl": baseline.impl,
                "experts_touched": 1,
                "timing": mode,
                "weight_copies": copies,
                "bf16_weight_copies": b_copies,
            }
            for path, (p_ms, _) in timed.items():
                row[f"{path}_ms"] = p_ms
            self.rows.append(row)
            self.print_row(label, row, timed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny shapes on CPU under TRITON_INTERPRET=1 (proves the script, times nothing real)",
    )
    parser.add_argument("--shapes", default="all", help="comma-separated shape names, or 'all'")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts")
    parser.add_argument("--iters", type=int, default=10, help="graph replays per measurement")
    parser.add_argument("--reps", type=int, default=8, help="calls (distinct routings) per replay")
    parser.add_argument(
        "--both-paths-max-pairs",
        type=int,
        default=512,
        help="also time the other kernel path when tokens*top_k is at most this",
    )
    parser.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help="comma-separated row kinds: q (routed CAMERA-Q mixes), p (routed CAMERA-P 50%%, 16-bit "
        "slab), shared (shared expert, where the model has one)",
    )
    parser.add_argument(
        "--no-graph", action="store_true", help="time eagerly (recorded as timing: eager), not from graphs"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output JSON (default bench/results/gpu-kernels-<device>.json; "
        "with --tune kernels/configs/<device>.json)",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="time candidate tiles instead of benchmarking and write kernels/configs/<device>.json "
        "(about 2-4 min per shape on an H100; restrict with --shapes)",
    )
    add_stamp_args(parser)
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not kinds or set(kinds) - set(KINDS):
        parser.error(f"--kinds takes a comma-separated subset of {','.join(KINDS)}, got {args.kinds!r}")

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels module is compiled
    load_kernels()
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if args.dry_run:
        device = torch.device("cpu")
        shapes, tokens_list, group = DRY_SHAPES, DRY_TOKENS, DRY_GROUP
        device_name = "cpu-dry-run"
        args.iters, args.reps = 1, 1
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU, or use --dry-run", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        shapes, tokens_list, group = SHAPES, TOKENS, GROUP
        device_name = torch.cuda.get_device_name(device)
    if args.shapes != "all":
        wanted = set(args.shapes.split(","))
        shapes = tuple(s for s in shapes if s.name in wanted)
    if args.tokens:
        tokens_list = tuple(int(t) for t in args.tokens.split(","))
    dtype = torch.bfloat16
    use_graph = not args.no_graph
    dev_name = device_name if device.type == "cuda" else None  # selects configs/<device>.json
    if args.tune:
        return run_tune(args, shapes, tokens_list, group, device, device_name, dtype)
    started = time.time()
    copy_bw = copy_bandwidth(device)
    print(
        f"device {device_name}; torch {torch.__version__}; triton {triton_version}; copy bandwidth "
        f"{copy_bw:.0f} GB/s",
        flush=True,
    )

    name = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu-kernels-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, checks = [], []
    result = {
        "device": device_name,
        # A dry run is a smoke check on CPU, not a result: it may come from a dirty tree.
        "stamp": stamp(allow_dirty=args.allow_dirty or args.dry_run, argv=argv),
        "dry_run": args.dry_run,
        # How "ms" was measured: CUDA events around graph replays (or eager calls with
        # --no-graph), or the CPU wall clock of interpreted eager calls in a dry run.
        "clock": "cuda_events" if device.type == "cuda" else "cpu_wall",
        "graphs": use_graph and device.type == "cuda",
        "kinds": list(kinds),
        "copy_bandwidth_GBps": copy_bw,
        "seconds": 0.0,
        "complete": False,
        "error": None,
        "correctness": checks,
        "rows": rows,
    }

    def save() -> None:
        # Rewritten after every shape, so a run cut short still leaves its rows.
        result["seconds"] = round(time.time() - started, 1)
        out.write_text(json.dumps(result, indent=1))

    bench = Bench(args, device, dtype, dev_name, copy_bw, use_graph, tokens_list, group, rows, checks)
    try:
        for shape in shapes:
            bench.shape(shape, kinds)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()
    except GraphCaptureError as err:
        result["error"] = str(err)
        save()
        print(f"error: {err}", file=sys.stderr)
        print(f"wrote {out} (incomplete: {len(rows)} rows)", file=sys.stderr)
        return 1

    result["complete"] = True
    save()
    print(f"wrote {out} ({len(rows)} rows, {result['seconds']} s)")
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
