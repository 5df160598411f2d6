"""Accuracy the way users measure it: lm-eval against ``vllm serve`` on each checkpoint.

For every checkpoint of the quality table (dense, CAMERA-P, CAMERA-Q and their baselines,
built and cached by ``bench/quality.py``'s own functions) this starts ``vllm serve``
(fp32, CPU), points lm-evaluation-harness's ``local-completions`` backend at it (echo +
logprobs, token ids from the checkpoint's own tokenizer) and runs the repo's tasks in
``bench/eval`` (LAMBADA-style last word and a multiple-choice cloze per held-out domain;
data from ``bench/eval/build_data.py``).  Results go to ``bench/results/eval.json`` and a
section of ``docs/quality.md`` (table) with ``docs/quality-eval.png`` (plot).

    python bench/lm_eval_run.py [--model DIR] [--only dense,camera-p] [--limit N]

``--only`` reruns the checkpoints whose method starts with a prefix and keeps the other
rows of an existing ``eval.json`` measured on the same tasks and data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "eval"))  # bench/eval/build_data.py; siblings come from sys.path[0]
import build_data  # noqa: E402
import load_test  # noqa: E402
import quality  # noqa: E402
from stamp import add_stamp_args, stamp  # noqa: E402

TASK_DIR = HERE / "eval"
RESULTS = HERE / "results" / "eval.json"
DOCS = REPO / "docs"
PLOT = DOCS / "quality-eval.png"
SECTION_BEGIN = quality.LM_EVAL_SECTION
SECTION_END = "<!-- end of lm-eval section -->"
MAX_MODEL_LEN = 512
# lm-eval's bootstrap for the perplexity stderr; its default (100k) takes minutes on 2 cores.
BOOTSTRAP_ITERS = 1000
# metric -> its column label in the generated table.
METRICS = {"acc": "acc", "acc_norm": "acc_norm", "perplexity": "word ppl"}


def _offline_env() -> None:
    # Local jsonl only: nothing may reach a hub (the tokenizer is the checkpoint's own).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def task_names(task_dir: Path = TASK_DIR) -> list[str]:
    """Names of the tasks defined by the YAML files of ``task_dir``."""
    return sorted(p.stem for p in task_dir.glob("camera_*.yaml"))


def task_config(template: str, name: str, data_file: Path) -> dict[str, Any]:
    """A task dict from one of the repo's templates (``lastword`` or ``cloze``) on another jsonl file."""
    import yaml

    cfg = yaml.safe_load((TASK_DIR / f"_{template}_template_yaml").read_text())
    cfg.pop("tag", None)  # the tag groups the repo's own tasks only
    cfg["task"] = name
    cfg["dataset_kwargs"] = {"data_files": {"test": str(data_file)}}
    return cfg


def evaluate(
    base_url: str,
    served_name: str,
    tokenizer_dir: Path,
    tasks: list[str | dict[str, Any]],
    *,
    include_path: Path | None = TASK_DIR,
    limit: int | None = None,
    log_samples: bool = False,
    batch_size: int = 8,
    max_length: int = MAX_MODEL_LEN,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` with ``local-completions`` on a running server; its results dict.

    Task YAMLs name their data files relative to the repository root, so the run happens there.
    """
    _offline_env()
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "base_url": f"{base_url}/v1/completions",
                "model": served_name,
                "tokenizer": str(tokenizer_dir),
                "tokenizer_backend": "huggingface",
                "tokenized_requests": True,
                "max_length": max_length,
                "batch_size": batch_size,
                "max_retries": 3,
                "timeout": 600,
            },
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            log_samples=log_samples,
            bootstrap_iters=BOOTSTRAP_ITERS,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    finally:
        os.chdir(cwd)


def result_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """``{task, metric, value, stderr, n}`` for every metric lm-eval reported (filter ``none``)."""
    rows = []
    for task, metrics in sorted(results["results"].items()):
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if filt != "none" or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                    "n": n,
                }
            )
    return rows


def serve(model_dir: Path, log: Path, *, eager: bool = True, max_num_seqs: int = 8) -> load_test.Server:
    """``vllm serve`` on ``model_dir`` (fp32, API key in the environment), healthy when returned."""
    cfg = load_test.LoadConfig(clients=max_num_seqs, eager=eager, max_model_len=MAX_MODEL_LEN)
    server = load_test.Server(model_dir, log, cfg)
    try:
        server.wait_healthy(cfg.start_timeout_s)
    except BaseException:
        server.stop()
        raise
    # lm-eval's API models send OPENAI_API_KEY as the bearer token.
    os.environ["OPENAI_API_KEY"] = server.api_key
    return server


def _data_digest(files: dict[str, Path]) -> str:
    h = hashlib.sha256()
    for task, path in sorted(files.items()):
        h.update(task.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=HERE / ".cache" / "models" / "qwen3moe-shakespeare")
    p.add_argument("--only", default=None, help="comma-separated method prefixes (as in bench/quality.py)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (a quick check)")
    p.add_argument("--lastword", type=int, default=500, help="last-word documents per domain")
    p.add_argument("--cloze", type=int, default=250, help="cloze documents per domain")
    p.add_argument("--rebuild", action="store_true", help="rebuild cached checkpoints (default: reuse)")
    p.add_argument("--compile", action="store_true", help="serve with torch.compile (default: eager)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--docs-only",
        action="store_true",
        help="only regenerate the docs/quality.md section and plot from bench/results/eval.json",
    )
    add_stamp_args(p)
    args = p.parse_args(argv)
    if args.docs_only:  # e.g. after bench/quality.py rewrote docs/quality.md
        old = json.loads(RESULTS.read_text())
        write_docs(old["rows"], old)
        return
    if not (args.model / "config.json").exists():
        raise SystemExit(f"{args.model}: no benchmark model; run `make bench-model` first")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import text_data

    from camera_vllm.compress.calibrate import CalibSpec

    files = build_data.build(lastword=args.lastword, cloze=args.cloze)
    tasks = task_names()
    missing = sorted(set(tasks) - set(files))
    if missing:
        raise SystemExit(f"{TASK_DIR}: tasks {missing} have no data from bench/eval/build_data.py")
    calib_file, _ = text_data.write_split(HERE / ".cache" / "text")
    calib = CalibSpec(num_seqs=64, seq_len=256, seed=0)  # bench/quality.py's calibration
    here = stamp(allow_dirty=args.allow_dirty, argv=argv)
    setup = {
        "model": args.model.name,
        "tasks": tasks,
        "limit": args.limit,
        "data": {"lastword": args.lastword, "cloze": args.cloze, "sha256_16": _data_digest(files)},
        "harness": _harness_version(),
    }
    previous = _previous_rows(args.out, setup) if args.only else []
    rows = [
        r
        for r in previous
        if not (args.only and any(r["checkpoint"]["method"].startswith(o) for o in args.only.split(",")))
    ]
    logs = HERE / ".cache" / "eval-logs"
    logs.mkdir(parents=True, exist_ok=True)
    for method, setting, kw in quality.settings():
        if args.only and not any(method.startswith(o) for o in args.only.split(",")):
            continue
        name = quality.checkpoint_name(method, setting)
        reused = bool(kw) and not args.rebuild and (quality.CKPTS / name).exists()
        ckpt = quality.build(args.model, name, kw, calib_file, calib, reuse=not args.rebuild)
        t0 = time.time()
        server = serve(ckpt, logs / f"{name}.log", eager=not args.compile)
        try:
            results = evaluate(server.url, load_test.SERVED_NAME, ckpt, tasks, limit=args.limit)
        finally:
            server.stop()
        where = {
            "method": method,
            "setting": setting,
            "path": str(ckpt.relative_to(REPO)) if ckpt.is_relative_to(REPO) else str(ckpt),
        }
        if reused:
            where["reused"] = True  # built earlier, maybe by other code: only the scoring is this run's
        for r in result_rows(results):
            r.update(checkpoint=where, commit=here["commit"], dirty=here["dirty"])
            rows.append(r)
            print(json.dumps(r), flush=True)
        print(f"[eval] {method} / {setting}: {time.time() - t0:.0f} s", flush=True)
        _write_json(args.out, here, setup, rows)
    _write_json(args.out, here, setup, rows)
    if args.out == RESULTS:
        write_docs(rows, setup)


def _harness_version() -> str:
    from importlib.metadata import version

    return f"lm-eval {version('lm-eval')}"


def _previous_rows(path: Path, setup: dict[str, Any]) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    differs = {k: (old.get(k), v) for k, v in setup.items() if old.get(k) != v}
    if differs:
        raise SystemExit(
            f"{path}: --only would merge rows measured on another setup {differs}; rerun the whole table"
        )
    return old["rows"]


def _order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import quality

    rank = {(m, s): i for i, (m, s, _) in enumerate(quality.settings())}
    return sorted(
        rows,
        key=lambda r: (
            rank.get((r["checkpoint"]["method"], r["checkpoint"]["setting"]), len(rank)),
            r["task"],
            r["metric"],
        ),
    )


def _write_json(path: Path, here: dict, setup: dict, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = _order(rows)
    doc = {
        "stamp": here,
        **setup,
        "row_commits": sorted({r["commit"] or "" for r in ordered} - {""}),
        "note": "stamp: the latest run; each row's commit: the code that produced it",
        "rows": ordered,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _fmt(metric: str, value: float, stderr: float | None) -> str:
    if metric == "perplexity":
        return (
            f"{value:.1f}" if stderr is None or not math.isfinite(stderr) else f"{value:.1f} ± {stderr:.1f}"
        )
    return f"{value:.3f}" if stderr is None else f"{value:.3f} ± {stderr:.3f}"


def markdown(rows: list[dict[str, Any]], setup: dict[str, Any], plot_name: str = PLOT.name) -> str:
    """The docs/quality.md section: one line per checkpoint, one column per (task, metric)."""
    rows = _order(rows)
    cols = sorted({(r["task"], r["metric"]) for r in rows}, key=lambda c: (c[0], list(METRICS).index(c[1])))
    ckpts: dict[tuple[str, str], dict] = {}
    for r in rows:
        ckpts.setdefault((r["checkpoint"]["method"], r["checkpoint"]["setting"]), {})[
            (r["task"], r["metric"])
        ] = r
    head = [f"{t.removeprefix('camera_')} {METRICS[m]}" for t, m in cols]
    n = sorted({(r["task"], r["n"]) for r in rows})
    lines = [
        SECTION_BEGIN,
        "## Accuracy with lm-eval (served model)",
        "",
        f"Generated by `bench/lm_eval_run.py` from `bench/results/eval.json`: {setup.get('harness')} "
        "`local-completions` against `vllm serve` (fp32, CPU) on the tasks in `bench/eval` "
        "(documents per task: " + ", ".join(f"{t.removeprefix('camera_')} {k}" for t, k in n) + "). "
        "`lastword`: accuracy of the greedy last word and per-word perplexity (lower is better); "
        "`cloze`: 1-of-4 next-sentence accuracy (chance 0.25), `acc_norm` normalised by length. "
        "± is lm-eval's standard error.",
        "",
        "| method | setting | " + " | ".join(head) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for (method, setting), by in ckpts.items():
        cells = [_fmt(m, by[(t, m)]["value"], by[(t, m)]["stderr"]) if (t, m) in by else "-" for t, m in cols]
        lines.append(f"| {method} | {setting} | " + " | ".join(cells) + " |")
    commits = sorted({(r["commit"] or "")[:10] + (" (dirty tree)" if r["dirty"] else "") for r in rows})
    lines += ["", f"Rows were produced by commit(s) {', '.join(f'`{c}`' for c in commits)}.", ""]
    lines += [f"![lm-eval accuracy per checkpoint]({plot_name})", SECTION_END]
    return "\n".join(lines) + "\n"


def write_docs(
    rows: list[dict[str, Any]], setup: dict[str, Any], doc: Path = DOCS / "quality.md", plot_path: Path = PLOT
) -> None:
    """Replace (or append) the lm-eval section of ``doc`` and draw the plot next to it."""
    section = markdown(rows, setup, plot_path.name)
    text = doc.read_text() if doc.exists() else ""
    if SECTION_BEGIN in text and SECTION_END in text:
        before, _, rest = text.partition(SECTION_BEGIN)
        _, _, after = rest.partition(SECTION_END)
        text = before + section.rstrip("\n") + after
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    doc.write_text(text)
    plot(rows, plot_path)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy per checkpoint, one bar per task (acc of every task)."""
    from matplotlib.figure import Figure

    rows = [r for r in _order(rows) if r["metric"] == "acc"]
    labels = list(dict.fromkeys(f"{r['checkpoint']['method']} / {r['checkpoint']['setting']}" for r in rows))
    tasks = sorted({r["task"] for r in rows})
    fig = Figure(figsize=(10, 0.3 * len(labels) * max(1, len(tasks)) + 1.5))
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(tasks))
    for k, task in enumerate(tasks):
        by = {
            f"{r['checkpoint']['method']} / {r['checkpoint']['setting']}": r
            for r in rows
            if r["task"] == task
        }
        ys = [i + k * height for i, lab in enumerate(labels) if lab in by]
        vals = [by[lab]["value"] for lab in labels if lab in by]
        errs = [by[lab]["stderr"] or 0.0 for lab in labels if lab in by]
        ax.barh(ys, vals, height=height, xerr=errs, label=task.removeprefix("camera_"))
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))], labels)
    ax.invert_yaxis()
    ax.set_xlabel("lm-eval accuracy (higher is better; error bars: standard error)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
