"""The serving guard: refuse a CAMERA checkpoint before vLLM builds an engine for it.

The vLLM plugin's :class:`~camera_vllm.vllm_plugin.config.CameraConfig` calls these hooks:

* :func:`refuse_foreign_quant_method` from ``override_quantization_method`` (vLLM asks every
  registered method, custom ones first): a CAMERA ``quantization_config`` filed under another
  ``quant_method`` is refused by name instead of failing later in e.g. GPTQ;
* :func:`validate_for_serving` from ``maybe_update_config`` (while vLLM builds its config,
  before any engine process starts): :func:`camera_vllm.format.validate.validate` on the
  local directory or cached hub snapshot, raising :class:`CameraFormatError` listing every
  problem.

No vLLM import: the guard is the checkpoint format's check, run the way serving needs it
(hub snapshots, the ``CAMERA_VALIDATE_VALUES`` switch), and is tested without an engine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..format import names
from ..format.schema import CameraFormatError
from ..format.validate import ValidationReport, foreign_quant_method_message, validate, weights_present

__all__ = ["VALUES_ENV", "refuse_foreign_quant_method", "resolve_local", "validate_for_serving"]

log = logging.getLogger(__name__)

# Environment switch of :func:`validate_for_serving`: "0" skips the NaN/inf/scale scan
# (which reads every tensor once) for very large checkpoints already validated offline.
VALUES_ENV = "CAMERA_VALIDATE_VALUES"


# Keys only a CAMERA quantization_config has together (format_version, scheme, per-layer slabs).
_CAMERA_KEYS = {"format_version", "scheme", "layers", "original_intermediate_size"}


def refuse_foreign_quant_method(quant_cfg: Any) -> None:
    """Raise :class:`CameraFormatError` for a CAMERA quantization_config under another quant_method.

    For vLLM's ``QuantizationConfig.override_quantization_method`` hook, which vLLM calls on
    every registered method (custom ones first) before it picks one by ``quant_method``:
    without it such a checkpoint reaches e.g. GPTQ and fails with an unrelated message.
    Anything else (a real GPTQ/AWQ/... config, or a CAMERA one) passes.
    """
    if not isinstance(quant_cfg, dict) or not _CAMERA_KEYS <= quant_cfg.keys():
        return
    if str(quant_cfg.get("quant_method", "")).lower() != names.QUANT_METHOD:
        raise CameraFormatError(foreign_quant_method_message(quant_cfg.get("quant_method")))


def resolve_local(model: str | Path, revision: str | None) -> Path | None:
    """The local directory of ``model``: itself, or its Hugging Face cache snapshot (no download)."""
    path = Path(model)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), revision=revision, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - not cached (yet) or not a hub id
        # A cached tree listing naming files this cache lacks (README, images, .bin copies, or the
        # weights not yet fetched) makes huggingface_hub refuse the snapshot as incomplete; what
        # is there is still what vLLM will read, so check it (weights_present decides how far).
        partial = getattr(err, "snapshot_path", None)
        return Path(partial) if partial else None


def validate_for_serving(
    model: str | Path, *, revision: str | None = None, check_values: bool | None = None
) -> ValidationReport | None:
    """Validate a CAMERA checkpoint before vLLM builds an engine for it; raise on any error.

    This is the hook the vLLM plugin calls (``CameraConfig.maybe_update_config``, run
    while vLLM builds its config, before any engine process starts).  ``model`` is
    vLLM's model argument: a local directory or a Hugging Face id already in the local
    cache; for an id whose files are not cached yet nothing can be checked here and
    ``None`` is returned after a warning.  On the first start from a hub vLLM has fetched
    config.json but not yet the weights (it downloads them when it loads the model): then
    only the config is checked here, and every tensor is checked against it by the plugin's
    weight loaders as it arrives (shape, dtype, completeness; no value scan).

    :param check_values: scan tensor values (NaN/inf, scales > 0; reads every tensor once).
        Default: on, unless the environment sets ``CAMERA_VALIDATE_VALUES=0``.
    :raises CameraFormatError: listing every problem, each naming its file/tensor/field.
    """
    root = resolve_local(model, revision)
    if root is None:
        log.warning(
            "camera-vllm: %s is not a local directory or cached snapshot; not validated before loading", model
        )
        return None
    if check_values is None:
        check_values = os.environ.get(VALUES_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
    weights = Path(model).is_dir() or weights_present(root)
    if not weights:
        log.info(
            "camera-vllm: %s: weights not downloaded yet; config checked now, tensors as vLLM loads them",
            model,
        )
    report = validate(root, check_values=check_values and weights, weights=weights)
    for warning in report.warnings:
        log.warning("camera-vllm: %s: %s", root, warning)
    if not report.ok:
        raise CameraFormatError(
            f"refusing to serve {root}: the CAMERA checkpoint is invalid ({len(report.errors)} error(s);"
            " run `camera-vllm validate` on it for the full report):\n"
            + "\n".join(f"  error: {e}" for e in report.errors)
        )
    return report
