"""Turn zero-masked pruning output (the CAMERA reference code's) into a CAMERA-P checkpoint.

The reference implementation prunes by zero-masking: every tensor keeps its shape and
the pruned micro-experts' gate rows, up rows and down columns are set to zero.  It
saves either a torch state dict (``prune_model_dict.pt``) or, through
``save_pretrained``, a normal HF directory full of zeros.  A channel counts as pruned
only when its gate row, up row and down column are *all exactly* zero, so a channel
that merely has a zero row somewhere is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .prune import LayerKeep, write_pruned_checkpoint
from .source import SourceCheckpoint


class StateDictSource(SourceCheckpoint):
    """A :class:`SourceCheckpoint` whose tensors come from an in-memory state dict.

    config.json and the tokenizer files still come from ``model_dir`` (the original model).
    """

    def __init__(self, model_dir: str | Path, state_dict: dict[str, torch.Tensor], origin: str):
        super().__init__(model_dir)
        self._state = state_dict
        self._origin = origin
        missing = [n for n in super().weight_map if n not in state_dict]
        if missing:
            raise KeyError(
                f"{origin}: {len(missing)} tensors of {model_dir} are missing from the state dict, "
                f"e.g. {missing[:3]} (was it saved from this model?)"
            )

    @property
    def weight_map(self) -> dict[str, str]:  # type: ignore[override]
        return {k: self._origin for k in self._state}

    def get(self, name: str) -> torch.Tensor:
        if name not in self._state:
            raise KeyError(f"tensor {name!r} not found in {self._origin}")
        return self._state[name]


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a ``.pt`` state dict safely (``weights_only=True``: no arbitrary code runs)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused or a corrupt file
        raise ValueError(
            f"{path}: could not be read as a plain tensor state dict with torch.load(weights_only=True): {err}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{path}: expected a dict of tensor name -> tensor, got {type(obj).__name__}")
    return obj


def zero_channel_keep(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Indices of micro-experts that are not entirely zero (gate row, up row and down column)."""
    alive = gate.ne(0).any(dim=1) | up.ne(0).any(dim=1) | down.ne(0).any(dim=0)
    return torch.nonzero(alive, as_tuple=False).flatten()


def detect_keeps(source: SourceCheckpoint) -> dict[int, LayerKeep]:
    """Kept micro-experts of every MoE layer of a zero-masked model."""
    keeps: dict[int, LayerKeep] = {}
    for layer in source.arch.moe_layers:
        gates, ups, downs = source.expert_weights(layer)
        experts = tuple(zero_channel_keep(g, u, d) for g, u, d in zip(gates, ups, downs))
        shared = source.shared_weights(layer)
        keeps[layer] = LayerKeep(experts, None if shared is None else zero_channel_keep(*shared))
    return keeps


def convert_zero_masked(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    state_dict_path: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a CAMERA-P checkpoint from a zero-masked model.

    ``model_dir`` is either the zero-masked HF directory itself, or (with
    ``state_dict_path``) the original model whose config and tokenizer accompany the
    reference code's ``prune_model_dict.pt``.
    """
    if state_dict_path is not None:
        source: SourceCheckpoint = StateDictSource(model_dir, load_state_dict_file(state_dict_path), str(state_dict_path))
    else:
        source = SourceCheckpoint(model_dir)
    keeps = detect_keeps(source)
    total = sum(source.arch.intermediate_size for _ in source.arch.moe_layers) * source.arch.num_experts
    kept = sum(sum(k.widths) for k in keeps.values())
    compression: dict[str, Any] = {
        "method": "camera-p",
        "origin": "zero-masked",
        "source": str(state_dict_path or model_dir),
        "routed_channels_kept": kept,
        "routed_channels_total": total,
    }
    return write_pruned_checkpoint(source, out_dir, keeps, compression=compression, overwrite=overwrite)
