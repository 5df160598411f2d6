"""The model card (``README.md``) of a compressed checkpoint: what was compressed, how, and how to serve it.

A compressed directory must not present itself as the original model, so the source's
README is replaced by this card: Hugging Face front matter (``base_model``,
``library_name: vllm``, tags) and a short body from the quantization_config and the
run's report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..format.names import REPORT_FILE
from ..format.schema import CameraQuantConfig

#: The card's file name: what the Hugging Face hub shows as the model's page.
MODEL_CARD_FILE = "README.md"


def base_model_id(config: dict[str, Any], source: Path) -> str:
    """The source model's hub id: from its cache snapshot path, or config.json's ``_name_or_path``;
    else its directory name."""
    from .hub import hub_id_of

    from_cache = hub_id_of(source)
    if from_cache:
        return from_cache
    name = str(config.get("_name_or_path") or "").strip()
    if name and not name.startswith(("/", ".")) and name.count("/") == 1:
        return name
    return source.name


def render_model_card(
    *,
    base_model: str,
    out_name: str,
    quant_config: CameraQuantConfig,
    report: dict[str, Any] | None,
) -> str:
    """Markdown with YAML front matter, for ``README.md`` of the checkpoint ``out_name``."""
    qc = quant_config
    comp = dict(qc.compression or {})
    prune = qc.scheme == "prune"
    tags = ["camera", "moe", "mixture-of-experts", "pruned" if prune else "quantized"]
    if not prune and float(comp.get("ratio") or comp.get("prune_ratio") or 0) > 0:
        tags.append("pruned")
    front = "\n".join(
        ["---", f"base_model: {json.dumps(base_model)}", "library_name: vllm", "tags:"]
        + [f"- {t}" for t in tags]
        + ["---", ""]
    )
    scheme = (
        "CAMERA-P (structured pruning of micro-experts)"
        if prune
        else ("CAMERA-Q (mixed-precision micro-experts, packed per bit-width)")
    )
    lines = [
        f"# {out_name}",
        "",
        f"`{base_model}` compressed with {scheme}, following CAMERA (arXiv 2508.02322), by camera-vllm.",
        "This is not the original model: its routed experts"
        + (" keep fewer channels." if prune else " are stored at a few bits per weight."),
        "",
        "## Settings",
        "",
        f"- scheme: `{qc.scheme}`, format version {qc.format_version}",
    ]
    if not prune:
        lines.append(f"- bit-widths: {list(qc.bits)}, group size {qc.group_size}")
    for key in ("ratio", "scope", "prune_ratio", "avg_bits", "quant_algorithm", "score"):
        if comp.get(key) is not None:
            lines.append(f"- {key}: {comp[key]}")
    calib = comp.get("calibration")
    if isinstance(calib, dict):
        shown = {k: calib[k] for k in ("files", "num_seqs", "seq_len", "seed") if k in calib}
        lines.append(f"- calibration: {json.dumps(shown)}")
    lines += ["", "## Size", ""]
    lines += _size_lines(report)
    lines += [
        "",
        "## Serve",
        "",
        "With vLLM and the camera-vllm plugin installed (it is picked up automatically):",
        "",
        "```bash",
        f"vllm serve {out_name}",
        "```",
        "",
    ]
    if report:
        lines += [f"`{REPORT_FILE}` in this directory holds the full per-layer report.", ""]
    return front + "\n".join(lines)


def _size_lines(report: dict[str, Any] | None) -> list[str]:
    if not report:
        return ["(no report was written for this run)"]
    out = []
    params = report.get("params") or {}
    if params.get("experts_before"):
        out.append(
            f"- routed/shared expert parameters: {params['experts_after']:,} of {params['experts_before']:,} "
            f"({100 * params['experts_kept_fraction']:.1f} % kept)"
        )
    if report.get("expert_bytes") and report.get("dense_expert_bytes"):
        ratio = report["dense_expert_bytes"] / report["expert_bytes"]
        out.append(
            f"- expert bytes: {report['expert_bytes']:,} vs {report['dense_expert_bytes']:,} dense "
            f"{report.get('dense_dtype', '')} ({ratio:.2f}x smaller)"
        )
    if report.get("avg_bits_achieved"):
        out.append(
            f"- stored bits per expert weight (scales and zeros included): {report['avg_bits_achieved']:.3f}"
        )
    return out or ["(the report has no size figures)"]
