"""Build vLLM's engine config for many checkpoints in one process; record what each one raised.

    python vllm_refuse.py MANIFEST.json OUT.json

MANIFEST is a list of ``{"id", "model", "quantization"}``.  For each entry this calls
``EngineArgs(model=..., quantization=..., model_loader_extra_config={"enable_weights_track":
true}, ...).create_engine_config()``, the same config building ``vllm serve`` and ``LLM(...)``
do in their first process, before any engine process starts.  That is where the camera
plugin's ``CameraConfig`` is built (``from_config``) and checks the checkpoint
(``maybe_update_config``).  OUT gets, per id: ``ok``, the quantization vLLM settled on, or
the error (type, message including chained causes) and the traceback frames, so the test
can check that the refusal came through the plugin.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


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
            except Exception:  # noqa: BLE001 - a foreign errors() signature: nothing wrapped
                pass
        todo += [e.__cause__, e.__context__]
    return [e for e in out if isinstance(e, BaseException)]


def _message(err: BaseException) -> str:
    return "\n".join(f"{type(e).__name__}: {e}" for e in _chain(err))


def _frames(err: BaseException) -> list[list[str]]:
    return [[f.filename, f.name] for e in _chain(err) for f in traceback.extract_tb(e.__traceback__)]


def main() -> None:
    manifest, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    results: dict[str, dict] = {}
    for entry in manifest:
        try:
            config = EngineArgs(
                model=entry["model"],
                quantization=entry["quantization"],
                dtype="float32",
                max_model_len=256,
                enforce_eager=True,
                model_loader_extra_config={"enable_weights_track": True},
            ).create_engine_config()
            quant = config.quant_config
            results[entry["id"]] = {
                "ok": True,
                "quantization": config.model_config.quantization,
                "quant_config": f"{type(quant).__module__}.{type(quant).__qualname__}" if quant else None,
            }
        except Exception as err:  # noqa: BLE001 - every refusal is the result being recorded
            results[entry["id"]] = {
                "ok": False,
                "type": type(err).__name__,
                "types": [type(e).__name__ for e in _chain(err)],
                "message": _message(err),
                "frames": _frames(err),
            }
        registered = "camera" in QUANTIZATION_METHODS
        out.write_text(json.dumps({"camera_registered": registered, "results": results}))


if __name__ == "__main__":
    main()
