"""The compression report written beside a CAMERA checkpoint: JSON facts and PNG plots.

``camera_report.json`` (``format.names.REPORT_FILE``) holds the settings, calibration
size, kept widths per layer and expert, parameter counts before/after and timings.
Two plots go into the same directory:

* ``camera_report_energy.png`` - per MoE layer, the spread of log10 CAMERA energies
  (5-95 % and 25-75 % bands, median) with the pruning threshold, and a histogram of
  kept vs removed micro-experts;
* ``camera_report_widths.png`` - kept width of every expert (and the shared expert) as
  a fraction of its original width, layers x experts.

A CAMERA-Q run (:func:`build_quant_report`) writes the same report plus the bit
allocation (slabs per layer, stored bytes, achieved average bits counting packed
weights, scales and zeros) and a third plot:

* ``camera_report_bits.png`` - mean bits per micro-expert of every expert (pruned = 0),
  layers x experts, and the share of micro-experts at each bit-width per layer.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import torch

from .. import __version__
from ..arch import MoEArch
from ..checkpoint.keeps import LayerKeep
from ..checkpoint.source import SourceCheckpoint
from .score import LayerEnergies

if TYPE_CHECKING:  # only for annotations: report.py stays importable without the quantize package
    from .quantize.allocate import LayerAllocation

ENERGY_PLOT = "camera_report_energy.png"
WIDTHS_PLOT = "camera_report_widths.png"
BITS_PLOT = "camera_report_bits.png"


def expert_param_counts(arch: MoEArch, keeps: dict[int, LayerKeep] | None = None) -> int:
    """Parameters of all routed + shared experts: original (``keeps=None``) or as pruned."""
    total = 0
    for layer in arch.moe_layers:
        if keeps is None:
            width = arch.num_experts * arch.intermediate_size + (arch.shared_intermediate_size or 0)
        else:
            keep = keeps[layer]
            shared = keep.shared.numel() if keep.shared is not None else (arch.shared_intermediate_size or 0)
            width = sum(keep.widths) + int(shared)
        total += 3 * arch.hidden_size * width
    return total


def model_param_count(source: SourceCheckpoint) -> int:
    """Every tensor element in the source checkpoint (read from headers only)."""
    total = 0
    for name in source.weight_map:
        n = 1
        for d in source.shape(name):
            n *= d
        total += n
    return total


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    if x.numel() == 0:
        return {}
    q = torch.quantile(x.double(), torch.tensor([0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0], dtype=torch.float64))
    return dict(zip(("min", "p05", "p25", "p50", "p75", "p95", "max"), (float(v) for v in q)))


def _removed_scores(le: LayerEnergies, keep: LayerKeep) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept energies, removed energies) of one layer, flattened."""
    kept, removed = [], []
    groups = list(zip(le.expert_scores, keep.experts))
    if le.shared is not None and keep.shared is not None:
        groups.append((le.shared_score, keep.shared))  # type: ignore[arg-type]
    for score, idx in groups:
        mask = torch.zeros(score.numel(), dtype=torch.bool)
        mask[idx.long()] = True
        kept.append(score[mask])
        removed.append(score[~mask])
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.float64)  # noqa: E731
    return cat(kept), cat(removed)


def build_prune_report(
    source: SourceCheckpoint,
    keeps: dict[int, LayerKeep],
    energies: dict[int, LayerEnergies],
    settings: dict[str, Any],
    timings: dict[str, float],
    *,
    calibration_tokens: int,
    plots: list[str] | None = None,
) -> dict[str, Any]:
    """The JSON report of a CAMERA-P run (plain Python types only)."""
    arch = source.arch
    layers: dict[str, Any] = {}
    for layer in arch.moe_layers:
        keep, le = keeps[layer], energies[layer]
        kept, removed = _removed_scores(le, keep)
        total = kept.numel() + removed.numel()
        layers[str(layer)] = {
            "kept_widths": keep.widths,
            "shared_kept": None if keep.shared is None else int(keep.shared.numel()),
            "original_width": arch.intermediate_size,
            "original_shared_width": arch.shared_intermediate_size,
            "micro_experts": total,
            "removed": int(removed.numel()),
            "zero_width_experts": [e for e, w in enumerate(keep.widths) if w == 0],
            "routed_tokens": [s.tokens for s in le.experts],
            "energy_threshold": float(removed.max()) if removed.numel() else None,
            "energy_quantiles": _quantiles(torch.cat([kept, removed])),
        }
    before_e, after_e = expert_param_counts(arch), expert_param_counts(arch, keeps)
    before_m = model_param_count(source)
    return {
        "method": "CAMERA-P",
        "camera_vllm_version": __version__,
        "source_model": str(source.path),
        "architecture": arch.architecture,
        "settings": settings,
        "calibration_tokens": calibration_tokens,
        "params": {
            "experts_before": before_e,
            "experts_after": after_e,
            "model_before": before_m,
            "model_after": before_m - (before_e - after_e),
            "experts_kept_fraction": after_e / before_e if before_e else 1.0,
        },
        "layers": layers,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "plots": plots or [],
    }


def _figure(figsize: tuple[float, float]):
    # The object-oriented Figure API: no pyplot global state, no backend switching.
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _log10(x: torch.Tensor) -> torch.Tensor:
    pos = x[x > 0]
    floor = float(pos.min()) * 0.1 if pos.numel() else 1e-30
    return torch.log10(x.double().clamp_min(floor))


def plot_energy_distribution(
    energies: dict[int, LayerEnergies], keeps: dict[int, LayerKeep] | None = None
) -> bytes:
    """PNG: per-layer log10 energy bands with pruning thresholds, and a kept/removed histogram."""
    layers = sorted(energies)
    fig = _figure((8, 7))
    ax1, ax2 = fig.subplots(2, 1)
    all_kept, all_removed = [], []
    for i, layer in enumerate(layers):
        le = energies[layer]
        if keeps is not None:
            kept, removed = _removed_scores(le, keeps[layer])
        else:
            kept, removed = le.all_scores(), torch.zeros(0, dtype=torch.float64)
        logs = _log10(torch.cat([kept, removed]))
        q = torch.quantile(logs, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)).tolist()
        ax1.vlines(i, q[0], q[4], color="tab:blue", alpha=0.35, lw=6)
        ax1.vlines(i, q[1], q[3], color="tab:blue", lw=6)
        ax1.plot(i, q[2], "w_", ms=8)
        if removed.numel():
            ax1.plot(i, float(_log10(removed.max().reshape(1))[0]), "r_", ms=14, mew=2)
        all_kept.append(kept)
        all_removed.append(removed)
    ax1.set_xticks(range(len(layers)), [str(x) for x in layers])
    ax1.set_xlabel("MoE layer")
    ax1.set_ylabel("log10 CAMERA energy")
    ax1.set_title("Micro-expert energy per layer (bands 5-95 %, 25-75 %; red: prune threshold)")
    kept = torch.cat(all_kept) if all_kept else torch.zeros(0)
    removed = torch.cat(all_removed) if all_removed else torch.zeros(0)
    both = _log10(torch.cat([kept, removed]))
    bins = torch.linspace(float(both.min()), float(both.max()) + 1e-9, 60).tolist() if both.numel() else 10
    if kept.numel():
        ax2.hist(_log10(kept).tolist(), bins=bins, color="tab:blue", alpha=0.8, label="kept")
    if removed.numel():
        ax2.hist(_log10(removed).tolist(), bins=bins, color="tab:red", alpha=0.8, label="removed")
    ax2.set_xlabel("log10 CAMERA energy")
    ax2.set_ylabel("micro-experts")
    ax2.legend()
    fig.tight_layout()
    return _png(fig)


def plot_kept_widths(arch: MoEArch, keeps: dict[int, LayerKeep]) -> bytes:
    """PNG: heat map of kept width / original width, MoE layers x experts (+ shared column)."""
    layers = sorted(keeps)
    shared = arch.has_shared_expert
    cols = arch.num_experts + (1 if shared else 0)
    grid = torch.zeros(len(layers), cols)
    for r, layer in enumerate(layers):
        keep = keeps[layer]
        grid[r, : arch.num_experts] = torch.tensor(keep.widths, dtype=torch.float32) / arch.intermediate_size
        if shared:
            n = keep.shared.numel() if keep.shared is not None else arch.shared_intermediate_size
            grid[r, -1] = float(n) / float(arch.shared_intermediate_size)  # type: ignore[arg-type]
    fig = _figure((max(5.0, min(14, 3 + 0.12 * cols)), max(3.0, min(12, 1.5 + 0.3 * len(layers)))))
    ax = fig.subplots()
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_ylabel("MoE layer")
    ax.set_xlabel("expert" + (" (last column: shared)" if shared else ""))
    ax.set_title("Kept micro-experts / original width")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return _png(fig)


def render_prune_plots(
    arch: MoEArch, energies: dict[int, LayerEnergies], keeps: dict[int, LayerKeep]
) -> dict[str, bytes]:
    """File name -> PNG bytes for the checkpoint directory."""
    return {
        ENERGY_PLOT: plot_energy_distribution(energies, keeps),
        WIDTHS_PLOT: plot_kept_widths(arch, keeps),
    }


# -- CAMERA-Q --------------------------------------------------------------------------------------
def keeps_from_allocations(allocations: dict[int, LayerAllocation]) -> dict[int, LayerKeep]:
    """The CAMERA-P view of a bit allocation: kept micro-experts (any bit-width), sorted."""
    return {
        layer: LayerKeep(
            tuple(torch.sort(e.perm).values for e in a.experts),
            None if a.shared is None else torch.sort(a.shared.perm).values,
        )
        for layer, a in allocations.items()
    }


def _micro_experts_by_bits(a: LayerAllocation) -> dict[str, int]:
    out = {str(b): 0 for b in a.bits}
    total = 0
    for e in a.all_experts():
        total += e.original_width
        for b, n in zip(e.bits, e.slabs):
            out[str(b)] += n
    out["0"] = total - sum(out.values())  # pruned
    return out


def build_quant_report(
    source: SourceCheckpoint,
    allocations: dict[int, LayerAllocation],
    energies: dict[int, LayerEnergies],
    settings: dict[str, Any],
    timings: dict[str, float],
    *,
    group_size: int,
    expert_bytes: int,
    output_rel_errors: dict[int, float] | None = None,
    calibration_tokens: int,
    plots: list[str] | None = None,
) -> dict[str, Any]:
    """The JSON report of a CAMERA-Q run: the CAMERA-P report plus the bit allocation.

    ``expert_bytes`` is what was actually stored for the expert matrices (packed weights,
    scales, zeros); ``avg_bits_achieved`` divides it (in bits) by the parameter count of the
    original expert matrices, shared experts included, the accounting of ``--avg-bits``.
    """
    arch = source.arch
    hidden = arch.hidden_size
    keeps = keeps_from_allocations(allocations)
    report = build_prune_report(
        source, keeps, energies, settings, timings, calibration_tokens=calibration_tokens, plots=plots
    )
    report["method"] = "CAMERA-Q"
    dense_params = 0
    code_bits = kept = 0
    for layer, a in sorted(allocations.items()):
        info = report["layers"][str(layer)]
        layer_params = a.dense_params(hidden)
        dense_params += layer_params
        by_bits = _micro_experts_by_bits(a)
        layer_kept = sum(n for b, n in by_bits.items() if b != "0")
        kept += layer_kept
        code_bits += sum(int(b) * n for b, n in by_bits.items())
        info.update(
            {
                "bits": list(a.bits),
                "expert_slabs": a.expert_slabs,
                "shared_slabs": a.shared_slabs,
                "micro_experts_by_bits": by_bits,
                "avg_bits": a.bits_per_weight(hidden, group_size),
                "avg_code_bits_kept": (
                    sum(int(b) * n for b, n in by_bits.items()) / layer_kept if layer_kept else 0.0
                ),
                "expert_bytes": a.stored_bytes(hidden, group_size),
                "dense_expert_params": layer_params,
                "output_rel_error": None if output_rel_errors is None else output_rel_errors.get(layer),
                "allocation": {k: v for k, v in a.info.items()},
            }
        )
    elem = torch.empty(0, dtype=source.dtype).element_size()
    report.update(
        {
            "bits": list(next(iter(allocations.values())).bits) if allocations else [],
            "group_size": group_size,
            "avg_bits_target": settings.get("avg_bits"),
            "avg_bits_achieved": 8.0 * expert_bytes / dense_params if dense_params else 0.0,
            "avg_code_bits_kept": code_bits / kept if kept else 0.0,
            "expert_bytes": expert_bytes,
            "dense_expert_params": dense_params,
            "dense_expert_bytes": dense_params * elem,
            "dense_dtype": str(source.dtype).replace("torch.", ""),
        }
    )
    return report


def plot_bits(arch: MoEArch, allocations: dict[int, LayerAllocation], group_size: int) -> bytes:
    """PNG: mean bits per micro-expert (layers x experts, pruned = 0) and bit-width shares per layer."""
    layers = sorted(allocations)
    shared = arch.has_shared_expert
    cols = arch.num_experts + (1 if shared else 0)
    grid = torch.zeros(len(layers), cols)
    for r, layer in enumerate(layers):
        for c, e in enumerate(allocations[layer].all_experts()):
            grid[r, c] = sum(b * n for b, n in zip(e.bits, e.slabs)) / max(e.original_width, 1)
    top = max((max(a.bits) for a in allocations.values()), default=1)
    fig = _figure((max(7.0, min(14, 3 + 0.12 * cols)), max(6.0, min(14, 4 + 0.5 * len(layers)))))
    ax1, ax2 = fig.subplots(2, 1)
    im = ax1.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest")
    ax1.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax1.set_ylabel("MoE layer")
    ax1.set_xlabel("expert" + (" (last column: shared)" if shared else ""))
    ax1.set_title("Mean code bits per micro-expert (pruned = 0)")
    fig.colorbar(im, ax=ax1, fraction=0.04)

    all_bits = sorted({b for a in allocations.values() for b in a.bits} | {0}, reverse=True)
    colours = ["tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown"]
    cmap = dict(zip(all_bits, colours))
    cmap[0] = "lightgrey"
    bottom = [0.0] * len(layers)
    for b in all_bits:
        share = [allocations[layer].fractions().get(b, 0.0) for layer in layers]
        label = "pruned" if b == 0 else f"{b} bit"
        ax2.bar(range(len(layers)), share, bottom=bottom, color=cmap.get(b, "black"), label=label)
        bottom = [x + y for x, y in zip(bottom, share)]
    for i, layer in enumerate(layers):
        bpw = allocations[layer].bits_per_weight(arch.hidden_size, group_size)
        ax2.text(i, 1.01, f"{bpw:.2f}", ha="center", va="bottom", fontsize=7)
    ax2.set_xticks(range(len(layers)), [str(x) for x in layers])
    ax2.set_ylim(0, 1.1)
    ax2.set_xlabel("MoE layer (numbers: stored bits per weight, scales and zeros included)")
    ax2.set_ylabel("share of micro-experts")
    ax2.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return _png(fig)


def render_quant_plots(
    arch: MoEArch,
    energies: dict[int, LayerEnergies],
    keeps: dict[int, LayerKeep],
    allocations: dict[int, LayerAllocation],
    group_size: int,
) -> dict[str, bytes]:
    """The CAMERA-P plots plus :data:`BITS_PLOT`: file name -> PNG bytes."""
    return {**render_prune_plots(arch, energies, keeps), BITS_PLOT: plot_bits(arch, allocations, group_size)}
