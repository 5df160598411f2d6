"""Static speed of the Triton slab MoE kernels on sm_90, read from their machine code (no GPU needed).

Every kernel variant that ``kernels/configs/*.json`` can select (each ``gemv`` and ``sorted``
tile set of every table, both kernels ``w13``/``w2``) is compiled ahead of time for sm_90
(:mod:`sm90_aot`: Triton's own compiler and the ptxas/cuobjdump bundled with it) as a
single-slot build at each slab bit-width 1/2/3/4/8/16 (16 = the dense bf16 slab of
CAMERA-P), with bf16 activations (the serving dtype; the w2 GEMV reads the fp32
intermediate), and the sorted kernels once more with fp32 activations (the exactness path,
at the smaller tiles the launcher gives fp32: ``tuning.fp32_sorted``).
Per row: registers, spill bytes and stack (cuobjdump / ptxas -v), shared memory, and
``sass_per_weight``.

How the innermost loop is found (:func:`sm90_aot.main_loop`): ``cuobjdump -sass`` lists the
kernel's instructions with addresses; every ``BRA`` whose target address is lower than its
own is a loop back edge, the body being target .. branch inclusive; a loop is innermost when
no other back edge lies inside it, and the K loop is the innermost loop with the most
instructions (the other innermost loops are the few-instruction ones around it).  The body
count includes everything the steady state issues per K step (loads, unpacking, math,
``tl.dot``'s MMAs, pipelining waits); instructions skipped by predicates still issue.

``sass_per_weight = body_instructions * 32 * num_warps / weights_per_iteration``: the body is
per thread, so times the threads of the CTA it is the lane-instructions (issue slots x 32)
one K step costs, divided by the weight elements that step consumes: ``2 * BLOCK_K *
BLOCK_N`` for the w13 kernels (gate and up tiles), ``BLOCK_K * BLOCK_N`` for w2 (x
``SPLIT_K`` nothing: a split program consumes its own K range).  For the sorted kernels a K
step serves ``BLOCK_M`` rows, so their number is per weight per block, not per (row, weight).

Writes ``bench/results/kernel-static-sm90.json`` (stamped with machine, versions, commit and
whether the tree was dirty) and, from that JSON, ``docs/kernels.md`` (roofline model of a
Qwen3-30B-A3B MoE layer).  Compiles take about a second each on one core.

    .venv/bin/python bench/kernel_static.py            # all rows (~1-2 minutes), then the doc
    .venv/bin/python bench/kernel_static.py --quick    # bits 2 and 4 only, not written
    .venv/bin/python bench/kernel_static.py --doc      # only regenerate docs/kernels.md
    (``--allow-dirty`` to write results from uncommitted code; they record it)
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from sm90_aot import (
    KERNELS,
    ROOT,
    block_k,
    compile_variants,
    config_kernel_tiles,
    fp32_sorted_tiles,
    main_loop,
    resource_usage,
    sass,
)
from stamp import add_stamp_args, stamp

RESULT = ROOT / "bench" / "results" / "kernel-static-sm90.json"
DOC = ROOT / "docs" / "kernels.md"
BITS = (1, 2, 3, 4, 8, 16)
QUANT_GROUP = 128  # the quantization group of the rows (and of the roofline's layer)
DENSE_GROUP = 256  # slab_weights.DENSE_GROUP_SIZE: a dense-only (CAMERA-P) layout


def variants(bits: tuple[int, ...] = BITS) -> list[dict[str, Any]]:
    """One single-slot build per (selectable kernel tile set, bit-width, activation dtype)."""
    out = []
    for (kernel, sizes, warps, stages), sources in config_kernel_tiles().items():
        sorted_path = "sorted" in kernel
        acts = ["bf16", "fp32"] if sorted_path else ["fp32" if kernel == "_w2_gemv_kernel" else "bf16"]
        for act in acts:
            for b in bits if act != "fp32" or not sorted_path else [b for b in bits if b in (4, 16)]:
                group = DENSE_GROUP if b == 16 else QUANT_GROUP
                tiles, nw, ns = dict(sizes), warps, stages
                if act == "fp32" and sorted_path:  # the launcher's fp32 caps (tuning.fp32_sorted)
                    tiles, nw, ns = fp32_sorted_tiles(tiles, warps)
                tiles["BLOCK_K"] = block_k(tiles["BLOCK_K"], group)
                out.append(
                    dict(
                        kernel=kernel,
                        path="prefill" if sorted_path else "decode",
                        act=act,
                        bits=[b],
                        dense_fp16=False,
                        ids=None if sorted_path else "i32",
                        tiles=tiles,
                        group_size=group,
                        warps=nw,
                        stages=ns,
                        sources=sources,
                    )
                )
    return out


def weights_per_iteration(v: dict[str, Any]) -> int:
    per_tile = v["tiles"]["BLOCK_K"] * v["tiles"]["BLOCK_N"]
    return 2 * per_tile if v["kernel"].startswith("_w13") else per_tile


def measure(vs: list[dict[str, Any]], kernels: Path = KERNELS) -> list[dict[str, Any]]:
    """Compile every variant and read its resources and main loop."""
    with tempfile.TemporaryDirectory() as tmp:
        out_dir, cache = Path(tmp) / "cubins", Path(tmp) / "cache"
        out_dir.mkdir()
        cache.mkdir()
        results = compile_variants(vs, out_dir, cache, kernels)
        rows = []
        for v, r in zip(vs, results):
            row = {
                "kernel": v["kernel"][1:-7],
                "path": v["path"],
                "bits": v["bits"][0],
                "act": v["act"],
                "group_size": v["group_size"],
                "tiles": dict(v["tiles"], num_warps=v["warps"], num_stages=v["stages"]),
                "sources": v["sources"],
            }
            if not r["ok"]:
                rows.append(dict(row, error=r.get("error")))
                continue
            usage = resource_usage(r["cubin"])[r["name"]]
            p = r["ptxas"] or {}
            loop = main_loop(sass(r["cubin"]))
            wpi = weights_per_iteration(v)
            threads = 32 * v["warps"]
            row.update(
                registers=usage["REG"],
                spill_bytes=p.get("spill_stores", 0) + p.get("spill_loads", 0),
                stack_bytes=usage["STACK"],
                local_bytes=usage["LOCAL"],
                shared_bytes=r["shared"],
                loop_instructions=loop["count"] if loop else None,
                threads=threads,
                weights_per_iteration=wpi,
                sass_per_weight=round(loop["count"] * threads / wpi, 3) if loop else None,
                loop_opcodes=dict(list(loop["opcodes"].items())[:12]) if loop else None,
            )
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- roofline model

QWEN3 = dict(name="Qwen3-30B-A3B", experts=128, top_k=8, hidden=2048, width=768)
GPUS = {"H100": 3.35e12, "H200": 4.8e12}  # HBM bytes/s (SXM)
SMS, LANES, CLOCK = 132, 128, 1.75e9  # H100/H200 SXM: SMs, issue lanes per SM (4 x 32), boost Hz
TOKENS = (1, 16, 64, 2048)


def _expected_blocks(num_tokens: int, top_k: int, experts: int, block_m: int) -> float:
    """E[sum_e ceil(n_e / block_m)], n_e ~ Binomial(T, k/E) (uniform routing)."""
    p = top_k / experts
    total = 0.0
    for n in range(1, num_tokens + 1):
        pmf = math.comb(num_tokens, n) * p**n * (1 - p) ** (num_tokens - n)
        if pmf < 1e-12 and n > num_tokens * p:
            break
        total += pmf * math.ceil(n / block_m)
    return experts * total


def _spw(rows: list[dict], kernel: str, path: str, bits: int, tiles: dict) -> float | None:
    for r in rows:
        if (
            r["kernel"] == kernel
            and r["path"] == path
            and r["bits"] == bits
            and r["act"] in ("bf16", "fp32" if kernel == "w2_gemv" else "bf16")
            and all(r["tiles"].get(k) == v for k, v in tiles.items())
        ):
            return r.get("sass_per_weight")
    return None


def roofline(rows: list[dict], bits: int, num_tokens: int) -> dict[str, Any]:
    """Predicted time of one Qwen3-30B-A3B MoE layer at ``bits`` (single slab) and ``num_tokens``."""
    import torch  # noqa: F401  (camera_kernels needs it)

    from camera_kernels.launch import grid_sizes
    from camera_kernels.tuning import get_config

    e, k, h, w = (QWEN3[x] for x in ("experts", "top_k", "hidden", "width"))
    pairs = num_tokens * k
    cfg = get_config(num_tokens, k, h, e)
    group = DENSE_GROUP if bits == 16 else QUANT_GROUP
    grids = grid_sizes(cfg, num_tokens, k, h, e, [w], group)
    distinct = e * (1 - (1 - k / e) ** num_tokens)
    wbits = bits + (0 if bits == 16 else 32 / group)  # fp16 scale + zero per group and column
    w13_weights, w2_weights = h * 2 * w, w * h
    gemv = cfg.path == "gemv"
    path = "decode" if gemv else "prefill"
    kname = "gemv" if gemv else "sorted"
    act_bytes = 4 if gemv else 2
    out = {"T": num_tokens, "path": cfg.path, "bits_per_weight": wbits, "kernels": {}}
    for part, nweights, conf in (("w13", w13_weights, cfg.w13), ("w2", w2_weights, cfg.w2)):
        tiles = {"BLOCK_N": conf.block_n, "num_warps": conf.num_warps}
        if not gemv:
            tiles["BLOCK_M"] = conf.block_m
        spw = _spw(rows, f"{part}_{kname}", path, bits, tiles)
        weight_bytes = distinct * nweights * wbits / 8
        if part == "w13":
            # x in, act out (split K: fp32 gate and up partial sums per split)
            split13 = grids["w13"][2]
            io = num_tokens * h * 2 + pairs * w * act_bytes * (2 * split13 if split13 > 1 else 1)
        else:
            # act in, fp32 out per K split (+ zero fill)
            split13 = grids["w13"][2]
            io = pairs * w * act_bytes * (2 * split13 if split13 > 1 else 1)
            io += pairs * h * 4 * (grids["w2"][2] if gemv else 2)
        ctas = grids[part][0] * grids[part][1] * grids[part][2]
        if gemv:
            dequant = pairs * nweights  # every pair dequantizes its expert's weights
            active = ctas
        else:
            nblocks = _expected_blocks(num_tokens, k, e, conf.block_m)
            dequant = nblocks * nweights
            active = nblocks * grids[part][1]
        issue = dequant * spw / (min(SMS, active) * LANES * CLOCK) if spw else None
        out["kernels"][part] = dict(
            split_k=grids[part][2],
            bytes=weight_bytes + io,
            weight_bytes=weight_bytes,
            ctas=ctas,
            active_ctas=round(active, 1),
            sass_per_weight=spw,
            issue_s=issue,
        )
    reduce_bytes = pairs * h * 4 + num_tokens * h * 2  # out_buf.view(T, k, H).sum(1).to(bf16)
    out["reduce_bytes"] = reduce_bytes
    bf16_bytes = distinct * (w13_weights + w2_weights) * 2 + num_tokens * h * 4 + pairs * w * 2 * 2
    out["bf16_bytes"] = bf16_bytes
    for gpu, bw in GPUS.items():
        t = sum(max(kk["bytes"] / bw, kk["issue_s"] or 0.0) for kk in out["kernels"].values())
        t += reduce_bytes / bw
        out[gpu] = dict(
            hbm_s=(sum(kk["bytes"] for kk in out["kernels"].values()) + reduce_bytes) / bw,
            predicted_s=t,
            bf16_s=bf16_bytes / bw,
            speedup_vs_bf16=bf16_bytes / bw / t,
        )
    return out


def _us(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e6:.1f}"


def write_doc(doc: dict[str, Any], path: Path = DOC) -> None:
    rows = doc["rows"]
    lines = [
        "# Triton slab MoE kernels: static machine-code measurements and roofline",
        "",
        f"Generated by `bench/kernel_static.py --doc` from `bench/results/{RESULT.name}` "
        f"(commit `{(doc['stamp'].get('commit') or '?')[:12]}`, "
        f"dirty tree: {doc['stamp'].get('dirty', doc['stamp'].get('dirty_tree'))}, "
        f"triton {doc['triton']}).  **Nothing here is measured on a GPU**: registers, spills and "
        "instruction counts are read from the sm_90 cubins that Triton builds on this CPU; the times "
        "are a model.  No GPU has been lent to the project yet (`bench/run_gpu_bench.sh` is the "
        "measurement to run when one is).",
        "",
        "## Per-variant machine code (sm_90)",
        "",
        "`sass_per_weight` = instructions of the K loop body (per thread) x threads / weight elements "
        "one K step consumes: lane-issue slots per weight (see the script's docstring for how the loop "
        "is found).  An H100 at 3.35 TB/s streaming 2.25-bit weights must consume ~11.9 G weights/ms, "
        f"which leaves {SMS * LANES * CLOCK / (3.35e12 * 8 / 2.25):.2f} lane-instructions per weight "
        f"({SMS} SMs x {LANES} lanes x {CLOCK / 1e9:.2f} GHz); an H200 (4.8 TB/s) leaves "
        f"{SMS * LANES * CLOCK / (4.8e12 * 8 / 2.25):.2f}.",
        "",
        "| kernel | path | act | bits | tiles (M/N/K, warps, stages) | regs | spill B | loop instr | "
        "sass/weight |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["tiles"]
        tile = "/".join(str(t[x]) for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if x in t)
        if "error" in r:
            lines.append(
                f"| {r['kernel']} | {r['path']} | {r['act']} | {r['bits']} | {tile} | did not compile |||"
            )
            continue
        lines.append(
            f"| {r['kernel']} | {r['path']} | {r['act']} | {r['bits']} | {tile}, {t['num_warps']}, "
            f"{t['num_stages']} | {r['registers']} | {r['spill_bytes']} | {r['loop_instructions']} | "
            f"{r['sass_per_weight']} |"
        )
    q = QWEN3
    lines += [
        "",
        f"## Roofline model: one {q['name']} MoE layer",
        "",
        f"{q['experts']} experts, top-{q['top_k']}, hidden {q['hidden']}, expert width {q['width']}, "
        f"one slab at the given bits, group {QUANT_GROUP} (fp16 scale + zero per group and column: "
        f"+{32 / QUANT_GROUP} bits/weight), uniform random routing, tiles from "
        "`kernels/configs/default.json` as `get_config` picks them.  Assumptions:",
        "",
        "* bytes: packed weights + scales/zeros of the distinct experts touched (E[distinct] = "
        "E(1-(1-k/E)^T); a repeated expert comes from L2), x in, the intermediate out and in "
        "(fp32 on the GEMV path, bf16 sorted), the fp32 `[T*k, H]` buffer out (and its zero fill on "
        "the sorted path), and the torch reduction reading it and writing bf16;",
        "* HBM-bound time = bytes / (3.35 TB/s H100, 4.8 TB/s H200);",
        f"* issue-bound time = weights dequantized x sass_per_weight / (min({SMS}, active CTAs) x "
        f"{LANES} lanes x {CLOCK / 1e9:.2f} GHz): the GEMV path dequantizes its expert once per (token, "
        "expert) pair, the sorted path once per block of BLOCK_M rows (expected blocks under uniform "
        "routing); one CTA keeps at most one SM busy;",
        "* per kernel the slower of the two; kernels run one after the other; launch gaps ignored "
        "(CUDA graphs); bf16 baseline = its bytes at full HBM bandwidth (optimistic for bf16, so the "
        "speedup is conservative).",
        "* CTAs = the launcher's grid (`camera_kernels.launch.grid_sizes`); on the sorted path most of "
        "the static block bound returns at once (active = expected non-empty blocks x column tiles).",
        "",
        "| bits | T | path | MB moved | CTAs w13 / w2 (active) | sass/w w13 / w2 | issue us w13 / w2 | "
        "H100 HBM us | H100 pred. us | H100 x bf16 | H200 HBM us | H200 pred. us | H200 x bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in doc["roofline"]:
        k13, k2 = m["kernels"]["w13"], m["kernels"]["w2"]
        mb = (k13["bytes"] + k2["bytes"] + m["reduce_bytes"]) / 1e6
        lines.append(
            f"| {m['bits']} | {m['T']} | {m['path']} | {mb:.1f} | {k13['ctas']} / {k2['ctas']} "
            f"({k13['active_ctas']:g} / {k2['active_ctas']:g}) | {k13['sass_per_weight']} / "
            f"{k2['sass_per_weight']} | {_us(k13['issue_s'])} / {_us(k2['issue_s'])} | "
            f"{_us(m['H100']['hbm_s'])} | {_us(m['H100']['predicted_s'])} | "
            f"{m['H100']['speedup_vs_bf16']:.2f} | {_us(m['H200']['hbm_s'])} | "
            f"{_us(m['H200']['predicted_s'])} | {m['H200']['speedup_vs_bf16']:.2f} |"
        )
    lines += [
        "",
        "`x bf16` is the predicted speedup over a bf16 MoE layer moving its bytes at full bandwidth "
        "(> 1: faster).  Predicted, not measured: the issue model ignores latency, dependency stalls, "
        "occupancy limits from registers and the tail of partial waves; the byte model ignores L2 hits "
        "on repeated activations.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="bits 2 and 4 only; prints, writes nothing")
    ap.add_argument("--doc", action="store_true", help="only regenerate docs/kernels.md from the JSON")
    ap.add_argument("--kernel", default=None, help="only kernels whose name contains this (not written)")
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument(
        "--kernels", type=Path, default=KERNELS, help="another moe_slab.py (a baseline); rows only, no doc"
    )
    add_stamp_args(ap)
    args = ap.parse_args(argv)
    if args.doc:
        write_doc(json.loads(args.out.read_text()))
        return DOC
    import triton

    # Before measuring, so that a dirty tree is refused at once (unless --allow-dirty).
    here = stamp(allow_dirty=args.allow_dirty or args.quick or bool(args.kernel), argv=argv)
    vs = variants((2, 4) if args.quick else BITS)
    if args.kernel:
        vs = [v for v in vs if args.kernel in v["kernel"]]
    rows = measure(vs, args.kernels)
    for r in rows:
        print(
            f"{r['kernel']:<10} {r['path']:<7} {r['act']:<4} b{r['bits']:<2} {r['tiles']} "
            f"REG {r.get('registers')} spill {r.get('spill_bytes')} loop {r.get('loop_instructions')} "
            f"spw {r.get('sass_per_weight')}"
        )
    if args.kernels != KERNELS:
        args.out.write_text(json.dumps({"kernels": str(args.kernels), "rows": rows}, indent=1) + "\n")
    if args.quick or args.kernel or args.kernels != KERNELS:
        return args.out
    doc: dict[str, Any] = {
        "stamp": here,
        "triton": triton.__version__,
        "target": "cuda sm_90 (GPUTarget('cuda', 90, 32)), compiled on CPU",
        "method": __doc__,
        "rows": rows,
    }
    doc["roofline"] = [dict(roofline(rows, b, t), bits=b) for b in (2, 4) for t in TOKENS]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    write_doc(doc)
    print(f"wrote {args.out} and {DOC}")
    return args.out


if __name__ == "__main__":
    main()
