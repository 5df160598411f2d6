"""The ``torch.ops.camera_vllm.moe`` custom op: the one entry point of CAMERA expert compute.

vLLM on CPU traces ``FusedMoEMethodBase.apply`` with Dynamo (fullgraph); the ragged
per-expert loop has data-dependent shapes, so it must sit behind an opaque custom op
with a fake (meta) implementation.

The op is scheme-generic: ``weights`` is a flat tensor list whose meaning is fixed by
``scheme`` (see :data:`_SCHEMES`).  Adding CAMERA-Q ("mixed") is one more entry there,
not a new op or a new signature.
"""

# No `from __future__ import annotations`: torch's schema inference reads the real
# annotation objects of the op function.
from collections.abc import Callable

import torch

from .ragged import ragged_moe_forward

OP_NAMESPACE = "camera_vllm"
OP_NAME = "moe"

SchemeImpl = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "list[torch.Tensor]", torch.Tensor | None], torch.Tensor
]


def _prune_impl(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    weights: "list[torch.Tensor]",
    expert_map: torch.Tensor | None,
) -> torch.Tensor:
    w13, w2t, offsets = weights
    return ragged_moe_forward(x, topk_weights, topk_ids, w13, w2t, offsets, expert_map)


# scheme name -> (number of weight tensors, implementation)
_SCHEMES: dict[str, tuple[int, SchemeImpl]] = {
    "prune": (3, _prune_impl),
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
    entry = _SCHEMES.get(scheme)
    if entry is None:
        raise NotImplementedError(
            f"camera_vllm.moe: no implementation for scheme {scheme!r}; known: {sorted(_SCHEMES)}"
        )
    n_weights, impl = entry
    if len(weights) != n_weights:
        raise ValueError(
            f"camera_vllm.moe: scheme {scheme!r} takes {n_weights} weight tensors, got {len(weights)}"
        )
    return impl(x, topk_weights, topk_ids, weights, expert_map)


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
