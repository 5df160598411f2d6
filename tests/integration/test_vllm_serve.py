"""``vllm serve`` on a CAMERA-P checkpoint: OpenAI completions, chat and streaming; clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from integration_helpers import MAX_TOKENS, PROMPTS, free_port, reference_greedy, vllm_env

ARCH = "qwen2_moe"  # routed experts and a pruned shared expert
SERVED = "camera-tiny"


def _wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout_s: float = 600) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"vllm serve not healthy after {timeout_s} s (log {log})")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server by pid, then wait for it and every process it spawned to exit."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("vllm serve ignored SIGTERM for 60 s")
    _, alive = psutil.wait_procs(children, timeout=60)
    for child in alive:
        child.kill()
    assert not alive, f"server children still alive after shutdown: {[c.pid for c in alive]}"


@pytest.fixture(scope="module")
def server(checkpoints, ckpt_root: Path):
    _, pruned = checkpoints(ARCH)
    port = free_port()
    log = ckpt_root / "serve.log"
    vllm_bin = Path(sys.executable).with_name("vllm")
    cmd = [
        str(vllm_bin),
        "serve",
        str(pruned),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        SERVED,
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--max-num-seqs",
        "4",
        "--enforce-eager",
        "--model-loader-extra-config",
        json.dumps({"enable_weights_track": True}),
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=vllm_env(ARCH))
    try:
        _wait_healthy(proc, port, log)
        yield {"port": port, "model_dir": pruned, "proc": proc, "log": log}
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key="unused")


@pytest.mark.vllm
def test_server_uses_camera_plugin(server) -> None:
    text = server["log"].read_text(errors="replace")
    assert "quantization=camera" in text


@pytest.mark.vllm
def test_completion_tokens_equal_reference(server, client) -> None:
    want = reference_greedy(server["model_dir"], PROMPTS[:2])
    for prompt, expected in zip(PROMPTS[:2], want):
        r = client.completions.create(
            model=SERVED,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        choice = r.choices[0]
        assert choice.token_ids == expected, prompt
        assert r.usage.completion_tokens == MAX_TOKENS


@pytest.mark.vllm
def test_chat_completion(client) -> None:
    r = client.chat.completions.create(
        model=SERVED,
        messages=[{"role": "user", "content": "Hello, who are you?"}],
        max_tokens=8,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str) and msg.content
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8


@pytest.mark.vllm
def test_streamed_completion_equals_unstreamed(client) -> None:
    kwargs = {
        "model": SERVED,
        "prompt": PROMPTS[2],
        "max_tokens": 12,
        "temperature": 0.0,
        "extra_body": {"ignore_eos": True},
    }
    full = client.completions.create(**kwargs).choices[0].text
    chunks = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert len(chunks) > 1
    assert "".join(chunks) == full and full
