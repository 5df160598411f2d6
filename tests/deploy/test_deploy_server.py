"""The container's entry command against the local CPU install, serving a tiny CAMERA checkpoint.

``deploy/docker/entrypoint.sh`` is what both images run; here it runs with this venv's
``vllm`` first on PATH (the CPU build), the way the image would run it: model directory as
the first argument, API key from a secret file, caches in a private directory.  One server
is shared by the module (vLLM on CPU takes ~30-40 s to start) and stopped by pid at the end;
a test that stops it (the SIGTERM test) leaves any test after it a fresh one, so the tests
hold in any order.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests
from entrypoint_server import API_KEY, HEALTHCHECK, Server, build_camera_checkpoint, start_entrypoint_server

SERVED_NAME = "tiny-camera"

pytestmark = pytest.mark.vllm


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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_camera_checkpoint(tmp_path_factory.mktemp("deploy") / "tiny-camera-p")


@pytest.fixture(scope="module")
def _servers(checkpoint: Path, tmp_path_factory) -> Iterator[Callable[[], Server]]:
    """``running() -> Server``: the module's server, started on first use and after a test stopped it."""
    with ExitStack() as stack:
        current: list[Server] = []

        def running() -> Server:
            if not current or current[-1].proc.poll() is not None:
                server = start_entrypoint_server(
                    str(checkpoint),
                    checkpoint,
                    tmp_path_factory.mktemp("deploy-server"),
                    env={"CAMERA_SERVED_MODEL_NAME": SERVED_NAME},
                    key_text=f"  {API_KEY}\n",  # as secrets often are: padded, trailing newline
                )
                current.append(stack.enter_context(server))
            return current[-1]

        yield running


@pytest.fixture
def server(_servers: Callable[[], Server]) -> Server:
    """A healthy server, whatever the tests before this one did to theirs."""
    return _servers()


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
    assert server.wait_group_gone(timeout=10), "engine/worker processes outlived the API server by 10 s"
