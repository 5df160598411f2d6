"""End-to-end CAMERA runs: calibrate -> stream layers (score, compress, re-run) -> write.

Public entry points (the CLI, the demo and the benchmark call these):

* :func:`analyze` - CAMERA energies of every MoE layer of the unmodified model, saved
  as safetensors + JSON sidecar.
* :func:`run_camera_p` - CAMERA-P: layer by layer, score, prune the lowest ``ratio``
  of micro-experts, re-run the pruned layer so the next layer is scored on pruned
  inputs, then write a servable checkpoint with a report and plots.

Both are built on :class:`~camera_vllm.compress.calibrate.LayerStreamer`; a new
per-layer method (CAMERA-Q) plugs in as an ``on_moe_layer`` callback the same way
:class:`CameraPPruner` does.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..format.validate import validate
from .calibrate import CalibSpec, LayerStreamer, MoELayerContext, load_calibration
from .prune import LayerKeep, PruneScope, select_keep, write_pruned_checkpoint
from .report import build_prune_report, render_prune_plots
from .score import EnergySpec, LayerEnergies, LayerWeights, save_energies
from .source import SourceCheckpoint

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; a device this machine lacks raises ``ValueError``.

    Called before calibration starts, so ``--device cuda`` on a machine without a GPU fails
    in a second, not after the calibration text is tokenized.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"--device {device!r} is not a device ({err}); use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu (or auto)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: the compressor runs on cpu or cuda")
    return dev


def check_run_setup(out: Path, *, overwrite: bool, batch_size: int) -> None:
    """Refuse, before any work, an output directory that cannot be written and bad run options.

    ``out`` must not exist (unless ``overwrite``) and must not be a file; the checkpoint is
    written into a sibling temporary directory, so its parent (or the nearest existing
    ancestor, when parents will be created) must accept a new directory: probed by creating
    and removing one, which also catches read-only mounts.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a checkpoint directory")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"--out {out}: {ancestor} is a file, so no directory can be made under it")
    try:
        probe = Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=ancestor))
    except OSError as err:
        raise PermissionError(
            f"--out {out}: cannot create the checkpoint under {ancestor} ({err.strerror})"
        ) from None
    probe.rmdir()


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


def _calib_settings(files: Sequence[str | Path], calib: CalibSpec, ids: torch.Tensor) -> dict[str, Any]:
    return {
        "files": [str(f) for f in files],
        "format": calib.fmt,
        "text_key": calib.text_key,
        "num_seqs": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "seed": calib.seed,
        "tokens": int(ids.numel()),
    }


def analyze(
    model_dir: str | Path,
    calib_files: Sequence[str | Path],
    out_path: str | Path,
    *,
    calib: CalibSpec | None = None,
    energy: EnergySpec | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 4,
    progress: bool = True,
) -> Path:
    """Score every micro-expert of the unmodified model; write ``out_path`` (+ ``.json`` sidecar).

    :returns: the safetensors path (see :func:`~camera_vllm.compress.score.save_energies`).
    """
    calib, energy = calib or CalibSpec(), energy or EnergySpec()
    t0 = time.perf_counter()
    source = SourceCheckpoint(model_dir)
    ids = load_calibration(model_dir, calib_files, calib)
    streamer = LayerStreamer(source, device=resolve_device(device), batch_size=batch_size)
    energies = streamer.run(ids, energy=energy, progress=progress)
    settings = {
        "model": str(source.path),
        "architecture": source.arch.architecture,
        "alpha": energy.alpha,
        "normalize_sum": energy.normalize_sum,
        "calibration": _calib_settings(calib_files, calib, ids),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return save_energies(out_path, energies, settings)


def run_camera_p(
    model_dir: str | Path,
    out_dir: str | Path,
    ratio: float,
    calib_files: Sequence[str | Path],
    *,
    scope: PruneScope = "layer",
    calib: CalibSpec | None = None,
    energy: EnergySpec | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 4,
    overwrite: bool = False,
    scores_out: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """CAMERA-P: prune ``ratio`` of each MoE layer's micro-experts and write a checkpoint.

    ``scope='layer'`` (the paper) ranks routed and shared micro-experts of a layer
    together and removes exactly ``round(ratio * N)`` of them; ``'expert'`` removes
    ``round(ratio * I_e)`` inside each expert.  Each layer is scored on the outputs of
    the already-pruned earlier layers.  The output directory gets ``camera_report.json``
    and two PNG plots; it is validated (headers and shapes) before returning.

    :param calib_files: text or JSON-lines files (see :class:`CalibSpec`).
    :param scores_out: optionally also save the energies (safetensors + JSON sidecar);
        never inside ``out_dir``, where loaders would take it for weights.
    :returns: ``out_dir`` as a resolved path.
    """
    calib, energy = calib or CalibSpec(), energy or EnergySpec()
    pruner = CameraPPruner(ratio, scope)  # fail fast on bad ratio/scope, before calibrating
    out = Path(out_dir).resolve()
    check_run_setup(out, overwrite=overwrite, batch_size=batch_size)
    if scores_out is not None and out in Path(scores_out).resolve().parents:
        raise ValueError(f"scores_out {scores_out} must not be inside the checkpoint directory {out}")
    dev = resolve_device(device)

    t0 = time.perf_counter()
    source = SourceCheckpoint(model_dir)
    ids = load_calibration(model_dir, calib_files, calib)
    t_calib = time.perf_counter()
    streamer = LayerStreamer(source, device=dev, batch_size=batch_size)
    energies: dict[int, LayerEnergies] = streamer.run(
        ids, energy=energy, on_moe_layer=pruner, progress=progress
    )
    t_stream = time.perf_counter()

    calib_info = _calib_settings(calib_files, calib, ids)
    settings: dict[str, Any] = {
        "ratio": ratio,
        "scope": scope,
        **asdict(energy),
        "device": str(dev),
        "batch_size": batch_size,
        "calibration": calib_info,
    }
    compression = {
        "method": "camera-p",
        **settings,
        "calibration": {**calib_info, "files": [Path(f).name for f in calib_files]},
    }
    if scores_out is not None:
        save_energies(scores_out, energies, {"model": str(source.path), **settings})
    plots = render_prune_plots(source.arch, energies, pruner.keeps)
    timings = {
        "calibration_load": t_calib - t0,
        "score_and_prune": t_stream - t_calib,
        "plots": time.perf_counter() - t_stream,
    }
    report = build_prune_report(
        source,
        pruner.keeps,
        energies,
        settings,
        timings,
        calibration_tokens=int(ids.numel()),
        plots=sorted(plots),
    )
    path = write_pruned_checkpoint(
        source,
        out,
        pruner.keeps,
        compression=compression,
        report=report,
        extra_files=plots,
        overwrite=overwrite,
    )
    log.info("CAMERA-P wrote %s in %.1fs", path, time.perf_counter() - t0)
    result = validate(path, check_values=False)
    if not result.ok:
        raise RuntimeError(f"the written checkpoint does not validate:\n{result}")
    return path
