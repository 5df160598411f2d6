"""CAMERA-P: choose the micro-experts to keep and write a physically smaller checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..format import names
from ..format.schema import CameraQuantConfig, LayerSpec
from .source import SourceCheckpoint
from .writer import CheckpointWriter

PruneScope = Literal["layer", "expert"]


@dataclass(frozen=True)
class LayerKeep:
    """Kept micro-expert indices (sorted ascending) of one MoE layer."""

    experts: tuple[torch.Tensor, ...]
    shared: torch.Tensor | None = None

    @property
    def widths(self) -> list[int]:
        return [int(k.numel()) for k in self.experts]


def _n_remove(total: int, ratio: float) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--ratio must be in [0, 1), got {ratio}")
    return int(round(ratio * total))


def select_keep(
    expert_scores: list[torch.Tensor],
    ratio: float,
    *,
    shared_scores: torch.Tensor | None = None,
    scope: PruneScope = "layer",
) -> LayerKeep:
    """Keep the highest-scoring micro-experts of one layer.

    ``scope='layer'`` (the paper's CAMERA-P) ranks routed and shared micro-experts of
    the layer together and removes ``round(ratio * N)`` of them, so experts end with
    different widths (possibly 0).  ``scope='expert'`` removes ``round(ratio * I_e)``
    inside every expert (uniform widths).  Ties break by (expert, channel) so the
    choice is deterministic.
    """
    groups = list(expert_scores) + ([shared_scores] if shared_scores is not None else [])
    if scope == "expert":
        kept = []
        for s in groups:
            r = _n_remove(s.numel(), ratio)
            order = torch.sort(s.double(), stable=True).indices  # ascending: weakest first
            kept.append(torch.sort(order[r:]).values)
    elif scope == "layer":
        flat = torch.cat([s.double().flatten() for s in groups])
        owner = torch.cat([torch.full((s.numel(),), i, dtype=torch.long) for i, s in enumerate(groups)])
        local = torch.cat([torch.arange(s.numel()) for s in groups])
        r = _n_remove(flat.numel(), ratio)
        order = torch.sort(flat, stable=True).indices
        keep_mask = torch.ones(flat.numel(), dtype=torch.bool)
        keep_mask[order[:r]] = False
        kept = [torch.sort(local[keep_mask & (owner == i)]).values for i in range(len(groups))]
    else:
        raise ValueError(f"unknown prune scope {scope!r}; expected 'layer' or 'expert'")
    shared = kept.pop() if shared_scores is not None else None
    return LayerKeep(tuple(kept), shared)


def prune_expert(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Physically remove micro-experts: rows of gate/up and columns of down not in ``keep``."""
    keep = keep.to(torch.long)
    return gate.index_select(0, keep), up.index_select(0, keep), down.index_select(1, keep)


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


def write_pruned_checkpoint(
    source: SourceCheckpoint,
    out_dir: str | Path,
    keeps: dict[int, LayerKeep],
    *,
    compression: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Stream ``source`` into ``out_dir`` with the experts of every layer in ``keeps`` pruned.

    Every MoE layer of the model must appear in ``keeps``.  Peak memory is one layer's
    experts.  Routed experts are always written per expert (``experts.N.gate_proj.weight``)
    so their widths can differ; width-0 experts store nothing.
    """
    arch = source.arch
    missing = set(arch.moe_layers) - set(keeps)
    if missing:
        raise ValueError(f"no keep-set for MoE layers {sorted(missing)}")
    qcfg = prune_quant_config(source, keeps, compression or {})
    a = arch.architecture
    handled: set[str] = set()
    with CheckpointWriter(out_dir, overwrite=overwrite) as writer:
        for layer in arch.moe_layers:
            keep = keeps[layer]
            gates, ups, downs = source.expert_weights(layer)
            for e, idx in enumerate(keep.experts):
                if idx.numel() == 0:
                    continue
                g, u, d = prune_expert(gates[e], ups[e], downs[e], idx)
                for proj, t in enumerate((g, u, d)):
                    writer.add(names.expert_tensor(a, layer, e, proj, "weight"), t)
            handled |= source.expert_tensor_names(layer)
            shared = source.shared_weights(layer)
            if shared is not None and keep.shared is not None:
                g, u, d = prune_expert(*shared, keep.shared)
                for proj, t in enumerate((g, u, d)):
                    writer.add(names.shared_tensor(a, layer, proj, "weight"), t)
                handled |= source.shared_tensor_names(layer)
        for name in sorted(source.weight_map):
            if name not in handled:
                writer.add(name, source.get(name))
        return writer.commit(
            source_dir=source.path,
            config=source.config,
            quant_config=qcfg,
            report=report,
            extra_files=extra_files,
        )
