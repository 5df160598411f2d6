"""Run many vLLM engines one after another in ONE process; write each one's tokens, memory or error as JSON.

Used by ``test_load_format_camera.py`` as a subprocess::

    python vllm_load_format_camera.py MANIFEST.json OUT.json

MANIFEST is a list of ``{"id", "model", "load_format", "eager", "max_num_seqs",
"quantization", "spawn"}``.  Engines with ``spawn`` run as ``vllm serve`` runs them (an
engine-core process and a worker process, spawned); the others run in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``distributed_executor_backend="uni"``): on this
CPU machine a spawned engine costs 40-70 s, an in-process one about 5 s once its model
class has been inspected.  The model loader, the CAMERA quantization config and the MoE
method run the same code either way.  Spawned engines must come first: an in-process
engine freezes vLLM's environment variables for the rest of the process.
Every engine is fp32 with weight tracking on; the ``camera`` loader's own summary comes
through ``CAMERA_LOAD_STATS``.  A run that raises records the error instead of tokens.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from integration_helpers import MAX_TOKENS, PROMPTS


def moe_memory(worker: Any) -> dict[str, Any]:
    """Runs in the worker: bytes of the routed-expert layers' own parameters.

    Also their methods and the worker's quantization.
    """
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    model = worker.model_runner.get_model()
    routed = 0
    methods: set[str] = set()
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            routed += sum(t.numel() * t.element_size() for t in module.parameters(recurse=False))
            methods.add(type(module.quant_method).__name__)
    quantization = worker.model_runner.model_config.quantization
    return {"routed_bytes": routed, "methods": sorted(methods), "quantization": quantization}


def _pid(worker: Any) -> int:
    return os.getpid()


def run_one(entry: dict[str, Any], stats_path: Path) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    os.environ["CAMERA_LOAD_STATS"] = str(stats_path)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if entry.get("spawn") else "0"
    stats_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        llm = LLM(
            model=entry["model"],
            load_format=entry["load_format"],
            quantization=entry.get("quantization"),
            dtype="float32",
            enforce_eager=entry["eager"],
            max_model_len=256,
            max_num_seqs=entry["max_num_seqs"],
            seed=0,
            distributed_executor_backend=None if entry.get("spawn") else "uni",
            model_loader_extra_config={"enable_weights_track": True},
        )
    except Exception as err:  # noqa: BLE001 - the test checks what was raised
        frames = [f.name for f in traceback.extract_tb(err.__traceback__)]
        return {
            "error": f"{type(err).__name__}: {err}",
            "frames": frames,
            "traceback": traceback.format_exc()[-4000:],
        }
    t_start = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    config = llm.llm_engine.vllm_config
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "quantization": config.model_config.quantization,
        "compilation_mode": str(config.compilation_config.mode),
        "engine_start_s": round(t_start, 2),
        "engine_pid": llm.collective_rpc(_pid)[0],
        "memory": llm.collective_rpc(moe_memory)[0],
        "loader_stats": json.loads(stats_path.read_text()) if stats_path.exists() else None,
    }
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def main() -> None:
    manifest, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    spawned = [i for i, e in enumerate(manifest) if e.get("spawn")]
    if spawned != list(range(len(spawned))):
        raise ValueError(f"{sys.argv[1]}: spawned engines must come before in-process ones")
    results: dict[str, Any] = {"driver_pid": os.getpid()}
    for entry in manifest:
        print(f"=== {entry['id']}", flush=True)
        results[entry["id"]] = run_one(entry, Path(f"{out}.stats.json"))
        out.write_text(json.dumps(results))  # partial results survive a later crash


if __name__ == "__main__":
    main()
