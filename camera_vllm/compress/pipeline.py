"""End-to-end CAMERA runs: calibrate -> stream layers (score, compress, re-run) -> write.

Public entry points (the Python API :mod:`camera_vllm.api`, the CLI, the demo and the
benchmarks call these):

* :func:`score_model` / :func:`analyze` - CAMERA energies of every MoE layer of the
  unmodified model (in memory / saved as safetensors + JSON sidecar).
* :func:`run_camera_p` - CAMERA-P: layer by layer, score, prune the lowest ``ratio``
  of micro-experts, re-run the pruned layer so the next layer is scored on pruned
  inputs, then write a servable checkpoint with a report and plots.

Both are built on :class:`~camera_vllm.compress.calibrate.LayerStreamer`; the run itself
(checks, calibration, writer, validation) is :func:`~camera_vllm.compress.run.compress_checkpoint`,
which CAMERA-Q (:mod:`camera_vllm.compress.quantize.pipeline`) shares: a method plugs in as
a :class:`~camera_vllm.compress.run.LayerMethod` the way :class:`PruneMethod` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.keeps import LayerKeep, prune_quant_config
from .calibrate import MoELayerCallback, MoELayerContext
from .prune import PruneScope, add_pruned_tensors, select_keep
from .report import build_prune_report, render_prune_plots
from .run import (
    CalibratedRun,
    Calibration,
    Finished,
    RunOptions,
    check_run_setup,
    compress_checkpoint,
    open_run,
    resolve_device,
    thread_limit,
)
from .score import EnergySpec, LayerEnergies, LayerWeights, save_energies
from .writer import CheckpointWriter

__all__ = [
    "CameraPPruner",
    "PruneMethod",
    "RunOptions",
    "analyze",
    "check_run_setup",
    "resolve_device",
    "run_camera_p",
    "score_model",
]


class CameraPPruner:
    """``on_moe_layer`` callback of CAMERA-P: keep the highest-energy micro-experts.

    Records the keep-set of every layer in :attr:`keeps` and returns the pruned
    weights so the streamer re-runs the layer with them.
    """

    def __init__(self, ratio: float, scope: PruneScope = "layer"):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        if scope not in ("layer", "expert"):
            raise ValueError(f"unknown prune scope {scope!r}; expected 'layer' or 'expert'")
        self.ratio = ratio
        self.scope: PruneScope = scope
        self.keeps: dict[int, LayerKeep] = {}

    def __call__(self, ctx: MoELayerContext) -> LayerWeights:
        e = ctx.energies
        keep = select_keep(e.expert_scores, self.ratio, shared_scores=e.shared_score, scope=self.scope)
        self.keeps[ctx.layer] = keep
        return ctx.weights.prune(keep)


def score_model(
    model_dir: str | Path,
    calibration: Calibration,
    *,
    energy: EnergySpec | None = None,
    options: RunOptions | None = None,
) -> tuple[dict[int, LayerEnergies], dict[str, Any]]:
    """CAMERA energies of every micro-expert of the unmodified model, and the settings used."""
    energy, options = energy or EnergySpec(), options or RunOptions()
    t0 = time.perf_counter()
    with thread_limit(options.threads):
        run = open_run(model_dir, calibration, options)
        energies = run.streamer.run(run.ids, energy=energy, progress=options.progress)
    settings = {
        "model": str(run.source.path),
        "architecture": run.source.arch.architecture,
        "alpha": energy.alpha,
        "normalize_sum": energy.normalize_sum,
        "calibration": run.base_settings(energy)["calibration"],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return energies, settings


def analyze(
    model_dir: str | Path,
    calibration: Calibration,
    out_path: str | Path,
    *,
    energy: EnergySpec | None = None,
    options: RunOptions | None = None,
) -> Path:
    """Score every micro-expert of the unmodified model; write ``out_path`` (+ ``.json`` sidecar).

    :param calibration: files (or :class:`~.calibrate.CalibrationData`).
    :param options: device, threads, calibration windows (default :class:`~.run.RunOptions`).
    :returns: the safetensors path (see :func:`~camera_vllm.compress.score.save_energies`).
    """
    energies, settings = score_model(model_dir, calibration, energy=energy, options=options)
    return save_energies(out_path, energies, settings)


class PruneMethod:
    """CAMERA-P as a :class:`~.run.LayerMethod`: prune each layer, then write the kept channels."""

    stream_phase = "score_and_prune"
    keep_moe_inputs = False

    def __init__(self, ratio: float, scope: PruneScope = "layer"):
        self.pruner = CameraPPruner(ratio, scope)  # fails fast on a bad ratio/scope

    def check(self, source) -> None:
        return None

    def settings(self) -> dict[str, Any]:
        return {"ratio": self.pruner.ratio, "scope": self.pruner.scope}

    def layer_callback(self, add: Callable[[str, torch.Tensor], None]) -> MoELayerCallback:
        return self.pruner

    def on_rerun(self, layer: int, rel_error: float) -> None:
        return None

    def layer_state(self, layer: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The keep-set of finished ``layer`` (for resuming)."""
        keep = self.pruner.keeps[layer]
        tensors = {f"keep.e{e}": k.clone() for e, k in enumerate(keep.experts)}
        if keep.shared is not None:
            tensors["keep.shared"] = keep.shared.clone()
        return tensors, {"experts": len(keep.experts)}

    def restore_layer(self, layer: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        experts = tuple(tensors[f"keep.e{e}"] for e in range(meta["experts"]))
        self.pruner.keeps[layer] = LayerKeep(experts, tensors.get("keep.shared"))

    def finish(
        self,
        writer: CheckpointWriter,
        run: CalibratedRun,
        energies: dict[int, LayerEnergies],
        settings: dict[str, Any],
        compression_calibration: dict[str, Any],
        timings: dict[str, float],
    ) -> Finished:
        source, keeps = run.source, self.pruner.keeps
        compression = {"method": "camera-p", **settings, "calibration": compression_calibration}
        t0 = time.perf_counter()
        plots = render_prune_plots(source.arch, energies, keeps)
        timings["plots"] = time.perf_counter() - t0
        report = build_prune_report(
            source,
            keeps,
            energies,
            settings,
            timings,
            calibration_tokens=int(run.ids.numel()),
            plots=sorted(plots),
        )
        add_pruned_tensors(writer, source, keeps)
        return Finished(prune_quant_config(source, keeps, compression), report, plots, "CAMERA-P")


def run_camera_p(
    model_dir: str | Path,
    out_dir: str | Path,
    ratio: float,
    calibration: Calibration,
    *,
    scope: PruneScope = "layer",
    energy: EnergySpec | None = None,
    options: RunOptions | None = None,
) -> Path:
    """CAMERA-P: prune ``ratio`` of each MoE layer's micro-experts and write a checkpoint.

    ``scope='layer'`` (the paper) ranks routed and shared micro-experts of a layer
    together and removes exactly ``round(ratio * N)`` of them; ``'expert'`` removes
    ``round(ratio * I_e)`` inside each expert.  Each layer is scored on the outputs of
    the already-pruned earlier layers.  The output directory gets ``camera_report.json``
    and two PNG plots; it is validated (headers and shapes) before returning.

    :param calibration: text or JSON-lines files (see :class:`~.calibrate.CalibSpec`), or
        :class:`~.calibrate.CalibrationData`.
    :param options: device, threads, calibration windows, output handling
        (``options.scores_out`` saves the energies too, never inside ``out_dir``).
    :returns: ``out_dir`` as a resolved path.
    """
    method = PruneMethod(ratio, scope)
    return compress_checkpoint(
        model_dir,
        out_dir,
        calibration,
        method,
        energy=energy or EnergySpec(),
        options=options or RunOptions(),
    )
