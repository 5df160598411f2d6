"""One MoE layer on CPU: dense bf16 (vLLM's ``cpu_fused_moe``) vs CAMERA-Q reference vs the compiled kernel.

The layer has the speed model's shape (``bench/speed_cpu.py``): hidden 1024, 32 experts of
width 768, top-4, group size 128, slabs at 3/2/1 bits with width fractions
0.25/0.5/0.25 ("q225") or 0.5/0.25/0.25 ("q25"); random weights (speed only).  Every
backend rotates over 8 copies of its layer so weights come from memory, not cache (a model
has many layers: serving never finds the next layer in cache).  Timed per call (median of
``--iters`` calls after a warm-up, backends interleaved call by call) for T = 1, 8, 64
tokens at 1 and 2 threads; the routing is random and the same for every backend.

* dense: ``torch.ops._C.cpu_fused_moe`` on bf16 weights prepacked with
  ``torch.ops._C.prepack_moe_weight`` (isa as vLLM picks it: "amx" where there are AMX
  tiles, else "vec"), bf16 activations, as the dense model is served;
* reference: :func:`camera_kernels.slab_moe_reference` (fp32 math, bf16 in/out);
* cpu: :func:`camera_kernels.cpu_slab.slab_moe_cpu` (fp32 math, bf16 in/out).

Writes ``bench/results/cpu-kernel.json`` (stamped) and ``bench/results/cpu-kernel.png``.

    python bench/cpu_kernel_bench.py            # full run (a few minutes)
    python bench/cpu_kernel_bench.py --quick    # smoke: 2 copies, few iterations
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from stamp import add_stamp_args, stamp
from tqdm import tqdm

from camera_kernels import slab_moe_reference
from camera_kernels.cpu_slab import (
    cpu_kernel_build_seconds,
    ensure_cpu_kernel,
    load_cpu_kernel_variant,
    slab_moe_cpu,
)
from camera_kernels.slab_weights import SlabMoEWeights
from camera_kernels.testing import random_slab_weights

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, WIDTH, EXPERTS, TOP_K, GROUP = 1024, 768, 32, 4, 128
LAYERS = {"q225": ((3, 2, 1), (0.25, 0.5, 0.25)), "q25": ((3, 2, 1), (0.5, 0.25, 0.25))}


def slab_layer(bits: tuple[int, ...], fractions: tuple[float, ...], seed: int) -> SlabMoEWeights:
    sizes = [round(f * WIDTH) for f in fractions]
    sizes[-1] = WIDTH - sum(sizes[:-1])
    return random_slab_weights([sizes] * EXPERTS, bits, HIDDEN, GROUP, seed=seed)


def copy_layer(w: SlabMoEWeights) -> SlabMoEWeights:
    """The same layer in fresh memory (cold-cache rotation needs distinct storage)."""
    return SlabMoEWeights.from_layout(
        w.layout,
        [t.clone() for t in w.w13_qweight],
        [t.clone() for t in w.w13_scales],
        [t.clone() for t in w.w13_zeros],
        [t.clone() for t in w.w2_qweight],
        [t.clone() for t in w.w2_scales],
        [t.clone() for t in w.w2_zeros],
    )


def load_vllm_library(isa: str) -> None:
    """Load vLLM's CPU kernels as a CPU of ``isa`` would: ``avx2`` loads ``vllm._C_AVX2`` (what
    vLLM picks without AVX-512), ``native`` lets vLLM choose."""
    if isa == "avx2":  # the ISA probes vLLM reads, patched as for bench/speed_cpu.py --isa avx2
        import emulate_avx2.sitecustomize  # noqa: F401
    import vllm._custom_ops  # noqa: F401 - loads torch.ops._C on CPU


def dense_layer(seed: int, cpu_isa: str = "native") -> tuple[torch.Tensor, torch.Tensor, str]:
    """Prepacked bf16 ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` for ``cpu_fused_moe``."""

    gen = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(EXPERTS, 2 * WIDTH, HIDDEN, generator=gen) * 0.05).to(torch.bfloat16)
    w2 = (torch.randn(EXPERTS, HIDDEN, WIDTH, generator=gen) * 0.05).to(torch.bfloat16)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    isa = "amx" if cpu_isa == "native" and amx is not None and amx() else "vec"
    out13, out2 = torch.empty_like(w13), torch.empty_like(w2)
    torch.ops._C.prepack_moe_weight(w13, out13, isa)
    torch.ops._C.prepack_moe_weight(w2, out2, isa)
    return out13, out2, isa


def time_interleaved(fns: dict[str, Callable[[int], Any]], copies: int, iters: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin so that load
    from other processes on a shared machine hits every backend alike; call ``j`` of a
    function uses copy ``j % copies``; one untimed pass over all copies first."""
    for fn in fns.values():
        for j in range(copies):
            fn(j)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for j in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(j % copies)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 copies, few iterations")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--ref-iters", type=int, default=8, help="iterations for the (slow) reference")
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument(
        "--isa",
        choices=["native", "avx2"],
        default="native",
        help="avx2: the kernel's AVX2 build against vLLM's AVX2 library, as on a CPU without AVX-512",
    )
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/cpu-kernel[-avx2].json")
    add_stamp_args(ap)
    args = ap.parse_args(argv)
    here = stamp(allow_dirty=args.allow_dirty, argv=argv)
    if args.out is None:
        args.out = RESULTS / ("cpu-kernel.json" if args.isa == "native" else f"cpu-kernel-{args.isa}.json")
    load_vllm_library(args.isa)
    if args.quick:
        args.copies, args.iters, args.ref_iters = 2, 4, 2
    tokens = [int(v) for v in args.tokens.split(",")]
    threads = [int(v) for v in args.threads.split(",")]

    t0 = time.perf_counter()
    if args.isa == "native":
        if not ensure_cpu_kernel():
            raise SystemExit("the compiled CPU kernel is not available here")
        build_s = cpu_kernel_build_seconds()
    else:
        load_cpu_kernel_variant(args.isa)
        build_s = time.perf_counter() - t0
    kernel_isa = None if args.isa == "native" else args.isa
    print(f"kernel ready in {time.perf_counter() - t0:.1f} s", flush=True)

    layers: dict[str, list[SlabMoEWeights]] = {}
    for name, (bits, fractions) in LAYERS.items():
        base = slab_layer(bits, fractions, seed=1)
        layers[name] = [base] + [copy_layer(base) for _ in range(args.copies - 1)]
    dense = [dense_layer(seed=10 + c, cpu_isa=args.isa) for c in range(args.copies)]
    isa = dense[0][2]

    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    jobs = [(nt, t) for nt in threads for t in tokens]
    for nt, t in tqdm(jobs, desc="configs"):
        torch.set_num_threads(nt)
        x = torch.randn(t, HIDDEN, generator=gen).to(torch.bfloat16)
        logits = torch.randn(t, EXPERTS, generator=gen)
        tw, ids = torch.topk(torch.softmax(logits, dim=-1), TOP_K, dim=-1)
        tw = tw.contiguous()
        ids32 = ids.to(torch.int32).contiguous()
        out = torch.empty_like(x)

        def dense_call(j: int, out=out, x=x, tw=tw, ids32=ids32) -> None:
            w13, w2, _ = dense[j]
            torch.ops._C.cpu_fused_moe(out, x, w13, w2, None, None, tw, ids32, False, "silu", isa)

        row: dict[str, Any] = {
            "threads": nt,
            "tokens": t,
            "hit_experts": int(torch.unique(ids).numel()),
            "loadavg_1m_before": os.getloadavg()[0],
        }
        fast = {"dense": dense_call}
        slow = {}
        for name, copies in layers.items():
            fast[f"{name}_cpu"] = lambda j, c=copies, x=x, tw=tw, ids=ids: slab_moe_cpu(
                x, tw, ids, c[j], isa=kernel_isa
            )
            slow[f"{name}_reference"] = lambda j, c=copies, x=x, tw=tw, ids=ids: slab_moe_reference(
                x, tw, ids, c[j]
            )
        for name, sec in {
            **time_interleaved(fast, args.copies, args.iters),
            **time_interleaved(slow, args.copies, args.ref_iters),
        }.items():
            row[f"{name}_ms"] = 1e3 * sec
        for name in layers:
            # Speed relative to dense (dense time / time): > 1 means faster than dense.
            row[f"{name}_cpu_vs_dense"] = row["dense_ms"] / row[f"{name}_cpu_ms"]
            row[f"{name}_reference_vs_dense"] = row["dense_ms"] / row[f"{name}_reference_ms"]
        row["loadavg_1m_after"] = os.getloadavg()[0]
        rows.append(row)
        tqdm.write(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))

    bytes_q = {name: ws[0].layout.nbytes() for name, ws in layers.items()}
    result = {
        "benchmark": "cpu-kernel",
        "stamp": here,
        "layer": {
            "hidden": HIDDEN,
            "expert_width": WIDTH,
            "experts": EXPERTS,
            "top_k": TOP_K,
            "group_size": GROUP,
            "slabs": {k: {"bits": b, "fractions": f} for k, (b, f) in LAYERS.items()},
            "bytes": {"dense_bf16": 3 * EXPERTS * HIDDEN * WIDTH * 2, **bytes_q},
        },
        "settings": {
            "copies": args.copies,
            "iters": args.iters,
            "ref_iters": args.ref_iters,
            "dense_isa": isa,
            "cpu_isa": args.isa,
            "quick": args.quick,
        },
        "kernel_build_or_load_s": build_s,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return args.out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(5 * len(threads), 4), squeeze=False)
    for ax, nt in zip(axes[0], threads):
        sub = [r for r in rows if r["threads"] == nt]
        xs = range(len(sub))
        width = 0.2
        series = [
            ("q225_cpu_vs_dense", "q225 kernel"),
            ("q25_cpu_vs_dense", "q25 kernel"),
            ("q225_reference_vs_dense", "q225 reference"),
        ]
        for s, (key, label) in enumerate(series):
            ax.bar([x + (s - 1) * width for x in xs], [r[key] for r in sub], width, label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.9, color="r", lw=0.8, ls="--", label="target 0.9x")
        ax.set_xticks(list(xs), [f"T={r['tokens']}" for r in sub])
        ax.set_ylabel("speed vs dense bf16 (x)")
        ax.set_title(f"one MoE layer, {nt} thread(s)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
