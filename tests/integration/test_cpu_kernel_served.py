"""A served bf16 CAMERA-P model on CPU runs its experts through vLLM's ``cpu_fused_moe``.

The layers are bucketed by width once after loading (``process_weights_after_loading``).  The
oracle is the same checkpoint served in fp32 on the pure-torch path; both bf16 paths (kernel
and torch) are measured against it.  The test runs twice: with the vLLM CPU library this
machine picks, and with vLLM's AVX2 library (what a CPU without AVX-512 runs), so both are
covered on every machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from integration_helpers import run_engines, vllm_env

# camera_vllm.vllm_plugin.ops.CPU_KERNEL_ENV: "0" keeps bf16 layers on the pure-torch path.
CPU_KERNEL_ENV = "CAMERA_VLLM_CPU_KERNEL"


def _engines(model: Path) -> list[dict]:
    """The checkpoint three times in-process (seconds each): bf16 with and without the CPU kernel
    path, and fp32 on the torch path (the oracle); per run the layers bucketed for
    ``cpu_fused_moe``, the kernel's bf16 rounding and the prompts' log-probabilities."""
    runs = {"kernel": ("1", "bfloat16"), "torch": ("0", "bfloat16"), "fp32": ("0", "float32")}
    return [
        {
            "id": run,
            "model": str(model),
            "in_process": True,
            "env": {CPU_KERNEL_ENV: kernel},
            "engine": {"dtype": dtype, "enforce_eager": True},
            "sampling": {"temperature": 0.0, "max_tokens": 1, "prompt_logprobs": 0},
            "probes": {"packed_layers": "packed_layers", "rounding": "kernel_rounding"},
        }
        for run, (kernel, dtype) in runs.items()
    ]


def _errors(got: list[list[float]], want: list[list[float]]) -> tuple[float, float]:
    diffs = [abs(a - b) for ga, wa in zip(got, want, strict=True) for a, b in zip(ga, wa, strict=True)]
    assert diffs, "no prompt log-probabilities came back"
    return max(diffs), sum(diffs) / len(diffs)


@pytest.mark.vllm
@pytest.mark.parametrize("library", ["native", "avx2"])
def test_bf16_camera_p_serves_through_the_cpu_kernel(
    library: str, checkpoints, ckpt_root: Path, vllm_cache_root: Path
) -> None:
    _, pruned = checkpoints("qwen3_moe")
    config = json.loads((pruned / "config.json").read_text())
    moe_layers = len(config["quantization_config"]["layers"])
    env = vllm_env("qwen3_moe")
    env["VLLM_CACHE_ROOT"] = str(vllm_cache_root)
    got = run_engines(
        _engines(pruned),
        ckpt_root,
        f"cpu-kernel-{library}",
        env,
        900,
        f"bf16 CPU-kernel run ({library})",
        emulate_avx2=library == "avx2",
    )["runs"]
    assert got["kernel"]["packed_layers"] == moe_layers, got["kernel"]["packed_layers"]
    assert got["torch"]["packed_layers"] == 0  # CAMERA_VLLM_CPU_KERNEL=0 keeps the torch path
    assert got["fp32"]["packed_layers"] == 0
    kernel = _errors(got["kernel"]["prompt_logprobs"], got["fp32"]["prompt_logprobs"])
    torch_path = _errors(got["torch"]["prompt_logprobs"], got["fp32"]["prompt_logprobs"])
    print(library, got["kernel"]["rounding"], "kernel-fp32", kernel, "torch-fp32", torch_path)
    assert got["kernel"]["rounding"] in ("nearest", "toward_zero")
    # Both bf16 paths carry half-ulp errors per rounding (the kernel's truncated outputs are
    # moved to their interval's midpoint), so both meet the bound of a bf16 model.
    for path, (worst, mean) in (("torch", torch_path), ("kernel", kernel)):
        assert worst < 0.05 and mean < 0.01, (path, library, worst, mean)
