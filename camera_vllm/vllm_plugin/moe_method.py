"""``CameraMoEMethod``: routed experts of a CAMERA checkpoint inside vLLM's ``RoutedExperts``.

vLLM's runner does the routing (top-k, renormalisation, scaling), the shared experts
and the TP all-reduce; this method only owns the expert weights and computes
``sum_k w[t, k] * Expert_{ids[t, k]}(x[t])`` through ``torch.ops.camera_vllm.moe``.

One subclass per CAMERA scheme: :class:`CameraPruneMoEMethod` (CAMERA-P: ragged
unquantized experts, layout in :mod:`.ragged`).  CAMERA-Q ("mixed") will be a sibling
subclass that allocates slab tensors and passes them to the same op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import (
    FusedMoEConfig,
    FusedMoEParallelConfig,
    FusedMoEQuantConfig,
)
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs

from ..format.schema import CameraFormatError
from . import ops
from .ragged import RaggedLayout

if TYPE_CHECKING:
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    from .config import CameraConfig

# vLLM's checkpoint-name mapping sends experts.N.{gate,up,down}_proj.weight to these
# parameters with shard ids w1 (gate), w3 (up), w2 (down).
W13 = "w13_weight"
W2 = "w2_weight"
OFFSETS = "camera_offsets"
_SHARD_NAMES = {"w1": "gate", "w3": "up", "w2": "down"}


def check_parallel_support(parallel: FusedMoEParallelConfig, prefix: str) -> None:
    """CAMERA layers run on one rank for now (raises NotImplementedError otherwise)."""
    if parallel.tp_size > 1 or parallel.ep_size > 1 or parallel.dp_size > 1:
        raise NotImplementedError(
            f"{prefix}: CAMERA MoE layers are served with tensor/data/expert parallel size 1 for now "
            f"(got tp={parallel.tp_size}, dp={parallel.dp_size}, ep={parallel.ep_size}). Splitting each "
            "expert's kept micro-experts across TP ranks and expert parallelism are planned."
        )


def make_moe_method(config: CameraConfig, layer: RoutedExperts, prefix: str) -> FusedMoEMethodBase:
    """The MoE method for ``layer`` according to the checkpoint's scheme."""
    scheme = config.camera.scheme
    if scheme == "prune":
        return CameraPruneMoEMethod(config, layer.moe_config, prefix)
    if scheme == "mixed":
        raise NotImplementedError(
            f"{prefix}: serving CAMERA-Q checkpoints (scheme 'mixed') in vLLM is not implemented yet; "
            "the slab kernels (camera_kernels.slab_moe) are being integrated. CAMERA-P checkpoints "
            "(scheme 'prune') are served; camera_vllm.reference.load runs 'mixed' checkpoints in transformers."
        )
    raise CameraFormatError(f"{prefix}: unknown CAMERA scheme {scheme!r}")


class CameraMoEMethod(FusedMoEMethodBase):
    """What every CAMERA scheme shares: checks, sizes, and the call into the custom op.

    Subclasses set :attr:`scheme` and implement :meth:`create_weights` and
    :meth:`op_weights` (the tensor list the op's scheme implementation expects).
    """

    scheme: str = ""

    def __init__(self, config: CameraConfig, moe: FusedMoEConfig, prefix: str) -> None:
        super().__init__(moe)
        self.config = config
        self.prefix = prefix
        check_parallel_support(moe.moe_parallel_config, prefix)
        self.global_widths = config.routed_widths(prefix)
        if moe.num_experts != len(self.global_widths):
            raise CameraFormatError(
                f"{prefix}: vLLM built {moe.num_experts} experts but quantization_config describes "
                f"{len(self.global_widths)} (redundant/fused shared experts are not supported)"
            )

    def _check_layer(self, layer: RoutedExperts) -> None:
        if layer.activation != MoEActivation.SILU or not layer.moe_config.is_act_and_mul:
            raise NotImplementedError(
                f"{self.prefix}: CAMERA experts implement SwiGLU (silu(gate) * up) only; "
                f"this layer uses activation {layer.activation.value!r}"
            )
        if layer.apply_router_weight_on_input:
            raise NotImplementedError(
                f"{self.prefix}: apply_router_weight_on_input (router weight applied before the expert, "
                "as in Llama-4) is not supported by CAMERA experts"
            )
        if any(v is not None for v in (layer.swiglu_limit, layer.swiglu_alpha, layer.swiglu_beta)):
            raise NotImplementedError(f"{self.prefix}: clamped/scaled SwiGLU variants are not supported")

    def maybe_roundup_sizes(
        self,
        hidden_size: int,
        intermediate_size_per_partition: int,
        act_dtype: torch.dtype,
        moe_parallel_config: FusedMoEParallelConfig,
    ) -> tuple[int, int]:
        # The layer's widest kept expert, so vLLM's bookkeeping reflects this layer and
        # not config.json's single moe_intermediate_size.  The hidden size is never
        # padded: our weights are not laid out for padded kernels.
        return hidden_size, max(self.global_widths, default=0)

    def get_fused_moe_quant_config(self, layer: RoutedExperts) -> FusedMoEQuantConfig | None:
        # Non-None, so the runner does not ask again on every forward.
        return FusedMoEQuantConfig.make()

    def op_weights(self, layer: RoutedExperts) -> list[torch.Tensor]:
        raise NotImplementedError

    def apply(
        self,
        layer: RoutedExperts,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: Any,
        shared_experts_input: torch.Tensor | None,
    ) -> torch.Tensor:
        # Shared experts are run by vLLM's runner, not here.
        return ops.camera_moe(
            x, topk_weights, topk_ids, self.op_weights(layer), layer.expert_map, self.scheme
        )


class CameraPruneMoEMethod(CameraMoEMethod):
    """CAMERA-P: every expert keeps its own number of micro-experts, stored ragged (no padding)."""

    scheme = "prune"

    def create_weights(
        self,
        layer: RoutedExperts,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        self._check_layer(layer)
        ops.ensure_registered()
        local_to_global = self._local_to_global(layer, num_experts)
        layout = RaggedLayout.for_local_experts(self.global_widths, local_to_global)
        self.layout = layout
        self.local_to_global = local_to_global
        self._global_to_local = {g: local for local, g in enumerate(local_to_global)}
        self.hidden_size = hidden_size
        self._loaded: set[tuple[int, str]] = set()

        attrs = dict(extra_weight_attrs)
        attrs["weight_loader"] = self._weight_loader
        # Zero-filled so a shard that is never loaded reads as a pruned one, not garbage;
        # process_weights_after_loading still rejects a partially loaded layer.
        w13 = torch.nn.Parameter(
            torch.zeros(2 * layout.total, hidden_size, dtype=params_dtype), requires_grad=False
        )
        w2t = torch.nn.Parameter(
            torch.zeros(layout.total, hidden_size, dtype=params_dtype), requires_grad=False
        )
        layer.register_parameter(W13, w13)
        layer.register_parameter(W2, w2t)
        set_weight_attrs(w13, attrs)
        set_weight_attrs(w2t, attrs)
        layer.register_buffer(OFFSETS, layout.offsets_tensor(), persistent=False)

    @staticmethod
    def _local_to_global(layer: RoutedExperts, num_local: int) -> list[int]:
        local_to_global = [-1] * num_local
        for g in range(layer.global_num_experts):
            local = layer._map_global_expert_id_to_local_expert_id(g)
            if local >= 0:
                local_to_global[local] = g
        if -1 in local_to_global:
            raise RuntimeError(
                f"expert map of {layer.layer_name} leaves local slots unassigned: {local_to_global}"
            )
        return local_to_global

    def _weight_loader(
        self,
        param: torch.nn.Parameter,
        loaded_weight: torch.Tensor,
        weight_name: str,
        shard_id: str,
        expert_id: int,
        return_success: bool = False,
    ) -> bool | None:
        """Copy one checkpoint tensor ``experts.N.{gate,up,down}_proj.weight`` into its ragged rows."""
        layer_local = self._global_to_local.get(expert_id, -1)
        if layer_local < 0:
            return False if return_success else None  # held by another rank
        width = self.layout.widths[layer_local]
        hidden = self.hidden_size
        if shard_id in ("w1", "w3"):
            rows = (
                self.layout.gate_rows(layer_local) if shard_id == "w1" else self.layout.up_rows(layer_local)
            )
            expected, source = (width, hidden), loaded_weight
        elif shard_id == "w2":
            rows, expected, source = self.layout.down_rows(layer_local), (hidden, width), loaded_weight.t()
        else:
            raise CameraFormatError(f"{weight_name}: unexpected expert shard id {shard_id!r}")
        if tuple(loaded_weight.shape) != expected:
            raise CameraFormatError(
                f"{self.prefix}: expert {expert_id} {_SHARD_NAMES[shard_id]}_proj has shape "
                f"{tuple(loaded_weight.shape)}, but quantization_config gives this expert width {width} "
                f"(expected {expected})"
            )
        param.data[rows].copy_(source)
        self._loaded.add((layer_local, shard_id))
        return True if return_success else None

    def process_weights_after_loading(self, layer: RoutedExperts) -> None:
        # An empty set means nothing went through our loader (e.g. --load-format dummy);
        # a partial set means the checkpoint lacks tensors the config promises.
        if self._loaded:
            expected = {(e, s) for e, w in enumerate(self.layout.widths) if w > 0 for s in _SHARD_NAMES}
            missing = sorted(expected - self._loaded)
            if missing:
                shown = ", ".join(
                    f"expert {self.local_to_global[e]} {_SHARD_NAMES[s]}_proj" for e, s in missing[:8]
                )
                raise CameraFormatError(
                    f"{self.prefix}: {len(missing)} expert tensor(s) missing from the checkpoint: {shown}"
                )
        self._loaded = set()

    def op_weights(self, layer: RoutedExperts) -> list[torch.Tensor]:
        return [getattr(layer, W13), getattr(layer, W2), getattr(layer, OFFSETS)]
