"""CAMERA-P on CPU through vLLM's compiled ``cpu_fused_moe``: experts bucketed by width.

``torch.ops._C.cpu_fused_moe`` computes a whole layer in one call, but only for experts
of one width that is a multiple of its 32-wide output tile.  CAMERA-P experts are
ragged, so after loading, a layer's experts are sorted by width and cut into a few
buckets; each bucket is zero-padded to its widest member (rounded up to 32) and
prepacked once.  Zero gate/up rows and zero down columns contribute exactly nothing
under SwiGLU, so the result is the ragged layer's.

The cut points come from a small dynamic program that minimises padded bytes for each
number of buckets; the fewest buckets within :data:`DEFAULT_MAX_PADDING` of the
32-aligned minimum win (more buckets = more kernel calls per step).  A forward step
sorts the ``(token, k)`` slots by bucket once and makes one kernel call per bucket that
got slots, so decode costs a handful of calls per layer instead of one per expert.  In a
served model this runs inside the ``camera_vllm.moe_cpu_buckets`` op (:mod:`.ops`).

No vLLM import: the kernel is reached through ``torch.ops._C``, present once vLLM's
CPU extension is loaded.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: ``cpu_fused_moe`` takes expert widths that are multiples of this (its output tile).
CPU_KERNEL_ALIGN = 32
#: At most this many kernel calls per layer and step.
DEFAULT_MAX_BUCKETS = 16
#: Accept this much padding over the 32-aligned widths to save a bucket.
DEFAULT_MAX_PADDING = 0.02
#: The ISAs ``cpu_fused_moe`` and ``prepack_moe_weight`` take: AMX tiles, or AVX vectors.
CPU_KERNEL_ISAS = ("amx", "vec")


def _align(n: int) -> int:
    return -(-n // CPU_KERNEL_ALIGN) * CPU_KERNEL_ALIGN


@dataclass(frozen=True)
class BucketPlan:
    """Which local experts share a padded width: ``members[j]`` are padded to ``widths[j]``."""

    widths: tuple[int, ...]
    members: tuple[tuple[int, ...], ...]
    num_experts: int

    @property
    def padded_total(self) -> int:
        """Micro-expert slots stored over all buckets (kept + zero padding)."""
        return sum(w * len(m) for w, m in zip(self.widths, self.members))

    def route(self) -> torch.Tensor:
        """int64 ``[E + 1]``: ``bucket * (E + 1) + index in bucket`` of every local expert.

        Sorting slots by this key groups them by bucket, and ``key % (E + 1)`` is the
        expert's index inside its bucket.  Experts of width 0 and the extra last entry
        (what id ``-1`` indexes) get ``len(widths) * (E + 1)``: no bucket, sorted last.
        """
        stride = self.num_experts + 1
        route = torch.full((stride,), len(self.widths) * stride, dtype=torch.int64)
        for j, members in enumerate(self.members):
            for i, e in enumerate(members):
                route[e] = j * stride + i
        return route


def plan_buckets(
    widths: Sequence[int],
    max_buckets: int = DEFAULT_MAX_BUCKETS,
    max_padding: float = DEFAULT_MAX_PADDING,
) -> BucketPlan:
    """Cut experts of ``widths`` into at most ``max_buckets`` width buckets (see module docstring).

    Exact for each bucket count: ``best[b][j]``, the fewest padded slots holding the ``j``
    narrowest experts in ``b`` buckets, is a min over the last bucket's first member.
    """
    if max_buckets < 1:
        raise ValueError(f"max_buckets must be >= 1, got {max_buckets}")
    order = sorted((e for e, w in enumerate(widths) if w > 0), key=lambda e: widths[e])
    n = len(order)
    if n == 0:
        return BucketPlan((), (), len(widths))
    padded = torch.tensor([_align(widths[e]) for e in order], dtype=torch.float64)
    # cost[i, j]: experts i..j-1 (sorted) in one bucket = (j - i) * padded[j - 1]
    idx = torch.arange(n + 1, dtype=torch.float64)
    last = torch.cat([padded.new_zeros(1), padded])  # last[j] = padded[j - 1]
    cost = (idx.view(1, -1) - idx.view(-1, 1)) * last.view(1, -1)
    cost = torch.where(idx.view(-1, 1) < idx.view(1, -1), cost, torch.inf)
    best = [torch.full((n + 1,), torch.inf, dtype=torch.float64)]
    best[0][0] = 0.0
    cuts: list[torch.Tensor] = []
    limit = (1.0 + max_padding) * float(padded.sum())
    for _ in range(min(max_buckets, n)):
        total = best[-1].view(-1, 1) + cost  # [first member i, end j]
        value, arg = total.min(dim=0)
        best.append(value)
        cuts.append(arg)
        if value[n] <= limit:
            break
    # Walk back from the last bucket's end.
    groups: list[tuple[int, ...]] = []
    j = n
    for arg in reversed(cuts):
        i = int(arg[j])
        groups.append(tuple(order[i:j]))
        j = i
    groups = [g for g in reversed(groups) if g]
    return BucketPlan(tuple(_align(max(widths[e] for e in g)) for g in groups), tuple(groups), len(widths))


def cpu_kernel_isa(dtype: torch.dtype) -> str | None:
    """The ``cpu_fused_moe`` ISA (of :data:`CPU_KERNEL_ISAS`) for ``dtype`` here, or None when the
    kernel cannot serve it.

    bf16 only: fp32 layers keep the pure-torch path (the exactness oracle's dtype).
    """
    if dtype != torch.bfloat16:
        return None
    try:
        torch.ops._C.cpu_fused_moe  # noqa: B018 - raises when vLLM's CPU extension is not loaded
        torch.ops._C.prepack_moe_weight  # noqa: B018
    except (AttributeError, RuntimeError):
        return None
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return "amx" if amx is not None and amx() else "vec"


#: How :func:`cpu_kernel_rounding` names the kernel's fp32 -> bf16 conversion.
ROUND_NEAREST = "nearest"
ROUND_TOWARD_ZERO = "toward_zero"


@functools.cache
def cpu_kernel_rounding(isa: str) -> str:
    """How vLLM's loaded ``cpu_fused_moe`` rounds its bf16 results: ``nearest`` or ``toward_zero``.

    vLLM ships one CPU library per ISA and loads the one this CPU runs.  Builds with
    AVX512-BF16 convert fp32 to bf16 with round-to-nearest-even; the AVX2 and plain AVX-512
    builds truncate, so every expert output is pulled toward zero by up to one bf16 ulp
    (vLLM's own dense MoE layers do the same there).  Measured once per process on a fixed
    random layer against an fp32 computation: truncation shrinks nearly every output, nearest
    rounding about half of them.
    """
    gen = torch.Generator().manual_seed(0)
    hidden, width, tokens = 64, 32, 16
    w13 = (torch.randn(1, 2 * width, hidden, generator=gen) * 0.2).to(torch.bfloat16)
    w2 = (torch.randn(1, hidden, width, generator=gen) * 0.2).to(torch.bfloat16)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    gate, up = (x.float() @ w13[0].float().t()).split(width, dim=1)
    want = (F.silu(gate) * up) @ w2[0].float().t()
    got = torch.empty_like(x)
    torch.ops._C.cpu_fused_moe(
        got,
        x,
        _prepack(w13, isa),
        _prepack(w2, isa),
        None,
        None,
        torch.ones(tokens, 1),
        torch.zeros(tokens, 1, dtype=torch.int32),
        False,
        "silu",
        isa,
    )
    shrunk = ((got.float() - want) * want.sign() < 0).float().mean().item()
    return ROUND_TOWARD_ZERO if shrunk > 0.75 else ROUND_NEAREST


def _truncation_midpoint(ys: torch.Tensor) -> torch.Tensor:
    """The midpoint of the bf16 interval that a truncated fp32 result came from (``ys`` fp32).

    A value truncated to ``t`` lay in ``[|t|, |t| + ulp(t))`` away from zero, so
    ``t + sign(t) * ulp(t) / 2`` is within half an ulp of it: the error bound of
    round-to-nearest, and no bias.  ``frexp`` gives ``|t| = m * 2**e`` with ``m`` in
    ``[0.5, 1)``, so a bf16 ulp (8 significant bits) is ``2**(e - 8)``.
    """
    _, exponent = torch.frexp(ys)
    return ys + torch.ldexp(torch.sign(ys) * 0.5, exponent - 8)


def _prepack(weight: torch.Tensor, isa: str) -> torch.Tensor:
    out = torch.empty_like(weight)
    torch.ops._C.prepack_moe_weight(weight, out, isa)
    return out


@torch.no_grad()
def pack_buckets(
    w13: torch.Tensor, w2t: torch.Tensor, widths: Sequence[int], plan: BucketPlan, isa: str
) -> list[torch.Tensor]:
    """The prepacked bucket tensors ``[w13_0, w2_0, w13_1, w2_1, ...]`` of a ragged layer.

    ``w13 [2R, H]`` / ``w2t [R, H]`` in the ragged layout (:mod:`.ragged`); bucket ``j``
    becomes ``w13_j [E_j, 2 W_j, H]`` (gate rows, then up rows, zero-padded) and
    ``w2_j [E_j, H, W_j]``, prepacked for ``isa``.  The inputs are not modified.
    """
    hidden = w13.shape[1]
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    out: list[torch.Tensor] = []
    for width, members in zip(plan.widths, plan.members):
        b13 = w13.new_zeros((len(members), 2 * width, hidden))
        b2 = w2t.new_zeros((len(members), hidden, width))
        for i, e in enumerate(members):
            lo, n = offsets[e], widths[e]
            b13[i, :n] = w13[2 * lo : 2 * lo + n]  # gate
            b13[i, width : width + n] = w13[2 * lo + n : 2 * lo + 2 * n]  # up
            b2[i, :, :n] = w2t[lo : lo + n].t()
        out += [_prepack(b13, isa), _prepack(b2, isa)]
    return out


def bucketed_moe_forward(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    route: torch.Tensor,
    buckets: Sequence[torch.Tensor],
    isa: str,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ragged MoE layer on bucketed weights: same result as :func:`.ragged.ragged_moe_forward`.

    :param route: :meth:`BucketPlan.route`; ``buckets``: :func:`pack_buckets`' list.
    :param expert_map: optional global -> local id map (``-1``: another rank's expert).
    :returns: ``[T, H]`` in ``x.dtype``; the ``K`` expert outputs of a token are summed in fp32.
    """
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_buckets = len(buckets) // 2
    if num_tokens == 0 or top_k == 0 or num_buckets == 0:
        return x.new_zeros((num_tokens, hidden))
    # Decode runs this once per layer and token step, so it is kept to few torch calls.
    ids = topk_ids.reshape(-1).to(torch.int64)
    if expert_map is not None:
        ids = expert_map.to(torch.int64)[ids]
    stride = route.numel()
    keys, order = torch.sort(route[ids])  # id -1 reads the last entry: no bucket
    bounds = torch.arange(1, num_buckets + 1, dtype=torch.int64).mul_(stride)
    ends = torch.searchsorted(keys, bounds).tolist()  # slots [ends[j-1], ends[j]) are bucket j's
    served = ends[-1]
    if served == 0:
        return x.new_zeros((num_tokens, hidden))
    order = order[:served]
    local = keys[:served].remainder(stride).to(torch.int32).unsqueeze(1)
    weights = topk_weights.reshape(-1).index_select(0, order).to(torch.float32).unsqueeze(1)
    if num_tokens == 1:
        xs = x.expand(served, hidden).contiguous()
    else:
        tokens = order.div(top_k, rounding_mode="floor")
        xs = x.index_select(0, tokens)
    ys = torch.empty_like(xs)
    start = 0
    for j, stop in enumerate(ends):
        if stop > start:
            torch.ops._C.cpu_fused_moe(
                ys[start:stop],
                xs[start:stop],
                buckets[2 * j],
                buckets[2 * j + 1],
                None,
                None,
                weights[start:stop],
                local[start:stop],
                False,
                "silu",
                isa,
            )
        start = stop
    ys = ys.to(torch.float32)
    if cpu_kernel_rounding(isa) == ROUND_TOWARD_ZERO:
        ys = _truncation_midpoint(ys)
    if num_tokens == 1:
        return ys.sum(dim=0, keepdim=True).to(x.dtype)
    out = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=x.device)
    out.index_add_(0, tokens, ys)
    return out.to(x.dtype)
