"""The CAMERA custom ops: one ``torch.ops.camera_vllm.*`` op per expert computation.

vLLM on CPU traces ``FusedMoEMethodBase.apply`` with Dynamo (fullgraph); the ragged
per-expert loop has data-dependent shapes, so every expert computation sits behind an
opaque custom op with a fake (meta) implementation.  Each op takes its tensors and the
layer's static layout as typed arguments (ints, int lists, a dtype), so the layout (Python
ints the Triton launcher needs without touching device memory) travels in the graph as
constants:

``moe_ragged(x, topk_weights, topk_ids, w13, w2t, offsets, expert_map)``
    CAMERA-P on the exact pure-torch ragged loop (:mod:`.ragged`).
``moe_cpu_buckets(x, topk_weights, topk_ids, route, buckets, isa, expert_map)``
    CAMERA-P in bf16 on CPU through vLLM's ``cpu_fused_moe``, experts bucketed by width
    (:mod:`.ragged_cpu`); ``isa`` is the kernel's ISA name (``"amx"`` or ``"vec"``).
``moe_slab(x, topk_weights, topk_ids, w13_qweight, w13_scales, w13_zeros, w2_qweight,
w2_scales, w2_zeros, slab_sizes, col_offsets, down_row_offsets, down_group_offsets,
expert_map, hidden_size, group_size, bits, sizes, dense_dtype)``
    CAMERA-Q, and CAMERA-P as one 16-bit dense slab, on the slab kernels
    (:func:`camera_kernels.slab_moe`); ``sizes`` is the layout's ``[E][len(bits)]`` slab sizes
    flattened row-major.
``slab_linear(x, weights, bits, sizes, group_size, gate_up, out_features)``
    One projection of a slab-quantized shared expert (:mod:`.linear_method`).

A MoE layer decides once, after loading, which computation it runs, and keeps it as one of
the frozen dataclasses :class:`RaggedMoE`, :class:`CpuBucketsMoE` or :class:`SlabMoE`
(:data:`MoEComputation`).  They name the layer's parameters/buffers and hold the static
arguments; calling one reads the tensors off the layer and calls its op.  The tensors stay
the layer's own, so Dynamo sees them as module state and vLLM's in-place tensor handling
(weight tracking, reloads that restore the original storage) applies to them as before.
"""

# No `from __future__ import annotations`: torch's schema inference reads the real
# annotation objects of the op functions.
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

from .backend import expert_backend
from .ragged import ragged_moe_forward
from .ragged_cpu import (
    CPU_KERNEL_ALIGN,
    CPU_KERNEL_ISAS,
    BucketPlan,
    bucketed_moe_forward,
    cpu_kernel_isa,
    pack_buckets,
    plan_buckets,
)

OP_NAMESPACE = "camera_vllm"
MOE_RAGGED = "moe_ragged"
MOE_CPU_BUCKETS = "moe_cpu_buckets"
MOE_SLAB = "moe_slab"
SLAB_LINEAR_NAME = "slab_linear"
#: Every op this module registers (``camera_vllm::<name>``).
OP_NAMES = (MOE_RAGGED, MOE_CPU_BUCKETS, MOE_SLAB, SLAB_LINEAR_NAME)

#: Set to ``0`` to serve CAMERA-P on CPU with the pure-torch path only (A/B checks).
CPU_KERNEL_ENV = "CAMERA_VLLM_CPU_KERNEL"

# The per-bit tensor groups of a slab layer, in op argument order; the four int32
# [E, len(bits)] metadata tensors follow them.
SLAB_TENSOR_GROUPS = ("w13_qweight", "w13_scales", "w13_zeros", "w2_qweight", "w2_scales", "w2_zeros")
SLAB_METADATA = ("slab_sizes", "col_offsets", "down_row_offsets", "down_group_offsets")


def _op(name: str) -> "torch._ops.OpOverloadPacket":
    return getattr(getattr(torch.ops, OP_NAMESPACE), name)


# -- CAMERA-P: the ragged torch loop ---------------------------------------------------------------


def moe_ragged_impl(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2t: torch.Tensor,
    offsets: torch.Tensor,
    expert_map: torch.Tensor | None,
) -> torch.Tensor:
    """Eager implementation of ``camera_vllm.moe_ragged``: :func:`.ragged.ragged_moe_forward`."""
    return ragged_moe_forward(x, topk_weights, topk_ids, w13, w2t, offsets, expert_map)


def _moe_ragged_fake(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2t: torch.Tensor,
    offsets: torch.Tensor,
    expert_map: torch.Tensor | None,
) -> torch.Tensor:
    return torch.empty_like(x)


def moe_ragged(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2t: torch.Tensor,
    offsets: torch.Tensor,
    expert_map: torch.Tensor | None,
) -> torch.Tensor:
    """Call the registered ``camera_vllm.moe_ragged`` op (one opaque node under torch.compile)."""
    return _op(MOE_RAGGED)(x, topk_weights, topk_ids, w13, w2t, offsets, expert_map)


# -- CAMERA-P: vLLM's CPU kernel on width buckets --------------------------------------------------


def moe_cpu_buckets_impl(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    route: torch.Tensor,
    buckets: list[torch.Tensor],
    isa: str,
    expert_map: torch.Tensor | None,
) -> torch.Tensor:
    """Eager implementation of ``camera_vllm.moe_cpu_buckets``: :func:`.ragged_cpu.bucketed_moe_forward`.

    ``buckets`` is ``[w13_0, w2_0, w13_1, w2_1, ...]`` (:func:`.ragged_cpu.pack_buckets`),
    ``isa`` one of :data:`.ragged_cpu.CPU_KERNEL_ISAS`.
    """
    if isa not in CPU_KERNEL_ISAS:
        raise ValueError(f"camera_vllm.moe_cpu_buckets: isa must be one of {CPU_KERNEL_ISAS}, got {isa!r}")
    if len(buckets) % 2:
        raise ValueError(
            f"camera_vllm.moe_cpu_buckets: buckets are (w13, w2) pairs, got {len(buckets)} tensors"
        )
    return bucketed_moe_forward(x, topk_weights, topk_ids, route, buckets, isa, expert_map)


def _moe_cpu_buckets_fake(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    route: torch.Tensor,
    buckets: list[torch.Tensor],
    isa: str,
    expert_map: torch.Tensor | None,
) -> torch.Tensor:
    return torch.empty_like(x)


def moe_cpu_buckets(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    route: torch.Tensor,
    buckets: list[torch.Tensor],
    isa: str,
    expert_map: torch.Tensor | None,
) -> torch.Tensor:
    """Call the registered ``camera_vllm.moe_cpu_buckets`` op."""
    return _op(MOE_CPU_BUCKETS)(x, topk_weights, topk_ids, route, buckets, isa, expert_map)


@dataclass(frozen=True, eq=False)
class PackedBuckets:
    """A CAMERA-P layer's bucketed, prepacked copy for vLLM's CPU kernel (:func:`prepare_cpu_buckets`)."""

    plan: BucketPlan
    isa: str
    route: torch.Tensor  # int64 [E + 1], BucketPlan.route()
    buckets: tuple[torch.Tensor, ...]  # (w13_0, w2_0, w13_1, w2_1, ...)


def prepare_cpu_buckets(w13: torch.Tensor, w2t: torch.Tensor, widths: "list[int]") -> PackedBuckets | None:
    """Bucketed, prepacked copies of a loaded CAMERA-P layer for vLLM's CPU kernel, when it can run it.

    Called once per layer after loading (``process_weights_after_loading``), never inside
    the op, so the op stays free of side effects under torch.compile.  The kernel serves
    bf16 CPU weights whose hidden size is a multiple of its tile; anything else (fp32,
    other devices, ``CAMERA_VLLM_CPU_KERNEL=0``) keeps the exact pure-torch path and
    returns None.  The inputs are left as they are; the caller drops them.
    """
    if os.environ.get(CPU_KERNEL_ENV, "1") == "0":
        return None
    if w13.device.type != "cpu" or w2t.device.type != "cpu" or w13.numel() == 0:
        return None
    if w13.shape[-1] % CPU_KERNEL_ALIGN != 0:  # the kernel's output tile (hidden is w2's output)
        return None
    isa = cpu_kernel_isa(w13.dtype)
    if isa is None:
        return None
    plan = plan_buckets(widths)
    return PackedBuckets(plan, isa, plan.route(), tuple(pack_buckets(w13, w2t, widths, plan, isa)))


# -- CAMERA-Q (and CAMERA-P as a dense slab): the slab kernels -------------------------------------


@functools.lru_cache(maxsize=1024)
def _slab_layout(
    hidden_size: int, group_size: int, bits: tuple[int, ...], sizes: tuple[int, ...], dense_dtype: torch.dtype
) -> "object":
    """The :class:`camera_kernels.SlabLayout` of the op's static arguments (built once per layer)."""
    from camera_kernels import SlabLayout

    nb = len(bits)
    if nb == 0 or len(sizes) % nb:
        raise ValueError(
            f"camera_vllm.moe_slab: sizes must hold len(bits) = {nb} slab sizes per expert, "
            f"got {len(sizes)} values"
        )
    rows = tuple(sizes[e : e + nb] for e in range(0, len(sizes), nb))
    return SlabLayout(hidden_size, group_size, bits, rows, dense_dtype)


def moe_slab_impl(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_qweight: list[torch.Tensor],
    w13_scales: list[torch.Tensor],
    w13_zeros: list[torch.Tensor],
    w2_qweight: list[torch.Tensor],
    w2_scales: list[torch.Tensor],
    w2_zeros: list[torch.Tensor],
    slab_sizes: torch.Tensor,
    col_offsets: torch.Tensor,
    down_row_offsets: torch.Tensor,
    down_group_offsets: torch.Tensor,
    expert_map: torch.Tensor | None,
    hidden_size: int,
    group_size: int,
    bits: list[int],
    sizes: list[int],
    dense_dtype: torch.dtype,
) -> torch.Tensor:
    """Eager implementation of ``camera_vllm.moe_slab``: :func:`camera_kernels.slab_moe`.

    The tensor lists hold one tensor per bit-width of ``bits`` (shapes in
    :class:`camera_kernels.SlabMoEWeights`); ``sizes`` is the layout's slab sizes
    ``[E][len(bits)]`` flattened row-major; ``dense_dtype`` is what a 16-bit slab holds.
    """
    from camera_kernels import SlabMoEWeights, slab_moe

    layout = _slab_layout(hidden_size, group_size, tuple(bits), tuple(sizes), dense_dtype)
    # Wraps the tensors (shape/dtype/device checks only: no copy, no host sync).
    slabs = SlabMoEWeights(
        layout,  # type: ignore[arg-type]
        tuple(w13_qweight),
        tuple(w13_scales),
        tuple(w13_zeros),
        tuple(w2_qweight),
        tuple(w2_scales),
        tuple(w2_zeros),
        slab_sizes,
        col_offsets,
        down_row_offsets,
        down_group_offsets,
    )
    ids = topk_ids
    if expert_map is not None:
        # Global -> local ids on the device; -1 (another rank's expert) is skipped by the kernels.
        ids = expert_map.to(torch.int64)[topk_ids.to(torch.int64)]
    # Triton on CUDA (no host syncs, graph-capturable), the compiled kernel on CPU, unless
    # CAMERA_VLLM_BACKEND forces one (backend.py).
    return slab_moe(x, topk_weights, ids, slabs, backend=expert_backend())


def _moe_slab_fake(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_qweight: list[torch.Tensor],
    w13_scales: list[torch.Tensor],
    w13_zeros: list[torch.Tensor],
    w2_qweight: list[torch.Tensor],
    w2_scales: list[torch.Tensor],
    w2_zeros: list[torch.Tensor],
    slab_sizes: torch.Tensor,
    col_offsets: torch.Tensor,
    down_row_offsets: torch.Tensor,
    down_group_offsets: torch.Tensor,
    expert_map: torch.Tensor | None,
    hidden_size: int,
    group_size: int,
    bits: list[int],
    sizes: list[int],
    dense_dtype: torch.dtype,
) -> torch.Tensor:
    return torch.empty_like(x)


def moe_slab(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_qweight: list[torch.Tensor],
    w13_scales: list[torch.Tensor],
    w13_zeros: list[torch.Tensor],
    w2_qweight: list[torch.Tensor],
    w2_scales: list[torch.Tensor],
    w2_zeros: list[torch.Tensor],
    slab_sizes: torch.Tensor,
    col_offsets: torch.Tensor,
    down_row_offsets: torch.Tensor,
    down_group_offsets: torch.Tensor,
    expert_map: torch.Tensor | None,
    hidden_size: int,
    group_size: int,
    bits: list[int],
    sizes: list[int],
    dense_dtype: torch.dtype,
) -> torch.Tensor:
    """Call the registered ``camera_vllm.moe_slab`` op (arguments as :func:`moe_slab_impl`)."""
    return _op(MOE_SLAB)(
        x,
        topk_weights,
        topk_ids,
        w13_qweight,
        w13_scales,
        w13_zeros,
        w2_qweight,
        w2_scales,
        w2_zeros,
        slab_sizes,
        col_offsets,
        down_row_offsets,
        down_group_offsets,
        expert_map,
        hidden_size,
        group_size,
        bits,
        sizes,
        dense_dtype,
    )


def slab_static_args(layout: "object") -> tuple[int, int, list[int], list[int], torch.dtype]:
    """``(hidden_size, group_size, bits, sizes, dense_dtype)`` of a :class:`camera_kernels.SlabLayout`
    as ``moe_slab`` takes them (``sizes`` flattened row-major)."""
    return (
        int(layout.hidden_size),  # type: ignore[attr-defined]
        int(layout.group_size),  # type: ignore[attr-defined]
        list(layout.bits),  # type: ignore[attr-defined]
        [n for row in layout.sizes for n in row],  # type: ignore[attr-defined]
        layout.dense_dtype,  # type: ignore[attr-defined]
    )


# -- the prepared computations a MoE layer keeps -----------------------------------------------------


@dataclass(frozen=True)
class RaggedMoE:
    """``moe_ragged`` on the layer's ragged ``w13``/``w2t``/``offsets`` (names of its tensors)."""

    w13: str
    w2t: str
    offsets: str

    def describe(self) -> dict[str, Any]:
        """What the layer runs, JSON-ready (for probes and logs)."""
        return {"op": MOE_RAGGED}

    def __call__(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        expert_map: torch.Tensor | None,
    ) -> torch.Tensor:
        return moe_ragged(
            x,
            topk_weights,
            topk_ids,
            getattr(layer, self.w13),
            getattr(layer, self.w2t),
            getattr(layer, self.offsets),
            expert_map,
        )


@dataclass(frozen=True)
class CpuBucketsMoE:
    """``moe_cpu_buckets`` on the layer's route and prepacked bucket tensors (names), for ``isa``."""

    route: str
    buckets: tuple[str, ...]  # (w13_0, w2_0, w13_1, w2_1, ...)
    isa: str

    def __post_init__(self) -> None:
        if self.isa not in CPU_KERNEL_ISAS or len(self.buckets) % 2:
            raise ValueError(
                f"CpuBucketsMoE: isa {self.isa!r} (one of {CPU_KERNEL_ISAS}) and (w13, w2) bucket "
                f"pairs needed, got {len(self.buckets)} bucket tensors"
            )

    def describe(self) -> dict[str, Any]:
        """What the layer runs, JSON-ready (for probes and logs)."""
        return {"op": MOE_CPU_BUCKETS, "isa": self.isa, "buckets": len(self.buckets) // 2}

    def __call__(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        expert_map: torch.Tensor | None,
    ) -> torch.Tensor:
        buckets = [getattr(layer, name) for name in self.buckets]
        return moe_cpu_buckets(
            x, topk_weights, topk_ids, getattr(layer, self.route), buckets, self.isa, expert_map
        )


@dataclass(frozen=True)
class SlabMoE:
    """``moe_slab`` on the layer's slab tensors (names) with a :class:`camera_kernels.SlabLayout`'s
    static arguments.

    ``groups`` names the tensors of :data:`SLAB_TENSOR_GROUPS`, one tuple of ``len(bits)``
    names each; ``metadata`` the four :data:`SLAB_METADATA` buffers.
    """

    groups: tuple[tuple[str, ...], ...]
    metadata: tuple[str, ...]
    hidden_size: int
    group_size: int
    bits: tuple[int, ...]
    sizes: tuple[int, ...]  # [E][len(bits)] flattened row-major
    dense_dtype: torch.dtype

    def __post_init__(self) -> None:
        nb = len(self.bits)
        if len(self.groups) != len(SLAB_TENSOR_GROUPS) or any(len(g) != nb for g in self.groups):
            raise ValueError(
                f"SlabMoE: {len(SLAB_TENSOR_GROUPS)} tensor groups of {nb} names each needed, "
                f"got {[len(g) for g in self.groups]}"
            )
        if len(self.metadata) != len(SLAB_METADATA):
            raise ValueError(f"SlabMoE: {len(SLAB_METADATA)} metadata names needed, got {len(self.metadata)}")
        if len(self.sizes) % max(nb, 1):
            raise ValueError(f"SlabMoE: sizes must hold {nb} slab sizes per expert, got {len(self.sizes)}")

    @classmethod
    def of_layout(
        cls, layout: "object", groups: "tuple[tuple[str, ...], ...]", metadata: "tuple[str, ...]"
    ) -> "SlabMoE":
        """The computation of a layer laid out as ``layout`` whose tensors are named as given."""
        hidden, group, bits, sizes, dense = slab_static_args(layout)
        return cls(groups, metadata, hidden, group, tuple(bits), tuple(sizes), dense)

    def describe(self) -> dict[str, Any]:
        """What the layer runs, JSON-ready (for probes and logs); ``dense_dtype`` only with a 16-bit slab."""
        from camera_kernels.packing import DENSE_BITS

        dense = str(self.dense_dtype).removeprefix("torch.") if DENSE_BITS in self.bits else None
        return {"op": MOE_SLAB, "bits": list(self.bits), "group_size": self.group_size, "dense_dtype": dense}

    def tensors(self, layer: torch.nn.Module) -> "list[tuple[torch.Tensor, ...]]":
        """The layer's tensor groups, in :data:`SLAB_TENSOR_GROUPS` order."""
        return [tuple(getattr(layer, n) for n in g) for g in self.groups]

    def __call__(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        expert_map: torch.Tensor | None,
    ) -> torch.Tensor:
        w13_q, w13_s, w13_z, w2_q, w2_s, w2_z = ([getattr(layer, n) for n in g] for g in self.groups)
        sizes_t, cols, rows, grps = (getattr(layer, n) for n in self.metadata)
        return moe_slab(
            x,
            topk_weights,
            topk_ids,
            w13_q,
            w13_s,
            w13_z,
            w2_q,
            w2_s,
            w2_z,
            sizes_t,
            cols,
            rows,
            grps,
            expert_map,
            self.hidden_size,
            self.group_size,
            list(self.bits),
            list(self.sizes),
            self.dense_dtype,
        )


#: What a CAMERA MoE layer runs, chosen once after loading.
MoEComputation = RaggedMoE | CpuBucketsMoE | SlabMoE


# -- registration ----------------------------------------------------------------------------------

_LIBRARY: torch.library.Library | None = None


def ensure_registered() -> None:
    """Register the ``camera_vllm`` ops (:data:`OP_NAMES`) once per process (idempotent, called lazily).

    Registration is deferred to the first MoE layer built, so importing the plugin
    registers no ops.
    """
    global _LIBRARY
    if _LIBRARY is not None:
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    # The Library object owns the ops: keep it alive for the life of the process.
    library = torch.library.Library(OP_NAMESPACE, "FRAGMENT")
    for name, impl, fake in (
        (MOE_RAGGED, moe_ragged_impl, _moe_ragged_fake),
        (MOE_CPU_BUCKETS, moe_cpu_buckets_impl, _moe_cpu_buckets_fake),
        (MOE_SLAB, moe_slab_impl, _moe_slab_fake),
        (SLAB_LINEAR_NAME, slab_linear_impl, _slab_linear_fake),
    ):
        direct_register_custom_op(
            op_name=name, op_func=impl, mutates_args=[], fake_impl=fake, target_lib=library
        )
    _LIBRARY = library


# -- quantized shared-expert projections -----------------------------------------------------------


def slab_linear_impl(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    bits: list[int],
    sizes: list[int],
    group_size: int,
    gate_up: bool,
    out_features: int,
) -> torch.Tensor:
    """One projection of a slab-quantized shared expert (:mod:`camera_kernels.linear`).

    ``weights`` is ``[qweight, scales, zeros]`` per non-empty slab, in ``bits`` order, then
    the int32 metadata (:func:`camera_kernels.linear.slab_linear_meta`, built at load:
    ``[H]`` for gate_up, the non-empty ``sizes`` for down).  gate_up (``gate_up=True``):
    slab ``j`` holds ``[packed_rows(H, b), 2 n_j]`` with gate columns first; the output is
    ``[..., 2 S]`` = all gate slabs, then all up slabs (what vLLM's SiluAndMul splits in
    half).  down: slab ``j`` is ``[packed_rows(n_j, b), H]`` and consumes input columns
    ``[sum_{<j} n, sum_{<=j} n)``; the output is ``[..., H]``.  The Triton kernels read the
    packed codes (no dequantized copy, no host sync) wherever ``CAMERA_VLLM_BACKEND``
    picks Triton; otherwise one slab at a time is dequantized to fp32.
    """
    from camera_kernels.linear import SlabLinearWeights, slab_linear

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    live = [(b, n) for b, n in zip(bits, sizes) if n > 0]
    if len(weights) != 3 * len(live) + 1:
        raise ValueError(
            f"camera_vllm.slab_linear: {len(live)} slabs need {3 * len(live)} tensors and the metadata, "
            f"got {len(weights)}"
        )
    meta, backend = weights[-1], expert_backend()
    if gate_up:
        gates, ups = [], []
        for j, (b, n) in enumerate(live):
            q, sc, z = weights[3 * j : 3 * j + 3]
            w = SlabLinearWeights((b,), (x2.shape[1],), 2 * n, group_size, (q,), (sc,), (z,), meta)
            y = slab_linear(x2, w, backend)
            gates.append(y[:, :n])
            ups.append(y[:, n:])
        out = torch.cat(gates + ups, dim=1) if live else x2.new_zeros(x2.shape[0], 0)
    elif live:
        w = SlabLinearWeights(
            tuple(b for b, _ in live),
            tuple(n for _, n in live),
            out_features,
            group_size,
            tuple(weights[0 : 3 * len(live) : 3]),
            tuple(weights[1 : 3 * len(live) : 3]),
            tuple(weights[2 : 3 * len(live) : 3]),
            meta,
        )
        out = slab_linear(x2, w, backend)
    else:
        out = x2.new_zeros(x2.shape[0], out_features)
    return out.reshape(*lead, out.shape[1])


def _slab_linear_fake(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    bits: list[int],
    sizes: list[int],
    group_size: int,
    gate_up: bool,
    out_features: int,
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def slab_linear(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    bits: list[int],
    sizes: list[int],
    group_size: int,
    gate_up: bool,
    out_features: int,
) -> torch.Tensor:
    """Call the registered ``camera_vllm.slab_linear`` op (``out_features``: 2S for gate_up, H for down)."""
    return getattr(torch.ops, OP_NAMESPACE).slab_linear(
        x, weights, bits, sizes, group_size, gate_up, out_features
    )
