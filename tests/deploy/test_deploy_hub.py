"""The container's entry command serving a CAMERA checkpoint by hub id, on its first start.

What users run: ``vllm serve ORG/NAME`` with an empty Hugging Face cache.  vLLM fetches
config.json first and builds its config, which calls the plugin's
``CameraConfig.maybe_update_config`` -> ``validate_for_serving`` while the weights are not
there yet; then it snapshots the repo's non-weight files (for the tokenizer) and downloads the
weights when it loads the model.  The hub is a loopback emulator
(``hub_emulator.py``) serving the tiny CAMERA-P checkpoint of ``test_deploy_server.py`` as
``org/tiny-camera``, recording every request; the server runs through
``deploy/docker/entrypoint.sh`` with the same settings as that test.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import requests
from entrypoint_server import Server, build_camera_checkpoint, start_entrypoint_server
from hub_emulator import HubEmulator

pytestmark = pytest.mark.vllm

REPO_ID = "org/tiny-camera"
SERVED_NAME = "tiny-camera"  # the entrypoint's default: the model argument's basename


class HubRun:
    def __init__(self, server: Server, hub: HubEmulator, hf_home: Path, ckpt: Path):
        self.server, self.hub, self.hf_home, self.ckpt = server, hub, hf_home, ckpt


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory):
    ckpt = build_camera_checkpoint(tmp_path_factory.mktemp("deploy-hub") / "tiny-camera-p")
    work = tmp_path_factory.mktemp("deploy-hub-server")
    hf_home = work / "hf-home"
    hf_home.mkdir()  # empty: the server's first start
    with HubEmulator(REPO_ID, ckpt) as hub:
        env = {
            "HF_ENDPOINT": hub.endpoint,
            "HF_HOME": str(hf_home),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        drop = ("VLLM_", "CAMERA_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_")
        try:
            with start_entrypoint_server(REPO_ID, ckpt, work, env=env, drop_env=drop) as srv:
                yield HubRun(srv, hub, hf_home, ckpt)
        finally:
            # For whoever reads a failure: what the server asked the hub, in order.
            (work / "hub-requests.log").write_text("".join(f"{o} {m} {p}\n" for o, m, p in hub.log()))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _file_requests(log: list[tuple[str, str, str]]) -> list[str]:
    """Every request for a file's metadata or bytes (resolve on the hub, LFS blobs on the CDN), in order."""
    return [
        f"{origin} {method} {path}" for origin, method, path in log if "/resolve/" in path or origin == "cdn"
    ]


def test_deploy_hub_first_start_serves_the_hub_id(hub_server):
    srv = hub_server.server
    body = {
        "model": SERVED_NAME,
        "prompt": "The quick brown fox",
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
    }
    r = requests.post(srv.url + "/v1/completions", json=body, headers=srv.auth, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8

    files = _file_requests(hub_server.hub.log())
    weights = sorted(p.name for p in hub_server.ckpt.glob("*.safetensors"))
    assert weights, "the test checkpoint has no weights"
    first_config = next((i for i, f in enumerate(files) if "config.json" in f), None)
    first_weights = next((i for i, f in enumerate(files) if ".safetensors" in f), None)
    assert first_config is not None and first_weights is not None, files
    assert first_config < first_weights, files
    for name in weights:  # downloaded from the (emulated) LFS CDN, each once
        assert sum(f.startswith("cdn GET /lfs/") and f"filename={name}" in f for f in files) == 1, files

    # ... into the empty HF_HOME's hub cache, intact.
    snapshots = list((hub_server.hf_home / "hub" / "models--org--tiny-camera" / "snapshots").iterdir())
    assert len(snapshots) == 1, snapshots
    for name in weights:
        cached = snapshots[0] / name
        assert cached.is_file(), sorted(p.name for p in snapshots[0].iterdir())
        assert _sha256(cached) == _sha256(hub_server.ckpt / name), f"cached {name} differs from the hub's"


def test_deploy_hub_first_start_log(hub_server):
    """The plugin checked the config before the weights came, and said so; then served the model."""
    log = hub_server.server.log.read_text(errors="replace")
    assert "weights not downloaded yet" in log, (
        "validate_for_serving did not take its config-only path on the first start "
        f"(it logged: {[line for line in log.splitlines() if 'camera-vllm: ' + REPO_ID in line]})"
    )
    assert f"camera-vllm: serving {REPO_ID}" in log, hub_server.server.log_tail()
