"""Pruned shared-expert linear layers (Qwen2-MoE ``shared_expert``, DeepSeek ``shared_experts``).

A CAMERA-P checkpoint keeps ``S`` of the shared expert's micro-experts, so its tensors
are ``gate_proj/up_proj.weight [S, H]`` and ``down_proj.weight [H, S]`` while vLLM's
model code builds the layers from config.json's full size.  This method allocates the
pruned width instead: ``gate_up_proj`` (vLLM fuses gate and up) gets ``[2S, H]`` and
``down_proj`` gets ``[H, S]``; the model's ``SiluAndMul`` splits its input in half, so
the shapes flow through unchanged code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    MergedColumnParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.utils import set_weight_attrs

from ..format.schema import CameraFormatError

if TYPE_CHECKING:
    from .config import CameraConfig


def make_shared_linear_method(config: CameraConfig, width: int, prefix: str) -> UnquantizedLinearMethod:
    """The linear method of one pruned shared-expert projection, by scheme."""
    if config.camera.scheme == "prune":
        return CameraPrunedLinearMethod(width, prefix)
    raise NotImplementedError(
        f"{prefix}: serving CAMERA-Q (scheme {config.camera.scheme!r}) shared experts in vLLM is not implemented yet"
    )


class CameraPrunedLinearMethod(UnquantizedLinearMethod):
    """Unquantized linear layer whose micro-expert axis has the checkpoint's pruned width.

    Forward and post-load processing (CPU GEMM dispatch) are the stock unquantized ones;
    only the allocation and the loader differ.
    """

    def __init__(self, width: int, prefix: str) -> None:
        super().__init__()
        self.width = width
        self.prefix = prefix
        self._loaded: set[int | None] = set()
        self._expected: set[int | None] = set()

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        assert isinstance(layer, LinearBase)
        if layer.tp_size > 1:
            raise NotImplementedError(
                f"{self.prefix}: pruned shared experts are served with tensor_parallel_size=1 for now; "
                "splitting the kept micro-experts across ranks is planned"
            )
        extra_weight_attrs.pop("weight_loader", None)
        if isinstance(layer, MergedColumnParallelLinear):
            if len(output_partition_sizes) != 2:
                raise CameraFormatError(
                    f"{self.prefix}: expected a fused gate/up projection, got {output_partition_sizes}"
                )
            shape = (2 * self.width, input_size_per_partition)
            self._expected = {0, 1}
            loader = self._load_gate_up
        elif isinstance(layer, RowParallelLinear):
            shape = (output_size, self.width)
            self._expected = {None}
            loader = self._load_down
        else:
            raise CameraFormatError(
                f"{self.prefix}: unexpected layer type {type(layer).__name__} for a shared expert"
            )
        weight = torch.nn.Parameter(torch.zeros(shape, dtype=params_dtype), requires_grad=False)
        layer.register_parameter("weight", weight)
        set_weight_attrs(
            weight, {**extra_weight_attrs, "input_dim": 1, "output_dim": 0, "weight_loader": loader}
        )

    def _check(self, what: str, got: torch.Tensor, expected: tuple[int, ...]) -> None:
        if tuple(got.shape) != expected:
            raise CameraFormatError(
                f"{self.prefix}: {what} has shape {tuple(got.shape)}, but quantization_config gives the "
                f"shared expert width {self.width} (expected {expected})"
            )

    def _load_gate_up(
        self,
        param: torch.nn.Parameter,
        loaded_weight: torch.Tensor,
        loaded_shard_id: int | tuple[int, ...] | None = None,
    ) -> None:
        hidden = param.shape[1]
        if loaded_shard_id in (0, 1):
            # shard 0 = gate_proj -> rows [0, S); shard 1 = up_proj -> rows [S, 2S)
            self._check(("gate_proj", "up_proj")[loaded_shard_id], loaded_weight, (self.width, hidden))
            start = loaded_shard_id * self.width
            param.data[start : start + self.width].copy_(loaded_weight)
            self._loaded.add(loaded_shard_id)
        elif loaded_shard_id is None or tuple(loaded_shard_id) == (0, 1):
            self._check("gate_up_proj", loaded_weight, (2 * self.width, hidden))
            param.data.copy_(loaded_weight)
            self._loaded.update((0, 1))
        else:
            raise CameraFormatError(
                f"{self.prefix}: unexpected shard id {loaded_shard_id!r} for gate_up_proj"
            )

    def _load_down(self, param: torch.nn.Parameter, loaded_weight: torch.Tensor, *unused: Any) -> None:
        self._check("down_proj", loaded_weight, tuple(param.shape))
        param.data.copy_(loaded_weight)
        self._loaded.add(None)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self._loaded and self._loaded != self._expected:
            missing = sorted(
                ("gate_proj", "up_proj")[s] if s is not None else "down_proj"
                for s in self._expected - self._loaded
            )
            raise CameraFormatError(
                f"{self.prefix}: shared expert tensor(s) missing from the checkpoint: {missing}"
            )
        super().process_weights_after_loading(layer)
