"""Kept micro-experts per MoE layer, and the CAMERA-P ``quantization_config`` they describe.

A :class:`LayerKeep` comes from CAMERA-P's scoring (``camera_vllm.compress.prune``) or from
a zero-masked model's zeros (:mod:`.zero_mask`); :func:`prune_quant_config` turns keep sets
into the config that the compressor writes and that ``--load-format camera`` installs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..format import names
from ..format.schema import CameraQuantConfig, LayerSpec
from .source import SourceCheckpoint

__all__ = ["LayerKeep", "prune_quant_config"]


@dataclass(frozen=True)
class LayerKeep:
    """Kept micro-expert indices (sorted ascending) of one MoE layer."""

    experts: tuple[torch.Tensor, ...]
    shared: torch.Tensor | None = None

    @property
    def widths(self) -> list[int]:
        return [int(k.numel()) for k in self.experts]


def prune_quant_config(
    source: SourceCheckpoint, keeps: dict[int, LayerKeep], compression: dict[str, Any]
) -> CameraQuantConfig:
    """The ``quantization_config`` describing a CAMERA-P checkpoint."""
    arch = source.arch
    layers = {
        layer: LayerSpec(
            expert_slabs=[[w] for w in keep.widths],
            shared_slabs=None if keep.shared is None else [int(keep.shared.numel())],
        )
        for layer, keep in sorted(keeps.items())
    }
    return CameraQuantConfig(
        scheme="prune",
        bits=[names.UNQUANTIZED_BITS],
        architecture=arch.architecture,
        num_experts=arch.num_experts,
        original_intermediate_size=arch.intermediate_size,
        original_shared_intermediate_size=arch.shared_intermediate_size,
        layers=layers,
        compression=compression,
    )
