"""A served bf16 CAMERA-P model on CPU runs its experts through vLLM's ``cpu_fused_moe``.

The layers are bucketed by width once after loading (``process_weights_after_loading``), and the
model's prompt log-probabilities match the same checkpoint served on the pure-torch path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from integration_helpers import run_vllm_driver, vllm_env

DRIVER = Path(__file__).resolve().parent / "vllm_cpu_kernel.py"


@pytest.mark.vllm
def test_bf16_camera_p_serves_through_the_cpu_kernel(checkpoints, ckpt_root: Path, vllm_cache_root: Path) -> None:
    _, pruned = checkpoints("qwen3_moe")
    config = json.loads((pruned / "config.json").read_text())
    moe_layers = len(config["quantization_config"]["layers"])
    out, log = ckpt_root / "cpu-kernel.json", ckpt_root / "cpu-kernel.log"
    env = vllm_env("qwen3_moe")
    env["VLLM_CACHE_ROOT"] = str(vllm_cache_root)
    got = run_vllm_driver([str(DRIVER), str(pruned), str(out)], out, log, env, 900, "bf16 CPU-kernel run")
    assert got["kernel"]["packed_layers"] == moe_layers, got["kernel"]["packed_layers"]
    assert got["torch"]["packed_layers"] == 0  # CAMERA_VLLM_CPU_KERNEL=0 keeps the torch path
    diffs = [
        abs(a - b)
        for ka, kb in zip(got["kernel"]["prompt_logprobs"], got["torch"]["prompt_logprobs"], strict=True)
        for a, b in zip(ka, kb, strict=True)
    ]
    assert diffs, "no prompt log-probabilities came back"
    # Both paths round to bf16; they differ only in summation order.
    assert max(diffs) < 0.05 and sum(diffs) / len(diffs) < 0.01, (max(diffs), sum(diffs) / len(diffs))
