"""Check a CAMERA checkpoint directory against the format spec.

:func:`validate` collects every problem it finds (it does not stop at the first) and
each message names the file and, where there is one, the tensor:

* ``config.json`` present and parseable; its ``quantization_config`` parses
  (:meth:`CameraQuantConfig.from_json_dict`) and agrees with config.json's own
  architecture facts (:func:`camera_vllm.arch.moe_arch_from_config`): architecture,
  num_experts, original_intermediate_size, original_shared_intermediate_size, the MoE
  layers, and ``shared_slabs`` in every layer exactly when the model has a shared expert;
* no ``.camera_incomplete`` marker (the writer did not finish);
* every safetensors header readable, and each file exactly as long as its header says
  (a truncated file, or one with trailing bytes, is named); every tensor's byte range
  matches its shape and dtype, and the ranges tile the data area without gaps or overlaps;
* the index (if any) lists exactly the tensors the shards hold, each in its own shard;
* every routed/shared expert tensor that :func:`layout.expert_tensors` expects is there
  with that exact shape and dtype, and no other expert tensor is; the embedding, final
  norm, LM head (unless tied) and every MoE layer's router are there with their shapes;
* no NaN/inf in floating-point tensors and every quantization scale > 0
  (``check_values=False`` skips this read);
* warnings (not errors): a width in ``bits`` that no slab uses, stray shards.

Headers are read by :mod:`.safetensors_header` (truncation is caught before any tensor is
read).  The serving guard that runs this check before vLLM builds an engine is
:mod:`camera_vllm.vllm_plugin.serving_guard`; ``inspect`` is :mod:`.inspect`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import names
from .layout import QWEIGHT_DTYPE_NAME, SCALE_DTYPE_NAME, expert_tensors
from .safetensors_header import FLOAT_TAGS, TensorInfo, read_safetensors_header
from .schema import CameraFormatError, CameraQuantConfig

__all__ = [
    "ValidationReport",
    "foreign_quant_method_message",
    "load_tensors",
    "validate",
    "weights_present",
]

_SCALES_RE = re.compile(rf"\.{names.SCALES}_b\d+$")

_LAYOUT_TAG = {SCALE_DTYPE_NAME: "F16", QWEIGHT_DTYPE_NAME: "I32"}
_MODEL_DTYPE_TAG = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


@dataclass
class ValidationReport:
    """Outcome of :func:`validate`: ``ok`` when there are no errors."""

    path: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tensors_checked: int = 0
    # Weight files (or the index) that could not be read: their tensors are unknown, so
    # "missing" is reported once for all of them instead of once per tensor.
    unreadable: list[str] = field(default_factory=list)
    _not_found: int = 0

    def missing(self, name: str) -> None:
        """Record an expected tensor that no readable file holds."""
        if self.unreadable:
            self._not_found += 1
        else:
            self.errors.append(f"tensor {name}: missing")

    def finish(self) -> None:
        if self._not_found:
            self.errors.append(
                f"{self._not_found} expected tensor(s) not found in the readable files; not checked"
                f" because {', '.join(self.unreadable)} could not be read"
            )
            self._not_found = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        lines = [
            f"{self.path}: {'OK' if self.ok else f'{len(self.errors)} error(s)'}"
            f" ({self.tensors_checked} tensors checked)"
        ]
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def raise_for_errors(self) -> None:
        """Raise :class:`CameraFormatError` listing every error, if any."""
        if self.errors:
            raise CameraFormatError(str(self))


def _load_config(root: Path, report: ValidationReport) -> dict[str, Any] | None:
    cfg_path = root / names.CONFIG_FILE
    if not cfg_path.is_file():
        report.errors.append(f"{names.CONFIG_FILE}: missing")
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        report.errors.append(f"{names.CONFIG_FILE}: not valid JSON ({err})")
        return None
    if not isinstance(cfg, dict):
        report.errors.append(f"{names.CONFIG_FILE}: expected a JSON object")
        return None
    return cfg


def load_tensors(root: Path, report: ValidationReport) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint, with index consistency checks."""
    tensors: dict[str, TensorInfo] = {}
    index_path = root / names.INDEX_FILE
    present = sorted(p.name for p in root.glob("*.safetensors"))
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            weight_map = None
        # An explicit check, not an assert: under ``python -O`` an assert would let a bad index through.
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            report.errors.append(f"{names.INDEX_FILE}: unreadable or has no 'weight_map'")
            report.unreadable.append(names.INDEX_FILE)
            return tensors
        files = sorted(set(weight_map.values()))
        for stray in sorted(set(present) - set(files)):
            report.warnings.append(f"{stray}: safetensors file not referenced by {names.INDEX_FILE}")
    else:
        weight_map = None
        files = present
        if not files:
            report.errors.append("no safetensors weights (model.safetensors or an index) found")
            report.unreadable.append("model.safetensors (absent)")
        elif len(files) > 1:
            report.errors.append(f"{len(files)} safetensors files but no {names.INDEX_FILE}: {files}")
    for fname in files:
        fpath = root / fname
        if not fpath.is_file():
            report.errors.append(f"{fname}: listed in {names.INDEX_FILE} but missing")
            report.unreadable.append(fname)
            continue
        try:
            header = read_safetensors_header(fpath)
        except CameraFormatError as err:
            report.errors.append(str(err))
            report.unreadable.append(fname)
            continue
        for name, info in header.items():
            if name in tensors:
                report.errors.append(f"{fname}: tensor {name} also stored in {tensors[name].file}")
                continue
            tensors[name] = info
            if weight_map is not None and weight_map.get(name) != fname:
                where = weight_map.get(name)
                report.errors.append(
                    f"{fname}: tensor {name} is not in {names.INDEX_FILE}"
                    if where is None
                    else f"{fname}: tensor {name} is indexed under {where}"
                )
    if weight_map is not None:
        for name, fname in sorted(weight_map.items()):
            if name not in tensors and (root / fname).is_file():
                report.errors.append(
                    f"{fname}: tensor {name} listed in {names.INDEX_FILE} is not in the file"
                )
    return tensors


def _int_field(cfg: dict[str, Any], key: str, report: ValidationReport) -> int | None:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        report.errors.append(f"{names.CONFIG_FILE}: {key} must be a positive integer, got {value!r}")
        return None
    return value


def _check_arch_facts(cfg: dict[str, Any], qc: CameraQuantConfig, report: ValidationReport) -> Any:
    """quantization_config vs config.json's own architecture facts; returns the MoEArch (or None)."""
    from ..arch import moe_arch_from_config

    prefix = f"{names.CONFIG_FILE}: quantization_config"
    try:
        arch = moe_arch_from_config(cfg)
    except (KeyError, ValueError, TypeError) as err:
        report.errors.append(f"{names.CONFIG_FILE}: architecture facts unreadable ({err})")
        return None
    if arch.architecture != qc.architecture:
        report.errors.append(
            f"{prefix}.architecture {qc.architecture} != config.json architectures {arch.architecture}"
        )
    if arch.num_experts != qc.num_experts:
        report.errors.append(f"{prefix}.num_experts {qc.num_experts} != config.json's {arch.num_experts}")
    if arch.intermediate_size != qc.original_intermediate_size:
        report.errors.append(
            f"{prefix}.original_intermediate_size {qc.original_intermediate_size}"
            f" != config.json's expert width {arch.intermediate_size}"
        )
    shared = arch.shared_intermediate_size if arch.has_shared_expert else None
    if qc.original_shared_intermediate_size != shared:
        report.errors.append(
            f"{prefix}.original_shared_intermediate_size {qc.original_shared_intermediate_size}"
            f" != config.json's shared expert width {shared}"
        )
    missing_layers = sorted(set(arch.moe_layers) - set(qc.layers))
    if missing_layers:
        report.errors.append(f"{prefix}.layers lacks MoE layers {missing_layers}")
    extra_layers = sorted(set(qc.layers) - set(arch.moe_layers))
    if extra_layers:
        report.errors.append(f"{prefix}.layers lists non-MoE layers {extra_layers}")
    for layer, spec in sorted(qc.layers.items()):
        if shared is not None and spec.shared_slabs is None:
            report.errors.append(
                f"{prefix}.layers.{layer}.shared_slabs missing: {arch.architecture} has a shared expert"
                f" (width {shared}) in every MoE layer"
            )
        elif shared is None and spec.shared_slabs is not None:
            report.errors.append(
                f"{prefix}.layers.{layer}.shared_slabs given but {arch.architecture} (config.json) has no"
                " shared expert"
            )
    return arch


def _check_core(
    cfg: dict[str, Any], arch: Any, tensors: dict[str, TensorInfo], report: ValidationReport
) -> None:
    """Embedding, final norm, LM head (unless tied) and the router of every MoE layer, with their shapes."""
    hidden, vocab = arch.hidden_size, _int_field(cfg, "vocab_size", report)
    want: dict[str, tuple[int, ...] | None] = {
        "model.embed_tokens.weight": None if vocab is None else (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    if not cfg.get("tie_word_embeddings", False):
        want["lm_head.weight"] = want["model.embed_tokens.weight"]
    for layer in arch.moe_layers:
        want[f"{names.moe_prefix(arch.architecture, layer)}.gate.weight"] = (arch.num_experts, hidden)
    for name, shape in want.items():
        info = tensors.get(name)
        if info is None:
            report.missing(name)
        elif shape is not None and info.shape != shape:
            report.errors.append(
                f"{info.file}: tensor {name} has shape {list(info.shape)}, expected {list(shape)}"
            )


def _check_layout(
    cfg: dict[str, Any], qc: CameraQuantConfig, tensors: dict[str, TensorInfo], report: ValidationReport
) -> None:
    """Expected expert/shared tensors present with exact shapes and dtypes; nothing else under experts."""
    arch_name = qc.architecture
    hidden = _int_field(cfg, "hidden_size", report)
    arch = _check_arch_facts(cfg, qc, report)
    if arch is not None and tensors:
        _check_core(cfg, arch, tensors, report)
    all_slabs = [s for spec in qc.layers.values() for s in [*spec.expert_slabs, spec.shared_slabs] if s]
    used = [any(s[i] for s in all_slabs) for i in range(len(qc.bits))]
    unused = [b for b, u in zip(qc.bits, used) if not u]
    if unused and qc.layers:
        report.warnings.append(
            f"{names.CONFIG_FILE}: quantization_config.bits lists width(s) {unused} that no slab of any"
            " layer uses"
        )
    if hidden is None:
        return
    model_dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "")
    model_tag = _MODEL_DTYPE_TAG.get(model_dtype)
    if model_tag is None and qc.scheme == "prune":
        report.warnings.append(
            f"{names.CONFIG_FILE}: unknown model dtype {model_dtype!r}; expert dtypes not checked"
        )
    shared_module = names.shared_expert_module(arch_name)

    def check(name: str, shape: tuple[int, ...], layout_dtype: str) -> None:
        info = tensors.get(name)
        if info is None:
            report.missing(name)
            return
        report.tensors_checked += 1
        want = model_tag if layout_dtype == "model" else _LAYOUT_TAG.get(layout_dtype, layout_dtype)
        if info.shape != shape:
            report.errors.append(
                f"{info.file}: tensor {name} has shape {list(info.shape)}, expected {list(shape)}"
            )
        if want is not None and info.dtype != want:
            report.errors.append(f"{info.file}: tensor {name} has dtype {info.dtype}, expected {want}")

    for layer, spec in sorted(qc.layers.items()):
        expected: set[str] = set()
        for e, slabs in enumerate(spec.expert_slabs):
            for proj, specs in expert_tensors(slabs, qc.bits, hidden, qc.group_size).items():
                for t in specs:
                    name = names.expert_tensor(arch_name, layer, e, proj, t.suffix)
                    expected.add(name)
                    check(name, t.shape, t.dtype)
        prefixes = [names.moe_prefix(arch_name, layer) + ".experts."]
        if shared_module is not None:
            # Every tensor under the shared expert is checked, described or not: a shared
            # expert that quantization_config forgot must not slip through unchecked.
            prefixes.append(names.shared_prefix(arch_name, layer) + ".")
        # shared_slabs without a shared expert is reported by _check_arch_facts.
        if spec.shared_slabs is not None and shared_module is not None:
            for proj, specs in expert_tensors(spec.shared_slabs, qc.bits, hidden, qc.group_size).items():
                for t in specs:
                    name = names.shared_tensor(arch_name, layer, proj, t.suffix)
                    expected.add(name)
                    check(name, t.shape, t.dtype)
        for name in sorted(tensors):
            if name not in expected and any(name.startswith(p) for p in prefixes):
                report.errors.append(f"{tensors[name].file}: unexpected expert tensor {name}")


def _check_values(root: Path, tensors: dict[str, TensorInfo], report: ValidationReport) -> None:
    """No NaN/inf in any floating-point tensor; every quantization scale > 0."""
    import torch
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name, info in tensors.items():
        if info.dtype in FLOAT_TAGS and not info.dtype.startswith("F8"):
            by_file.setdefault(info.file, []).append(name)
    for fname, tensor_names in sorted(by_file.items()):
        try:
            with safe_open(str(root / fname), "pt") as f:
                for name in sorted(tensor_names):
                    t = f.get_tensor(name)
                    finite = torch.isfinite(t)
                    bad = int((~finite).sum())
                    if bad:
                        report.errors.append(f"{fname}: tensor {name} has {bad} NaN/inf value(s)")
                    if _SCALES_RE.search(name):
                        nonpos = int((finite & (t <= 0)).sum())
                        if nonpos:
                            report.errors.append(
                                f"{fname}: tensor {name} has {nonpos} zero or negative scale(s);"
                                " scales must be > 0"
                            )
        except Exception as err:  # noqa: BLE001 - safetensors' own checks, reported against the file
            report.errors.append(f"{fname}: unreadable by safetensors ({type(err).__name__}: {err})")


def validate(
    checkpoint_dir: str | Path, *, check_values: bool = True, weights: bool = True
) -> ValidationReport:
    """Check a CAMERA checkpoint directory; see the module docstring for what is checked.

    ``weights=False`` checks only what config.json holds (the quantization_config against the
    model's own architecture facts): for a hub snapshot whose weights are not downloaded yet.
    """
    root = Path(checkpoint_dir)
    report = ValidationReport(root)
    if not root.is_dir():
        report.errors.append(f"{root}: not a directory")
        return report
    if (root / names.INCOMPLETE_MARKER).exists():
        report.errors.append(
            f"{names.INCOMPLETE_MARKER}: present - the checkpoint was not completely written"
        )
    cfg = _load_config(root, report)
    qc = None
    if cfg is not None:
        raw = cfg.get("quantization_config")
        if raw is None:
            report.errors.append(f"{names.CONFIG_FILE}: no quantization_config (not a CAMERA checkpoint)")
        else:
            if isinstance(raw, dict) and str(raw.get("quant_method")).lower() != names.QUANT_METHOD:
                report.errors.append(foreign_quant_method_message(raw.get("quant_method")))
            try:
                qc = CameraQuantConfig.from_json_dict(raw, source=f"{names.CONFIG_FILE}: quantization_config")
            except CameraFormatError as err:
                report.errors.append(str(err))
    if not weights:
        if cfg is not None and qc is not None:
            _check_arch_facts(cfg, qc, report)
        report.finish()
        return report
    tensors = load_tensors(root, report)
    if cfg is not None and qc is not None:
        _check_layout(cfg, qc, tensors, report)
    if check_values and tensors:
        # Only files whose header (and length) checked out contributed to ``tensors``.
        _check_values(root, tensors, report)
    report.finish()
    return report


def foreign_quant_method_message(method: Any) -> str:
    """The error for a CAMERA quantization_config filed under another ``quant_method``."""
    return (
        f"{names.CONFIG_FILE}: quantization_config.quant_method is {method!r}, not {names.QUANT_METHOD!r}:"
        " this is not a CAMERA checkpoint (or its config.json was replaced)"
    )


def weights_present(root: Path) -> bool:
    """Whether the weight files are all there: model.safetensors, or every shard its index names."""
    if (root / "model.safetensors").is_file():
        return True
    index = root / names.INDEX_FILE
    if not index.is_file():
        return False
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        return True  # a broken index is validate()'s to report
    return all((root / shard).is_file() for shard in shards)
