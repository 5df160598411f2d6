"""The ``torch.ops.camera_vllm.moe`` custom op: the one entry point of CAMERA expert compute.

vLLM on CPU traces ``FusedMoEMethodBase.apply`` with Dynamo (fullgraph); the ragged
per-expert loop has data-dependent shapes, so it must sit behind an opaque custom op
with a fake (meta) implementation.

The op is scheme-generic: ``weights`` is a flat tensor list whose meaning is fixed by
``scheme`` (see :data:`_SCHEMES`).  A scheme may carry a static argument after a colon:
CAMERA-Q is ``"mixed:<layout json>"`` (see :func:`mixed_scheme`), so the layer's layout
(Python ints the Triton launcher needs without touching device memory) travels in the
graph as a constant string instead of through process-global state.

A second op, ``torch.ops.camera_vllm.slab_linear``, computes the quantized shared
expert's projections (:mod:`.linear_method`) on the same kernels (:mod:`camera_kernels.linear`).
"""

# No `from __future__ import annotations`: torch's schema inference reads the real
# annotation objects of the op function.
import functools
import json
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from .backend import expert_backend
from .ragged import ragged_moe_forward
from .ragged_cpu import (
    CPU_KERNEL_ALIGN,
    BucketPlan,
    bucketed_moe_forward,
    cpu_kernel_isa,
    pack_buckets,
    plan_buckets,
)

OP_NAMESPACE = "camera_vllm"
OP_NAME = "moe"

SLAB_LINEAR_NAME = "slab_linear"

# (x, topk_weights, topk_ids, weights, expert_map, scheme argument or None) -> out
SchemeImpl = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "list[torch.Tensor]", torch.Tensor | None, str | None],
    torch.Tensor,
]


def _prune_impl(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    weights: "list[torch.Tensor]",
    expert_map: torch.Tensor | None,
    arg: str | None,
) -> torch.Tensor:
    w13, w2t, offsets = weights
    return ragged_moe_forward(x, topk_weights, topk_ids, w13, w2t, offsets, expert_map)


def _prune_cpu_impl(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    weights: "list[torch.Tensor]",
    expert_map: torch.Tensor | None,
    arg: str | None,
) -> torch.Tensor:
    if arg is None:
        raise NotImplementedError("camera_vllm.moe: scheme 'prune_cpu' needs its ISA ('prune_cpu:<isa>')")
    if len(weights) % 2 != 1:
        raise ValueError(
            f"camera_vllm.moe: scheme 'prune_cpu' takes a route and bucket pairs, got {len(weights)} tensors"
        )
    return bucketed_moe_forward(x, topk_weights, topk_ids, weights[0], weights[1:], arg, expert_map)


#: Set to ``0`` to serve CAMERA-P on CPU with the pure-torch path only (A/B checks).
CPU_KERNEL_ENV = "CAMERA_VLLM_CPU_KERNEL"


class CpuBuckets(NamedTuple):
    """A CAMERA-P layer prepared for vLLM's CPU kernel: call the op with ``scheme`` and ``weights``."""

    scheme: str
    plan: BucketPlan
    weights: list[torch.Tensor]  # [route, w13_0, w2_0, w13_1, w2_1, ...]


def prepare_cpu_buckets(w13: torch.Tensor, w2t: torch.Tensor, widths: "list[int]") -> CpuBuckets | None:
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
    return CpuBuckets(f"prune_cpu:{isa}", plan, [plan.route(), *pack_buckets(w13, w2t, widths, plan, isa)])


# Order of the per-bit tensor groups in a "mixed" weight list; the four int32
# [E, len(bits)] metadata tensors follow them.
MIXED_TENSOR_GROUPS = ("w13_qweight", "w13_scales", "w13_zeros", "w2_qweight", "w2_scales", "w2_zeros")
MIXED_METADATA = ("slab_sizes", "col_offsets", "down_row_offsets", "down_group_offsets")


def mixed_scheme(layout: "object") -> str:
    """The op's ``scheme`` string for a slab layer: ``mixed:`` + the layout as compact JSON.

    CAMERA-Q layers and CAMERA-P layers on the slab kernels (one 16-bit dense slab) both use
    it; a layout with a dense slab also names what that slab holds (``"dense": "bfloat16"``).
    """
    spec: dict = {
        "h": layout.hidden_size,  # type: ignore[attr-defined]
        "g": layout.group_size,  # type: ignore[attr-defined]
        "bits": list(layout.bits),  # type: ignore[attr-defined]
        "sizes": [list(r) for r in layout.sizes],  # type: ignore[attr-defined]
    }
    if 16 in spec["bits"]:
        spec["dense"] = str(layout.dense_dtype).removeprefix("torch.")  # type: ignore[attr-defined]
    return "mixed:" + json.dumps(spec, separators=(",", ":"))


@functools.lru_cache(maxsize=1024)
def _parse_layout(arg: str) -> "object":
    from camera_kernels import SlabLayout

    spec = json.loads(arg)
    dense = getattr(torch, spec.get("dense", "bfloat16"))
    return SlabLayout(
        int(spec["h"]), int(spec["g"]), tuple(spec["bits"]), tuple(map(tuple, spec["sizes"])), dense
    )


def _mixed_impl(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    weights: "list[torch.Tensor]",
    expert_map: torch.Tensor | None,
    arg: str | None,
) -> torch.Tensor:
    from camera_kernels import SlabMoEWeights, slab_moe

    if arg is None:
        raise NotImplementedError(
            "camera_vllm.moe: no implementation for scheme 'mixed' without its layout; "
            "CAMERA-Q layers call the op with scheme 'mixed:<layout json>' (ops.mixed_scheme)"
        )
    layout = _parse_layout(arg)
    nb = layout.num_bits  # type: ignore[attr-defined]
    want = len(MIXED_TENSOR_GROUPS) * nb + len(MIXED_METADATA)
    if len(weights) != want:
        raise ValueError(
            f"camera_vllm.moe: scheme 'mixed' with {nb} bit-widths takes {want} tensors, got {len(weights)}"
        )
    groups = [tuple(weights[j * nb : (j + 1) * nb]) for j in range(len(MIXED_TENSOR_GROUPS))]
    meta = dict(zip(MIXED_METADATA, weights[len(MIXED_TENSOR_GROUPS) * nb :]))
    # Wraps the tensors (shape/dtype/device checks only: no copy, no host sync).
    slabs = SlabMoEWeights(layout, *groups, **meta)
    ids = topk_ids
    if expert_map is not None:
        # Global -> local ids on the device; -1 (another rank's expert) is skipped by the kernels.
        ids = expert_map.to(torch.int64)[topk_ids.to(torch.int64)]
    # Triton on CUDA (no host syncs, graph-capturable), the compiled kernel on CPU, unless
    # CAMERA_VLLM_BACKEND forces one (backend.py).
    return slab_moe(x, topk_weights, ids, slabs, backend=expert_backend())


# scheme name -> (number of weight tensors or None when the argument fixes it, implementation)
_SCHEMES: dict[str, tuple[int | None, SchemeImpl]] = {
    "prune": (3, _prune_impl),
    "prune_cpu": (None, _prune_cpu_impl),
    "mixed": (None, _mixed_impl),
}


def camera_moe_impl(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    weights: list[torch.Tensor],
    expert_map: torch.Tensor | None,
    scheme: str,
) -> torch.Tensor:
    """Eager implementation behind the op (callable directly, e.g. in tests)."""
    name, sep, arg = scheme.partition(":")
    entry = _SCHEMES.get(name)
    if entry is None:
        raise NotImplementedError(
            f"camera_vllm.moe: no implementation for scheme {name!r}; known: {sorted(_SCHEMES)}"
        )
    n_weights, impl = entry
    if n_weights is not None and len(weights) != n_weights:
        raise ValueError(
            f"camera_vllm.moe: scheme {name!r} takes {n_weights} weight tensors, got {len(weights)}"
        )
    return impl(x, topk_weights, topk_ids, weights, expert_map, arg if sep else None)


def _camera_moe_fake(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    weights: list[torch.Tensor],
    expert_map: torch.Tensor | None,
    scheme: str,
) -> torch.Tensor:
    return torch.empty_like(x)


_LIBRARY: torch.library.Library | None = None


def ensure_registered() -> None:
    """Register ``torch.ops.camera_vllm.moe`` once per process (idempotent, called lazily).

    Registration is deferred to the first MoE layer built, so importing the plugin
    registers no ops.
    """
    global _LIBRARY
    if _LIBRARY is not None:
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    # The Library object owns the op: keep it alive for the life of the process.
    library = torch.library.Library(OP_NAMESPACE, "FRAGMENT")
    direct_register_custom_op(
        op_name=OP_NAME,
        op_func=camera_moe_impl,
        mutates_args=[],
        fake_impl=_camera_moe_fake,
        target_lib=library,
    )
    direct_register_custom_op(
        op_name=SLAB_LINEAR_NAME,
        op_func=slab_linear_impl,
        mutates_args=[],
        fake_impl=_slab_linear_fake,
        target_lib=library,
    )
    _LIBRARY = library


def camera_moe(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    weights: list[torch.Tensor],
    expert_map: torch.Tensor | None,
    scheme: str,
) -> torch.Tensor:
    """Call the registered op (traceable by torch.compile as one opaque node)."""
    return getattr(torch.ops, OP_NAMESPACE).moe(x, topk_weights, topk_ids, weights, expert_map, scheme)


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
