"""What compressing costs: time and peak memory of the CAMERA pipeline, and checkpoint bytes.

On the benchmark MoE (``make bench-model``):

* CAMERA analysis (``camera-vllm analyze``: energy scoring of every micro-expert) and
  CAMERA-P (``camera-vllm prune --ratio 0.5``: score, prune, re-run, write) at several
  calibration sizes, from 2 k tokens up to the CLI default (128 windows of 1024 tokens,
  the model's context);
* CAMERA-Q at 2.25 bits per weight with RTN and with GPTQ, and at 2.5 with GPTQ, at the
  default calibration size;
* the bytes of the written checkpoints against the dense model: whole directory on disk,
  safetensors files, and expert matrices alone.

Each run reads a calibration file cut from the training split to about twice the text
its windows need (so tokenizing grows with the calibration size, as it does for a user
who brings a file of the right size); one extra run only tokenizes the whole 4.5 MB
training split, to show what a large single-document file costs by itself.

Every run is a fresh subprocess and reports its own peak resident memory (``VmHWM`` of
``/proc/self/status``, read as it finishes; the high-water mark restarts at ``exec``, unlike
``ru_maxrss``, which keeps the resident size of the forked parent).  An ``import floor``
run that only imports the pipeline and loads the tokenizer shows how much of it is the
Python/torch baseline.  Time is
``perf_counter`` around the pipeline call inside the child (imports excluded), the CPU
time of that call (``process_time``: all threads of the child; with one torch thread it
is the work itself and hardly changes when the machine is shared, unlike wall time) and,
for reference, the whole child's wall time.

Results go to ``bench/results/compressor-cost.json`` (stamped), ``docs/compressor-cost.md``
and ``docs/compressor-cost.png``.

    python bench/compressor_cost.py [--model DIR] [--tokens 2048,8192,...] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stamp import add_stamp_args, stamp

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DOCS = ROOT.parent / "docs"
WORK = ROOT / ".cache" / "cost"
DEFAULT_MODEL = ROOT / ".cache" / "models" / "qwen3moe-shakespeare"
SEQ_LEN = 1024  # the benchmark model's context: the CLI default min(2048, max positions)
CHARS_PER_TOKEN = 3.1  # of the benchmark tokenizer on Shakespeare (measured: 3.07)
DEFAULT_TOKENS = (2048, 8192, 32768, 65536, 131072)  # 131072 = the CLI default, 128 x 1024


# -- measuring one child process ---------------------------------------------------------------------
def peak_rss_self() -> int:
    """This process's peak resident set size in bytes (``VmHWM``), reset by ``exec``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line (not Linux?)")


def run_measured(
    cmd: list[str], *, env: dict[str, str] | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Run ``cmd`` to completion; return its exit code, stdout, stderr tail, wall time and ``ru_maxrss``.

    ``ru_maxrss_bytes`` is this child's own (``os.wait4``, not the maximum over all children
    as ``RUSAGE_CHILDREN`` gives) but, being kept across ``exec``, it is at least the resident
    size of the parent at fork time: an upper bound.  Children that can should report
    :func:`peak_rss_self` instead.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        return {
            "returncode": proc.returncode,
            "stdout": out.read().decode(errors="replace"),
            "stderr_tail": err.read().decode(errors="replace")[-4000:],
            "wall_seconds": wall,
            "ru_maxrss_bytes": int(usage.ru_maxrss) * 1024,  # Linux reports KiB
        }


# -- the child side ----------------------------------------------------------------------------------
def _worker(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in this process (called in the child); returns what it measured inside."""
    import torch
    import transformers  # noqa: F401  (imported before the clock starts, like torch)

    torch.set_num_threads(job["threads"])
    from camera_vllm.compress.calibrate import CalibSpec, load_calibration
    from camera_vllm.compress.pipeline import RunOptions, analyze, run_camera_p
    from camera_vllm.compress.quantize.pipeline import QuantSpec, run_camera_q

    model, calib_file = job["model"], job["calib"]
    spec = CalibSpec(num_seqs=job.get("num_seqs", 1), seq_len=job.get("seq_len"), seed=0)
    out = Path(job["out"]) if job.get("out") else None
    options = RunOptions(calib=spec, device="cpu", progress=False)
    t0, c0 = time.perf_counter(), time.process_time()
    op = job["op"]
    if op == "floor":
        # Imports, tokenizer and calibration tokens: everything a run pays before scoring.
        load_calibration(model, [calib_file], spec)
    elif op == "analyze":
        analyze(model, [calib_file], out, options=options)
    elif op == "prune":
        run_camera_p(model, out, job["ratio"], [calib_file], options=options)
    elif op == "quantize":
        quant = QuantSpec(avg_bits=job["avg_bits"], method=job["method"], group_size=job["group_size"])
        run_camera_q(model, out, [calib_file], quant, options=options)
    else:
        raise ValueError(f"unknown job op {op!r}")
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "peak_rss_bytes": peak_rss_self(),
    }


# -- checkpoint bytes --------------------------------------------------------------------------------
def checkpoint_bytes(ckpt: Path) -> dict[str, int]:
    """On-disk bytes of a checkpoint directory: all files, the safetensors, the expert matrices."""
    from camera_vllm.format.inspect import summarize

    files = [p for p in ckpt.iterdir() if p.is_file()]
    s = summarize(ckpt)
    return {
        "dir_bytes": sum(p.stat().st_size for p in files),
        "safetensors_bytes": sum(p.stat().st_size for p in files if p.suffix == ".safetensors"),
        "expert_bytes": int(s["totals"]["stored_bytes"] or 0),
    }


def dense_bytes(model: Path) -> dict[str, int]:
    """The dense model's bytes, with its expert matrices counted from the safetensors headers."""
    from safetensors import safe_open

    from camera_vllm.checkpoint.source import SourceCheckpoint

    src = SourceCheckpoint(model)
    expert_names = set()
    for layer in src.arch.moe_layers:
        expert_names |= src.expert_tensor_names(layer) | src.shared_tensor_names(layer)
    expert, params = 0, 0
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for name in h.keys():
                if name in expert_names:
                    sl = h.get_slice(name)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    params += n
                    expert += n * {"F32": 4, "BF16": 2, "F16": 2}[sl.get_dtype()]
    files = [p for p in model.iterdir() if p.is_file()]
    return {
        "dir_bytes": sum(p.stat().st_size for p in files),
        "safetensors_bytes": sum(p.stat().st_size for p in files if p.suffix == ".safetensors"),
        "expert_bytes": expert,
        "expert_params": params,
    }


# -- the parent side ---------------------------------------------------------------------------------
def jobs(tokens: list[int]) -> list[dict[str, Any]]:
    """Every run of the benchmark, in order (cheap ones first)."""
    default = max(tokens)
    out: list[dict[str, Any]] = [
        {"op": "floor", "num_seqs": 1, "seq_len": SEQ_LEN, "label": "import floor"},
        {
            "op": "floor",
            "num_seqs": 1,
            "seq_len": SEQ_LEN,
            "label": "tokenize whole train split",
            "full_text": True,
        },
    ]
    for t in tokens:
        out.append(
            {
                "op": "analyze",
                "num_seqs": t // SEQ_LEN if t >= SEQ_LEN else 1,
                "seq_len": min(t, SEQ_LEN),
                "label": "analyze",
            }
        )
    for t in tokens:
        out.append(
            {
                "op": "prune",
                "ratio": 0.5,
                "num_seqs": t // SEQ_LEN if t >= SEQ_LEN else 1,
                "seq_len": min(t, SEQ_LEN),
                "label": "camera-p 50%",
                "ckpt": "camera-p-50" if t == default else None,
            }
        )
    n = default // SEQ_LEN
    out += [
        {
            "op": "prune",
            "ratio": 0.25,
            "num_seqs": n,
            "seq_len": SEQ_LEN,
            "label": "camera-p 25%",
            "ckpt": "camera-p-25",
        },
        {
            "op": "quantize",
            "avg_bits": 2.25,
            "method": "rtn",
            "group_size": 128,
            "num_seqs": n,
            "seq_len": SEQ_LEN,
            "label": "camera-q rtn 2.25",
            "ckpt": "camera-q-rtn-2.25",
        },
        {
            "op": "quantize",
            "avg_bits": 2.25,
            "method": "gptq",
            "group_size": 128,
            "num_seqs": n,
            "seq_len": SEQ_LEN,
            "label": "camera-q gptq 2.25",
            "ckpt": "camera-q-gptq-2.25",
        },
        {
            "op": "quantize",
            "avg_bits": 2.5,
            "method": "gptq",
            "group_size": 128,
            "num_seqs": n,
            "seq_len": SEQ_LEN,
            "label": "camera-q gptq 2.5",
            "ckpt": "camera-q-gptq-2.5",
        },
    ]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument(
        "--tokens",
        default=",".join(map(str, DEFAULT_TOKENS)),
        help="calibration token counts (multiples of 1024 above 1024)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads in every run (recorded)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # JSON job: run it here and print the result
    add_stamp_args(p)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))), flush=True)
        return
    if not (args.model / "config.json").exists():
        raise SystemExit(f"{args.model}: no benchmark model; run `make bench-model` first")
    tokens = sorted(int(t) for t in args.tokens.split(","))
    bad = [t for t in tokens if t > SEQ_LEN and t % SEQ_LEN]
    if bad:
        raise SystemExit(f"--tokens: {bad} are not multiples of {SEQ_LEN}")

    import text_data
    from tqdm.auto import tqdm

    # Before the runs: the code that produces the numbers (a dirty tree is refused here).
    here = stamp(allow_dirty=args.allow_dirty, argv=argv)
    train_file, _ = text_data.write_split(ROOT / ".cache" / "text")
    train = train_file.read_text()
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    runs, ckpts = [], {}
    all_jobs = jobs(tokens)
    for i, job in enumerate(tqdm(all_jobs, desc="compressor cost", unit="run")):
        want = job["num_seqs"] * job["seq_len"]
        if job.get("full_text"):
            calib_file = train_file
        else:
            # About twice the text the windows need (windows are drawn at random offsets).
            calib_file = WORK / f"calib-{want}.txt"
            if not calib_file.exists():
                calib_file.write_text(train[: int(2 * want * CHARS_PER_TOKEN)])
        job = {
            **job,
            "model": str(args.model),
            "calib": str(calib_file),
            "threads": args.threads,
            "calib_chars": len(train) if job.get("full_text") else int(2 * want * CHARS_PER_TOKEN),
        }
        out = WORK / f"run{i:02d}-{job['op']}"
        if job["op"] == "analyze":
            out = out.with_suffix(".safetensors")
        job["out"] = None if job["op"] == "floor" else str(out)
        load_before = os.getloadavg()[0]
        res = run_measured(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
            env=env,
            timeout=args.timeout,
        )
        lines = [ln for ln in res["stdout"].splitlines() if ln.startswith("{")]
        if res["returncode"] != 0 or not lines:
            raise SystemExit(f"run {job['label']} failed (exit {res['returncode']}):\n{res['stderr_tail']}")
        inner = json.loads(lines[-1])
        row = {
            "label": job["label"],
            "op": job["op"],
            "calibration_tokens": job["num_seqs"] * job["seq_len"],
            "num_seqs": job["num_seqs"],
            "seq_len": job["seq_len"],
            "seconds": round(inner["seconds"], 2),
            "cpu_seconds": round(inner["cpu_seconds"], 2),
            "wall_seconds": round(res["wall_seconds"], 2),
            "peak_rss_bytes": inner["peak_rss_bytes"],
            # The machine may be shared: the 1-minute load average before and after the run.
            "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
        for k in ("calib_chars", "ratio", "avg_bits", "method", "group_size"):
            if k in job:
                row[k] = job[k]
        tqdm.write(json.dumps(row))
        runs.append(row)
        if job.get("ckpt"):
            ckpts[job["ckpt"]] = out
        if job["op"] == "prune" and not job.get("ckpt"):
            shutil.rmtree(out, ignore_errors=True)  # timing-only run; keep the disk small

    dense = dense_bytes(args.model)
    sizes = [{"checkpoint": "dense (fp32)", **dense}]
    for name, path in ckpts.items():
        b = checkpoint_bytes(path)
        sizes.append(
            {
                "checkpoint": name,
                **b,
                **{
                    f"{k}_vs_dense": round(b[k] / dense[k], 4)
                    for k in ("dir_bytes", "safetensors_bytes", "expert_bytes")
                },
                "expert_bytes_vs_dense_bf16": round(b["expert_bytes"] / (2 * dense["expert_params"]), 4),
            }
        )
    result = {
        "stamp": here,
        "model": args.model.name,
        "torch_threads": args.threads,
        "seq_len": SEQ_LEN,
        "runs": runs,
        "checkpoint_bytes": sizes,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compressor-cost.json").write_text(json.dumps(result, indent=2) + "\n")
    write_docs(result)
    shutil.rmtree(WORK, ignore_errors=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def write_docs(result: dict[str, Any]) -> None:
    """docs/compressor-cost.md (tables) and docs/compressor-cost.png (time and peak RSS vs tokens)."""
    from matplotlib.figure import Figure

    runs = result["runs"]
    floor = next((r for r in runs if r["op"] == "floor"), None)
    m = result["stamp"]["machine"]
    lines = [
        "# Compressor cost",
        "",
        "Generated by `bench/compressor_cost.py` from `bench/results/compressor-cost.json`: "
        f"model `{result['model']}`, {m['cpu_count']} CPUs ({m['device']}), torch threads "
        f"{result['torch_threads']}, commit `{(result['stamp']['commit'] or '')[:10]}`.",
        "",
        "Each run is its own process. *seconds* is the wall time of the pipeline call (imports excluded), "
        "*CPU seconds* its CPU time (the steadier number on a shared machine); *peak RSS* is "
        "that process's maximum resident memory, imports included"
        + (
            " (the import floor: Python, torch, transformers and the tokenizer, is "
            f"{_mib(floor['peak_rss_bytes'])} MiB)."
            if floor
            else "."
        )
        + " Calibration files hold about twice the text their windows need.",
        "",
        f"The machine has {m['cpu_count']} cores and may be shared: a load average well above that means "
        "other work ran at the same time and the seconds are inflated (peak RSS is not affected).",
        "",
        "## Time and memory vs calibration tokens",
        "",
        "| run | calibration tokens | calibration file chars | seconds | CPU seconds | process wall s "
        "| peak RSS MiB | load avg before/after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        tokens = "-" if r["op"] == "floor" else r["calibration_tokens"]
        lines.append(
            f"| {r['label']} | {tokens} | {r['calib_chars']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} "
            f"| {r['wall_seconds']:.1f} | {_mib(r['peak_rss_bytes'])} "
            f"| {r['loadavg_1min'][0]:.1f} / {r['loadavg_1min'][1]:.1f} |"
        )
    lines += [
        "",
        "## Checkpoint bytes vs dense",
        "",
        "| checkpoint | directory MiB | safetensors MiB | expert MiB | expert vs dense fp32 "
        "| expert vs dense bf16 | safetensors vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in result["checkpoint_bytes"]:
        dense = "dense" in s["checkpoint"]
        lines.append(
            f"| {s['checkpoint']} | {_mib(s['dir_bytes'])} | {_mib(s['safetensors_bytes'])} "
            f"| {_mib(s['expert_bytes'])} "
            f"| {'1' if dense else s['expert_bytes_vs_dense']} "
            f"| {'2' if dense else s['expert_bytes_vs_dense_bf16']} "
            f"| {'1' if dense else s['safetensors_bytes_vs_dense']} |"
        )
    lines += [
        "",
        "The benchmark model is stored in fp32; CAMERA-P keeps the model dtype, CAMERA-Q stores packed "
        "codes with fp16 scales and zeros. Embeddings, attention and router are unchanged in every "
        "checkpoint, so the whole-file ratio is above the expert ratio.",
        "",
    ]
    DOCS.mkdir(exist_ok=True)
    (DOCS / "compressor-cost.md").write_text("\n".join(lines))

    fig = Figure(figsize=(10, 4))
    ax_t, ax_m = fig.subplots(1, 2)
    for op, label in (("analyze", "analyze (energies)"), ("prune", "CAMERA-P 50 %")):
        pts = [r for r in runs if r["op"] == op and r.get("ratio", 0.5) == 0.5]
        x = [r["calibration_tokens"] for r in pts]
        (line,) = ax_t.plot(x, [r["seconds"] for r in pts], "o-", label=f"{label}, wall")
        ax_t.plot(x, [r["cpu_seconds"] for r in pts], "o--", color=line.get_color(), label=f"{label}, CPU")
        ax_m.plot(x, [r["peak_rss_bytes"] / 2**20 for r in pts], "o-", label=label)
    for r in runs:
        if r["op"] == "quantize":
            (line,) = ax_t.plot([r["calibration_tokens"]], [r["seconds"]], "s", label=f"{r['label']}, wall")
            ax_t.plot(
                [r["calibration_tokens"]],
                [r["cpu_seconds"]],
                "s",
                mfc="none",
                color=line.get_color(),
                label=f"{r['label']}, CPU",
            )
            ax_m.plot([r["calibration_tokens"]], [r["peak_rss_bytes"] / 2**20], "s", label=r["label"])
    if floor:
        ax_m.axhline(
            floor["peak_rss_bytes"] / 2**20, color="k", linestyle="--", linewidth=1, label="import floor"
        )
    for ax, yl in ((ax_t, "seconds (pipeline call; wall and CPU)"), (ax_m, "peak RSS (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration tokens")
        ax.set_ylabel(yl)
        ax.grid(True, alpha=0.3)
    ax_t.legend(fontsize=8)
    ax_m.legend(fontsize=8)
    fig.suptitle(f"CAMERA compressor cost on {result['model']} (torch threads: {result['torch_threads']})")
    fig.tight_layout()
    fig.savefig(DOCS / "compressor-cost.png", dpi=110)


if __name__ == "__main__":
    main()
