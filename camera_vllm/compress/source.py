"""Read a Hugging Face MoE checkpoint directory tensor by tensor (never the whole model)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from ..arch import MoEArch, moe_arch_from_config
from ..format import names


class SourceCheckpoint:
    """A local HF model directory with safetensors weights (single file or sharded)."""

    def __init__(self, model_dir: str | Path):
        self.path = Path(model_dir)
        cfg_path = self.path / names.CONFIG_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: no config.json; expected a Hugging Face model directory")
        self.config: dict = json.loads(cfg_path.read_text())
        qc = self.config.get("quantization_config")
        if qc:
            raise ValueError(
                f"{cfg_path}: the model is already quantized ({qc.get('quant_method')!r}); "
                "CAMERA compresses an unquantized model"
            )
        self.arch: MoEArch = moe_arch_from_config(self.config)
        self._handles: dict[str, object] = {}

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file name."""
        index = self.path / names.INDEX_FILE
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.path / "model.safetensors"
        if not single.is_file():
            raise FileNotFoundError(f"{self.path}: no model.safetensors or {names.INDEX_FILE}")
        with safe_open(single, "pt") as f:
            return {k: single.name for k in f.keys()}

    def _file(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.path / shard, "pt")
        return self._handles[shard]

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (raises KeyError naming the tensor and directory)."""
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} not found in {self.path}")
        return self._file(self.weight_map[name]).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor, read from the safetensors header (no data loaded)."""
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} not found in {self.path}")
        return tuple(self._file(self.weight_map[name]).get_slice(name).get_shape())

    @property
    def dtype(self) -> torch.dtype:
        name = next(n for n in self.weight_map if n.endswith("embed_tokens.weight"))
        return self.get(name).dtype

    def expert_weights(self, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(gate [I, H], up [I, H], down [H, I]) per routed expert of ``layer``.

        Reads per-expert tensors (``experts.N.gate_proj.weight``) or the fused 3-D form
        (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``).
        """
        a = self.arch.architecture
        first = names.expert_tensor(a, layer, 0, 0, "weight")
        if self.has(first):
            gates, ups, downs = [], [], []
            for e in range(self.arch.num_experts):
                gates.append(self.get(names.expert_tensor(a, layer, e, 0, "weight")))
                ups.append(self.get(names.expert_tensor(a, layer, e, 1, "weight")))
                downs.append(self.get(names.expert_tensor(a, layer, e, 2, "weight")))
            return gates, ups, downs
        prefix = names.moe_prefix(a, layer) + ".experts"
        gate_up, down = self.get(f"{prefix}.gate_up_proj"), self.get(f"{prefix}.down_proj")
        inter = gate_up.shape[1] // 2
        return (
            [gate_up[e, :inter] for e in range(gate_up.shape[0])],
            [gate_up[e, inter:] for e in range(gate_up.shape[0])],
            [down[e] for e in range(down.shape[0])],
        )

    def expert_tensor_names(self, layer: int) -> set[str]:
        """Names of every stored routed-expert tensor of ``layer`` (either layout)."""
        prefix = names.moe_prefix(self.arch.architecture, layer) + ".experts."
        return {n for n in self.weight_map if n.startswith(prefix)}

    def shared_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(gate [S, H], up [S, H], down [H, S]) of the shared expert, or None."""
        if not self.arch.has_shared_expert:
            return None
        a = self.arch.architecture
        return tuple(self.get(names.shared_tensor(a, layer, p, "weight")) for p in range(3))  # type: ignore[return-value]

    def shared_tensor_names(self, layer: int) -> set[str]:
        if not self.arch.has_shared_expert:
            return set()
        return {names.shared_tensor(self.arch.architecture, layer, p, "weight") for p in range(3)}
