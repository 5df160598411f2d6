"""Pruning baselines for the quality table, at CAMERA-P's parameter count.

* ``random``    - channels removed uniformly at random (seeded), layer-pooled.
* ``magnitude`` - channels ranked by weight magnitude ``||gate_j|| * ||up_j|| * ||down_:,j||``,
  layer-pooled (no calibration signal).
* ``expert-drop`` - NAEE-like: whole routed experts dropped by routing frequency on the
  calibration tokens, lowest first, as many as the channel budget allows (shared
  experts kept).

All run through the same layer streamer as CAMERA-P, so later layers see pruned inputs.

Quantization baseline, at CAMERA-Q's bytes:

* ``mc-like`` - expert-level mixed precision in the spirit of Mixture Compressor (MC):
  every routed expert gets *one* bit-width for all its micro-experts, chosen per layer
  from the expert's importance (routing frequency and CAMERA energy) and its measured
  quantization error, under the same byte budget CAMERA-Q meets (every stored byte
  counted).  Written as a CAMERA-Q checkpoint whose experts each fill a single slab, so
  it is served by the same vLLM path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from camera_vllm.checkpoint.keeps import LayerKeep
from camera_vllm.checkpoint.source import SourceCheckpoint
from camera_vllm.compress.calibrate import CalibSpec, LayerStreamer, MoELayerContext, load_calibration
from camera_vllm.compress.prune import select_keep, write_pruned_checkpoint
from camera_vllm.compress.quantize.allocate import ExpertAllocation, LayerAllocation, bits_per_weight
from camera_vllm.compress.quantize.pipeline import (
    LayerQuantResult,
    QuantMethod,
    QuantSpec,
    copy_unquantized,
    final_allocations,
    quant_config,
    quantize_layer,
)
from camera_vllm.compress.quantize.rtn import quantize_rtn
from camera_vllm.compress.writer import CheckpointWriter
from camera_vllm.format.layout import stored_bytes
from camera_vllm.format.validate import validate

BASELINES = ("random", "magnitude", "expert-drop")


class _BaselinePruner:
    def __init__(self, method: str, ratio: float, seed: int = 0):
        if method not in BASELINES:
            raise ValueError(f"unknown baseline {method!r}; choose from {BASELINES}")
        self.method, self.ratio = method, ratio
        self.gen = torch.Generator().manual_seed(seed)
        self.keeps: dict[int, LayerKeep] = {}

    def _magnitude(self, g: torch.Tensor, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return (g.float().norm(dim=1) * u.float().norm(dim=1) * d.float().norm(dim=0)).cpu()

    def __call__(self, ctx: MoELayerContext):
        w = ctx.weights
        shared = w.shared
        if self.method == "random":
            scores = [torch.rand(g.shape[0], generator=self.gen) for g in w.gates]
            sh = None if shared is None else torch.rand(shared[0].shape[0], generator=self.gen)
            keep = select_keep(scores, self.ratio, shared_scores=sh)
        elif self.method == "magnitude":
            scores = [self._magnitude(g, u, d) for g, u, d in zip(w.gates, w.ups, w.downs)]
            sh = None if shared is None else self._magnitude(*shared)
            keep = select_keep(scores, self.ratio, shared_scores=sh)
        else:
            counts = torch.bincount(
                ctx.routing.topk_ids.flatten().long().clamp(min=0), minlength=len(w.gates)
            )
            total = sum(w.widths) + (0 if shared is None else shared[0].shape[0])
            budget = int(round(self.ratio * total))
            dropped, removed = set(), 0
            for e in torch.sort(counts.double(), stable=True).indices.tolist():
                if removed + w.widths[e] > budget:
                    break
                dropped.add(e)
                removed += w.widths[e]
            experts = tuple(
                torch.zeros(0, dtype=torch.long) if e in dropped else torch.arange(w.widths[e])
                for e in range(len(w.gates))
            )
            keep = LayerKeep(experts, None if shared is None else torch.arange(shared[0].shape[0]))
        self.keeps[ctx.layer] = keep
        return w.prune(keep)


def run_baseline_p(
    model_dir: str | Path,
    out_dir: str | Path,
    method: str,
    ratio: float,
    calib_files: Sequence[str | Path],
    *,
    calib: CalibSpec | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a pruned checkpoint chosen by a baseline ``method`` (see module docstring)."""
    calib = calib or CalibSpec()
    source = SourceCheckpoint(model_dir)
    ids = load_calibration(model_dir, calib_files, calib)
    pruner = _BaselinePruner(method, ratio, seed=calib.seed)
    LayerStreamer(source).run(
        ids, on_moe_layer=pruner, keep_moe_inputs=method == "expert-drop", progress=True
    )
    compression = {"method": f"baseline-{method}", "ratio": ratio}
    return write_pruned_checkpoint(
        source, out_dir, pruner.keeps, compression=compression, overwrite=overwrite
    )


# -- MC-like expert-level mixed precision -------------------------------------------------------------
MC_BITS: tuple[int, ...] = (4, 3, 2, 1)
# Largest DP table (budget units x experts) before refusing: a bench helper, not a general solver.
_MAX_DP_CELLS = 50_000_000


def expert_importance(routed_share: Tensor, energy_share: Tensor, gamma: float = 0.5) -> Tensor:
    """Importance of each expert: ``routed_share**gamma * energy_share**(1 - gamma)``.

    :param routed_share: ``[E]`` share of the layer's routed (token, slot) pairs per expert
        (MC's access frequency).
    :param energy_share: ``[E]`` share of the layer's CAMERA energy (sum over the expert's
        micro-experts), which also carries the router weights (MC's activation weight).
    """
    if routed_share.shape != energy_share.shape:
        raise ValueError(
            f"routed_share {tuple(routed_share.shape)} and energy_share "
            f"{tuple(energy_share.shape)} differ in shape"
        )
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    return routed_share.double().clamp(min=0) ** gamma * energy_share.double().clamp(min=0) ** (1.0 - gamma)


def rtn_relative_error(gate: Tensor, up: Tensor, down: Tensor, bits: int, group_size: int) -> float:
    """``sum ||W - Q_b(W)||^2 / sum ||W||^2`` over an expert's three matrices (RTN with clipping).

    Matrices are quantized as the slabs store them: gate/up along the hidden dim, down along
    the expert's intermediate dim.
    """
    num = den = 0.0
    for wt in (gate.float().T, up.float().T, down.float().T):  # K-major: [K, N]
        q = quantize_rtn(wt, bits, group_size, clip_search=True).dequantize()
        num += float((wt - q).double().square().sum())
        den += float(wt.double().square().sum())
    return num / den if den > 0 else 0.0


def solve_expert_bits(
    importance: Sequence[float],
    errors: Sequence[Sequence[float]],
    costs: Sequence[Sequence[int]],
    budget: int,
    bits: Sequence[int] = MC_BITS,
) -> list[int]:
    """Bit-width per expert minimising ``sum_e importance_e * errors[e][i]`` with ``sum costs <= budget``.

    Exact (multiple-choice knapsack by dynamic programming over costs divided by their gcd).

    :param errors, costs: ``[E][len(bits)]`` relative error and stored bytes of expert ``e``
        at ``bits[i]``.
    :returns: the chosen bit-width of every expert.
    :raises ValueError: if even the cheapest choice of every expert exceeds ``budget``.
    """
    n_e, n_b = len(importance), len(bits)
    if len(errors) != n_e or len(costs) != n_e or any(len(r) != n_b for r in list(errors) + list(costs)):
        raise ValueError(f"errors and costs must be [{n_e}][{n_b}] (experts x bit-widths)")
    if n_e == 0:
        return []
    cheapest = sum(min(c) for c in costs)
    if cheapest > budget:
        raise ValueError(f"budget {budget} bytes is below the cheapest assignment ({cheapest} bytes)")
    unit = reduce(math.gcd, [int(c) for row in costs for c in row if c > 0], 0) or 1
    cap = budget // unit
    if cap * n_e > _MAX_DP_CELLS:
        raise ValueError(f"{n_e} experts x {cap} budget units is too large for the exact solver")
    inf = float("inf")
    best = [0.0] + [inf] * cap  # best[c]: least loss of the experts so far at exactly c units
    choice: list[list[int]] = []
    for e in range(n_e):
        new = [inf] * (cap + 1)
        pick = [-1] * (cap + 1)
        for i in range(n_b):
            w = int(costs[e][i]) // unit
            loss = float(importance[e]) * float(errors[e][i])
            for c in range(w, cap + 1):
                prev = best[c - w]
                if prev + loss < new[c]:
                    new[c], pick[c] = prev + loss, i
        best = new
        choice.append(pick)
    c = min(range(cap + 1), key=lambda k: (best[k], k))
    out = [0] * n_e
    for e in range(n_e - 1, -1, -1):
        i = choice[e][c]
        out[e] = bits[i]
        c -= int(costs[e][i]) // unit
    return out


def expert_level_allocation(
    expert_bits: Sequence[int], widths: Sequence[int], bits: Sequence[int] = MC_BITS, info: dict | None = None
) -> LayerAllocation:
    """A :class:`LayerAllocation` in which expert ``e`` keeps all its micro-experts at ``expert_bits[e]``."""
    order = tuple(sorted(bits, reverse=True))
    experts = []
    for e, (b, w) in enumerate(zip(expert_bits, widths)):
        if b not in order:
            raise ValueError(f"expert {e}: bit-width {b} is not one of {list(order)}")
        slabs = tuple(w if x == b else 0 for x in order)
        experts.append(ExpertAllocation(order, slabs, torch.arange(w), torch.zeros(0, dtype=torch.long), w))
    return LayerAllocation(order, tuple(experts), None, dict(info or {}))


class _MCLikeQuantizer:
    """``on_moe_layer`` callback: choose expert bit-widths, then quantize like CAMERA-Q."""

    def __init__(self, spec: QuantSpec, sink, gamma: float):
        self.spec, self.sink, self.gamma = spec, sink, gamma
        self.results: dict[int, LayerQuantResult] = {}
        self.plans: dict[int, dict[str, Any]] = {}

    def __call__(self, ctx: MoELayerContext):
        w, arch, g = ctx.weights, ctx.arch, self.spec.group_size
        if w.shared is not None:
            raise NotImplementedError("the MC-like baseline covers routed experts only (no shared expert)")
        n_e = len(w.gates)
        counts = torch.bincount(ctx.routing.topk_ids.flatten().long().clamp(min=0), minlength=n_e)[
            :n_e
        ].double()
        energy = torch.stack([s.sum() for s in ctx.energies.expert_scores]).double()
        share = lambda v: v / v.sum() if float(v.sum()) > 0 else torch.full_like(v, 1.0 / n_e)  # noqa: E731
        imp = expert_importance(share(counts), share(energy), self.gamma)
        errors = [
            [rtn_relative_error(w.gates[e], w.ups[e], w.downs[e], b, g) for b in MC_BITS] for e in range(n_e)
        ]
        costs = [[stored_bytes([w.widths[e]], [b], arch.hidden_size, g) for b in MC_BITS] for e in range(n_e)]
        dense = sum(3 * arch.hidden_size * wd for wd in w.widths)
        budget = int(self.spec.avg_bits * dense // 8)  # the per-layer budget CAMERA-Q meets
        chosen = solve_expert_bits(imp.tolist(), errors, costs, budget)
        alloc = expert_level_allocation(chosen, w.widths)
        alloc.info["bits_per_weight"] = bits_per_weight(alloc, arch.hidden_size, g)
        self.plans[ctx.layer] = {
            "expert_bits": chosen,
            "importance": [round(float(x), 6) for x in imp],
            "routed_share": [round(float(x), 6) for x in share(counts)],
            "energy_share": [round(float(x), 6) for x in share(energy)],
            "bits_per_weight": alloc.info["bits_per_weight"],
        }
        res = quantize_layer(ctx, self.spec, allocation=alloc)
        for name in sorted(res.tensors):
            self.sink(name, res.tensors[name])
        fed, res.tensors, res.weights = res.weights, {}, None
        self.results[ctx.layer] = res
        return fed


def run_mc_like_q(
    model_dir: str | Path,
    out_dir: str | Path,
    avg_bits: float,
    calib_files: Sequence[str | Path],
    *,
    method: QuantMethod = "gptq",
    group_size: int = 128,
    gamma: float = 0.5,
    calib: CalibSpec | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an MC-like checkpoint (see module docstring) at ``avg_bits`` stored bits per expert weight.

    Calibration, layer streaming, GPTQ/RTN and their options are CAMERA-Q's; only the bit
    plan differs (one width per expert instead of per micro-expert).
    """
    calib = calib or CalibSpec()
    spec = QuantSpec(avg_bits=avg_bits, method=method, group_size=group_size)
    source = SourceCheckpoint(model_dir)
    ids = load_calibration(model_dir, calib_files, calib)
    out = Path(out_dir).resolve()
    with CheckpointWriter(out, overwrite=overwrite) as writer:
        q = _MCLikeQuantizer(spec, writer.add, gamma)
        LayerStreamer(source).run(ids, on_moe_layer=q, keep_moe_inputs=True, progress=True)
        copy_unquantized(writer, source)
        allocations = final_allocations(q.results)
        achieved = bits_per_weight(list(allocations.values()), source.arch.hidden_size, group_size)
        compression = {
            "method": "baseline-mc-like",
            "quant_algorithm": method,
            "avg_bits": avg_bits,
            "avg_bits_achieved": achieved,
            "group_size": group_size,
            "gamma": gamma,
            "candidate_bits": list(MC_BITS),
            "calibration": {
                "files": [Path(f).name for f in calib_files],
                "tokens": int(ids.numel()),
                "num_seqs": calib.num_seqs,
                "seq_len": calib.seq_len,
                "seed": calib.seed,
            },
        }
        report = {
            **compression,
            "layers": {str(k): v for k, v in sorted(q.plans.items())},
            "expert_bytes": sum(r.expert_bytes for r in q.results.values()),
            "output_rel_errors": {str(k): r.output_rel_error for k, r in sorted(q.results.items())},
        }
        path = writer.commit(
            source_dir=source.path,
            config=source.config,
            quant_config=quant_config(source, allocations, group_size, compression),
            report=report,
        )
    result = validate(path, check_values=False)
    if not result.ok:
        raise RuntimeError(f"the MC-like checkpoint {path} does not validate:\n{result}")
    return path
