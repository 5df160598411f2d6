"""``python -m camera_vllm.demo`` (what ``make demo`` runs) end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from integration_helpers import free_port, vllm_env


@pytest.mark.vllm
def test_demo_builds_prunes_serves_and_stops(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "camera_vllm.demo",
            "--workdir",
            str(tmp_path),
            "--port",
            str(port),
            "--max-tokens",
            "8",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=vllm_env("qwen3_moe"),
        timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "shutting the server down", "done."):
        assert step in out, out
    assert '"role": "user"' in out  # the request is printed
    pruned = tmp_path / "tiny-qwen3-moe-camera-p50"
    qc = json.loads((pruned / "config.json").read_text())["quantization_config"]
    assert qc["scheme"] == "prune" and len({sum(s) for s in qc["layers"]["0"]["expert_slabs"]}) > 1
    assert "quantization=camera" in (tmp_path / "serve.log").read_text(errors="replace")
    with pytest.raises(OSError):  # the server is gone
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
