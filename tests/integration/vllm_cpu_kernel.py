"""Serve one CAMERA-P checkpoint three times in-process: bf16 with and without the CPU kernel
path, and fp32 on the torch path (the oracle).

Writes, per run, how many MoE layers were bucketed for vLLM's ``cpu_fused_moe``, the
prompt log-probabilities of :data:`integration_helpers.PROMPTS`, and how the kernel rounds
to bf16 on this CPU (:func:`camera_vllm.vllm_plugin.ragged_cpu.cpu_kernel_rounding`)::

    python vllm_cpu_kernel.py MODEL_DIR OUT.json [avx2]

``avx2`` makes vLLM load its AVX2 kernel library, as it does on a CPU without AVX-512, so
that path is served on every machine.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from integration_helpers import PROMPTS


def packed_layers(worker: Any) -> int:
    """MoE layers of the worker's model served from prepacked width buckets, their ragged tensors freed."""
    from camera_vllm.vllm_plugin.moe_method import CPU_ROUTE, W13

    model = worker.get_model()
    return sum(1 for m in model.modules() if hasattr(m, CPU_ROUTE) and getattr(m, W13).numel() == 0)


def kernel_rounding(worker: Any) -> str | None:
    import torch

    from camera_vllm.vllm_plugin.ragged_cpu import cpu_kernel_isa, cpu_kernel_rounding

    isa = cpu_kernel_isa(torch.bfloat16)
    return None if isa is None else cpu_kernel_rounding(isa)


def run(model: str, kernel: str, dtype: str = "bfloat16") -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from camera_vllm.vllm_plugin.ops import CPU_KERNEL_ENV

    os.environ[CPU_KERNEL_ENV] = kernel
    llm = LLM(
        model=model,
        dtype=dtype,
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=4,
        seed=0,
        distributed_executor_backend="uni",
        model_loader_extra_config={"enable_weights_track": True},
    )
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    logprobs = [[next(iter(pos.values())).logprob for pos in o.prompt_logprobs[1:]] for o in outputs]
    result = {
        "packed_layers": llm.collective_rpc(packed_layers)[0],
        "rounding": llm.collective_rpc(kernel_rounding)[0],
        "prompt_logprobs": logprobs,
    }
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def force_avx2_library() -> None:
    """Make vLLM pick ``vllm._C_AVX2`` (its choice on a CPU without AVX-512) in this process."""
    import torch

    torch.cpu._is_avx512_supported = lambda: False
    torch.cpu._is_avx512_bf16_supported = lambda: False
    torch.cpu._is_amx_tile_supported = lambda: False


def main() -> None:
    model, out = sys.argv[1], Path(sys.argv[2])
    if sys.argv[3:] == ["avx2"]:
        force_avx2_library()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # all engines in this process (seconds, not a minute)
    runs = {"kernel": run(model, "1"), "torch": run(model, "0"), "fp32": run(model, "0", "float32")}
    out.write_text(json.dumps(runs))


if __name__ == "__main__":
    main()
