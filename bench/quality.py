"""Quality table: perplexity of CAMERA and baseline checkpoints on held-out text.

Every checkpoint is scored twice on the same token windows: through vLLM (prompt
logprobs of a real engine, one subprocess per checkpoint) and through the transformers
reference; the two must agree within 0.5 %.  Results go to
``bench/results/quality.json``, ``docs/quality.md`` and ``docs/quality.png``.

    python bench/quality.py [--model DIR] [--only camera-p,mc-like] [--skip-vllm]

``--only`` recomputes just the rows whose method starts with one of the prefixes and keeps
every other row of the existing JSON (refused if that JSON used other windows or
calibration).  Every row records the commit (and dirty flag) of the code that produced
it; the file's stamp is the latest run's.  Checkpoints are rebuilt on every run
(``--reuse-checkpoints`` scores those cached in ``bench/.cache/quality`` as they are, and
marks the rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import baselines
import ppl
import text_data
from stamp import add_stamp_args, stamp

from camera_vllm.compress.calibrate import CalibSpec

ROOT = Path(__file__).resolve().parent
CKPTS = ROOT / ".cache" / "quality"
RESULTS = ROOT / "results"
DOCS = ROOT.parent / "docs"


def _expert_bytes(ckpt: Path) -> int:
    from camera_vllm.format.inspect import summarize

    s = summarize(ckpt)
    return int(s["totals"]["stored_bytes"] or 0)


def _dense_expert_bytes(model: Path) -> int:
    from compressor_cost import dense_bytes

    return dense_bytes(model)["expert_bytes"]


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
            rows.append(
                (f"camera-q {m}", label, {"kind": "q", "avg_bits": bits, "method": m, "group_size": 128})
            )
    # MC-like: one bit-width per expert (1-4) at CAMERA-Q's bytes, same group size.
    for bits, label in ((2.25, "2.25 bpw"), (2.5, "2.5 bpw")):
        for m in ("rtn", "gptq"):
            rows.append(
                (f"mc-like {m}", label, {"kind": "mc", "avg_bits": bits, "method": m, "group_size": 128})
            )
    # Uniform baselines at the same bytes: 2 bits with g128 = 2.25 bpw, with g64 = 2.5 bpw.
    for m in ("rtn", "gptq"):
        rows.append(
            (
                f"uniform {m} 2-bit",
                "2.25 bpw (g128)",
                {"kind": "q", "bits": [2], "fractions": [1.0], "method": m, "group_size": 128},
            )
        )
        rows.append(
            (
                f"uniform {m} 2-bit",
                "2.5 bpw (g64)",
                {"kind": "q", "bits": [2], "fractions": [1.0], "method": m, "group_size": 64},
            )
        )
        rows.append(
            (
                f"uniform {m} 3-bit",
                "3.25 bpw (g128)",
                {"kind": "q", "bits": [3], "fractions": [1.0], "method": m, "group_size": 128},
            )
        )
    return rows


def build(model: Path, name: str, kw: dict, calib_file: Path, calib: CalibSpec, reuse: bool = False) -> Path:
    from camera_vllm.compress.pipeline import RunOptions, run_camera_p
    from camera_vllm.compress.quantize.pipeline import QuantSpec, run_camera_q

    out = CKPTS / name
    if out.exists():
        if reuse:
            return out
        shutil.rmtree(out)  # built by whatever code ran last: rebuild so the row's commit is true
    kind = kw.get("kind")
    if kind == "p":
        return run_camera_p(
            model, out, kw["ratio"], [calib_file], scope=kw["scope"], options=RunOptions(calib=calib)
        )
    if kind == "b":
        return baselines.run_baseline_p(model, out, kw["method"], kw["ratio"], [calib_file], calib=calib)
    if kind == "mc":
        return baselines.run_mc_like_q(
            model,
            out,
            kw["avg_bits"],
            [calib_file],
            method=kw["method"],
            group_size=kw["group_size"],
            calib=calib,
        )
    if kind == "q":
        spec = QuantSpec(
            avg_bits=kw.get("avg_bits"),
            bits=None if kw.get("bits") is None else tuple(kw["bits"]),
            fractions=None if kw.get("fractions") is None else tuple(kw["fractions"]),
            group_size=kw["group_size"],
            method=kw["method"],
        )
        return run_camera_q(model, out, [calib_file], spec, options=RunOptions(calib=calib))
    return model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / ".cache" / "models" / "qwen3moe-shakespeare")
    p.add_argument("--num-seqs", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--only", default=None, help="comma-separated method prefixes to run")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument(
        "--reuse-checkpoints",
        action="store_true",
        help="score cached checkpoints in bench/.cache/quality as they are instead of rebuilding them",
    )
    add_stamp_args(p)
    args = p.parse_args(argv)
    here = stamp(allow_dirty=args.allow_dirty, argv=argv)
    if not (args.model / "config.json").exists():
        raise SystemExit(f"{args.model}: no benchmark model; run `make bench-model` first")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    data_dir = ROOT / ".cache" / "text"
    calib_file, held_file = text_data.write_split(data_dir)
    windows = ppl.token_windows(args.model, held_file.read_text(), args.seq_len, args.windows)
    calib = CalibSpec(num_seqs=args.num_seqs, seq_len=args.seq_len, seed=0)
    out_json = RESULTS / "quality.json"
    setup = {
        "model": str(args.model.name),
        "windows": len(windows),
        "seq_len": args.seq_len,
        "calibration": vars(calib),
    }
    previous: list[dict] = []
    if out_json.exists() and args.only:
        old = json.loads(out_json.read_text())
        differs = {k: (old.get(k), v) for k, v in setup.items() if old.get(k) != v}
        if differs:
            raise SystemExit(
                f"{out_json}: --only would merge rows measured on another setup {differs}; "
                "rerun the whole table instead"
            )
        old_stamp = old.get("stamp", old)  # files from before the one stamp layout: at top level
        for r in old["rows"]:  # rows from before per-row stamps were produced by the file's commit
            r.setdefault("commit", old_stamp.get("commit"))
            r.setdefault("dirty", old_stamp.get("dirty", old_stamp.get("dirty_tree")))
        previous = old["rows"]
    done = {(r["method"], r["setting"]): r for r in previous}
    rows = []
    for method, setting, kw in settings():
        if args.only and not any(method.startswith(o) for o in args.only.split(",")):
            if (method, setting) in done:
                rows.append(done[(method, setting)])
            continue
        name = checkpoint_name(method, setting)
        t0 = time.time()
        reused = bool(kw) and args.reuse_checkpoints and (CKPTS / name).exists()
        ckpt = build(args.model, name, kw, calib_file, calib, reuse=args.reuse_checkpoints)
        t_build = time.time() - t0
        ref = ppl.ppl_reference(ckpt, windows)
        served = None
        if not args.skip_vllm:
            res = subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "ppl.py"),
                    str(ckpt),
                    "--text",
                    str(held_file),
                    "--seq-len",
                    str(args.seq_len),
                    "--windows",
                    str(args.windows),
                    "--backend",
                    "vllm",
                    "--json",
                ],
                capture_output=True,
                text=True,
            )
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            if res.returncode != 0 or not lines:
                print(res.stderr[-3000:], file=sys.stderr)
                served = None
            else:
                served = json.loads(lines[-1])["ppl"]
        row = {
            "method": method,
            "setting": setting,
            "ppl_served": served,
            "ppl_reference": round(ref, 4),
            "served_vs_reference": None if served is None else round(served / ref - 1, 5),
            "expert_bytes": _expert_bytes(ckpt) if kw else _dense_expert_bytes(ckpt),
            "compress_seconds": round(t_build, 1),
            "checkpoint": str(ckpt.relative_to(ROOT.parent))
            if ckpt.is_relative_to(ROOT.parent)
            else str(ckpt),
            "commit": here["commit"],
            "dirty": here["dirty"],
        }
        if not kw:
            row["note"] = "expert bytes = fp32 expert matrices of the dense model"
        if reused:
            row["checkpoint_reused"] = (
                True  # built earlier, maybe by other code: only the scoring is this commit's
            )
        print(json.dumps(row), flush=True)
        rows.append(row)
        RESULTS.mkdir(exist_ok=True)
        _write_json(out_json, here, setup, rows, done)
    _write_json(out_json, here, setup, rows, done)
    write_docs(rows)


def _write_json(path: Path, here: dict, setup: dict, rows: list[dict], done: dict) -> None:
    """The table so far, in table order, with the rows not rerun yet kept from the previous file."""
    order = [(m, s) for m, s, _ in settings()]
    have = {(r["method"], r["setting"]): r for r in rows}
    merged = [have.get(k) or done[k] for k in order if k in have or k in done]
    commits = sorted({r.get("commit") or "" for r in merged} - {""})
    path.write_text(
        json.dumps(
            {
                "stamp": here,
                **setup,
                "row_commits": commits,
                "note": "stamp: the latest run; each row's commit: the code that produced it",
                "rows": merged,
            },
            indent=2,
        )
        + "\n"
    )


TIE_PCT = 0.5  # perplexity gap (%) below which two rows are called equal in the generated text


def _mc_verdict(rows: list[dict]) -> list[str]:
    """Generated comparison of CAMERA-Q with the MC-like baseline at equal bytes (empty without MC rows)."""
    by = {(r["method"], r["setting"]): r for r in rows}
    pairs = [
        (m, s)
        for m in ("rtn", "gptq")
        for s in ("2.25 bpw", "2.5 bpw")
        if (f"camera-q {m}", s) in by and (f"mc-like {m}", s) in by
    ]
    if not pairs:
        return []
    out = [
        "",
        "## CAMERA-Q vs MC-like (expert-level mixed precision)",
        "",
        "MC-like follows Mixture Compressor's idea: each routed expert gets one bit-width (1-4) for all "
        "its weights, chosen per layer by an exact knapsack that minimises "
        "sum(importance x measured RTN error) under CAMERA-Q's byte budget; importance = "
        "sqrt(routing share x CAMERA-energy share). Same group size (128), same GPTQ/RTN code, "
        "same calibration, all scale/zero bytes counted. Its checkpoint is a CAMERA-Q checkpoint "
        "whose experts each fill one slab, served by the same vLLM path. Neither method removes "
        "weights here: MC-like gives at least 1 bit even to experts the calibration never routes to, "
        "and CAMERA-Q runs without pruning.",
        "",
    ]
    uniform = {"2.25 bpw": "2.25 bpw (g128)", "2.5 bpw": "2.5 bpw (g64)"}
    wins = losses = 0
    for m, s in pairs:
        c, b = by[(f"camera-q {m}", s)], by[(f"mc-like {m}", s)]
        pc, pb = c["ppl_reference"], b["ppl_reference"]
        gap = (pb / pc - 1) * 100
        # 32 windows of 256 tokens: differences under TIE_PCT are not a result.
        if abs(gap) < TIE_PCT:
            verdict = f"about equal (within {TIE_PCT} %)"
        else:
            verdict = "CAMERA-Q wins" if gap > 0 else "MC-like wins"
            wins, losses = wins + (gap > 0), losses + (gap < 0)
        u = by.get((f"uniform {m} 2-bit", uniform[s]))
        ref = "" if u is None else f"; uniform 2-bit {m.upper()} at the same bytes: {u['ppl_reference']:.2f}"
        out.append(
            f"- {s}, {m.upper()}: CAMERA-Q {pc:.2f} ({c['expert_bytes']} B) vs MC-like {pb:.2f} "
            f"({b['expert_bytes']} B), MC-like {gap:+.2f} %: {verdict}{ref}."
        )
    out += [
        "",
        f"Of {len(pairs)} comparisons CAMERA-Q wins {wins}, MC-like wins {losses}, "
        f"the rest are within {TIE_PCT} %.",
    ]
    return out


def checkpoint_name(method: str, setting: str) -> str:
    """The cache directory name of a row's checkpoint (``bench/lm_eval_run.py`` serves the same ones)."""
    return f"{method}-{setting}".replace(" ", "_").replace("%", "pct").replace("(", "").replace(")", "")


# bench/lm_eval_run.py owns everything from this marker on in docs/quality.md.
LM_EVAL_SECTION = "<!-- lm-eval section: generated by bench/lm_eval_run.py -->"


def write_docs(rows: list[dict]) -> None:
    """Markdown table in docs/quality.md and a bar chart in docs/quality.png."""
    from matplotlib.figure import Figure

    DOCS.mkdir(exist_ok=True)
    lines = [
        "# Quality: perplexity on held-out Shakespeare",
        "",
        "Generated by `bench/quality.py` from `bench/results/quality.json`.",
        "",
        "| method | setting | ppl (vLLM) | ppl (reference) | expert bytes |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        served = "-" if r["ppl_served"] is None else f"{r['ppl_served']:.2f}"
        lines.append(
            f"| {r['method']} | {r['setting']} | {served} | {r['ppl_reference']:.2f} | {r['expert_bytes']} |"
        )
    lines += _mc_verdict(rows)
    commits = sorted(
        {
            (r.get("commit") or "")[:10] + (" (dirty tree)" if r.get("dirty", r.get("dirty_tree")) else "")
            for r in rows
            if r.get("commit")
        }
    )
    if commits:
        lines += [
            "",
            f"Rows were produced by commit(s) {', '.join(f'`{c}`' for c in commits)}; "
            "`bench/results/quality.json` records the commit of every row.",
        ]
    doc = DOCS / "quality.md"
    kept = ""
    if doc.exists() and LM_EVAL_SECTION in doc.read_text():
        kept = "\n" + LM_EVAL_SECTION + doc.read_text().partition(LM_EVAL_SECTION)[2]
    doc.write_text("\n".join(lines) + "\n" + kept)
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
