"""Load test of ``vllm serve`` on a CAMERA checkpoint: concurrent streaming clients, memory watched.

Builds a tiny CAMERA-Q checkpoint (mixed 4/2/1-bit slabs, through ``camera-vllm
quantize``) unless ``--model`` is given, starts ``vllm serve`` on 127.0.0.1 with an API
key, and runs ``--clients`` streaming clients for a warm-up plus ``--duration`` seconds.
Each client loops requests: completions and chat, prompts of 8 to 400 characters,
``max_tokens`` from 1 to 64.  Every stream is checked (see ``load_client.check_stream``)
and the resident memory of the whole server process tree (API server, engine core,
workers) is sampled every few seconds.

Criteria (the exit status is 1 when one fails):
  * no failed request (transport error, timeout, HTTP status other than 200);
  * every stream complete: one finish_reason, usage, ``[DONE]``, token count right;
  * tree RSS at the end of the window at most ``--max-rss-growth-pct`` (5) above its value
    at the middle (minute 1 vs minute 2 for the default 120 s), each the mean of the
    samples in the last 10 s before the mark.

    python bench/load_test.py                        # 32 clients, 20 s warm-up + 120 s
    python bench/load_test.py --model DIR --clients 8 --duration 30 --out /tmp/load.json

Writes ``bench/results/load-serve.json`` and ``docs/load-serve.png`` by default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import load_client
from stamp import add_stamp_args, stamp

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "load-serve.json"
PLOT = ROOT / "docs" / "load-serve.png"
SERVED_NAME = "camera-load"
RSS_WINDOW_S = 10.0  # each RSS mark is the mean of the samples in this many seconds before it


@dataclass(frozen=True)
class LoadConfig:
    """How hard and how long to load the server, and what to accept."""

    clients: int = 32
    duration_s: float = 120.0
    warmup_s: float = 20.0
    sample_every_s: float = 3.0
    request_timeout_s: float = 120.0
    max_rss_growth_pct: float = 5.0
    seed: int = 0
    eager: bool = False
    max_model_len: int = 512
    start_timeout_s: float = 600.0
    seeded: bool = False  # sampled requests carry a seed (see load_client.make_request)
    serve_args: tuple[str, ...] = ()  # extra ``vllm serve`` arguments


def _say(msg: str) -> None:
    print(f"[load] {msg}", flush=True)


def _vllm_bin() -> list[str]:
    exe = Path(sys.executable).with_name("vllm")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def build_checkpoint(work: Path) -> Path:
    """A tiny CAMERA-Q checkpoint (RTN, 4/2/1-bit slabs, group 32) made by the project's CLI."""
    import torch

    from camera_vllm.testing.tiny_models import build_tiny_moe

    out = work / "tiny-qwen3-moe-camera-q"
    if (out / "config.json").exists():
        return out
    dense = build_tiny_moe("qwen3_moe", work / "tiny-qwen3-moe", dtype=torch.float32)
    calib = work / "calib.txt"
    calib.write_text(load_client.PROMPT_TEXT * 8)
    cmd = [
        str(Path(sys.executable).with_name("camera-vllm")),
        "quantize",
        str(dense),
        "--out",
        str(out),
        "--bits",
        "4,2,1",
        "--fractions",
        "0.25,0.5,0.25",
        "--group-size",
        "32",
        "--method",
        "rtn",
        "--calib",
        str(calib),
        "--num-seqs",
        "2",
        "--seq-len",
        "32",
        "--device",
        "cpu",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"camera-vllm quantize failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``vllm serve`` in its own session, with an API key passed through the environment."""

    def __init__(self, model: Path, log: Path, cfg: LoadConfig):
        self.model, self.log, self.port = model, log, _free_port()
        self.api_key = "load-" + secrets.token_hex(12)
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = (
            _vllm_bin()
            + [
                "serve",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--served-model-name",
                SERVED_NAME,
                "--dtype",
                "float32",
                "--max-model-len",
                str(cfg.max_model_len),
                "--max-num-seqs",
                str(max(cfg.clients, 1)),
            ]
            + (["--enforce-eager"] if cfg.eager else [])
            + list(cfg.serve_args)
        )
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["VLLM_API_KEY"] = self.api_key  # not on the command line
        env["VLLM_PLUGINS"] = "camera_vllm,camera_stats"
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(
                self.cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._seen: dict[int, Any] = {}

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def wait_healthy(self, timeout_s: float) -> float:
        """Seconds until ``/health`` answered 200; raises with the log tail if the server died."""
        start = time.monotonic()
        next_note = start + 30
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > next_note:
                _say(f"server starting ... {time.monotonic() - start:.0f} s")
                next_note += 30
            time.sleep(1.0)
        raise TimeoutError(f"vllm serve not healthy after {timeout_s:.0f} s (log {self.log})")

    def get_json(self, path: str) -> Any:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.api_key}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def tree_memory(self) -> dict[str, Any]:
        """RSS of the server and every process below it, in bytes, total and per process."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return {"rss": 0, "procs": {}}
        per: dict[str, int] = {}
        for p in procs:
            try:
                self._seen.setdefault(p.pid, p)
                key = f"{p.name()}[{p.pid}]"
                per[key] = p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return {"rss": sum(per.values()), "procs": per}

    def stop(self, timeout_s: float = 60.0) -> list[int]:
        """SIGTERM the server; pids of its processes still alive after ``timeout_s`` (then killed)."""
        import psutil

        self.tree_memory()  # remember the current children
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        children = [p for pid, p in self._seen.items() if pid != self.proc.pid]
        _, alive = psutil.wait_procs(children, timeout=timeout_s)
        for p in alive:  # only processes this server started
            p.kill()
        return [p.pid for p in alive]


class MemorySampler(threading.Thread):
    """Samples the server tree's RSS and the load average every ``every_s`` seconds."""

    def __init__(self, server: Server, t0: float, every_s: float):
        super().__init__(daemon=True)
        self.server, self.t0, self.every_s = server, t0, every_s
        self.samples: list[dict[str, Any]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            mem = self.server.tree_memory()
            if not mem["rss"]:  # the server is gone; nothing to sample
                break
            self.samples.append(
                {
                    "t": round(time.monotonic() - self.t0, 2),
                    "rss_mb": round(mem["rss"] / 2**20, 1),
                    "procs_mb": {k: round(v / 2**20, 1) for k, v in mem["procs"].items()},
                    "loadavg_1m": round(os.getloadavg()[0], 2),
                }
            )
            self._halt.wait(self.every_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))], 4)


def rss_mark(samples: list[dict[str, Any]], at: float, window: float = RSS_WINDOW_S) -> float | None:
    """Mean tree RSS (MiB) of the samples in ``(at - window, at]``."""
    vals = [s["rss_mb"] for s in samples if at - window < s["t"] <= at + 1e-6]
    return round(statistics.fmean(vals), 1) if vals else None


def _by_process(samples: list[dict[str, Any]], at: float, window: float = RSS_WINDOW_S) -> dict[str, float]:
    """Mean RSS (MiB) per server process over ``(at - window, at]``."""
    acc: dict[str, list[float]] = {}
    for s in samples:
        if at - window < s["t"] <= at + 1e-6:
            for name, mb in s["procs_mb"].items():
                acc.setdefault(name, []).append(mb)
    return {name: round(statistics.fmean(v), 1) for name, v in acc.items()}


def summarize(
    results: list[load_client.RequestResult], samples: list[dict[str, Any]], cfg: LoadConfig
) -> dict[str, Any]:
    """Counts, latencies, throughput, RSS marks and the pass/fail of each criterion."""
    measured = [r for r in results if r.start >= 0]
    failed = [r for r in results if r.failed]
    incomplete = [r for r in results if not r.failed and not r.complete]
    ok = [r for r in measured if r.complete]
    window = max(max((r.end for r in measured), default=cfg.duration_s), 1e-9)
    tokens = sum(r.check["completion_tokens"] for r in ok)
    reasons: dict[str, int] = {}
    for r in ok:
        reasons[r.check["finish_reason"]] = reasons.get(r.check["finish_reason"], 0) + 1
    m1, m2 = cfg.duration_s / 2, cfg.duration_s
    rss1, rss2 = rss_mark(samples, m1), rss_mark(samples, m2)
    growth = round(100 * (rss2 - rss1) / rss1, 2) if rss1 and rss2 else None
    bucket = 5.0
    timeline = []
    t = -cfg.warmup_s
    while t < window:
        done = [r for r in results if t <= r.end < t + bucket and r.complete]
        timeline.append(
            {
                "t": t + bucket / 2,
                "req_per_s": round(len(done) / bucket, 2),
                "tokens_per_s": round(sum(r.check["completion_tokens"] for r in done) / bucket, 1),
            }
        )
        t += bucket
    problems = [
        {
            "client": r.client,
            "kind": r.kind,
            "max_tokens": r.max_tokens,
            "start": round(r.start, 2),
            "end": round(r.end, 2),
            "status": r.status,
            "error": r.error or r.check.get("problem"),
        }
        for r in failed + incomplete
    ]
    criteria = {
        "no_failed_requests": not failed,
        "every_stream_complete": not incomplete,
        f"rss_growth_below_{cfg.max_rss_growth_pct:g}pct": growth is not None
        and growth < cfg.max_rss_growth_pct,
    }
    return {
        "requests": {
            "total": len(results),
            "warmup": len(results) - len(measured),
            "measured": len(measured),
            "ok": len(ok),
            "failed": len(failed),
            "incomplete": len(incomplete),
            "by_kind": {k: sum(r.kind == k for r in ok) for k in ("completion", "chat")},
            "finish_reasons": reasons,
            "per_client_min": min((sum(r.client == c for r in ok) for c in range(cfg.clients)), default=0),
        },
        "latency_s": {
            "p50": _pct([r.end - r.start for r in ok], 50),
            "p95": _pct([r.end - r.start for r in ok], 95),
            "max": _pct([r.end - r.start for r in ok], 100),
        },
        "ttft_s": {
            "p50": _pct([r.ttft for r in ok if r.ttft is not None], 50),
            "p95": _pct([r.ttft for r in ok if r.ttft is not None], 95),
        },
        "throughput": {
            "window_s": round(window, 1),
            "req_per_s": round(len(ok) / window, 2),
            "tokens_per_s": round(tokens / window, 1),
            "completion_tokens": tokens,
        },
        "rss": {
            "marks_s": [m1, m2],
            "window_s": RSS_WINDOW_S,
            "min1_mb": rss1,
            "min2_mb": rss2,
            "growth_pct": growth,
            "at_load_start_mb": samples[0]["rss_mb"] if samples else None,
            "peak_mb": max((s["rss_mb"] for s in samples), default=None),
            "by_process_min1_mb": _by_process(samples, m1),
            "by_process_min2_mb": _by_process(samples, m2),
        },
        "timeline": timeline,
        "problems": problems[:50],
        "criteria": criteria,
        "passed": all(criteria.values()),
    }


def plot(summary: dict[str, Any], samples: list[dict[str, Any]], path: Path, title: str) -> None:
    """RSS of the server tree and completed requests per second over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ts = [s["t"] for s in samples]
    ax1.plot(ts, [s["rss_mb"] for s in samples], marker=".", lw=1)
    rss = summary["rss"]
    for mark, val in zip(rss["marks_s"], (rss["min1_mb"], rss["min2_mb"])):
        ax1.axvspan(mark - rss["window_s"], mark, color="tab:orange", alpha=0.2)
        if val is not None:
            ax1.annotate(f"{val:.0f} MiB", (mark, val), textcoords="offset points", xytext=(-40, 8))
    if samples:  # none when the server died before the first sample
        lo, hi = min(s["rss_mb"] for s in samples), max(s["rss_mb"] for s in samples)
        ax1.set_ylim(lo - 0.05 * hi, hi * 1.05)
    ax1.set_ylabel("server tree RSS (MiB)")
    growth = rss["growth_pct"]
    ax1.set_title(
        f"{title}\nRSS growth between the marks: {growth:+.2f} %" if growth is not None else title, fontsize=9
    )
    tl = summary["timeline"]
    width = tl[1]["t"] - tl[0]["t"] if len(tl) > 1 else 5.0
    ax2.bar(
        [b["t"] for b in tl], [b["req_per_s"] for b in tl], width=width * 0.9, color="tab:blue", alpha=0.6
    )
    ax2.set_ylabel("completed requests/s", color="tab:blue")
    ax3 = ax2.twinx()
    ax3.plot([b["t"] for b in tl], [b["tokens_per_s"] for b in tl], color="tab:green", marker="o", ms=3)
    ax3.set_ylabel("generated tokens/s", color="tab:green")
    ax3.set_ylim(bottom=0)
    for ax in (ax1, ax2):
        ax.axvline(0, color="grey", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
    ax2.set_xlabel("seconds since the end of the warm-up (negative: warm-up)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_load(server: Server, cfg: LoadConfig) -> tuple[list[load_client.RequestResult], list[dict[str, Any]]]:
    """Warm-up plus measured window against a running server; results and RSS samples."""
    t0 = time.monotonic() + cfg.warmup_s
    sampler = MemorySampler(server, t0, cfg.sample_every_s)
    results: list[load_client.RequestResult] = []
    stop_at = t0 + cfg.duration_s
    done = threading.Event()

    def progress() -> None:
        while not done.wait(10.0):
            now = time.monotonic() - t0
            bad = sum(r.failed or not r.complete for r in results)
            rss = sampler.samples[-1]["rss_mb"] if sampler.samples else float("nan")
            phase = "warm-up" if now < 0 else f"{min(now, cfg.duration_s):.0f}/{cfg.duration_s:.0f} s"
            _say(
                f"{phase}: {len(results)} requests done, {bad} bad, server RSS {rss:.0f} MiB, "
                f"load {os.getloadavg()[0]:.1f}"
            )

    sampler.start()
    reporter = threading.Thread(target=progress, daemon=True)
    reporter.start()
    try:
        # A dead server ends the run at once instead of turning into a stream of refused connections.
        asyncio.run(
            load_client.run_clients(
                server.url,
                server.api_key,
                SERVED_NAME,
                clients=cfg.clients,
                t0=t0,
                stop_at=stop_at,
                seed=cfg.seed,
                timeout_s=cfg.request_timeout_s,
                results=results,
                seeded=cfg.seeded,
                abort=lambda: server.proc.poll() is not None,
            )
        )
    finally:
        done.set()
        sampler.stop()
    return results, sampler.samples


def run(model: Path | None, work: Path, cfg: LoadConfig) -> dict[str, Any]:
    """Build (if needed) and serve the checkpoint, load it, stop it; the summary dict."""
    work.mkdir(parents=True, exist_ok=True)
    if model is None:
        _say(f"tiny CAMERA-Q checkpoint under {work} (camera-vllm quantize, reused if there)")
        model = build_checkpoint(work)
    _say(f"starting vllm serve on {model} (log {work / 'serve.log'})")
    load_before = os.getloadavg()
    server = Server(model, work / "serve.log", cfg)
    leftovers: list[int] = []
    try:
        start_s = server.wait_healthy(cfg.start_timeout_s)
        _say(
            f"server healthy after {start_s:.0f} s; {cfg.clients} clients, "
            f"{cfg.warmup_s:.0f} s warm-up + {cfg.duration_s:.0f} s"
        )
        stats = server.get_json("/camera/stats")
        results, samples = run_load(server, cfg)
        running_after = server.proc.poll() is None
    finally:
        leftovers = server.stop()
    summary = summarize(results, samples, cfg)
    summary["criteria"]["server_alive_after_load"] = running_after
    summary["criteria"]["no_leftover_processes_after_sigterm"] = not leftovers
    summary["passed"] = all(summary["criteria"].values())
    summary["samples"] = samples
    summary["server"] = {
        "command": "vllm " + " ".join(server.cmd[len(_vllm_bin()) :]).replace(str(ROOT) + "/", ""),
        "env": {
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "VLLM_PLUGINS": "camera_vllm,camera_stats",
            "VLLM_API_KEY": "<random per run>",
        },
        "start_s": round(start_s, 1),
        "checkpoint": {k: stats.get(k) for k in ("scheme", "bits", "group_size")},
        "camera_totals": stats.get("totals"),
    }
    if not running_after:
        log = server.log.read_text(errors="replace").splitlines()
        errors = [ln for ln in log if "Error:" in ln and "Traceback" not in ln]
        summary["server"]["died"] = {
            "exit_code": server.proc.returncode,
            "first_error": errors[0][-300:] if errors else None,
        }
    summary["config"] = asdict(cfg)
    summary["host_load"] = {
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "note": "shared machine: other jobs ran during the test",
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="CAMERA checkpoint directory (default: build a tiny CAMERA-Q)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=120.0, help="measured seconds (after the warm-up)")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of load before the measured window")
    ap.add_argument("--sample-every", type=float, default=3.0, help="RSS sampling period (s)")
    ap.add_argument("--max-rss-growth-pct", type=float, default=5.0)
    ap.add_argument("--enforce-eager", action="store_true", help="serve without torch.compile")
    ap.add_argument(
        "--serve-args",
        default="",
        help='extra vllm serve arguments as one string; write --serve-args="--flag value"',
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    ap.add_argument(
        "--seeded",
        action="store_true",
        help="sampled requests carry an OpenAI 'seed' (crashes vllm-cpu 0.32 under load; see docs)",
    )
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / ".cache" / "load")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--plot", type=Path, default=PLOT)
    add_stamp_args(ap)
    args = ap.parse_args(argv)
    here = stamp(allow_dirty=args.allow_dirty, argv=argv)
    for flag, v in (("--clients", args.clients), ("--duration", args.duration)):
        if v <= 0:
            ap.error(f"{flag} must be positive, got {v}")
    if args.model is not None and not (args.model / "config.json").is_file():
        ap.error(f"--model {args.model}: no config.json there")
    cfg = LoadConfig(
        clients=args.clients,
        duration_s=args.duration,
        warmup_s=args.warmup,
        sample_every_s=args.sample_every,
        max_rss_growth_pct=args.max_rss_growth_pct,
        seed=args.seed,
        eager=args.enforce_eager,
        seeded=args.seeded,
        serve_args=tuple(shlex.split(args.serve_args)),
    )
    summary = run(args.model, args.work, cfg)
    out = {
        "stamp": here,
        "what": f"vllm serve under {cfg.clients} concurrent streaming clients "
        f"({cfg.warmup_s:g} s warm-up + {cfg.duration_s:g} s), CAMERA checkpoint",
        **summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    plot(
        summary,
        summary["samples"],
        args.plot,
        f"vllm serve, {cfg.clients} streaming clients, {summary['server']['checkpoint'].get('scheme')} "
        f"checkpoint ({here['machine']['cpu_count']} CPUs, shared)",
    )
    r, rss = summary["requests"], summary["rss"]
    _say(
        f"{r['ok']} ok, {r['failed']} failed, {r['incomplete']} incomplete; "
        f"p50/p95 latency {summary['latency_s']['p50']}/{summary['latency_s']['p95']} s, "
        f"TTFT p50 {summary['ttft_s']['p50']} s, {summary['throughput']['tokens_per_s']} tokens/s; "
        f"RSS {rss['min1_mb']} -> {rss['min2_mb']} MiB ({rss['growth_pct']} %)"
    )
    for name, passed in summary["criteria"].items():
        _say(f"{'PASS' if passed else 'FAIL'} {name}")
    _say(f"wrote {args.out} and {args.plot}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
