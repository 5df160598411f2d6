#!/usr/bin/env python
"""Benchmark the mixed-precision slab MoE Triton kernel against a bf16 grouped GEMM.

For the MoE layer shapes of Qwen3-30B-A3B, DeepSeek-MoE-16B and Qwen2-57B-A14B, at
1, 16, 64, 256 and 2048 tokens, with random RTN-quantized slabs at about 2.25 and
2.5 stored bits per weight (4/2/1-bit mixes, scales and zeros counted), it measures:

* ``ms``: the Triton kernel (``camera_kernels.launch.slab_moe_triton``, default tiles);
* ``bf16_ms``: the same routing through ``torch._grouped_mm`` on bf16 experts
  (sort by expert, grouped gate/up GEMM, SiLU*up, grouped down GEMM, weighted
  scatter-add), the fastest plain-torch bf16 MoE on Hopper;
* ``roofline_frac``: (compressed weight bytes of the experts the routing touches /
  time) / measured device-to-device copy bandwidth; ``bf16_roofline_frac`` likewise;
* a correctness check of both kernel paths against the pure-torch reference.

Timing: CUDA graphs, each replay running ``--reps`` calls with different random
routings (so the next call does not find its experts in L2, as in real serving
where the other layers run in between); eager timing if capture fails (recorded).

It imports ``kernels/`` by path as the package ``camera_kernels`` (the GPU machine
has torch and triton but no camera packages) and uses no Triton feature newer than
3.6.  ``--dry-run`` runs tiny shapes on CPU under ``TRITON_INTERPRET=1`` to prove the
script end to end without a GPU.  ``--tune`` times a few candidate tile configs per
shape and token count instead and writes ``kernels/configs/<device>.json`` (read by
``camera_kernels.tuning``; commit it).

Output: ``bench/results/gpu-kernels-<device>.json``: ``{"device", "torch",
"triton", "git_commit", "copy_bandwidth_GBps", "complete", "correctness": [...],
"rows": [...]}`` (rewritten after each shape; ``complete`` is false if cut short);
each row has ``shape, H, I, E, top_k, tokens, bits_target, avg_bits, path, ms,
bf16_ms, speedup_vs_bf16, weight_bytes, achieved_GBps, roofline_frac,
bf16_roofline_frac, tflops, timing`` (plus ``gemv_ms``/``sorted_ms`` where both paths
were timed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    """One routed-expert MoE layer (shared experts are not benchmarked)."""

    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int


SHAPES = (
    Shape("Qwen3-30B-A3B", 2048, 768, 128, 8),
    Shape("DeepSeek-MoE-16B", 2048, 1408, 64, 6),  # + 2 shared experts, not measured
    Shape("Qwen2-57B-A14B", 3584, 2560, 64, 8),
)
TOKENS = (1, 16, 64, 256, 2048)
# Target stored bits -> fractions of micro-experts at 4/2/1 bits.  With G = 128 the
# fp16 scale + zero add 32 / 128 = 0.25 bits per weight: 2.0 + 0.25 and 2.25 + 0.25.
MIXES = {"2.25": (0.25, 0.25, 0.50), "2.5": (0.25, 0.50, 0.25)}
BITS = (4, 2, 1)
GROUP = 128

DRY_SHAPES = (Shape("tiny-dry-run", 64, 96, 8, 2),)
DRY_TOKENS = (1, 12)  # 2 and 24 pairs: GEMV by default, the sorted path timed as well
DRY_GROUP = 32


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


def expert_bytes(layout, e: int) -> int:
    """Compressed bytes of expert ``e`` (packed weights, scales, zeros of gate/up/down)."""
    from camera_kernels.packing import num_groups, packed_rows

    total = 0
    for i, b in enumerate(layout.bits):
        n = layout.sizes[e][i]
        if n == 0:
            continue
        total += (
            packed_rows(layout.hidden_size, b) * 2 * n * 4
            + num_groups(layout.hidden_size, layout.group_size) * 2 * n * 4
        )
        total += (
            packed_rows(n, b) * layout.hidden_size * 4
            + num_groups(n, layout.group_size) * layout.hidden_size * 4
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

    def weight_bytes(self, experts_used: int) -> int:
        return experts_used * 3 * self.shape.hidden * self.shape.inter * 2


def time_calls(calls: list[Callable[[], object]], device, iters: int, use_graph: bool) -> tuple[float, str]:
    """Mean ms per call of ``calls`` (run round-robin); CUDA graph replay when possible."""
    import torch

    def run_all() -> None:
        for c in calls:
            c()

    if device.type != "cuda":  # dry run: the interpreter has nothing to warm up
        start = time.perf_counter()
        for _ in range(iters):
            run_all()
        return (time.perf_counter() - start) * 1e3 / (iters * len(calls)), "cpu_wall"
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
            replay = graph.replay
            mode = "cuda_graph"
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager, recorded
            print(f"  graph capture failed ({type(err).__name__}: {err}); timing eagerly", flush=True)
            torch.cuda.synchronize()
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
    from camera_kernels.slab_weights import random_slab_weights
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
                    try:
                        ms, _ = time_calls(calls, device, args.iters, not args.no_graph)
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
    parser.add_argument("--no-graph", action="store_true", help="time eagerly")
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
    args = parser.parse_args(argv)

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels module is compiled
    ck = load_kernels()
    import torch
    from camera_kernels.launch import slab_moe_triton
    from camera_kernels.slab_weights import SlabLayout, random_slab_weights
    from camera_kernels.tuning import get_config

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
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "dry_run": args.dry_run,
        "copy_bandwidth_GBps": copy_bw,
        "seconds": 0.0,
        "complete": False,
        "correctness": checks,
        "rows": rows,
    }

    def save() -> None:
        # Rewritten after every shape, so a run cut short still leaves its rows.
        result["seconds"] = round(time.time() - started, 1)
        out.write_text(json.dumps(result, indent=1))

    failed = False
    for shape in shapes:
        baseline = GroupedBF16MoE(shape, device, dtype)
        bf16_ms: dict[int, tuple[float, str]] = {}
        for mix_name, fractions in MIXES.items():
            sizes = slab_sizes(shape, fractions, seed=7, align=32 if not args.dry_run else 8)
            t0 = time.time()
            w = random_slab_weights(sizes, BITS, shape.hidden, group, seed=3, device=device)
            lay: SlabLayout = w.layout
            per_expert = [expert_bytes(lay, e) for e in range(shape.experts)]
            print(
                f"{shape.name} mix {mix_name}: avg {lay.avg_bits():.3f} bits/weight, "
                f"{lay.nbytes() / 2**20:.1f} MiB (built in {time.time() - t0:.1f}s)",
                flush=True,
            )

            # Correctness of both paths against the reference (bf16; tolerance as in
            # tests/kernels/test_kernel_triton.py: 4 bf16 ulp of max|ref|).
            if mix_name == next(iter(MIXES)):
                nt = 16 if not args.dry_run else 8
                x = torch.randn(nt, shape.hidden, device=device, dtype=dtype)
                tw, ids = routings(nt, shape, 1, device, seed=99)[0]
                want = ck.slab_moe_reference(x, tw, ids, w).float()
                for path in ("gemv", "sorted"):
                    cfg = get_config(nt, shape.top_k, shape.hidden, shape.experts, dev_name, path=path)
                    got = slab_moe_triton(x, tw, ids, w, cfg).float()
                    rel = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
                    ok = rel <= 4 * 2.0**-7
                    failed |= not ok
                    checks.append(
                        {"shape": shape.name, "tokens": nt, "path": path, "max_rel_err": rel, "ok": ok}
                    )
                    print(
                        f"  check {path}: max err / max |ref| = {rel:.2e} {'ok' if ok else 'FAILED'}",
                        flush=True,
                    )

            for nt in tokens_list:
                x = torch.randn(nt, shape.hidden, device=device, dtype=dtype)
                routes = routings(nt, shape, args.reps, device, seed=nt)
                used = [len(set(ids.flatten().tolist())) for _, ids in routes]
                touched = [sum(per_expert[e] for e in set(ids.flatten().tolist())) for _, ids in routes]
                wbytes = sum(touched) / len(touched)
                cfg = get_config(nt, shape.top_k, shape.hidden, shape.experts, dev_name)
                paths = {cfg.path: cfg}
                if nt * shape.top_k <= args.both_paths_max_pairs:
                    alt = "sorted" if cfg.path == "gemv" else "gemv"
                    paths[alt] = get_config(nt, shape.top_k, shape.hidden, shape.experts, dev_name, path=alt)
                timed = {}
                for path, pcfg in paths.items():
                    calls = [
                        lambda x=x, w=w, tw=tw, ids=ids, c=pcfg: slab_moe_triton(x, tw, ids, w, c)
                        for tw, ids in routes
                    ]
                    timed[path] = time_calls(calls, device, args.iters, use_graph)
                ms, mode = timed[cfg.path]
                if nt not in bf16_ms:
                    calls = [lambda f=baseline, x=x, tw=tw, ids=ids: f(x, tw, ids) for tw, ids in routes]
                    bf16_ms[nt] = time_calls(calls, device, args.iters, use_graph)
                b_ms, b_mode = bf16_ms[nt]
                flops = 2 * nt * shape.top_k * 3 * shape.hidden * shape.inter
                row = {
                    "shape": shape.name,
                    "H": shape.hidden,
                    "I": shape.inter,
                    "E": shape.experts,
                    "top_k": shape.top_k,
                    "tokens": nt,
                    "bits_target": float(mix_name),
                    "avg_bits": round(lay.avg_bits(), 4),
                    "group_size": group,
                    "bits": list(BITS),
                    "path": cfg.path,
                    "config_source": cfg.source,
                    "ms": ms,
                    "bf16_ms": b_ms,
                    "speedup_vs_bf16": b_ms / ms,
                    "weight_bytes": wbytes,
                    "achieved_GBps": wbytes / (ms * 1e-3) / 1e9,
                    "roofline_frac": (wbytes / (ms * 1e-3) / 1e9) / copy_bw if copy_bw else None,
                    "bf16_roofline_frac": (baseline.weight_bytes(sum(used) / len(used)) / (b_ms * 1e-3) / 1e9)
                    / copy_bw
                    if copy_bw
                    else None,
                    "tflops": flops / (ms * 1e-3) / 1e12,
                    "bf16_impl": baseline.impl,
                    "experts_touched": sum(used) / len(used),
                    "timing": mode if mode == b_mode else f"{mode}/{b_mode}",
                }
                for path, (p_ms, _) in timed.items():
                    row[f"{path}_ms"] = p_ms
                rows.append(row)
                frac = f"{row['roofline_frac']:.2f}" if row["roofline_frac"] is not None else "n/a"
                print(
                    f"  T={nt:5d} {cfg.path:6s} {ms:8.4f} ms  bf16 {b_ms:8.4f} ms  x{b_ms / ms:5.2f}  "
                    f"roofline {frac}  " + " ".join(f"{p}={v[0]:.4f}" for p, v in timed.items()),
                    flush=True,
                )
            del w
        del baseline
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()

    result["complete"] = True
    save()
    print(f"wrote {out} ({len(rows)} rows, {result['seconds']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
