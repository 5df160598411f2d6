"""Turn zero-masked pruning output (the CAMERA reference code's) into a CAMERA-P checkpoint.

The reference implementation prunes by zero-masking: every tensor keeps its shape and
the pruned micro-experts' gate rows, up rows and down columns are set to zero.  It
saves either a torch state dict (``prune_model_dict.pt``) or, through
``save_pretrained``, a normal HF directory full of zeros.  A channel counts as pruned
only when its gate row, up row and down column are *all exactly* zero, so a channel
that merely has a zero row somewhere is kept.

Under transformers >= 5 the state dict (and a directory written with
``save_pretrained(save_original_format=False)``) holds each layer's routed experts as
two fused tensors; :class:`~camera_vllm.checkpoint.source.SourceCheckpoint` reads those
too, and the CAMERA-P checkpoint always stores its experts per expert under the
checkpoint names.  Which channels are zero is decided in :mod:`camera_vllm.checkpoint.zero_mask`
(shared with ``--load-format camera``); this module reads ``.pt`` state dicts and writes.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from ..checkpoint.source import FUSED_DOWN, FUSED_GATE_UP, SourceCheckpoint
from ..checkpoint.zero_mask import detect_keeps, zero_mask_compression
from ..format import names
from .prune import write_pruned_checkpoint


class StateDictSource(SourceCheckpoint):
    """A :class:`SourceCheckpoint` whose tensors come from an in-memory state dict.

    config.json and the tokenizer files still come from ``model_dir`` (the original model).
    The state dict may hold the routed experts per expert or fused (what
    ``torch.save(model.state_dict())`` writes under transformers >= 5), whatever layout
    ``model_dir`` uses; every other tensor of ``model_dir`` must be in it.
    """

    def __init__(self, model_dir: str | Path, state_dict: dict[str, torch.Tensor], origin: str):
        super().__init__(model_dir)
        self._state = state_dict
        self._origin = origin
        self.where = origin
        original = SourceCheckpoint(model_dir)
        routed = set().union(*(original.expert_tensor_names(layer) for layer in self.arch.moe_layers))
        missing = [n for n in original.weight_map if n not in routed and not self.has(n)]
        if missing:
            raise KeyError(
                f"{origin}: {len(missing)} tensors of {model_dir} are missing from the state dict, "
                f"e.g. {missing[:3]} (was it saved from this model?)"
            )
        a = self.arch.architecture
        for layer in self.arch.moe_layers:
            if self.fused_experts(layer) is not None:
                continue
            absent = [
                n
                for e in range(self.arch.num_experts)
                for proj in range(3)
                if not self.has(n := names.expert_tensor(a, layer, e, proj, "weight"))
            ]
            if absent:
                raise KeyError(
                    f"{origin}: the routed experts of layer {layer} are missing from the state dict: neither "
                    f"fused ({names.moe_prefix(a, layer)}.experts.{FUSED_GATE_UP} and .{FUSED_DOWN}) nor "
                    f"per expert ({len(absent)} missing, e.g. {absent[:2]}); was it saved from this model?"
                )

    @cached_property
    def stored_map(self) -> dict[str, str]:  # type: ignore[override]
        return dict.fromkeys(self._state, self._origin)

    def _read(self, stored: str) -> torch.Tensor:
        return self._state[stored]

    def _stored_shape(self, stored: str) -> tuple[int, ...]:
        return tuple(self._state[stored].shape)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a ``.pt`` state dict safely (``weights_only=True``: no arbitrary code runs)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused or a corrupt file
        raise ValueError(
            f"{path}: could not be read as a plain tensor state dict with "
            f"torch.load(weights_only=True): {err}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(f"{path}: expected a dict of tensor name -> tensor, got {type(obj).__name__}")
    return obj


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
        source: SourceCheckpoint = StateDictSource(
            model_dir, load_state_dict_file(state_dict_path), str(state_dict_path)
        )
    else:
        source = SourceCheckpoint(model_dir)
    keeps = detect_keeps(source)
    compression = zero_mask_compression(source, keeps, "zero-masked", str(state_dict_path or model_dir))
    return write_pruned_checkpoint(source, out_dir, keeps, compression=compression, overwrite=overwrite)
