"""Serve one CAMERA-P checkpoint in bf16 twice in-process: with and without the CPU kernel path.

Writes, per run, how many MoE layers were bucketed for vLLM's ``cpu_fused_moe`` and the
prompt log-probabilities of :data:`integration_helpers.PROMPTS`::

    python vllm_cpu_kernel.py MODEL_DIR OUT.json
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


def run(model: str, kernel: str) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from camera_vllm.vllm_plugin.ops import CPU_KERNEL_ENV

    os.environ[CPU_KERNEL_ENV] = kernel
    llm = LLM(
        model=model,
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=4,
        seed=0,
        distributed_executor_backend="uni",
        model_loader_extra_config={"enable_weights_track": True},
    )
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    logprobs = [
        [next(iter(pos.values())).logprob for pos in o.prompt_logprobs[1:]] for o in outputs
    ]
    result = {"packed_layers": llm.collective_rpc(packed_layers)[0], "prompt_logprobs": logprobs}
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def main() -> None:
    model, out = sys.argv[1], Path(sys.argv[2])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # both engines in this process (seconds, not a minute)
    out.write_text(json.dumps({"kernel": run(model, "1"), "torch": run(model, "0")}))


if __name__ == "__main__":
    main()
