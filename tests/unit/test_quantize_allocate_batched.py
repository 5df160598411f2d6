"""The batched budget optimiser gives exactly the allocations of the one-rule-at-a-time one.

The reference below is the optimiser as it was before trials were priced in batches: one
``searchsorted`` per rule, one bisection step per call.  It is swapped in for the solver's
``solve``/``fill``/``counts_of`` and every allocation must come out identical.
"""

from __future__ import annotations

import math

import pytest
import torch

from camera_vllm.compress.quantize import allocate
from camera_vllm.compress.quantize.allocate import allocate_layer


class _ReferenceProblem(allocate._BudgetProblem):
    def counts_of(self, hull, cut):
        top = len(hull) - 1
        n_bits = len(self.bits_list)
        col = torch.tensor([self.bits_list.index(b) if b > 0 else n_bits for b in reversed(hull)])
        bnd = torch.tensor([0] + [cut[j] for j in range(top - 1, -1, -1)] + [self.n_items])
        if self.scope == "layer":
            at = torch.searchsorted(self.rank_of, bnd.expand(len(self.members), -1).contiguous())
            runs = at[:, 1:] - at[:, :-1]
        else:
            runs = (bnd[1:] - bnd[:-1]).expand(self.n_routed, -1)
        rows = torch.zeros(runs.shape[0], n_bits + 1, dtype=torch.long).index_add_(1, col, runs)
        if self.scope == "expert" and len(self.members) > self.n_routed:
            sh = self.members[-1].numel()
            sh_keep = sh - int(round(self.prune_ratio * sh))
            base = rows[0].tolist() if self.n_routed else [0] * n_bits + [self.n_items]
            shared = torch.tensor(allocate._split_counts(sh_keep, [c / max(self.n_items, 1) for c in base]))
            rows = torch.cat([rows, shared.unsqueeze(0)])
        return rows[:, :n_bits]

    def total_bits(self, rows):
        return int(self._slab_table().gather(1, rows.T.contiguous()).sum())

    def solve(self, hull, rho):
        top = len(hull) - 1

        def fits(cut):
            return self.total_bits(self.counts_of(hull, cut)) <= self.budget

        if not fits([0] * top):
            return None
        neg_w = -self.weight
        slope = [
            (self.cost[hull[j + 1]] - self.cost[hull[j]]) / (rho[hull[j]] - rho[hull[j + 1]])
            for j in range(top)
        ]

        def at(lam):
            return torch.searchsorted(
                neg_w, torch.tensor([-lam * s for s in slope], dtype=torch.float64)
            ).tolist()

        lo, hi = -60.0, 20.0
        cut = at(math.exp(lo))
        if not fits(cut):
            cut = [0] * top
            for _ in range(64):
                mid = 0.5 * (lo + hi)
                cand = at(math.exp(mid))
                if fits(cand):
                    hi, cut = mid, cand
                else:
                    lo = mid
        cut = self.fill(hull, cut, rho)
        return cut, self.loss(hull, cut, rho)

    def fill(self, hull, cut, rho):
        cut = list(cut)
        top = len(cut)
        used = self.total_bits(self.counts_of(hull, cut))
        while True:
            best = None
            for j in range(top):
                room = (cut[j - 1] if j > 0 else self.n_items) - cut[j]
                for m in allocate._FILL_SIZES:
                    if m > room:
                        break
                    trial = cut[:j] + [cut[j] + m] + cut[j + 1 :]
                    t = self.total_bits(self.counts_of(hull, trial))
                    if t > self.budget:
                        continue
                    gain = (self.prefix[cut[j] + m] - self.prefix[cut[j]]) * (rho[hull[j]] - rho[hull[j + 1]])
                    ratio = gain / (t - used) if t > used else math.inf
                    if best is None or ratio > best[0]:
                        best = (ratio, trial, t)
            if best is None:
                return cut
            _, cut, used = best


def _same(a, b) -> None:
    assert a.bits == b.bits
    assert a.info["bits_per_weight"] == b.info["bits_per_weight"]
    assert a.info["model_loss"] == b.info["model_loss"]
    for x, y in zip(a.all_experts(), b.all_experts()):
        assert x.slabs == y.slabs
        assert torch.equal(x.perm, y.perm) and torch.equal(x.pruned, y.pruned)


def _energies(kind: str, n: int, width: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if kind == "identical":  # the CLI's dry run: every expert the same ranking
        return [torch.arange(width, 0, -1, dtype=torch.float64) for _ in range(n)]
    if kind == "flat":
        return [torch.ones(width, dtype=torch.float64) for _ in range(n)]
    return [
        torch.exp(1.5 * torch.randn(width, generator=gen) + torch.randn((), generator=gen)) for _ in range(n)
    ]


@pytest.mark.parametrize("kind", ["identical", "flat", "random"])
@pytest.mark.parametrize("scope", ["layer", "expert"])
@pytest.mark.parametrize(
    ("avg_bits", "group_size", "kw"),
    [(2.25, 128, {}), (3.1, 64, {}), (2.6, 128, {"prune_ratio": 0.2}), (1.1, 128, {"allow_prune": True})],
)
def test_batched_optimiser_matches_reference(kind, scope, avg_bits, group_size, kw, monkeypatch) -> None:
    hidden, n, width = 256, 12, 96
    energies = _energies(kind, n, width, seed=3)
    shared = (
        torch.arange(2 * width, 0, -1, dtype=torch.float64) if kind != "random" else torch.rand(2 * width)
    )
    args = dict(shared_energies=shared, avg_bits=avg_bits, scope=scope, **kw)
    got = allocate_layer(energies, hidden, group_size, **args)
    monkeypatch.setattr(allocate, "_BudgetProblem", _ReferenceProblem)
    ref = allocate_layer(energies, hidden, group_size, **args)
    _same(got, ref)


def test_batched_counts_match_one_rule_at_a_time() -> None:
    energies = _energies("random", 7, 50, seed=4)
    for scope in ("layer", "expert"):
        args = (energies, 6, [4, 3, 2, 1], 3.0, 128, 64, 0.1, scope)
        prob, ref = allocate._BudgetProblem(*args), _ReferenceProblem(*args)
        gen = torch.Generator().manual_seed(5)
        hull = [1, 2, 4]
        cuts = [
            sorted(torch.randint(0, prob.n_items + 1, (2,), generator=gen).tolist(), reverse=True)
            for _ in range(9)
        ]
        many = prob.counts_of_many(hull, cuts)
        assert many.shape == (9, len(energies), 4)
        for c, rows in zip(cuts, many):
            assert torch.equal(rows, ref.counts_of(hull, c))
            assert prob.total_bits(rows) == ref.total_bits(rows)
        assert prob.total_bits_many(many).tolist() == [ref.total_bits(r) for r in many]
        for c in cuts[:3]:
            trials = [(j, m, c[:j] + [c[j] + m] + c[j + 1 :]) for j in (0, 1) for m in (1, 4)]
            moved = prob._moved_counts(hull, c, trials)
            assert all(torch.equal(moved[i], ref.counts_of(hull, t[2])) for i, t in enumerate(trials))
