"""Read a Hugging Face MoE checkpoint directory tensor by tensor (never the whole model).

Shared by the compressor (``camera_vllm.compress``) and the server
(``--load-format camera`` in ``camera_vllm.vllm_plugin.loader``).

Tensor names are presented in *checkpoint* form (``names.py``), whatever form the files
use.  transformers >= 5 keeps a layer's routed experts fused in memory and writes them
that way with ``save_pretrained(save_original_format=False)`` or
``torch.save(model.state_dict())``: ``experts.gate_up_proj [E, 2I, H]`` (the gate rows
of every expert, then its up rows) and ``experts.down_proj [E, H, I]``; it also calls
Mixtral's MoE block ``mlp`` instead of ``block_sparse_moe``.  Both are read here, as is
the transposed fused layout (``[E, H, 2I]`` and ``[E, I, H]``) that some models store;
the orientation is decided from both tensors' shapes together, which is never ambiguous.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from ..arch import MoEArch, moe_arch_from_config
from ..format import names

# Names of the fused routed-expert tensors under ``<moe block>.experts.``.
FUSED_GATE_UP = "gate_up_proj"
FUSED_DOWN = "down_proj"
# transformers' in-memory name of every architecture's MoE block.
_IN_MEMORY_MOE_MODULE = "mlp"
_LAYER_MODULE = re.compile(r"^model\.layers\.(\d+)\.([^.]+)\.")


def canonical_name(architecture: str, name: str) -> str:
    """The checkpoint-form name of a stored tensor name (Mixtral: ``.mlp.`` -> ``.block_sparse_moe.``)."""
    m = _LAYER_MODULE.match(name)
    if m is None or m.group(2) != _IN_MEMORY_MOE_MODULE:
        return name
    module = names.moe_prefix(architecture, int(m.group(1))).rsplit(".", 1)[1]
    if module == _IN_MEMORY_MOE_MODULE:
        return name
    return f"model.layers.{m.group(1)}.{module}.{name[m.end() :]}"


@dataclass(frozen=True)
class FusedExperts:
    """The two fused routed-expert tensors of one layer (checkpoint-form names) and their orientation."""

    gate_up: str
    down: str
    transposed: bool  # True: [E, H, 2I] and [E, I, H]

    def split(
        self, gate_up: torch.Tensor, down: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(gate [I, H], up [I, H], down [H, I]) views per expert."""
        if self.transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        inter = gate_up.shape[1] // 2
        experts = range(gate_up.shape[0])
        return (
            [gate_up[e, :inter] for e in experts],
            [gate_up[e, inter:] for e in experts],
            [down[e] for e in experts],
        )


def fused_orientation(
    arch: MoEArch, gate_up: str, gate_up_shape: tuple[int, ...], down: str, down_shape: tuple[int, ...]
) -> bool:
    """True if the fused expert tensors are stored transposed.

    Raises, naming both tensors, if neither layout fits.
    Both shapes are checked together: a lone ``[E, 2I, H]`` with ``2I == H`` could be
    either layout, but its ``down_proj`` (``[E, H, I]`` or ``[E, I, H]``) then is not.
    """
    e, h, i = arch.num_experts, arch.hidden_size, arch.intermediate_size
    gu, d = tuple(gate_up_shape), tuple(down_shape)
    if gu == (e, 2 * i, h) and d == (e, h, i):
        return False
    if gu == (e, h, 2 * i) and d == (e, i, h):
        return True
    raise ValueError(
        f"fused experts {gate_up} {list(gu)} and {down} {list(d)}: expected "
        f"[{e}, {2 * i}, {h}] and [{e}, {h}, {i}] (experts, 2 x moe intermediate, hidden), "
        f"or the transposed [{e}, {h}, {2 * i}] and [{e}, {i}, {h}]"
    )


class SourceCheckpoint:
    """A local HF model directory with safetensors weights (single file or sharded).

    Shard files are opened on first use and stay open (memory-mapped) until :meth:`close`;
    the pages of a mapped file that were read count towards the process's resident memory,
    so a long run calls :meth:`close` between layers (handles reopen on the next read, which
    costs one header parse).  Use as a context manager to close them at the end.
    """

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
        self.where = str(self.path)  # where the tensors come from, for messages
        self._handles: dict[str, object] = {}

    @cached_property
    def stored_map(self) -> dict[str, str]:
        """Tensor name as stored -> shard file name."""
        index = self.path / names.INDEX_FILE
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.path / "model.safetensors"
        if not single.is_file():
            raise FileNotFoundError(f"{self.path}: no model.safetensors or {names.INDEX_FILE}")
        with safe_open(single, "pt") as f:
            return {k: single.name for k in f.keys()}

    @cached_property
    def _stored_names(self) -> dict[str, str]:
        """Checkpoint-form name -> name as stored."""
        out: dict[str, str] = {}
        for stored in self.stored_map:
            canon = canonical_name(self.arch.architecture, stored)
            if canon in out:
                raise ValueError(
                    f"{self.path}: both {out[canon]!r} and {stored!r} are stored; they name the same tensor"
                )
            out[canon] = stored
        return out

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Checkpoint-form tensor name -> shard file name."""
        return {canon: self.stored_map[stored] for canon, stored in self._stored_names.items()}

    def _file(self, shard: str):
        if shard not in self._handles:
            handle = safe_open(self.path / shard, "pt")
            handle.__enter__()
            self._handles[shard] = handle
        return self._handles[shard]

    @property
    def open_files(self) -> list[str]:
        """Shard files currently open (memory-mapped)."""
        return sorted(self._handles)

    def close(self) -> None:
        """Close every open shard file (they are reopened if read again)."""
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.__exit__(None, None, None)

    def __enter__(self) -> SourceCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, name: str) -> bool:
        return name in self._stored_names

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor by its checkpoint-form name (raises KeyError naming the tensor and directory)."""
        if name not in self._stored_names:
            raise KeyError(f"tensor {name!r} not found in {self.where}")
        return self._read(self._stored_names[name])

    def _read(self, stored: str) -> torch.Tensor:
        return self._file(self.stored_map[stored]).get_tensor(stored)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor, read from the safetensors header (no data loaded)."""
        if name not in self._stored_names:
            raise KeyError(f"tensor {name!r} not found in {self.where}")
        return self._stored_shape(self._stored_names[name])

    def _stored_shape(self, stored: str) -> tuple[int, ...]:
        return tuple(self._file(self.stored_map[stored]).get_slice(stored).get_shape())

    @property
    def dtype(self) -> torch.dtype:
        name = next(n for n in self.weight_map if n.endswith("embed_tokens.weight"))
        return self.get(name).dtype

    def fused_experts(self, layer: int) -> FusedExperts | None:
        """The fused routed-expert tensors of ``layer`` and their orientation.

        None if the experts are stored per expert.
        """
        prefix = names.moe_prefix(self.arch.architecture, layer) + ".experts"
        gate_up, down = f"{prefix}.{FUSED_GATE_UP}", f"{prefix}.{FUSED_DOWN}"
        if not self.has(gate_up) and not self.has(down):
            return None
        for present, absent in ((gate_up, down), (down, gate_up)):
            if self.has(present) and not self.has(absent):
                raise KeyError(
                    f"{self.where}: fused expert tensor {present!r} is stored but {absent!r} is not"
                )
        try:
            transposed = fused_orientation(self.arch, gate_up, self.shape(gate_up), down, self.shape(down))
        except ValueError as err:
            raise ValueError(f"{self.where}: {err}") from None
        return FusedExperts(gate_up, down, transposed)

    def expert_weights(self, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(gate [I, H], up [I, H], down [H, I]) per routed expert of ``layer``.

        Reads per-expert tensors (``experts.N.gate_proj.weight``) or the fused 3-D form
        (see the module docstring).
        """
        a = self.arch.architecture
        fused = self.fused_experts(layer)
        if fused is not None:
            return fused.split(self.get(fused.gate_up), self.get(fused.down))
        gates, ups, downs = [], [], []
        for e in range(self.arch.num_experts):
            gates.append(self.get(names.expert_tensor(a, layer, e, 0, "weight")))
            ups.append(self.get(names.expert_tensor(a, layer, e, 1, "weight")))
            downs.append(self.get(names.expert_tensor(a, layer, e, 2, "weight")))
        return gates, ups, downs

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
