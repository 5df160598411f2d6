"""Pruned shared-expert linear layers (Qwen2-MoE ``shared_expert``, DeepSeek ``shared_experts``).

A CAMERA-P checkpoint keeps ``S`` of the shared expert's micro-experts, so its tensors
are ``gate_proj/up_proj.weight [S, H]`` and ``down_proj.weight [H, S]`` while vLLM's
model code builds the layers from config.json's full size.  This method allocates the
pruned width instead: ``gate_up_proj`` (vLLM fuses gate and up) gets ``[2S, H]`` and
``down_proj`` gets ``[H, S]``; the model's ``SiluAndMul`` splits its input in half, so
the shapes flow through unchanged code.

A CAMERA-Q checkpoint stores the kept micro-experts in slabs of different bit-widths
(``shared_expert.{gate,up,down}_proj.{qweight,scales,zeros}_bB``).
:class:`CameraSlabLinearMethod` keeps them packed and computes each projection with
``torch.ops.camera_vllm.slab_linear``: the slab kernels on CUDA (one launch per slab for
gate_up, one for down), one transiently dequantized slab at a time elsewhere.

Tensor parallelism follows vLLM's MLP split (column-parallel gate/up, row-parallel
down, whose partial outputs vLLM all-reduces) on the kept micro-experts, with the
rule of :mod:`camera_vllm.format.sharding`: each rank takes a contiguous share of the
micro-experts (CAMERA-P) or whole quantization groups of every slab (CAMERA-Q), the
same share in gate, up and down.  The checkpoint tensors arrive whole and each rank's
loader slices its share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.utils import set_weight_attrs

from ..format import sharding
from ..format.schema import CameraFormatError

if TYPE_CHECKING:
    from .config import CameraConfig

# Buffer of a slab-quantized projection: the kernels' int32 slab metadata.
META = "camera_meta"


def make_shared_linear_method(config: CameraConfig, width: int, prefix: str) -> LinearMethodBase:
    """The linear method of one pruned (and maybe quantized) shared-expert projection, by scheme."""
    if config.camera.scheme == "prune":
        return CameraPrunedLinearMethod(width, prefix)
    if config.camera.scheme == "mixed":
        from .config import layer_index

        index = layer_index(prefix)
        spec = None if index is None else config.camera.layer(index)
        if spec is None or spec.shared_slabs is None or config.camera.group_size is None:
            raise CameraFormatError(f"{prefix}: quantization_config has no shared_slabs for this layer")
        return CameraSlabLinearMethod(
            tuple(config.camera.bits), tuple(spec.shared_slabs), config.camera.group_size, prefix
        )
    raise CameraFormatError(f"{prefix}: unknown CAMERA scheme {config.camera.scheme!r}")


class CameraPrunedLinearMethod(UnquantizedLinearMethod):
    """Unquantized linear layer whose micro-expert axis has the checkpoint's pruned width.

    Forward and post-load processing (CPU GEMM dispatch) are the stock unquantized ones;
    only the allocation and the loader differ.
    """

    def __init__(self, width: int, prefix: str) -> None:
        super().__init__()
        self.width = width  # the checkpoint's (global) kept width
        self.prefix = prefix
        self.lo, self.hi = 0, width  # this rank's share, set in create_weights
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
        self.lo, self.hi = sharding.prune_shares([self.width], layer.tp_size, layer.tp_rank)[0]
        local = self.hi - self.lo
        extra_weight_attrs.pop("weight_loader", None)
        if isinstance(layer, MergedColumnParallelLinear):
            if len(output_partition_sizes) != 2:
                raise CameraFormatError(
                    f"{self.prefix}: expected a fused gate/up projection, got {output_partition_sizes}"
                )
            shape = (2 * local, input_size_per_partition)
            self._expected = {0, 1}
            loader = self._load_gate_up
        elif isinstance(layer, RowParallelLinear):
            if not layer.input_is_parallel:
                raise NotImplementedError(
                    f"{self.prefix}: a pruned down projection needs its input already split across ranks"
                )
            shape = (output_size, local)
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
        lo, hi = self.lo, self.hi
        local = hi - lo
        if loaded_shard_id in (0, 1):
            # shard 0 = gate_proj -> rows [0, s); shard 1 = up_proj -> rows [s, 2s), s = this rank's share
            self._check(("gate_proj", "up_proj")[loaded_shard_id], loaded_weight, (self.width, hidden))
            start = loaded_shard_id * local
            param.data[start : start + local].copy_(loaded_weight[lo:hi])
            self._loaded.add(loaded_shard_id)
        elif loaded_shard_id is None or tuple(loaded_shard_id) == (0, 1):
            self._check("gate_up_proj", loaded_weight, (2 * self.width, hidden))
            param.data[:local].copy_(loaded_weight[lo:hi])
            param.data[local:].copy_(loaded_weight[self.width + lo : self.width + hi])
            self._loaded.update((0, 1))
        else:
            raise CameraFormatError(
                f"{self.prefix}: unexpected shard id {loaded_shard_id!r} for gate_up_proj"
            )

    def _load_down(self, param: torch.nn.Parameter, loaded_weight: torch.Tensor, *unused: Any) -> None:
        self._check("down_proj", loaded_weight, (param.shape[0], self.width))
        param.data.copy_(loaded_weight[:, self.lo : self.hi])
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


class CameraSlabLinearMethod(LinearMethodBase):
    """A shared-expert projection whose micro-experts are slab-quantized (CAMERA-Q).

    Parameters per bit-width ``b`` with ``n_b > 0`` kept micro-experts (``H`` hidden size):

    * ``gate_up_proj``: ``qweight_bB [packed_rows(H, b), 2 n_b]`` int32, ``scales_bB`` /
      ``zeros_bB [ceil(H/G), 2 n_b]`` float16; gate columns first, then up (shard 0 / 1).
    * ``down_proj``: ``qweight_bB [packed_rows(n_b, b), H]``, ``scales_bB`` / ``zeros_bB
      [ceil(n_b/G), H]``: the checkpoint tensors as they are.

    The output of gate_up is ``[..., 2 S]``: every gate slab, then every up slab, in bit
    order, so vLLM's ``SiluAndMul`` pairs gate and up of the same micro-expert and the
    down projection consumes the activation in that same slab order.

    Under tensor parallelism every shape above uses this rank's share of each slab
    (``sharding.mixed_shares``); a slab whose share is empty keeps a zero-size parameter
    that takes its checkpoint tensors and drops them.
    """

    def __init__(self, bits: tuple[int, ...], slabs: tuple[int, ...], group_size: int, prefix: str) -> None:
        super().__init__()
        self.bits = bits
        self.slabs = slabs
        self.group_size = group_size
        self.prefix = prefix
        self.width = sum(slabs)
        self.local_slabs = slabs  # this rank's share of each slab, set in create_weights
        self.tp_size, self.tp_rank = 1, 0
        self.ranges = [(0, n) for n in slabs]
        self.gate_up = False
        self.out_features = 0
        self._loaded: set[tuple[str, int | None]] = set()
        self._expected: set[tuple[str, int | None]] = set()

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
        from camera_kernels.packing import num_groups, packed_rows
        from camera_kernels.slab_weights import QWEIGHT_DTYPE, SCALE_DTYPE

        from . import ops

        assert isinstance(layer, LinearBase)
        ops.ensure_registered()
        tp, rank = self.tp_size, self.tp_rank = layer.tp_size, layer.tp_rank
        self.ranges = sharding.mixed_shares([self.slabs], self.group_size, tp, rank)[0]
        self.local_slabs = sharding.share_sizes(self.ranges)
        extra_weight_attrs.pop("weight_loader", None)
        if isinstance(layer, MergedColumnParallelLinear):
            if len(output_partition_sizes) != 2:
                raise CameraFormatError(
                    f"{self.prefix}: expected a fused gate/up projection, got {output_partition_sizes}"
                )
            self.gate_up = True
            self.out_features = 2 * sum(self.local_slabs)
            hidden = input_size_per_partition
            shards: tuple[int | None, ...] = (0, 1)
        elif isinstance(layer, RowParallelLinear):
            if not layer.input_is_parallel:
                raise NotImplementedError(
                    f"{self.prefix}: a quantized down projection needs its input already split across ranks"
                )
            self.out_features = hidden = output_size
            shards = (None,)
        else:
            raise CameraFormatError(
                f"{self.prefix}: unexpected layer type {type(layer).__name__} for a shared expert"
            )
        self.hidden = hidden
        from camera_kernels.linear import slab_linear_meta

        # The kernels' slab metadata, made once here (per call it would be a host-to-device copy).
        k_sizes = [hidden] if self.gate_up else [m for m in self.local_slabs if m > 0]
        layer.register_buffer(META, slab_linear_meta(k_sizes), persistent=False)
        for bi, (b, n, m) in enumerate(zip(self.bits, self.slabs, self.local_slabs)):
            if n == 0:
                continue  # empty slabs are not stored
            # m: this rank's share of the n micro-experts
            if self.gate_up:
                shapes = {
                    "qweight": (packed_rows(hidden, b), 2 * m),
                    "scales": (num_groups(hidden, self.group_size), 2 * m),
                }
            else:
                shapes = {
                    "qweight": (packed_rows(m, b), hidden),
                    "scales": (num_groups(m, self.group_size), hidden),
                }
            shapes["zeros"] = shapes["scales"]
            for kind, shape in shapes.items():
                dtype = QWEIGHT_DTYPE if kind == "qweight" else SCALE_DTYPE
                param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
                name = f"{kind}_b{b}"
                layer.register_parameter(name, param)
                set_weight_attrs(
                    param,
                    {**extra_weight_attrs, "weight_loader": self._loader, "camera_slab": (kind, b, n, bi)},
                )
                self._expected.update((name, s) for s in shards)

    def _loader(
        self,
        param: torch.nn.Parameter,
        loaded_weight: torch.Tensor,
        loaded_shard_id: int | None = None,
        *unused: Any,
    ) -> None:
        from camera_kernels.packing import num_groups, packed_rows

        kind, b, n, bi = param.camera_slab
        name = f"{kind}_b{b}"
        lo, hi = self.ranges[bi]  # this rank's micro-experts of the slab
        m = hi - lo
        if self.gate_up:
            if loaded_shard_id not in (0, 1):
                raise CameraFormatError(
                    f"{self.prefix}.{name}: expected gate_proj or up_proj (shard 0/1), "
                    f"got shard {loaded_shard_id!r}"
                )
            what = f"{self.prefix} ({('gate_proj', 'up_proj')[loaded_shard_id]}).{name}"
            expected = (param.shape[0], n)
            dest = param.data[:, loaded_shard_id * m : (loaded_shard_id + 1) * m]
            source = loaded_weight[:, lo:hi]
        else:
            what = f"{self.prefix}.{name}"
            hidden = param.shape[1]
            if kind == "qweight":
                expected = (packed_rows(n, b), hidden)
                src = sharding.down_packed_rows(lo, hi, b)
            else:
                expected = (num_groups(n, self.group_size), hidden)
                src = sharding.down_group_rows(lo, hi, self.group_size)
            dest, source = param.data, loaded_weight[src[0] : src[1]]
        if tuple(loaded_weight.shape) != expected or loaded_weight.dtype != param.dtype:
            raise CameraFormatError(
                f"{what} is {tuple(loaded_weight.shape)} {loaded_weight.dtype}, but quantization_config "
                f"(shared slabs {list(self.slabs)} at bits {list(self.bits)}) needs {expected} {param.dtype}"
            )
        dest.copy_(source)
        self._loaded.add((name, loaded_shard_id if self.gate_up else None))

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self._loaded and self._loaded != self._expected:
            missing = sorted(f"{n} (shard {s})" for n, s in self._expected - self._loaded)
            raise CameraFormatError(
                f"{self.prefix}: shared expert tensor(s) missing from the checkpoint: {missing}"
            )
        self._loaded = set()

    def op_weights(self, layer: torch.nn.Module) -> list[torch.Tensor]:
        return [
            getattr(layer, f"{kind}_b{b}")
            for b, m in zip(self.bits, self.local_slabs)
            if m > 0
            for kind in ("qweight", "scales", "zeros")
        ] + [getattr(layer, META)]

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        from . import ops

        out = ops.slab_linear(
            x,
            self.op_weights(layer),
            list(self.bits),
            list(self.local_slabs),
            self.group_size,
            self.gate_up,
            self.out_features,
        )
        return out if bias is None else out + bias
