"""Which micro-experts a zero-masked model keeps (the CAMERA reference code's output).

The reference implementation prunes by zero-masking: every tensor keeps its shape and
the pruned micro-experts' gate rows, up rows and down columns are set to zero.  A
channel counts as pruned only when its gate row, up row and down column are *all
exactly* zero, so a channel that merely has a zero row somewhere is kept.

Used by ``camera-vllm convert`` (``camera_vllm.compress.convert``, which writes a
CAMERA-P checkpoint) and by ``--load-format camera`` (``camera_vllm.vllm_plugin.loader``,
which serves the masked directory compactly); ``/camera/stats`` derives the same config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..format.schema import CameraQuantConfig
from .keeps import LayerKeep, prune_quant_config
from .source import SourceCheckpoint

__all__ = ["detect_keeps", "zero_channel_keep", "zero_mask_compression", "zero_masked_quant_config"]


def zero_channel_keep(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Indices of micro-experts that are not entirely zero (gate row, up row and down column)."""
    alive = gate.ne(0).any(dim=1) | up.ne(0).any(dim=1) | down.ne(0).any(dim=0)
    return torch.nonzero(alive, as_tuple=False).flatten()


def detect_keeps(source: SourceCheckpoint) -> dict[int, LayerKeep]:
    """Kept micro-experts of every MoE layer of a zero-masked model (one layer in memory at a time)."""
    keeps: dict[int, LayerKeep] = {}
    for layer in source.arch.moe_layers:
        gates, ups, downs = source.expert_weights(layer)
        experts = tuple(zero_channel_keep(g, u, d) for g, u, d in zip(gates, ups, downs))
        shared = source.shared_weights(layer)
        keeps[layer] = LayerKeep(experts, None if shared is None else zero_channel_keep(*shared))
    return keeps


def zero_mask_compression(
    source: SourceCheckpoint, keeps: dict[int, LayerKeep], origin: str, where: str
) -> dict[str, Any]:
    """The ``compression`` record of a CAMERA-P config derived from a zero-masked model."""
    total = len(source.arch.moe_layers) * source.arch.num_experts * source.arch.intermediate_size
    return {
        "method": "camera-p",
        "origin": origin,
        "source": where,
        "routed_channels_kept": sum(sum(k.widths) for k in keeps.values()),
        "routed_channels_total": total,
    }


def zero_masked_quant_config(model_dir: str | Path, origin: str = "zero-masked") -> CameraQuantConfig:
    """The CAMERA-P ``quantization_config`` that a zero-masked HF directory amounts to.

    This is what ``--load-format camera`` installs; it reads every expert tensor once.
    """
    source = SourceCheckpoint(model_dir)
    keeps = detect_keeps(source)
    return prune_quant_config(source, keeps, zero_mask_compression(source, keeps, origin, str(model_dir)))
