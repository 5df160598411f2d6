"""Quality table: perplexity of CAMERA and baseline checkpoints on held-out text.

Every checkpoint is scored twice on the same token windows: through vLLM (prompt
logprobs of a real engine, one subprocess per checkpoint) and through the transformers
reference; the two must agree within 0.5 %.  Results go to
``bench/results/quality.json``, ``docs/quality.md`` and ``docs/quality.png``.

    python bench/quality.py [--model DIR] [--only camera-p,uniform-rtn] [--skip-vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402
import ppl  # noqa: E402
import text_data  # noqa: E402
from stamp import stamp  # noqa: E402

from camera_vllm.compress.calibrate import CalibSpec  # noqa: E402

ROOT = Path(__file__).resolve().parent
CKPTS = ROOT / ".cache" / "quality"
RESULTS = ROOT / "results"
DOCS = ROOT.parent / "docs"


def _expert_bytes(ckpt: Path) -> int:
    from camera_vllm.format.validate import summarize

    s = summarize(ckpt)
    return int(s.get("expert_bytes") or s.get("stored_expert_bytes") or 0)


def settings() -> list[tuple[str, str, dict]]:
    """(method, setting, kwargs) rows of the table."""
    rows: list[tuple[str, str, dict]] = [("dense", "uncompressed (fp32)", {})]
    for r in (0.25, 0.5):
        rows += [
            ("camera-p layer", f"prune {r:.0%}", {"kind": "p", "ratio": r, "scope": "layer"}),
            ("camera-p expert", f"prune {r:.0%}", {"kind": "p", "ratio": r, "scope": "expert"}),
            ("random", f"prune {r:.0%}", {"kind": "b", "method": "random", "ratio": r}),
            ("magnitude", f"prune {r:.0%}", {"kind": "b", "method": "magnitude", "ratio": r}),
            ("expert-drop (NAEE-like)", f"prune {r:.0%}", {"kind": "b", "method": "expert-drop", "ratio": r}),
        ]
    for bits, label in ((2.25, "2.25 bpw"), (2.5, "2.5 bpw")):
        for m in ("rtn", "gptq"):
            rows.append((f"camera-q {m}", label, {"kind": "q", "avg_bits": bits, "method": m, "group_size": 128}))
    # Uniform baselines at the same bytes: 2 bits with g128 = 2.25 bpw, with g64 = 2.5 bpw.
    for m in ("rtn", "gptq"):
        rows.append((f"uniform {m} 2-bit", "2.25 bpw (g128)", {"kind": "q", "bits": [2], "fractions": [1.0],
                                                                "method": m, "group_size": 128}))
        rows.append((f"uniform {m} 2-bit", "2.5 bpw (g64)", {"kind": "q", "bits": [2], "fractions": [1.0],
                                                              "method": m, "group_size": 64}))
        rows.append((f"uniform {m} 3-bit", "3.25 bpw (g128)", {"kind": "q", "bits": [3], "fractions": [1.0],
                                                                "method": m, "group_size": 128}))
    return rows


def build(model: Path, name: str, kw: dict, calib_file: Path, calib: CalibSpec) -> Path:
    from camera_vllm.compress.pipeline import run_camera_p
    from camera_vllm.compress.quantize.pipeline import run_camera_q

    out = CKPTS / name
    if out.exists():
        return out
    kind = kw.get("kind")
    if kind == "p":
        return run_camera_p(model, out, kw["ratio"], [calib_file], scope=kw["scope"], calib=calib)
    if kind == "b":
        return baselines.run_baseline_p(model, out, kw["method"], kw["ratio"], [calib_file], calib=calib)
    if kind == "q":
        return run_camera_q(model, out, [calib_file], avg_bits=kw.get("avg_bits"), bits=kw.get("bits"),
                            fractions=kw.get("fractions"), group_size=kw["group_size"], method=kw["method"],
                            calib=calib)
    return model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / ".cache" / "models" / "qwen3moe-shakespeare")
    p.add_argument("--num-seqs", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--only", default=None, help="comma-separated method prefixes to run")
    p.add_argument("--skip-vllm", action="store_true")
    args = p.parse_args(argv)
    if not (args.model / "config.json").exists():
        raise SystemExit(f"{args.model}: no benchmark model; run `make bench-model` first")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    data_dir = ROOT / ".cache" / "text"
    calib_file, held_file = text_data.write_split(data_dir)
    windows = ppl.token_windows(args.model, held_file.read_text(), args.seq_len, args.windows)
    calib = CalibSpec(num_seqs=args.num_seqs, seq_len=args.seq_len, seed=0)
    out_json = RESULTS / "quality.json"
    previous = json.loads(out_json.read_text())["rows"] if out_json.exists() else []
    done = {(r["method"], r["setting"]): r for r in previous}
    rows = []
    for method, setting, kw in settings():
        if args.only and not any(method.startswith(o) for o in args.only.split(",")):
            if (method, setting) in done:
                rows.append(done[(method, setting)])
            continue
        name = f"{method}-{setting}".replace(" ", "_").replace("%", "pct").replace("(", "").replace(")", "")
        t0 = time.time()
        ckpt = build(args.model, name, kw, calib_file, calib)
        t_build = time.time() - t0
        ref = ppl.ppl_reference(ckpt, windows)
        served = None
        if not args.skip_vllm:
            res = subprocess.run(
                [sys.executable, str(ROOT / "ppl.py"), str(ckpt), "--text", str(held_file), "--seq-len",
                 str(args.seq_len), "--windows", str(args.windows), "--backend", "vllm", "--json"],
                capture_output=True, text=True,
            )
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            if res.returncode != 0 or not lines:
                print(res.stderr[-3000:], file=sys.stderr)
                served = None
            else:
                served = json.loads(lines[-1])["ppl"]
        row = {
            "method": method, "setting": setting, "ppl_served": served, "ppl_reference": round(ref, 4),
            "served_vs_reference": None if served is None else round(served / ref - 1, 5),
            "expert_bytes": _expert_bytes(ckpt) if kw else None, "compress_seconds": round(t_build, 1),
            "checkpoint": str(ckpt.relative_to(ROOT.parent)) if ckpt.is_relative_to(ROOT.parent) else str(ckpt),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        RESULTS.mkdir(exist_ok=True)
        out_json.write_text(json.dumps({**stamp(), "model": str(args.model.name), "windows": len(windows),
                                        "seq_len": args.seq_len, "calibration": vars(calib), "rows": rows},
                                       indent=2) + "\n")
    write_docs(rows)


def write_docs(rows: list[dict]) -> None:
    """Markdown table in docs/quality.md and a bar chart in docs/quality.png."""
    from matplotlib.figure import Figure

    DOCS.mkdir(exist_ok=True)
    lines = ["# Quality: perplexity on held-out Shakespeare", "",
             "Generated by `bench/quality.py` from `bench/results/quality.json`.", "",
             "| method | setting | ppl (vLLM) | ppl (reference) | expert bytes |", "|---|---|---|---|---|"]
    for r in rows:
        served = "-" if r["ppl_served"] is None else f"{r['ppl_served']:.2f}"
        lines.append(f"| {r['method']} | {r['setting']} | {served} | {r['ppl_reference']:.2f} | {r['expert_bytes']} |")
    (DOCS / "quality.md").write_text("\n".join(lines) + "\n")
    fig = Figure(figsize=(10, 0.35 * len(rows) + 1.5))
    ax = fig.add_subplot()
    labels = [f"{r['method']} / {r['setting']}" for r in rows]
    vals = [r["ppl_reference"] for r in rows]
    ax.barh(labels, vals)
    dense = [r["ppl_reference"] for r in rows if r["method"] == "dense"]
    if dense:
        ax.axvline(dense[0], color="k", linestyle="--", linewidth=1, label="dense")
        ax.legend(loc="lower right")
    # Differences are a few percent: start the axis near the best value so they show.
    ax.set_xlim(min(vals) * 0.97, max(vals) * 1.02)
    ax.invert_yaxis()
    ax.set_xlabel("held-out perplexity (lower is better)")
    fig.tight_layout()
    fig.savefig(DOCS / "quality.png", dpi=110)


if __name__ == "__main__":
    main()
