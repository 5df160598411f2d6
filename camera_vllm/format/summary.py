"""One summary of a CAMERA checkpoint from its config.json: ``inspect``, ``/camera/stats`` and ``/metrics``.

Pure (config dict in, JSON-able dict out; no torch, no vLLM), so the CLI, the server and
the tests compute the same numbers: widths and bit-widths per MoE layer, and the bytes the
routed and shared experts take before (model dtype, original width) and after
compression (:func:`camera_vllm.format.layout.stored_bytes`: packed weights, scales and
zeros all counted).  ``totals.bits_per_original_weight`` is the compressor's
``avg_bits_achieved``: stored expert bits per weight of the original experts.
"""

from __future__ import annotations

from typing import Any

from .layout import stored_bytes
from .names import QUANT_METHOD
from .schema import CameraQuantConfig

__all__ = ["NotACameraCheckpoint", "checkpoint_dtype", "summarize_camera_config", "text_config"]

# Bytes per element of the checkpoint dtype, as config.json spells it.
_DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "fp32": 4,
    "float16": 2,
    "half": 2,
    "fp16": 2,
    "bfloat16": 2,
    "bf16": 2,
    "float64": 8,
    "double": 8,
}


class NotACameraCheckpoint(LookupError):
    """The served model has no CAMERA ``quantization_config``."""


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    sub = config.get("text_config")
    return sub if isinstance(sub, dict) else {}


def checkpoint_dtype(config: dict[str, Any]) -> str | None:
    """The weights dtype recorded in config.json (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    for cfg in (config, text_config(config)):
        for key in ("dtype", "torch_dtype"):
            value = cfg.get(key)
            if isinstance(value, str):
                return value.removeprefix("torch.")
    return None


def _hidden_size(config: dict[str, Any]) -> int | None:
    for cfg in (config, text_config(config)):
        value = cfg.get("hidden_size")
        if isinstance(value, int) and value > 0:
            return value
    return None


def _quant_block(config: dict[str, Any]) -> dict[str, Any]:
    block = config.get("quantization_config")
    if block is None:
        block = text_config(config).get("quantization_config")
    if not isinstance(block, dict) or str(block.get("quant_method", "")).lower() != QUANT_METHOD:
        found = block.get("quant_method") if isinstance(block, dict) else None
        raise NotACameraCheckpoint(
            f"the served model is not a CAMERA checkpoint (quantization_config.quant_method is {found!r})"
        )
    return block


def _width_stats(widths: list[int]) -> dict[str, Any]:
    if not widths:
        return {"min": 0, "max": 0, "mean": 0.0, "total": 0}
    return {"min": min(widths), "max": max(widths), "mean": sum(widths) / len(widths), "total": sum(widths)}


def _ratio(num: float, den: float) -> float | None:
    return None if not den else num / den


def summarize_camera_config(config: dict[str, Any], *, experts: bool = False) -> dict[str, Any]:
    """Summarise a CAMERA checkpoint from its whole config.json dict.

    Returns the format version, the scheme and bit-widths, per-MoE-layer width and bit
    statistics, and the bytes the routed and shared experts occupy before (model dtype,
    original width) and after compression (:func:`camera_vllm.format.layout.stored_bytes`:
    packed weights, scales and zeros all counted).  Byte fields are ``None`` when config.json
    lacks ``hidden_size`` or a known dtype.  ``experts=True`` adds per-expert widths and slabs.

    Raises :class:`NotACameraCheckpoint` when there is no CAMERA ``quantization_config`` and
    :class:`CameraFormatError` when there is one but it is invalid.
    """
    q = CameraQuantConfig.from_json_dict(_quant_block(config))
    hidden = _hidden_size(config)
    dtype = checkpoint_dtype(config)
    model_bytes = _DTYPE_BYTES.get(dtype) if dtype else None

    layers: list[dict[str, Any]] = []
    tot = {
        "original_bytes": 0,
        "stored_bytes": 0,
        "kept_micro_experts": 0,
        "original_micro_experts": 0,
        "kept_shared_micro_experts": 0,
        "original_shared_micro_experts": 0,
    }
    by_bits_total = {str(b): 0 for b in q.bits}
    for index in sorted(q.layers):
        spec = q.layers[index]
        widths = spec.expert_widths
        by_bits = {str(b): sum(s[i] for s in spec.expert_slabs) for i, b in enumerate(q.bits)}
        original_width = q.num_experts * q.original_intermediate_size
        entry: dict[str, Any] = {
            "layer": index,
            "expert_width": _width_stats(widths),
            "original_width_total": original_width,
            "kept_fraction": _ratio(sum(widths), original_width),
            "empty_experts": sum(1 for w in widths if w == 0),
            "micro_experts_by_bits": by_bits,
            "shared_width": spec.shared_width,
            "shared_micro_experts_by_bits": (
                None if spec.shared_slabs is None else {str(b): n for b, n in zip(q.bits, spec.shared_slabs)}
            ),
        }
        tot["kept_micro_experts"] += sum(widths)
        tot["original_micro_experts"] += original_width
        for b, n in by_bits.items():
            by_bits_total[b] += n
        if spec.shared_width is not None and q.original_shared_intermediate_size:
            tot["kept_shared_micro_experts"] += spec.shared_width
            tot["original_shared_micro_experts"] += q.original_shared_intermediate_size
        if hidden is not None and model_bytes is not None:
            original = q.num_experts * 3 * hidden * q.original_intermediate_size * model_bytes
            stored = sum(
                stored_bytes(s, q.bits, hidden, q.group_size, model_bytes) for s in spec.expert_slabs
            )
            kept_weights = 3 * hidden * sum(widths)
            if spec.shared_slabs is not None and q.original_shared_intermediate_size:
                original += 3 * hidden * q.original_shared_intermediate_size * model_bytes
                stored += stored_bytes(spec.shared_slabs, q.bits, hidden, q.group_size, model_bytes)
                kept_weights += 3 * hidden * sum(spec.shared_slabs)
            entry.update(
                original_bytes=original,
                stored_bytes=stored,
                bytes_saved=original - stored,
                effective_bits_per_kept_weight=_ratio(8 * stored, kept_weights),
            )
            tot["original_bytes"] += original
            tot["stored_bytes"] += stored
        else:
            entry.update(
                original_bytes=None, stored_bytes=None, bytes_saved=None, effective_bits_per_kept_weight=None
            )
        if experts:
            entry["expert_widths"] = widths
            entry["expert_slabs"] = [list(s) for s in spec.expert_slabs]
            if spec.shared_slabs is not None:
                entry["shared_slabs"] = list(spec.shared_slabs)
        layers.append(entry)

    totals: dict[str, Any] = {
        "scope": "routed and shared expert weights of the MoE layers (attention, embeddings and dense "
        "layers are not counted)",
        "kept_micro_experts": tot["kept_micro_experts"],
        "original_micro_experts": tot["original_micro_experts"],
        "kept_fraction": _ratio(tot["kept_micro_experts"], tot["original_micro_experts"]),
        "micro_experts_by_bits": by_bits_total,
    }
    if tot["original_shared_micro_experts"]:
        totals["kept_shared_micro_experts"] = tot["kept_shared_micro_experts"]
        totals["original_shared_micro_experts"] = tot["original_shared_micro_experts"]
    if hidden is not None and model_bytes is not None:
        totals.update(
            original_bytes=tot["original_bytes"],
            stored_bytes=tot["stored_bytes"],
            bytes_saved=tot["original_bytes"] - tot["stored_bytes"],
            compression_ratio=_ratio(tot["original_bytes"], tot["stored_bytes"]),
            # Stored bits per original expert weight: the compressor's avg_bits_achieved.
            bits_per_original_weight=_ratio(8 * tot["stored_bytes"], tot["original_bytes"] / model_bytes),
        )
    else:
        totals.update(
            original_bytes=None,
            stored_bytes=None,
            bytes_saved=None,
            compression_ratio=None,
            bits_per_original_weight=None,
        )

    return {
        "quant_method": q.quant_method,
        "format_version": q.format_version,
        "scheme": q.scheme,
        "bits": list(q.bits),
        "group_size": q.group_size,
        "architecture": q.architecture,
        "num_experts": q.num_experts,
        "original_intermediate_size": q.original_intermediate_size,
        "original_shared_intermediate_size": q.original_shared_intermediate_size,
        "hidden_size": hidden,
        "checkpoint_dtype": dtype,
        "num_moe_layers": len(layers),
        "totals": totals,
        "layers": layers,
        "compression": dict(q.compression),
    }
