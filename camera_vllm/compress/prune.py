"""CAMERA-P: choose the micro-experts to keep and write a physically smaller checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from ..checkpoint.keeps import LayerKeep, prune_quant_config
from ..checkpoint.source import SourceCheckpoint
from ..format import names
from ..format.projection import PROJECTIONS
from .writer import CheckpointWriter

PruneScope = Literal["layer", "expert"]


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
    missing = set(source.arch.moe_layers) - set(keeps)
    if missing:
        raise ValueError(f"no keep-set for MoE layers {sorted(missing)}")
    qcfg = prune_quant_config(source, keeps, compression or {})
    with CheckpointWriter(out_dir, overwrite=overwrite) as writer:
        add_pruned_tensors(writer, source, keeps)
        return writer.commit(
            source_dir=source.path,
            config=source.config,
            quant_config=qcfg,
            report=report,
            extra_files=extra_files,
        )


def add_pruned_tensors(
    writer: CheckpointWriter, source: SourceCheckpoint, keeps: dict[int, LayerKeep]
) -> None:
    """Add every tensor of ``source`` to ``writer``, the experts of the layers in ``keeps`` pruned.

    Layer by layer (routed experts, then the shared one), then every other tensor by
    name: the order, and so the shard layout, depends only on the inputs.
    """
    arch = source.arch
    missing = set(arch.moe_layers) - set(keeps)
    if missing:
        raise ValueError(f"no keep-set for MoE layers {sorted(missing)}")
    a = arch.architecture
    handled: set[str] = set()
    for layer in arch.moe_layers:
        keep = keeps[layer]
        gates, ups, downs = source.expert_weights(layer)
        for e, idx in enumerate(keep.experts):
            if idx.numel() == 0:
                continue
            pruned = prune_expert(gates[e], ups[e], downs[e], idx)
            for proj in PROJECTIONS:
                writer.add(names.expert_tensor(a, layer, e, proj, "weight"), pruned[proj])
        handled |= source.expert_tensor_names(layer)
        shared = source.shared_weights(layer)
        if shared is not None and keep.shared is not None:
            pruned = prune_expert(*shared, keep.shared)
            for proj in PROJECTIONS:
                writer.add(names.shared_tensor(a, layer, proj, "weight"), pruned[proj])
            handled |= source.shared_tensor_names(layer)
    for name in sorted(source.weight_map):
        if name not in handled:
            writer.add(name, source.get(name))
