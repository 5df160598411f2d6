"""Bit allocation for CAMERA-Q: which micro-expert gets which bit-width.

A micro-expert's CAMERA energy ``E_j`` is the output energy it contributes (the loss of
pruning it, see shared notes).  Quantizing it at ``b`` bits loses roughly
``E_j * rho(b)``, with ``rho(b)`` the relative squared error of ``b``-bit group
quantization (``rho(0) = 1``: pruned).  All three vectors of a micro-expert share one
bit-width, and higher energy never gets fewer bits than lower energy within the ranking
scope:

* ``scope="layer"`` ranks all micro-experts of the layer together, routed and shared (as
  CAMERA-P does), so experts end up with different splits;
* ``scope="expert"`` gives every expert (and the shared expert) the same split, each
  ranking its own micro-experts.

Two ways to choose the split:

* explicit: ``bits=[4, 2, 1], fractions=[f4, f2, f1]`` (fractions of the micro-experts
  kept after pruning, summing to 1; the highest energies get the highest bits);
* budget: ``avg_bits=B``.  The split minimises ``sum_j E_j * rho(b_j)`` (the
  :data:`DEFAULT_LEVEL_ERROR` model) subject to the average stored bits per weight being
  ``<= B``.  With ``rho`` convex in the storage cost the optimum is a threshold rule on
  energy (water-filling), found by bisecting the Lagrange multiplier and then filling
  the remaining budget greedily one micro-expert (or, in expert scope, one rank
  position) at a time.  Bit-widths off the lower convex hull of (cost, rho) are never
  optimal and get empty slabs.

Average bits per weight (:func:`bits_per_weight`) counts every stored byte of the expert
matrices -- packed weights (with their padding to 32 rows), fp16 scales and fp16 zeros,
as given by :func:`camera_vllm.format.layout.stored_bytes` -- and divides by the dense
parameter count of the *original* expert matrices (``3 * hidden * original width`` per
expert, shared expert included), so pruning lowers the average.  Group overhead alone
is ``32 / group_size`` bits per kept weight (0.5 at G=64, 0.25 at G=128).

``prune_ratio`` removes the lowest-energy fraction first (in the ranking scope), in both
modes; the rest is split among the bit-widths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from camera_vllm.format.layout import stored_bytes
from camera_vllm.format.names import QUANT_BITS
from camera_vllm.format.quant_params import check_bits, check_group_size

__all__ = [
    "DEFAULT_CANDIDATE_BITS",
    "DEFAULT_LEVEL_ERROR",
    "ExpertAllocation",
    "LayerAllocation",
    "allocate_layer",
    "bits_per_weight",
    "drop_unused_bits",
]

Scope = Literal["layer", "expert"]

DEFAULT_CANDIDATE_BITS: tuple[int, ...] = (4, 3, 2, 1)

# rho(b): relative squared error ||w - Q_b(w)||^2 / ||w||^2 of asymmetric group-wise RTN
# with the clipping search on, measured on Gaussian weights at group size 128 (heavier
# tailed Laplace weights give 1.3-1.6x these; ratios between levels are what matter).
# Without clipping, 1-bit min-max RTN loses 3.5x the weight energy -- worse than pruning.
# Covers 0 and every width of QUANT_BITS, so any checked candidate list has a rho.
DEFAULT_LEVEL_ERROR: Mapping[int, float] = {0: 1.0, 1: 0.38, 2: 0.12, 3: 0.034, 4: 0.009, 8: 3.5e-5}


@dataclass(frozen=True)
class ExpertAllocation:
    """Slab layout of one expert.

    :param bits: slab bit-widths, distinct and descending (the checkpoint's ``bits``).
    :param slabs: micro-experts per slab, aligned with ``bits``.
    :param perm: long ``[sum(slabs)]``, original micro-expert indices of the kept ones, slab
        by slab; inside a slab in increasing original order.
    :param pruned: long, sorted original indices of the removed micro-experts.
    :param original_width: the expert's intermediate size before compression.
    """

    bits: tuple[int, ...]
    slabs: tuple[int, ...]
    perm: Tensor
    pruned: Tensor
    original_width: int

    @property
    def width(self) -> int:
        return int(sum(self.slabs))

    def slab_ranges(self) -> list[tuple[int, int, int]]:
        """``(bits, start, end)`` of every slab, as positions in ``perm`` (empty slabs included)."""
        out, start = [], 0
        for b, n in zip(self.bits, self.slabs):
            out.append((b, start, start + n))
            start += n
        return out

    def slab_indices(self, i: int) -> Tensor:
        """Original micro-expert indices stored in slab ``i``."""
        b, s, e = self.slab_ranges()[i]
        return self.perm[s:e]

    def bits_of(self) -> Tensor:
        """int ``[original_width]``: bit-width per original micro-expert, 0 where pruned."""
        out = torch.zeros(self.original_width, dtype=torch.long)
        for b, s, e in self.slab_ranges():
            out[self.perm[s:e]] = b
        return out

    def stored_bytes(self, hidden: int, group_size: int) -> int:
        return stored_bytes(list(self.slabs), list(self.bits), hidden, group_size)


@dataclass(frozen=True)
class LayerAllocation:
    """Allocation of one MoE layer: every routed expert and the optional shared expert."""

    bits: tuple[int, ...]
    experts: tuple[ExpertAllocation, ...]
    shared: ExpertAllocation | None = None
    info: dict = field(default_factory=dict, compare=False)

    @property
    def expert_slabs(self) -> list[list[int]]:
        """``LayerSpec.expert_slabs`` of the checkpoint config."""
        return [list(e.slabs) for e in self.experts]

    @property
    def shared_slabs(self) -> list[int] | None:
        return None if self.shared is None else list(self.shared.slabs)

    def all_experts(self) -> list[ExpertAllocation]:
        return list(self.experts) + ([self.shared] if self.shared is not None else [])

    def stored_bytes(self, hidden: int, group_size: int) -> int:
        return sum(e.stored_bytes(hidden, group_size) for e in self.all_experts())

    def dense_params(self, hidden: int) -> int:
        """Parameters of the original (uncompressed) expert matrices: ``3 * hidden * width``."""
        return sum(3 * hidden * e.original_width for e in self.all_experts())

    def bits_per_weight(self, hidden: int, group_size: int) -> float:
        return bits_per_weight(self, hidden, group_size)

    def fractions(self) -> dict[int, float]:
        """Share of the layer's original micro-experts at each bit-width (0: pruned)."""
        total = sum(e.original_width for e in self.all_experts())
        out = {b: 0 for b in self.bits}
        for e in self.all_experts():
            for b, n in zip(e.bits, e.slabs):
                out[b] += n
        out[0] = total - sum(out.values())
        return {b: (n / total if total else 0.0) for b, n in out.items()}


def bits_per_weight(
    allocation: LayerAllocation | Sequence[LayerAllocation], hidden: int, group_size: int
) -> float:
    """Stored bits (weights + scales + zeros) per original dense expert parameter."""
    layers = [allocation] if isinstance(allocation, LayerAllocation) else list(allocation)
    dense = sum(a.dense_params(hidden) for a in layers)
    if dense == 0:
        return 0.0
    return 8.0 * sum(a.stored_bytes(hidden, group_size) for a in layers) / dense


def drop_unused_bits(allocations: Sequence[LayerAllocation]) -> list[LayerAllocation]:
    """Remove bit-widths whose slabs are empty in every expert of every layer given.

    The checkpoint's ``bits`` list is global, so do this over all layers of a model.
    """
    used = {b for a in allocations for e in a.all_experts() for b, n in zip(e.bits, e.slabs) if n > 0}
    if not allocations:
        return []
    keep = [i for i, b in enumerate(allocations[0].bits) if b in used] or [0]

    def cut(e: ExpertAllocation) -> ExpertAllocation:
        return ExpertAllocation(
            tuple(e.bits[i] for i in keep),
            tuple(e.slabs[i] for i in keep),
            e.perm,
            e.pruned,
            e.original_width,
        )

    return [
        LayerAllocation(
            tuple(a.bits[i] for i in keep),
            tuple(cut(e) for e in a.experts),
            None if a.shared is None else cut(a.shared),
            a.info,
        )
        for a in allocations
    ]


# --------------------------------------------------------------------------------------------------
# helpers


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Integer counts summing to ``n`` with cumulative rounding of ``n * cumsum(fractions)``."""
    out, prev, acc = [], 0, 0.0
    for f in fractions:
        acc += f
        cur = min(n, int(round(n * acc)))
        out.append(cur - prev)
        prev = cur
    out[-1] += n - prev
    return out


def _rank(energy: Tensor) -> Tensor:
    """Indices by decreasing energy; ties keep the original order (stable)."""
    return torch.argsort(-energy.to(torch.float64), stable=True)


def _expert_from_levels(levels: Tensor, bits: tuple[int, ...]) -> ExpertAllocation:
    """Build an expert's slabs from a per-micro-expert bit-width (0 = pruned)."""
    parts, slabs = [], []
    for b in bits:
        idx = torch.nonzero(levels == b).flatten()
        parts.append(idx)
        slabs.append(int(idx.numel()))
    perm = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    kept = torch.zeros(levels.numel(), dtype=torch.bool)
    kept[perm] = True
    return ExpertAllocation(bits, tuple(slabs), perm, torch.nonzero(~kept).flatten(), int(levels.numel()))


def _levels_by_rank(energy: Tensor, counts_desc: Sequence[int], levels_desc: Sequence[int]) -> Tensor:
    """Give the top ``counts_desc[0]`` energies ``levels_desc[0]`` bits, the next ones the next, ...;
    the rest get 0 (pruned)."""
    order = _rank(energy)
    per_rank = torch.zeros(energy.numel(), dtype=torch.long)
    start = 0
    for n, b in zip(counts_desc, levels_desc):
        per_rank[start : start + n] = b
        start += n
    out = torch.zeros(energy.numel(), dtype=torch.long)
    out[order] = per_rank
    return out


def _hull(levels: Sequence[int], cost: Mapping[int, float], err: Mapping[int, float]) -> list[int]:
    """Levels (ascending cost) on the lower convex hull of the points (cost, err)."""
    pts = sorted(levels, key=lambda b: (cost[b], err[b]))
    hull: list[int] = []
    for b in pts:
        if hull and err[b] >= err[hull[-1]]:
            continue  # costs more, not better
        while len(hull) >= 2:
            a, m = hull[-2], hull[-1]
            # m is dominated if it lies on or above the segment a -> b.
            lhs = (err[m] - err[a]) * (cost[b] - cost[a])
            rhs = (err[b] - err[a]) * (cost[m] - cost[a])
            if lhs >= rhs:
                hull.pop()
            else:
                break
        hull.append(b)
    return hull


# --------------------------------------------------------------------------------------------------
# public entry point


def allocate_layer(
    energies: Sequence[Tensor],
    hidden: int,
    group_size: int,
    *,
    shared_energies: Tensor | None = None,
    bits: Sequence[int] | None = None,
    fractions: Sequence[float] | None = None,
    avg_bits: float | None = None,
    prune_ratio: float = 0.0,
    scope: Scope = "layer",
    allow_prune: bool = False,
) -> LayerAllocation:
    """Allocate bit-widths to the micro-experts of one MoE layer.

    :param energies: per routed expert, 1-D CAMERA energies of its micro-experts.
    :param shared_energies: 1-D energies of the shared expert's micro-experts, if any.
    :param bits: explicit mode: the bit-widths (with ``fractions``); budget mode: the
        candidate bit-widths (default :data:`DEFAULT_CANDIDATE_BITS`).
    :param fractions: explicit mode: share of the kept micro-experts per entry of ``bits``
        (non-negative, summing to 1).
    :param avg_bits: budget mode: bound on :func:`bits_per_weight` (scales/zeros included).
    :param prune_ratio: share of micro-experts (in the ranking scope) pruned first.
    :param scope: ``"layer"`` or ``"expert"`` ranking (module docstring).
    :param allow_prune: budget mode: let the optimiser also prune (0 bits) when that is the
        cheapest way to meet the budget.
    :return: a :class:`LayerAllocation` whose ``bits`` are descending; budget-mode layers list
        all candidates (use :func:`drop_unused_bits` over the whole model afterwards).
    """
    if scope not in ("layer", "expert"):
        raise ValueError(f"scope must be 'layer' or 'expert', got {scope!r}")
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
    check_group_size(group_size)
    if hidden <= 0:
        raise ValueError(f"hidden must be positive, got {hidden}")
    routed = [torch.as_tensor(e).detach().to("cpu", torch.float64).flatten() for e in energies]
    shared = (
        None
        if shared_energies is None
        else torch.as_tensor(shared_energies).detach().to("cpu", torch.float64).flatten()
    )
    members = routed + ([shared] if shared is not None else [])
    for i, e in enumerate(members):
        if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
            raise ValueError(
                f"energies of {'expert ' + str(i) if i < len(routed) else 'the shared expert'} "
                "must be finite and non-negative"
            )

    if (avg_bits is None) == (fractions is None):
        raise ValueError("give exactly one of `fractions` (with `bits`) or `avg_bits`")
    if fractions is not None:
        if bits is None or len(bits) != len(fractions):
            raise ValueError(f"`bits` and `fractions` must have the same length, got {bits} and {fractions}")
        check_bits(bits)
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")
        pairs = sorted(zip(bits, fractions), key=lambda p: -p[0])
        bits_desc = tuple(b for b, _ in pairs)
        fr_desc = [f for _, f in pairs]
        levels = _explicit_levels(members, bits_desc, fr_desc, prune_ratio, scope)
        info = {"mode": "fractions", "scope": scope}
    else:
        cand = tuple(DEFAULT_CANDIDATE_BITS if bits is None else bits)
        check_bits(cand)
        bits_desc = tuple(sorted(cand, reverse=True))
        levels, info = _budget_levels(
            members,
            len(routed),
            bits_desc,
            float(avg_bits),
            hidden,
            group_size,
            prune_ratio,
            scope,
            dict(DEFAULT_LEVEL_ERROR),
            allow_prune,
        )
    experts = [_expert_from_levels(lv, bits_desc) for lv in levels]
    alloc = LayerAllocation(
        bits_desc,
        tuple(experts[: len(routed)]),
        experts[len(routed)] if shared is not None else None,
        info,
    )
    alloc.info["bits_per_weight"] = alloc.bits_per_weight(hidden, group_size)
    if avg_bits is not None and alloc.info["bits_per_weight"] > avg_bits * (1 + 1e-12):
        # The optimiser prices experts slab by slab; this re-checks with whole-expert accounting.
        raise RuntimeError(f"allocation uses {alloc.info['bits_per_weight']} bits/weight, above {avg_bits}")
    return alloc


def _explicit_levels(
    members: list[Tensor], bits_desc: tuple[int, ...], fr_desc: list[float], prune_ratio: float, scope: Scope
) -> list[Tensor]:
    if scope == "expert":
        out = []
        for e in members:
            n_keep = e.numel() - int(round(prune_ratio * e.numel()))
            out.append(_levels_by_rank(e, _split_counts(n_keep, fr_desc), bits_desc))
        return out
    flat = torch.cat(members) if members else torch.zeros(0, dtype=torch.float64)
    n_keep = flat.numel() - int(round(prune_ratio * flat.numel()))
    lv = _levels_by_rank(flat, _split_counts(n_keep, fr_desc), bits_desc)
    return list(torch.split(lv, [e.numel() for e in members]))


def _budget_levels(
    members: list[Tensor],
    n_routed: int,
    bits_desc: tuple[int, ...],
    avg_bits: float,
    hidden: int,
    group_size: int,
    prune_ratio: float,
    scope: Scope,
    rho: dict[int, float],
    allow_prune: bool,
) -> tuple[list[Tensor], dict]:
    """Water-filling under the exact byte budget; returns per-member bit-widths and a summary.

    Every subset of the candidate bit-widths is solved separately and the one with the lowest
    modelled loss wins: each non-empty slab costs a fixed overhead (its own partial group of
    down scales and its own padding to 32 rows), which the per-micro-expert Lagrangian cannot
    see, so fewer levels can beat more levels on narrow experts.
    """
    prob = _BudgetProblem(
        members, n_routed, list(bits_desc), avg_bits, hidden, group_size, prune_ratio, scope
    )
    best = None
    for r in range(1, len(bits_desc) + 1):
        for subset in _subsets(bits_desc, r):
            levels = sorted(subset) if not allow_prune else [0] + sorted(subset)
            hull = _hull(levels, prob.cost, rho)
            got = prob.solve(hull, rho)
            if got is not None and (best is None or got[1] < best[2] - 1e-15):
                best = (hull, got[0], got[1])
    if best is None:
        lowest = min(bits_desc) if not allow_prune else 0
        rows = prob.counts_of(_hull([lowest], prob.cost, rho), [])
        need = prob.total_bits(rows) / prob.dense_bits
        raise ValueError(
            f"avg_bits {avg_bits} is unreachable: the lowest allocation (all at {lowest} bits, group size "
            f"{group_size}) needs {need:.4f} bits/weight; raise avg_bits or group_size, "
            "or allow pruning (prune_ratio / allow_prune)"
        )
    hull, cut, objective = best
    info = {
        "mode": "avg_bits",
        "scope": scope,
        "target_bits": avg_bits,
        "used_bits": [b for b in hull if b > 0],
        "model_loss": objective,
        "level_error": {str(b): rho[b] for b in sorted(rho) if b in set(bits_desc) | {0}},
    }
    return prob.expand(hull, cut), info


def _subsets(bits: Sequence[int], r: int) -> list[tuple[int, ...]]:
    from itertools import combinations

    return list(combinations(bits, r))


_FILL_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
# Bisection steps priced per batch (2**depth - 1 candidates each).
_BISECT_DEPTH = 6


class _BudgetProblem:
    """Items sorted by decreasing weight, and the exact storage of any threshold rule on them.

    Items are micro-experts (layer scope) or rank positions weighted by the summed energy of
    that rank over the routed experts (expert scope).  A threshold rule over a ladder of
    levels ``hull`` (ascending bits) is the vector ``cut[j]`` = number of items above level
    ``j`` (non-increasing in ``j``), so evaluating one is a few ``searchsorted`` calls plus
    cached :func:`stored_bytes` lookups.
    """

    def __init__(
        self,
        members: list[Tensor],
        n_routed: int,
        bits_list: list[int],
        avg_bits: float,
        hidden: int,
        group_size: int,
        prune_ratio: float,
        scope: Scope,
    ):
        self.members, self.n_routed, self.bits_list = members, n_routed, bits_list
        self.hidden, self.group_size, self.prune_ratio, self.scope = hidden, group_size, prune_ratio, scope
        self.widths = [e.numel() for e in members]
        self.dense_bits = 3 * hidden * sum(self.widths)
        self.budget = avg_bits * self.dense_bits
        # Approximate storage per micro-expert, in bits per original weight (3*hidden weights):
        # codes plus fp16 scale+zero per group of gate/up (ceil(H/G) each) and of down (~1/G).
        overhead = (2 * 32 * math.ceil(hidden / group_size) / hidden + 32 / group_size) / 3
        self.cost = {b: (b + overhead if b > 0 else 0.0) for b in [0, *QUANT_BITS]}
        self._table: Tensor | None = None

        if scope == "layer":
            flat = torch.cat(members)
            n_items = flat.numel() - int(round(prune_ratio * flat.numel()))
            self.items = _rank(flat)[:n_items]
            weight = flat[self.items]
            owner = torch.repeat_interleave(
                torch.arange(len(members)), torch.tensor(self.widths, dtype=torch.long)
            )
            item_owner = owner[self.items]
            # rank_of[m] = sorted item positions of member m (padded past the end).
            self.rank_of = torch.full((len(members), max(self.widths)), n_items + 1, dtype=torch.long)
            for m in range(len(members)):
                pos = torch.nonzero(item_owner == m).flatten()
                self.rank_of[m, : pos.numel()] = pos
        else:
            routed_w = {m.numel() for m in members[:n_routed]}
            if len(routed_w) > 1:
                raise ValueError(
                    f"scope 'expert' needs routed experts of one width, got widths {sorted(routed_w)}"
                )
            width = routed_w.pop() if routed_w else members[-1].numel()
            n_items = width - int(round(prune_ratio * width))
            sorted_e = [m[_rank(m)] for m in members[:n_routed]]
            weight = (
                torch.stack(sorted_e).sum(0)[:n_items]
                if sorted_e
                else torch.ones(n_items, dtype=torch.float64)
            )
        self.n_items = n_items
        # Strictly decreasing weights in rank order (tiny tie-break), scaled to max 1, so that
        # the threshold rule follows the ranking even for zero or equal energies.
        top = float(weight.max()) if n_items else 1.0
        weight = weight / (top if top > 0 else 1.0)
        self.weight = weight + 1e-12 * (n_items - torch.arange(n_items, dtype=torch.float64)) / max(
            n_items, 1
        )
        self.prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(self.weight, 0)]).tolist()

    # -- storage -----------------------------------------------------------------------------------
    def _slab_table(self) -> Tensor:
        """``[len(bits_list), max_width + 1]``: stored bits of one slab of ``n`` micro-experts.

        An expert's storage is the sum over its slabs (every tensor belongs to one slab), so
        one :func:`stored_bytes` call per (bits, n) prices every candidate allocation.
        """
        if self._table is None:
            n_max = max(self.widths)
            self._table = torch.tensor(
                [
                    [8 * stored_bytes([n], [b], self.hidden, self.group_size) for n in range(n_max + 1)]
                    for b in self.bits_list
                ],
                dtype=torch.long,
            )
        return self._table

    def counts_of(self, hull: list[int], cut: list[int]) -> Tensor:
        """long ``[members, len(bits_list)]``: micro-experts per slab for the rule ``cut`` on ``hull``."""
        return self.counts_of_many(hull, [cut])[0]

    def counts_of_many(self, hull: list[int], cuts: Sequence[Sequence[int]]) -> Tensor:
        """long ``[len(cuts), members, len(bits_list)]``: :meth:`counts_of` of several rules at once.

        One ``searchsorted`` prices every rule (the optimiser's trials come in batches), instead
        of one small call per rule.
        """
        top = len(hull) - 1
        n_bits = len(self.bits_list)
        n_t = len(cuts)
        # Column of each level, from the top level down; 0 bits goes to an extra, dropped column.
        col = torch.tensor([self.bits_list.index(b) if b > 0 else n_bits for b in reversed(hull)])
        # Runs from the top level down: level top is [0, cut[top-1]), level 0 is [cut[0], n_items).
        bnd = torch.tensor(
            [[0] + [c[j] for j in range(top - 1, -1, -1)] + [self.n_items] for c in cuts], dtype=torch.long
        ).reshape(n_t, top + 2)
        if self.scope == "layer":
            n_m = len(self.members)
            # [members, trials * (top + 2)] queries into each member's sorted item positions.
            q = bnd.reshape(1, -1).expand(n_m, -1).contiguous()
            at = torch.searchsorted(self.rank_of, q).reshape(n_m, n_t, top + 2).transpose(0, 1)
            runs = at[..., 1:] - at[..., :-1]  # [trials, members, levels]
        else:
            runs = (bnd[:, 1:] - bnd[:, :-1]).unsqueeze(1).expand(n_t, self.n_routed, top + 1)
        rows = torch.zeros(n_t, runs.shape[1], n_bits + 1, dtype=torch.long).index_add_(2, col, runs)
        if self.scope == "expert" and len(self.members) > self.n_routed:
            sh = self.members[-1].numel()
            sh_keep = sh - int(round(self.prune_ratio * sh))
            bases = rows[:, 0].tolist() if self.n_routed else [[0] * n_bits + [self.n_items]] * n_t
            shared = torch.tensor(
                [_split_counts(sh_keep, [c / max(self.n_items, 1) for c in base]) for base in bases],
                dtype=torch.long,
            ).reshape(n_t, 1, n_bits + 1)
            rows = torch.cat([rows, shared], dim=1)
        return rows[..., :n_bits]

    def _moved_counts(
        self, hull: list[int], cut: list[int], trials: list[tuple[int, int, list[int]]]
    ) -> Tensor:
        """:meth:`counts_of_many` of rules that differ from ``cut`` in one threshold each.

        Trial ``(j, m, _)`` is ``cut`` with ``cut[j] += m``.  In layer scope only that one
        boundary needs a new search per member; the others are shared by every trial.
        """
        if self.scope != "layer":
            return self.counts_of_many(hull, [t[2] for t in trials])
        top, n_bits, n_m, n_t = len(cut), len(self.bits_list), len(self.members), len(trials)
        col = torch.tensor([self.bits_list.index(b) if b > 0 else n_bits for b in reversed(hull)])
        bnd = torch.tensor([0] + [cut[j] for j in range(top - 1, -1, -1)] + [self.n_items], dtype=torch.long)
        base = torch.searchsorted(self.rank_of, bnd.expand(n_m, -1).contiguous())  # [members, top + 2]
        moved = torch.tensor([cut[j] + m for j, m, _ in trials], dtype=torch.long)
        at_new = torch.searchsorted(self.rank_of, moved.expand(n_m, -1).contiguous())  # [members, trials]
        # cut[j] sits at position top - j of the boundaries (they run from the top level down).
        pos = torch.tensor([top - j for j, _, _ in trials], dtype=torch.long)
        at = base.unsqueeze(0).repeat(n_t, 1, 1)
        at.scatter_(2, pos.view(n_t, 1, 1).expand(n_t, n_m, 1), at_new.T.unsqueeze(2))
        runs = at[..., 1:] - at[..., :-1]
        rows = torch.zeros(n_t, n_m, n_bits + 1, dtype=torch.long).index_add_(2, col, runs)
        return rows[..., :n_bits]

    def total_bits(self, rows: Tensor) -> int:
        return int(self.total_bits_many(rows.unsqueeze(0))[0])

    def total_bits_many(self, rows: Tensor) -> Tensor:
        """long ``[trials]``: stored bits of every rule in ``rows [trials, members, bits]``."""
        table = self._slab_table()
        n_t, n_m, n_b = rows.shape
        # table[b, rows[t, m, b]] summed over members and slabs.
        idx = rows.permute(2, 0, 1).reshape(n_b, n_t * n_m)
        return table.gather(1, idx).reshape(n_b, n_t, n_m).sum(dim=(0, 2))

    def loss(self, hull: list[int], cut: list[int], rho: Mapping[int, float]) -> float:
        bnd = [0] + [cut[j] for j in range(len(hull) - 2, -1, -1)] + [self.n_items]
        return sum(
            (self.prefix[bnd[i + 1]] - self.prefix[bnd[i]]) * rho[hull[len(hull) - 1 - i]]
            for i in range(len(hull))
        )

    # -- optimisation ------------------------------------------------------------------------------
    def solve(self, hull: list[int], rho: Mapping[int, float]) -> tuple[list[int], float] | None:
        """Best threshold rule on ``hull`` within the budget, or None if even the lowest level exceeds it."""
        top = len(hull) - 1

        def fits_many(cuts: list[list[int]]) -> list[bool]:
            return (self.total_bits_many(self.counts_of_many(hull, cuts)) <= self.budget).tolist()

        if not fits_many([[0] * top])[0]:
            return None
        neg_w = -self.weight  # ascending, for searchsorted
        slope = [
            (self.cost[hull[j + 1]] - self.cost[hull[j]]) / (rho[hull[j]] - rho[hull[j + 1]])
            for j in range(top)
        ]

        def at_many(log_lams: list[float]) -> list[list[int]]:
            # Item i sits above level j iff weight_i * d_rho_j > lam * d_cost_j.
            lams = [math.exp(x) for x in log_lams]
            q = torch.tensor([[-lam * s for s in slope] for lam in lams], dtype=torch.float64)
            return torch.searchsorted(neg_w, q.reshape(len(lams), top)).tolist()

        # Bisect the multiplier in log space: small lambda -> everything at the top level.
        lo, hi = -60.0, 20.0  # log(lambda); weights are scaled to max 1
        cut = at_many([lo])[0]
        if not fits_many([cut])[0]:
            cut = [0] * top
            lo, hi, cut = self._bisect(lo, hi, cut, at_many, fits_many)
        cut = self.fill(hull, cut, rho)
        return cut, self.loss(hull, cut, rho)

    @staticmethod
    def _bisect(lo, hi, cut, at_many, fits_many, steps: int = 64, depth: int = _BISECT_DEPTH):
        """64 bisection steps on ``log(lambda)``, ``depth`` at a time.

        Every midpoint the next ``depth`` steps could visit (a complete binary tree of
        ``2**depth - 1`` intervals) is priced in one batch, then the path the sequential
        bisection would take is followed: the same midpoints, floats and outcome as one
        ``fits`` call per step.
        """
        while steps > 0:
            d = min(depth, steps)
            # Node i (1-based heap order) holds an interval; child 2i: it fit (hi = mid),
            # child 2i + 1: it did not (lo = mid).
            spans: list[tuple[float, float]] = [(0.0, 0.0), (lo, hi)]
            mids: list[float] = []
            for i in range(1, 2**d):
                a, b = spans[i]
                mid = 0.5 * (a + b)
                mids.append(mid)
                if i < 2 ** (d - 1):
                    spans.extend([(a, mid), (mid, b)])
            cands = at_many(mids)
            ok = fits_many(cands)
            i = 1
            for _ in range(d):
                mid = mids[i - 1]
                if ok[i - 1]:
                    hi, cut = mid, cands[i - 1]
                    i = 2 * i
                else:
                    lo = mid
                    i = 2 * i + 1
            steps -= d
        return lo, hi, cut

    def fill(self, hull: list[int], cut: list[int], rho: Mapping[int, float]) -> list[int]:
        """Spend what the Lagrangian solution left of the exact budget.

        A move lifts the ``m`` best items of level ``j`` to level ``j + 1`` (``cut[j] += m``),
        which keeps the threshold rule.  Padding to 32 rows and partial groups make exact
        costs lumpy (the first micro-expert past a boundary pays for a whole block, the next
        ones are free), so several sizes are tried and the best loss reduction per exact
        extra bit that fits wins.  All trials of a step are priced in one batch.
        """
        cut = list(cut)
        top = len(cut)
        used = self.total_bits(self.counts_of(hull, cut))
        while True:
            trials: list[tuple[int, int, list[int]]] = []
            for j in range(top):
                room = (cut[j - 1] if j > 0 else self.n_items) - cut[j]
                for m in _FILL_SIZES:
                    if m > room:
                        break
                    trials.append((j, m, cut[:j] + [cut[j] + m] + cut[j + 1 :]))
            if not trials:
                return cut
            costs = self.total_bits_many(self._moved_counts(hull, cut, trials)).tolist()
            best = None
            for (j, m, trial), t in zip(trials, costs):
                if t > self.budget:
                    continue
                gain = (self.prefix[cut[j] + m] - self.prefix[cut[j]]) * (rho[hull[j]] - rho[hull[j + 1]])
                ratio = gain / (t - used) if t > used else math.inf
                if best is None or ratio > best[0]:
                    best = (ratio, trial, t)
            if best is None:
                return cut
            _, cut, used = best

    def expand(self, hull: list[int], cut: list[int]) -> list[Tensor]:
        """Per member, the bit-width of every original micro-expert (0 = pruned)."""
        if self.scope == "layer":
            level_bits = torch.full((self.n_items,), hull[0], dtype=torch.long)
            for j in range(len(hull) - 1):
                level_bits[: cut[j]] = hull[j + 1]
            flat = torch.zeros(sum(self.widths), dtype=torch.long)
            flat[self.items] = level_bits
            return list(torch.split(flat, self.widths))
        return [
            _levels_by_rank(m, row, self.bits_list)
            for m, row in zip(self.members, self.counts_of(hull, cut).tolist())
        ]
