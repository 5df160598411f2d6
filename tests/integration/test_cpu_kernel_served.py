"""A served bf16 CAMERA-P model on CPU runs its experts through vLLM's ``cpu_fused_moe``.

The layers are bucketed by width once after loading (``process_weights_after_loading``).  The
oracle is the same checkpoint served in fp32 on the pure-torch path; both bf16 paths (kernel
and torch) are measured against it.  The test runs twice: with the vLLM CPU library this
machine picks, and with vLLM's AVX2 library (what a CPU without AVX-512 runs), so both are
covered on every machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from integration_helpers import run_vllm_driver, vllm_env

DRIVER = Path(__file__).resolve().parent / "vllm_cpu_kernel.py"


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
    out, log = ckpt_root / f"cpu-kernel-{library}.json", ckpt_root / f"cpu-kernel-{library}.log"
    env = vllm_env("qwen3_moe")
    env["VLLM_CACHE_ROOT"] = str(vllm_cache_root)
    args = [str(DRIVER), str(pruned), str(out)] + (["avx2"] if library == "avx2" else [])
    got = run_vllm_driver(args, out, log, env, 900, f"bf16 CPU-kernel run ({library})")
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
