"""Check a CAMERA checkpoint directory against the format spec; summarise it.

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

:func:`validate_for_serving` is the same check as the vLLM plugin runs it before the
engine is built: it raises :class:`CameraFormatError` listing every problem.

Headers are parsed here directly (8-byte length + JSON) so that truncation is caught
before any tensor is read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import names
from .layout import QWEIGHT_DTYPE_NAME, SCALE_DTYPE_NAME, expert_tensors
from .schema import CameraFormatError, CameraQuantConfig

log = logging.getLogger(__name__)

# Environment switch of :func:`validate_for_serving`: "0" skips the NaN/inf/scale scan
# (which reads every tensor once) for very large checkpoints already validated offline.
VALUES_ENV = "CAMERA_VALIDATE_VALUES"
_SCALES_RE = re.compile(rf"\.{names.SCALES}_b\d+$")

# safetensors dtype tags
_FLOAT_TAGS = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
_LAYOUT_TAG = {SCALE_DTYPE_NAME: "F16", QWEIGHT_DTYPE_NAME: "I32"}
_MODEL_DTYPE_TAG = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
_TAG_BYTES = {
    "F64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I64": 8,
    "U64": 8,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


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


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor name -> :class:`TensorInfo` from a safetensors file's header.

    Raises :class:`CameraFormatError` naming the file when the header is unreadable or
    the file is shorter than the header declares (truncated).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CameraFormatError(f"{path.name}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CameraFormatError(
                f"{path.name}: truncated safetensors file (header of {n} bytes, file {size} bytes)"
            )
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CameraFormatError(f"{path.name}: unreadable safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CameraFormatError(f"{path.name}: safetensors header is not a JSON object")
    out: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(v) for v in meta["data_offsets"])
            dtype, shape = str(meta["dtype"]), tuple(int(d) for d in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise CameraFormatError(f"{path.name}: malformed header entry for tensor {name!r}") from None
        if dtype not in _TAG_BYTES:
            raise CameraFormatError(f"{path.name}: tensor {name} has unknown dtype {dtype!r}")
        if any(d < 0 for d in shape) or start < 0 or stop < start:
            raise CameraFormatError(
                f"{path.name}: tensor {name} has a malformed header entry (shape {list(shape)},"
                f" data_offsets [{start}, {stop}])"
            )
        want = math.prod(shape) * _TAG_BYTES[dtype]
        if stop - start != want:
            raise CameraFormatError(
                f"{path.name}: tensor {name} spans {stop - start} bytes but shape {list(shape)} {dtype}"
                f" needs {want}"
            )
        out[name] = TensorInfo(path.name, dtype, shape, stop - start)
        spans.append((start, stop, name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            what = "overlaps the tensor before it" if start < end else f"leaves a gap at byte {end}"
            raise CameraFormatError(f"{path.name}: tensor {name} data ({start}..{stop}) {what}")
        end = stop
    if 8 + n + end > size:
        raise CameraFormatError(
            f"{path.name}: truncated safetensors file: data ends at byte {8 + n + end}, file has {size} bytes"
        )
    if 8 + n + end < size:
        raise CameraFormatError(
            f"{path.name}: {size - 8 - n - end} trailing bytes after the last tensor (data ends at byte"
            f" {8 + n + end}, file has {size}); the file is corrupt or was overwritten in place"
        )
    return out


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


def _load_tensors(root: Path, report: ValidationReport) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint, with index consistency checks."""
    tensors: dict[str, TensorInfo] = {}
    index_path = root / names.INDEX_FILE
    present = sorted(p.name for p in root.glob("*.safetensors"))
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
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
        if info.dtype in _FLOAT_TAGS and not info.dtype.startswith("F8"):
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
                report.errors.append(_foreign_method_message(raw.get("quant_method")))
            try:
                qc = CameraQuantConfig.from_json_dict(raw, source=f"{names.CONFIG_FILE}: quantization_config")
            except CameraFormatError as err:
                report.errors.append(str(err))
    if not weights:
        if cfg is not None and qc is not None:
            _check_arch_facts(cfg, qc, report)
        report.finish()
        return report
    tensors = _load_tensors(root, report)
    if cfg is not None and qc is not None:
        _check_layout(cfg, qc, tensors, report)
    if check_values and tensors:
        # Only files whose header (and length) checked out contributed to ``tensors``.
        _check_values(root, tensors, report)
    report.finish()
    return report


def _foreign_method_message(method: Any) -> str:
    return (
        f"{names.CONFIG_FILE}: quantization_config.quant_method is {method!r}, not {names.QUANT_METHOD!r}:"
        " this is not a CAMERA checkpoint (or its config.json was replaced)"
    )


# Keys only a CAMERA quantization_config has together (format_version, scheme, per-layer slabs).
_CAMERA_KEYS = {"format_version", "scheme", "layers", "original_intermediate_size"}


def refuse_foreign_quant_method(quant_cfg: Any) -> None:
    """Raise :class:`CameraFormatError` for a CAMERA quantization_config under another quant_method.

    For vLLM's ``QuantizationConfig.override_quantization_method`` hook, which vLLM calls on
    every registered method (custom ones first) before it picks one by ``quant_method``:
    without it such a checkpoint reaches e.g. GPTQ and fails with an unrelated message.
    Anything else (a real GPTQ/AWQ/... config, or a CAMERA one) passes.
    """
    if not isinstance(quant_cfg, dict) or not _CAMERA_KEYS <= quant_cfg.keys():
        return
    if str(quant_cfg.get("quant_method", "")).lower() != names.QUANT_METHOD:
        raise CameraFormatError(_foreign_method_message(quant_cfg.get("quant_method")))


def _resolve_local(model: str | Path, revision: str | None) -> Path | None:
    """The local directory of ``model``: itself, or its Hugging Face cache snapshot (no download)."""
    path = Path(model)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), revision=revision, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - not cached (yet) or not a hub id
        # A cached tree listing naming files this cache lacks (README, images, .bin copies, or the
        # weights not yet fetched) makes huggingface_hub refuse the snapshot as incomplete; what
        # is there is still what vLLM will read, so check it (weights_present decides how far).
        partial = getattr(err, "snapshot_path", None)
        return Path(partial) if partial else None


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


def validate_for_serving(
    model: str | Path, *, revision: str | None = None, check_values: bool | None = None
) -> ValidationReport | None:
    """Validate a CAMERA checkpoint before vLLM builds an engine for it; raise on any error.

    This is the hook the vLLM plugin calls (``CameraConfig.maybe_update_config``, run
    while vLLM builds its config, before any engine process starts).  ``model`` is
    vLLM's model argument: a local directory or a Hugging Face id already in the local
    cache; for an id whose files are not cached yet nothing can be checked here and
    ``None`` is returned after a warning.  On the first start from a hub vLLM has fetched
    config.json but not yet the weights (it downloads them when it loads the model): then
    only the config is checked here, and every tensor is checked against it by the plugin's
    weight loaders as it arrives (shape, dtype, completeness; no value scan).

    :param check_values: scan tensor values (NaN/inf, scales > 0; reads every tensor once).
        Default: on, unless the environment sets ``CAMERA_VALIDATE_VALUES=0``.
    :raises CameraFormatError: listing every problem, each naming its file/tensor/field.
    """
    root = _resolve_local(model, revision)
    if root is None:
        log.warning(
            "camera-vllm: %s is not a local directory or cached snapshot; not validated before loading", model
        )
        return None
    if check_values is None:
        check_values = os.environ.get(VALUES_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
    weights = Path(model).is_dir() or weights_present(root)
    if not weights:
        log.info(
            "camera-vllm: %s: weights not downloaded yet; config checked now, tensors as vLLM loads them",
            model,
        )
    report = validate(root, check_values=check_values and weights, weights=weights)
    for warning in report.warnings:
        log.warning("camera-vllm: %s: %s", root, warning)
    if not report.ok:
        raise CameraFormatError(
            f"refusing to serve {root}: the CAMERA checkpoint is invalid ({len(report.errors)} error(s);"
            " run `camera-vllm validate` on it for the full report):\n"
            + "\n".join(f"  error: {e}" for e in report.errors)
        )
    return report


# -- inspect ---------------------------------------------------------------------------------------
def summarize(checkpoint_dir: str | Path) -> dict[str, Any]:
    """``inspect``: the checkpoint's summary plus its files.

    The summary is :func:`camera_vllm.format.summary.summarize_camera_config` with per-expert
    widths and slabs, exactly what ``/camera/stats?experts=true`` serves for the same
    config.json; added here: ``path``, ``num_tensors``, ``files`` and ``total_bytes`` (every
    tensor of the directory).
    """
    from .summary import summarize_camera_config

    root = Path(checkpoint_dir)
    cfg = json.loads((root / names.CONFIG_FILE).read_text())
    summary = summarize_camera_config(cfg, experts=True)
    tensors = _load_tensors(root, ValidationReport(root))
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
