"""``camera-vllm inspect``: a checkpoint directory's summary and its human-readable table.

The numbers are the one summary of the format (:func:`camera_vllm.format.summary.summarize_camera_config`,
the same ``/camera/stats`` serves); added here are the directory's files and tensors, read from
the safetensors headers (no tensor data).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import names
from .summary import summarize_camera_config
from .validate import ValidationReport, load_tensors

__all__ = ["format_summary", "summarize"]


def summarize(checkpoint_dir: str | Path) -> dict[str, Any]:
    """``inspect``: the checkpoint's summary plus its files.

    The summary is :func:`camera_vllm.format.summary.summarize_camera_config` with per-expert
    widths and slabs, exactly what ``/camera/stats?experts=true`` serves for the same
    config.json; added here: ``path``, ``num_tensors``, ``files`` and ``total_bytes`` (every
    tensor of the directory).
    """
    root = Path(checkpoint_dir)
    cfg = json.loads((root / names.CONFIG_FILE).read_text())
    summary = summarize_camera_config(cfg, experts=True)
    tensors = load_tensors(root, ValidationReport(root))
    summary.update(
        path=str(root),
        total_bytes=sum(i.nbytes for i in tensors.values()),
        num_tensors=len(tensors),
        files=sorted({i.file for i in tensors.values()}),
    )
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable table of :func:`summarize` output."""
    s, t = summary, summary["totals"]
    mib = lambda n: "?" if n is None else f"{n / 2**20:.2f}"  # noqa: E731 - unknown dtype: no bytes
    lines = [
        f"{s['path']}",
        f"  architecture {s['architecture']}, CAMERA format v{s['format_version']}, scheme {s['scheme']},"
        f" bits {s['bits']}" + (f", group size {s['group_size']}" if s["group_size"] else ""),
        f"  {s['num_experts']} experts of original width {s['original_intermediate_size']}"
        + (
            f", shared width {s['original_shared_intermediate_size']}"
            if s["original_shared_intermediate_size"]
            else ""
        ),
        f"  {s['num_tensors']} tensors in {len(s['files'])} file(s), {s['total_bytes'] / 2**20:.2f} MiB",
        f"  experts {mib(t['stored_bytes'])} MiB of {mib(t['original_bytes'])} MiB dense"
        + (f" ({t['compression_ratio']:.2f}x smaller" if t.get("compression_ratio") else " (")
        + (
            f", {t['bits_per_original_weight']:.3f} bits per original expert weight)"
            if t.get("bits_per_original_weight")
            else ")"
        ),
        f"  routed micro-experts kept: {t['kept_fraction']:.1%}"
        if t.get("kept_fraction") is not None
        else "",
        "",
        f"  {'layer':>5} {'kept':>6} {'min':>5} {'max':>5} {'zero':>5} {'shared':>6} {'bits/w':>7}"
        f" {'MiB':>8}  micro-experts by bits",
    ]
    for info in s["layers"]:
        shared = "-" if info["shared_width"] is None else str(info["shared_width"])
        by_bits = " ".join(f"b{b}:{n}" for b, n in info["micro_experts_by_bits"].items())
        width = info["expert_width"]
        bits = info["effective_bits_per_kept_weight"]
        lines.append(
            f"  {info['layer']:>5} {info['kept_fraction'] or 0:>6.1%} {width['min']:>5} {width['max']:>5}"
            f" {info['empty_experts']:>5} {shared:>6} {'?' if bits is None else f'{bits:.2f}':>7}"
            f" {mib(info['stored_bytes']):>8}  {by_bits}"
        )
    return "\n".join(lines)
