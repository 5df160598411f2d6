"""``CameraMoEMethod``: routed experts of a CAMERA checkpoint inside vLLM's ``RoutedExperts``.

vLLM's runner does the routing (top-k, renormalisation, scaling), the shared experts
and the TP all-reduce; this method only owns the expert weights and computes
``sum_k w[t, k] * Expert_{ids[t, k]}(x[t])`` through one of the ``torch.ops.camera_vllm``
expert ops (:mod:`.ops`).

One subclass per checkpoint scheme: :class:`CameraPruneMoEMethod` (CAMERA-P: ragged
unquantized experts, layout in :mod:`.ragged`) and :class:`CameraMixedMoEMethod`
(CAMERA-Q: packed mixed-precision slabs, layout :class:`camera_kernels.SlabLayout`).
``process_weights_after_loading`` decides once which computation the layer runs and keeps
it as :attr:`CameraMoEMethod.computation` (an immutable :data:`.ops.MoEComputation`);
``apply`` only calls it:

* CAMERA-Q: :class:`.ops.SlabMoE` (``camera_vllm.moe_slab``, the slab kernels);
* CAMERA-P off CPU, or when ``CAMERA_VLLM_BACKEND`` forces ``triton`` or ``reference``
  (:func:`.backend.prune_on_slabs`): repacked into one 16-bit dense slab, :class:`.ops.SlabMoE`;
* CAMERA-P in bf16 on CPU: prepacked width buckets for vLLM's CPU kernel,
  :class:`.ops.CpuBucketsMoE` (``camera_vllm.moe_cpu_buckets``);
* CAMERA-P otherwise (fp32 on CPU, ``CAMERA_VLLM_CPU_KERNEL=0``): the exact ragged torch
  loop, :class:`.ops.RaggedMoE` (``camera_vllm.moe_ragged``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import (
    FusedMoEConfig,
    FusedMoEParallelConfig,
    FusedMoEQuantConfig,
)
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs

from ..format import sharding
from ..format.schema import CameraFormatError
from . import ops
from .config import layer_index as layer_index_of
from .ragged import RaggedLayout

if TYPE_CHECKING:
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    from .config import CameraConfig

# vLLM's checkpoint-name mapping sends experts.N.{gate,up,down}_proj.weight to these
# parameters with shard ids w1 (gate), w3 (up), w2 (down).
W13 = "w13_weight"
W2 = "w2_weight"
OFFSETS = "camera_offsets"
# CAMERA-P layers served by vLLM's CPU kernel: the slot route and the prepacked width buckets.
CPU_ROUTE = "camera_cpu_route"
CPU_BUCKET = "camera_cpu_bucket"
_SHARD_NAMES = {"w1": "gate", "w3": "up", "w2": "down"}
# CAMERA-P layers repacked as a dense slab: buffer name prefix.
DENSE_SLAB = "camera_dense_"

logger = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(level: int, message: str, *args: Any) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message, *args)


def dense_slab_dtype(w13: torch.Tensor, w2t: torch.Tensor, prefix: str) -> torch.dtype | None:
    """What a dense slab of these CAMERA-P weights holds: their own dtype when 16-bit; for fp32
    weights bf16 or fp16 only when the conversion is exact (checkpoints saved in 16 bits and
    served with ``--dtype float32``); else None, with a warning (the torch path then serves them)."""
    from camera_kernels.packing import DENSE_DTYPES

    if w13.dtype in DENSE_DTYPES:
        return w13.dtype
    for dtype in DENSE_DTYPES:
        if all(torch.equal(t.to(dtype).to(t.dtype), t) for t in (w13, w2t)):
            return dtype
    _log_once(
        logging.WARNING,
        "%s: CAMERA-P weights in %s are not exact in 16 bits, so they stay on the torch ragged path, "
        "which syncs with the host (CUDA graphs need --enforce-eager); serve with --dtype bfloat16 "
        "to use the fused slab kernels",
        prefix,
        w13.dtype,
    )
    return None


def check_parallel_support(parallel: FusedMoEParallelConfig, prefix: str) -> None:
    """CAMERA layers support tensor and expert parallelism, not data parallelism.

    Raises NotImplementedError for data parallelism.
    """
    if parallel.dp_size > 1:
        raise NotImplementedError(
            f"{prefix}: CAMERA MoE layers are not served with data parallelism (got dp={parallel.dp_size}); "
            "use --tensor-parallel-size, optionally with --enable-expert-parallel, or run replicas"
        )


def make_moe_method(config: CameraConfig, layer: RoutedExperts, prefix: str) -> FusedMoEMethodBase:
    """The MoE method for ``layer`` according to the checkpoint's scheme."""
    scheme = config.camera.scheme
    if scheme == "prune":
        return CameraPruneMoEMethod(config, layer.moe_config, prefix)
    if scheme == "mixed":
        return CameraMixedMoEMethod(config, layer.moe_config, prefix)
    raise CameraFormatError(f"{prefix}: unknown CAMERA scheme {scheme!r}")


class CameraMoEMethod(FusedMoEMethodBase):
    """What every CAMERA scheme shares: checks, sizes, and the call into the layer's computation.

    Subclasses name their checkpoint :attr:`scheme`, implement :meth:`create_weights`, and
    set :attr:`computation` once in ``process_weights_after_loading``.
    """

    #: The checkpoint scheme this class serves (``quantization_config.scheme``); fixed per class.
    scheme: ClassVar[str]

    def __init__(self, config: CameraConfig, moe: FusedMoEConfig, prefix: str) -> None:
        super().__init__(moe)
        self.config = config
        self.prefix = prefix
        self._computation: ops.MoEComputation | None = None
        parallel = moe.moe_parallel_config
        check_parallel_support(parallel, prefix)
        # With expert parallelism vLLM's MoE tp_size is 1: experts stay whole.
        self.tp_size, self.tp_rank = parallel.tp_size, parallel.tp_rank
        self.global_widths = config.routed_widths(prefix)
        if moe.num_experts != len(self.global_widths):
            raise CameraFormatError(
                f"{prefix}: vLLM built {moe.num_experts} experts but quantization_config describes "
                f"{len(self.global_widths)} (redundant/fused shared experts are not supported)"
            )

    def _bind_local_experts(self, layer: RoutedExperts, num_local: int) -> list[int]:
        """Record which global experts this rank holds (``local_to_global`` and its inverse)."""
        self.local_to_global = local_to_global_ids(layer, num_local)
        self._global_to_local = {g: local for local, g in enumerate(self.local_to_global)}
        return self.local_to_global

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
        # The layer's widest kept expert share on this rank, so vLLM's bookkeeping
        # reflects this layer and not config.json's single moe_intermediate_size.  The
        # hidden size is never padded: our weights are not laid out for padded kernels.
        return hidden_size, max(self.rank_widths(), default=0)

    def rank_widths(self) -> list[int]:
        """Micro-experts of every global expert held by this tensor-parallel rank (sharding rule)."""
        raise NotImplementedError

    def get_fused_moe_quant_config(self, layer: RoutedExperts) -> FusedMoEQuantConfig | None:
        # Non-None, so the runner does not ask again on every forward.
        return FusedMoEQuantConfig.make()

    @property
    def computation(self) -> ops.MoEComputation:
        """What this layer runs, decided once after loading (see the module docstring)."""
        if self._computation is None:
            raise RuntimeError(f"{self.prefix}: the MoE layer ran before process_weights_after_loading")
        return self._computation

    def _set_computation(self, computation: ops.MoEComputation) -> None:
        """Fix :attr:`computation`; a second call may only confirm it (e.g. a repeated
        ``process_weights_after_loading`` on a CAMERA-Q layer), never change it."""
        if self._computation is not None and self._computation != computation:
            raise RuntimeError(
                f"{self.prefix}: process_weights_after_loading ran again and would switch the layer from "
                f"{type(self._computation).__name__} to {type(computation).__name__}; CAMERA-P layers "
                "repacked after loading cannot be reloaded in place"
            )
        self._computation = computation

    def apply(
        self,
        layer: RoutedExperts,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: Any,
        shared_experts_input: torch.Tensor | None,
    ) -> torch.Tensor:
        # Shared experts are run by vLLM's runner, not here.  One opaque op call under Dynamo.
        return self.computation(layer, x, topk_weights, topk_ids, layer.expert_map)


def local_to_global_ids(layer: RoutedExperts, num_local: int) -> list[int]:
    """Global expert id of every local expert slot of ``layer``."""
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


class CameraPruneMoEMethod(CameraMoEMethod):
    """CAMERA-P: every expert keeps its own number of micro-experts, stored ragged (no padding).

    vLLM loads the checkpoint into the ragged ``w13``/``w2`` tensors (:mod:`.ragged`); after
    loading, the layer is repacked for the computation that will run it: one 16-bit dense
    slab on the slab kernels (CUDA; :func:`.backend.prune_on_slabs`), width buckets for
    vLLM's CPU kernel (bf16 on CPU), or left as it is for the exact torch loop.

    Under tensor parallelism a rank stores only its contiguous share of every expert's
    micro-experts (:func:`camera_vllm.format.sharding.prune_shares`): a smaller ragged
    layout, computed by the same op; vLLM all-reduces the partial outputs.
    """

    scheme: ClassVar[str] = "prune"

    def rank_shares(self) -> list[tuple[int, int]]:
        """Micro-experts ``[lo, hi)`` of every global expert held by this rank (sharding rule)."""
        return sharding.prune_shares(self.global_widths, self.tp_size, self.tp_rank)

    def rank_widths(self) -> list[int]:
        return list(sharding.share_sizes(self.rank_shares()))

    def create_weights(
        self,
        layer: RoutedExperts,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        from .backend import expert_backend

        expert_backend()  # a bad CAMERA_VLLM_BACKEND fails at load, not at the first forward
        self._check_layer(layer)
        ops.ensure_registered()
        local_to_global = self._bind_local_experts(layer, num_experts)
        self._shares = self.rank_shares()
        layout = RaggedLayout.for_local_experts(sharding.share_sizes(self._shares), local_to_global)
        self.layout = layout
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
            # Held by another rank; an empty parameter is complete as it is.
            return (param.numel() == 0) if return_success else None
        width = self.global_widths[expert_id]
        lo, hi = self._shares[expert_id]  # this rank's share
        hidden = self.hidden_size
        if shard_id in ("w1", "w3"):
            rows = (
                self.layout.gate_rows(layer_local) if shard_id == "w1" else self.layout.up_rows(layer_local)
            )
            expected, source = (width, hidden), loaded_weight[lo:hi]
        elif shard_id == "w2":
            rows, expected, source = (
                self.layout.down_rows(layer_local),
                (hidden, width),
                loaded_weight[:, lo:hi].t(),
            )
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
            # Global widths: an expert whose share on this rank is empty still has tensors.
            expected = {
                (e, s)
                for e, g in enumerate(self.local_to_global)
                if self.global_widths[g] > 0
                for s in _SHARD_NAMES
            }
            missing = sorted(expected - self._loaded)
            if missing:
                shown = ", ".join(
                    f"expert {self.local_to_global[e]} {_SHARD_NAMES[s]}_proj" for e, s in missing[:8]
                )
                raise CameraFormatError(
                    f"{self.prefix}: {len(missing)} expert tensor(s) missing from the checkpoint: {shown}"
                )
        self._loaded = set()
        from .backend import prune_on_slabs

        w13, w2t = getattr(layer, W13), getattr(layer, W2)
        if prune_on_slabs(w13.device.type):
            dtype = dense_slab_dtype(w13.data, w2t.data, self.prefix)
            if dtype is not None:
                self._set_computation(self._use_dense_slab(layer, dtype))
                return
        # bf16 on CPU: vLLM's compiled MoE kernel, one call per width bucket (ragged_cpu.py).
        packed = ops.prepare_cpu_buckets(w13, w2t, list(self.layout.widths))
        if packed is not None:
            self._set_computation(self._use_cpu_buckets(layer, packed))
            return
        self._set_computation(ops.RaggedMoE(W13, W2, OFFSETS))

    def _use_dense_slab(self, layer: RoutedExperts, dtype: torch.dtype) -> ops.SlabMoE:
        """Serve ``layer`` as one 16-bit dense slab on the slab kernels; free the ragged tensors."""
        from camera_kernels import SlabMoEWeights

        slabs = SlabMoEWeights.from_ragged_dense(
            getattr(layer, W13).data, getattr(layer, W2).data, self.layout.widths, dtype
        )
        for group in ops.SLAB_TENSOR_GROUPS:
            (tensor,) = getattr(slabs, group)  # one (16-bit) slab
            layer.register_buffer(DENSE_SLAB + group, tensor, persistent=False)
        for meta in ops.SLAB_METADATA:
            layer.register_buffer(DENSE_SLAB + meta, getattr(slabs, meta), persistent=False)
        self._free_ragged(layer)
        _log_once(logging.INFO, "CAMERA-P experts run as %s dense slabs on the slab kernels", dtype)
        return ops.SlabMoE.of_layout(
            slabs.layout,
            tuple((DENSE_SLAB + group,) for group in ops.SLAB_TENSOR_GROUPS),
            tuple(DENSE_SLAB + meta for meta in ops.SLAB_METADATA),
        )

    def _free_ragged(self, layer: RoutedExperts) -> None:
        for name in (W13, W2):
            param = getattr(layer, name)
            param.data = param.data.new_empty((0, param.shape[1]))

    def _use_cpu_buckets(self, layer: RoutedExperts, packed: ops.PackedBuckets) -> ops.CpuBucketsMoE:
        """Serve ``layer`` from its bucketed copy and free the ragged tensors it replaces."""
        names = tuple(f"{CPU_BUCKET}{j // 2}_{'w2' if j % 2 else 'w13'}" for j in range(len(packed.buckets)))
        layer.register_buffer(CPU_ROUTE, packed.route, persistent=False)
        for name, tensor in zip(names, packed.buckets):
            layer.register_buffer(name, tensor, persistent=False)
        self._free_ragged(layer)
        return ops.CpuBucketsMoE(CPU_ROUTE, names, packed.isa)


# Checkpoint kinds of a slab tensor and the SlabMoEWeights field each (projection, kind) fills.
_SLAB_KINDS = ("qweight", "scales", "zeros")


def mixed_param_name(proj: str, kind: str, bits: int) -> str:
    """Parameter name vLLM's expert mapping produces: ``w13_qweight_b4``, ``w2_scales_b2`` ..."""
    return f"{proj}_{kind}_b{bits}"


class CameraMixedMoEMethod(CameraMoEMethod):
    """CAMERA-Q: every expert's micro-experts in slabs of different bit-widths, kept packed.

    Per bit-width ``b`` the layer owns ``w13_{qweight,scales,zeros}_b{b}`` and
    ``w2_{qweight,scales,zeros}_b{b}``: all local experts' slabs of that width
    concatenated as :class:`camera_kernels.SlabLayout` prescribes (gate/up by columns,
    down by packed rows / groups).  The loader copies each checkpoint tensor into its
    slice; nothing is ever dequantized into a persistent tensor.  A bit-width no expert
    of the layer uses has zero-size tensors, kept as buffers (nothing to load); one that
    only experts (or shares) on other ranks use is a zero-size parameter.

    Under tensor parallelism a rank holds whole quantization groups of every slab
    (:func:`camera_vllm.format.sharding.mixed_shares`), so its share is again a slab layout
    and the same op computes it; vLLM all-reduces the partial outputs.
    """

    scheme: ClassVar[str] = "mixed"

    def global_slabs(self) -> list[tuple[int, ...]]:
        """Slab sizes of every global expert of this layer, as the checkpoint stores them."""
        camera = self.config.camera
        index = layer_index_of(self.prefix)
        spec = camera.layer(index) if index is not None else None
        assert spec is not None  # routed_widths() in __init__ already refused an undescribed layer
        return [tuple(slabs) for slabs in spec.expert_slabs]

    def rank_shares(self) -> list[list[tuple[int, int]]]:
        """Micro-experts ``[lo, hi)`` of every slab of every global expert held by this rank.

        By the sharding rule (:func:`camera_vllm.format.sharding.mixed_shares`).
        """
        group = self.config.camera.group_size
        assert group is not None
        return sharding.mixed_shares(self.global_slabs(), group, self.tp_size, self.tp_rank)

    def rank_widths(self) -> list[int]:
        return [sum(sharding.share_sizes(s)) for s in self.rank_shares()]

    def create_weights(
        self,
        layer: RoutedExperts,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        from camera_kernels import SlabLayout
        from camera_kernels.slab_weights import QWEIGHT_DTYPE, SCALE_DTYPE

        from .backend import expert_backend

        expert_backend()  # a bad CAMERA_VLLM_BACKEND fails at load, not at the first forward
        self._check_layer(layer)
        ops.ensure_registered()
        camera = self.config.camera
        local_to_global = self._bind_local_experts(layer, num_experts)
        assert camera.group_size is not None
        self._global_slabs = self.global_slabs()
        self._shares = self.rank_shares()
        layout = SlabLayout(
            hidden_size,
            camera.group_size,
            tuple(camera.bits),
            tuple(sharding.share_sizes(self._shares[g]) for g in local_to_global),
        )
        self.layout = layout
        self._loaded: set[tuple[int, int, str, str]] = set()
        self.param_names: list[str] = []

        attrs = dict(extra_weight_attrs)
        attrs["weight_loader"] = self._weight_loader
        for i, b in enumerate(layout.bits):
            shapes = {
                "w13": (layout.w13_qweight_shape(i), layout.w13_scales_shape(i)),
                "w2": (layout.w2_qweight_shape(i), layout.w2_scales_shape(i)),
            }
            for proj, (qshape, sshape) in shapes.items():
                for kind in _SLAB_KINDS:
                    shape, dtype = (qshape, QWEIGHT_DTYPE) if kind == "qweight" else (sshape, SCALE_DTYPE)
                    name = mixed_param_name(proj, kind, b)
                    # Zeros, not empty: an unloaded slice is caught by the completeness check,
                    # but must never be read as garbage in a dummy-weights run.
                    tensor = torch.zeros(shape, dtype=dtype)
                    if not any(slabs[i] for slabs in self._global_slabs):
                        # Nothing of this width in this layer: no checkpoint tensor will come,
                        # and weight tracking only checks parameters.  (A width some expert
                        # has but no local one does is a zero-size parameter that accepts
                        # and drops its tensors.)
                        layer.register_buffer(name, tensor, persistent=False)
                        continue
                    param = torch.nn.Parameter(tensor, requires_grad=False)
                    layer.register_parameter(name, param)
                    set_weight_attrs(param, {**attrs, "camera_slab": (proj, kind, i)})
                    self.param_names.append(name)
        for name, tensor in layout.metadata().items():
            layer.register_buffer(f"camera_{name}", tensor, persistent=False)

    def _weight_loader(
        self,
        param: torch.nn.Parameter,
        loaded_weight: torch.Tensor,
        weight_name: str,
        shard_id: str,
        expert_id: int,
        return_success: bool = False,
    ) -> bool | None:
        """Copy one checkpoint tensor ``experts.N.{gate,up,down}_proj.{kind}_bB`` into its slab slice."""
        from camera_kernels.packing import num_groups, packed_rows

        local = self._global_to_local.get(expert_id, -1)
        if local < 0:
            # Held by another rank.  An empty parameter (no local expert has this width)
            # is complete as it is, so weight tracking may count it as loaded.
            return (param.numel() == 0) if return_success else None
        proj, kind, i = param.camera_slab
        lay = self.layout
        b, n, hidden = lay.bits[i], self._global_slabs[expert_id][i], lay.hidden_size
        # This rank's share of the slab: whole groups (see camera_vllm.format.sharding).
        group = lay.group_size
        lo, hi = self._shares[expert_id][i]
        what = f"{self.prefix}: expert {expert_id} {_SHARD_NAMES.get(shard_id, shard_id)}_proj.{kind}_b{b}"
        if n == 0:
            raise CameraFormatError(
                f"{what} is in the checkpoint, but quantization_config gives this expert no {b}-bit slab"
            )
        if (proj == "w13") != (shard_id in ("w1", "w3")) or shard_id not in _SHARD_NAMES:
            raise CameraFormatError(f"{what}: unexpected shard id {shard_id!r} for parameter {weight_name}")
        if proj == "w13":
            cols = lay.gate_cols(local, i) if shard_id == "w1" else lay.up_cols(local, i)
            expected = (param.shape[0], n)
            dest, source = param.data[:, cols], loaded_weight[:, lo:hi]
        else:
            if kind == "qweight":
                rows, expected = lay.down_rows(local, i), (packed_rows(n, b), hidden)
                src_lo, src_hi = sharding.down_packed_rows(lo, hi, b)
            else:
                rows, expected = lay.down_groups(local, i), (num_groups(n, group), hidden)
                src_lo, src_hi = sharding.down_group_rows(lo, hi, group)
            dest, source = param.data[rows], loaded_weight[src_lo:src_hi]
        if tuple(loaded_weight.shape) != expected or loaded_weight.dtype != param.dtype:
            raise CameraFormatError(
                f"{what} is {tuple(loaded_weight.shape)} {loaded_weight.dtype}, but quantization_config "
                f"(a {n}-wide {b}-bit slab, group size {lay.group_size}) needs {expected} {param.dtype}"
            )
        dest.copy_(source)
        self._loaded.add((local, i, shard_id, kind))
        return True if return_success else None

    def process_weights_after_loading(self, layer: RoutedExperts) -> None:
        from camera_kernels import SlabMoEWeights

        if self._loaded:  # empty: nothing went through our loader (e.g. --load-format dummy)
            lay = self.layout
            expected = {
                (e, i, s, k)
                for e in range(lay.num_experts)
                for i in range(lay.num_bits)
                # Global sizes: a slab whose share on this rank is empty is still stored.
                if self._global_slabs[self.local_to_global[e]][i] > 0
                for s in _SHARD_NAMES
                for k in _SLAB_KINDS
            }
            missing = sorted(expected - self._loaded)
            if missing:
                shown = ", ".join(
                    f"expert {self.local_to_global[e]} {_SHARD_NAMES[s]}_proj.{k}_b{lay.bits[i]}"
                    for e, i, s, k in missing[:8]
                )
                raise CameraFormatError(
                    f"{self.prefix}: {len(missing)} expert tensor(s) missing from the checkpoint: {shown}"
                )
        self._loaded = set()
        computation = ops.SlabMoE.of_layout(
            self.layout,
            tuple(
                tuple(mixed_param_name(*group.split("_"), b) for b in self.layout.bits)
                for group in ops.SLAB_TENSOR_GROUPS
            ),
            tuple(f"camera_{name}" for name in ops.SLAB_METADATA),
        )
        # Validates shapes/dtypes/devices of the very tensors the op will get (wraps, never copies).
        slabs = SlabMoEWeights(
            self.layout,
            *computation.tensors(layer),
            **{name: getattr(layer, f"camera_{name}") for name in ops.SLAB_METADATA},
        )
        self._set_computation(computation)
        if slabs.device.type == "cpu":
            from camera_kernels.cpu_slab import ensure_cpu_kernel

            # Build (first time on this machine) or load the compiled CPU kernel now, not on the
            # first request.
            ensure_cpu_kernel()
