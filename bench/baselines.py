"""Pruning baselines for the quality table, at CAMERA-P's parameter count.

* ``random``    - channels removed uniformly at random (seeded), layer-pooled.
* ``magnitude`` - channels ranked by weight magnitude ``||gate_j|| * ||up_j|| * ||down_:,j||``,
  layer-pooled (no calibration signal).
* ``expert-drop`` - NAEE-like: whole routed experts dropped by routing frequency on the
  calibration tokens, lowest first, as many as the channel budget allows (shared
  experts kept).

All run through the same layer streamer as CAMERA-P, so later layers see pruned inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from camera_vllm.compress.calibrate import CalibSpec, LayerStreamer, MoELayerContext, load_calibration
from camera_vllm.compress.prune import LayerKeep, select_keep, write_pruned_checkpoint
from camera_vllm.compress.source import SourceCheckpoint

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
            counts = torch.bincount(ctx.routing.topk_ids.flatten().long().clamp(min=0), minlength=len(w.gates))
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
    LayerStreamer(source).run(ids, on_moe_layer=pruner, keep_moe_inputs=method == "expert-drop", progress=True)
    compression = {"method": f"baseline-{method}", "ratio": ratio}
    return write_pruned_checkpoint(source, out_dir, pruner.keeps, compression=compression, overwrite=overwrite)
