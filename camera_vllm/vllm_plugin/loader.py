"""``--load-format camera``: serve a zero-masked MoE (the CAMERA reference code's output) compactly.

The reference implementation prunes by zero-masking: every tensor keeps its shape and
the pruned micro-experts' gate rows, up rows and down columns are zero.  Served as is,
the zeros cost memory and compute.  This loader, run in the worker that builds the
model, scans the checkpoint for micro-experts whose gate row, up row and down column
are *all exactly* zero (:func:`camera_vllm.checkpoint.zero_mask.detect_keeps`, one layer at
a time), builds the CAMERA-P ``quantization_config`` those keep sets describe, installs
it as the model's quantization config *before* the model is constructed (the CAMERA
MoE method sizes its parameters from it), and then feeds the checkpoint through
``index_select`` so only the kept rows/columns reach the model.  Width-0 experts store
nothing.  The served function is exactly the masked model's (a zero micro-expert adds
``silu(0) * 0 = 0``).

Use it on a plain HF directory (single-file or sharded safetensors) without
``--quantization``::

    vllm serve MASKED_DIR --load-format camera

The routed experts may be stored per expert or fused, as transformers >= 5 keeps them
(``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``, or transposed;
see :mod:`camera_vllm.checkpoint.source`); fused tensors are split into per-expert ones
here, and transformers' in-memory names (Mixtral's ``mlp``) are mapped to the names
vLLM's model classes load.

``--quantization camera`` is refused together with this load format: the checkpoint has
no ``quantization_config`` for it to read, and the loader installs the CAMERA method by
itself.  A directory that already is a CAMERA checkpoint (config.json has a
``quantization_config``) is loaded unchanged, as with ``--load-format auto``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import Any

import torch
from vllm.config import ModelConfig, VllmConfig
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from ..format import names
from ..format.schema import CameraQuantConfig

logger = logging.getLogger(__name__)

LOAD_FORMAT = "camera"
# If set, the worker writes a JSON summary of what it dropped to this path (tests, tools).
STATS_ENV = "CAMERA_LOAD_STATS"
# ``quantization_config.compression.origin`` of the config this loader installs.
ZERO_MASK_ORIGIN = "zero-masked (--load-format camera)"


def _keep_plan(source: Any, keeps: dict[int, Any]) -> dict[str, tuple[torch.Tensor, int]]:
    """Checkpoint-form tensor name -> (kept indices, dim to select) for per-expert and shared tensors."""
    a = source.arch.architecture
    plan: dict[str, tuple[torch.Tensor, int]] = {}
    for layer, keep in keeps.items():
        for e, idx in enumerate(keep.experts):
            for proj in range(3):
                plan[names.expert_tensor(a, layer, e, proj, "weight")] = (
                    idx.to(torch.long),
                    0 if proj < 2 else 1,
                )
        if keep.shared is not None:
            for proj in range(3):
                plan[names.shared_tensor(a, layer, proj, "weight")] = (
                    keep.shared.to(torch.long),
                    0 if proj < 2 else 1,
                )
    return plan


class CameraZeroMaskLoader(DefaultModelLoader):
    """Default safetensors loading, with all-zero micro-experts dropped (see module docstring)."""

    def __init__(self, load_config: Any) -> None:
        # DefaultModelLoader picks files by load_format; read the directory as safetensors.
        inner = copy.copy(load_config)
        inner.load_format = "safetensors"
        super().__init__(inner)
        self._plan: dict[str, tuple[torch.Tensor, int]] | None = None
        # fused tensor name -> (layer, its LayerKeep, "gate_up" or "down", stored transposed)
        self._fused: dict[str, tuple[int, Any, str, bool]] = {}
        self._arch: str | None = None
        self.stats: dict[str, Any] = {}

    # -- model construction -------------------------------------------------------------------------
    def load_model(
        self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = ""
    ) -> torch.nn.Module:
        hf_qc = getattr(model_config.hf_config, "quantization_config", None)
        if not hf_qc and vllm_config.quant_config is not None:
            raise ValueError(
                f"--load-format {LOAD_FORMAT} cannot be combined with "
                f"--quantization {model_config.quantization}: "
                f"it serves the zero-masked model {model_config.model} with the CAMERA method, "
                "which it sets up itself; drop --quantization"
            )
        if hf_qc or vllm_config.quant_config is not None:
            if model_config.quantization not in (None, names.QUANT_METHOD):
                raise ValueError(
                    f"--load-format {LOAD_FORMAT} serves a zero-masked unquantized model; "
                    f"{model_config.model} is quantized with {model_config.quantization!r}"
                )
            if vllm_config.quant_config is None:
                raise ValueError(
                    f"--load-format {LOAD_FORMAT}: {model_config.model} has a quantization_config but "
                    "vLLM built no quantization config for it"
                )
            logger.info(
                "camera-vllm: %s is already a CAMERA checkpoint; loading it as is", model_config.model
            )
            return super().load_model(vllm_config, model_config, prefix)
        self._install_camera_config(vllm_config, model_config)
        model = super().load_model(vllm_config, model_config, prefix)
        self._record_resident(model)
        return model

    def _install_camera_config(self, vllm_config: VllmConfig, model_config: ModelConfig) -> None:
        from .config import CameraConfig

        model_dir = Path(model_config.model)
        if not model_dir.is_dir():
            raise ValueError(
                f"--load-format {LOAD_FORMAT} reads a local model directory; "
                f"{model_config.model!r} is not one "
                "(download it first, e.g. with `hf download`)"
            )
        vllm_config.quant_config = CameraConfig(self.plan(model_dir))
        model_config.quantization = names.QUANT_METHOD

    def plan(self, model_dir: Path) -> CameraQuantConfig:
        """Scan ``model_dir`` for all-zero micro-experts; return the CAMERA-P config that serves it compactly.

        Afterwards :meth:`get_all_weights` yields the checkpoint with only the kept
        micro-experts, per expert and under the names vLLM's model classes load.
        """
        from ..checkpoint.keeps import prune_quant_config
        from ..checkpoint.source import SourceCheckpoint
        from ..checkpoint.zero_mask import detect_keeps, zero_mask_compression

        source = SourceCheckpoint(model_dir)
        keeps = detect_keeps(source)
        compression = zero_mask_compression(source, keeps, ZERO_MASK_ORIGIN, str(model_dir))
        qcfg = prune_quant_config(source, keeps, compression)
        arch = source.arch
        kept, total = compression["routed_channels_kept"], compression["routed_channels_total"]
        self._arch = arch.architecture
        self._plan = _keep_plan(source, keeps)
        self._fused = {}
        for layer, keep in keeps.items():
            fused = source.fused_experts(layer)
            if fused is not None:
                self._fused[fused.gate_up] = (layer, keep, "gate_up", fused.transposed)
                self._fused[fused.down] = (layer, keep, "down", fused.transposed)
        shared_total = shared_kept = 0
        for k in keeps.values():
            if k.shared is not None:
                shared_total += arch.shared_intermediate_size or 0
                shared_kept += int(k.shared.numel())
        self.stats = {
            "routed_channels_kept": kept,
            "routed_channels_total": total,
            "shared_channels_kept": shared_kept,
            "shared_channels_total": shared_total,
            "empty_experts": sum(w == 0 for k in keeps.values() for w in k.widths),
            "fused_layers": sorted({layer for layer, *_ in self._fused.values()}),
            "widths": {str(layer): k.widths for layer, k in sorted(keeps.items())},
        }
        logger.info(
            "camera-vllm: --load-format camera: %s keeps %d of %d routed micro-experts (%.1f%%), "
            "%d empty experts, %d of %d shared micro-experts",
            model_dir,
            kept,
            total,
            100.0 * kept / max(total, 1),
            self.stats["empty_experts"],
            shared_kept,
            shared_total,
        )
        return qcfg

    # -- weights ------------------------------------------------------------------------------------
    def get_all_weights(
        self, model_config: ModelConfig, model: torch.nn.Module
    ) -> Generator[tuple[str, torch.Tensor], None, None]:
        weights = super().get_all_weights(model_config, model)
        if self._plan is None:
            yield from weights
        else:
            yield from self._compact(weights)

    def _compact(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Generator[tuple[str, torch.Tensor], None, None]:
        from ..checkpoint.source import canonical_name

        if self._plan is None or self._arch is None:
            raise RuntimeError("CameraZeroMaskLoader: plan() must run before the weights are compacted")

        for stored, tensor in weights:
            name = canonical_name(self._arch, stored)
            hit = self._plan.get(name)
            if hit is not None:
                idx, dim = hit
                if idx.numel() == 0:
                    continue  # width-0 expert: nothing resident
                yield name, tensor.index_select(dim, idx.to(tensor.device)).contiguous()
                continue
            fused = self._fused.get(name)
            if fused is not None:
                yield from self._split_fused(tensor, *fused)
                continue
            yield name, tensor

    def _split_fused(
        self, tensor: torch.Tensor, layer: int, keep: Any, kind: str, transposed: bool
    ) -> Generator[tuple[str, torch.Tensor], None, None]:
        """Per-expert, pruned tensors (checkpoint names vLLM maps) from one fused 3-D expert tensor."""
        if self._arch is None:
            raise RuntimeError("CameraZeroMaskLoader: plan() must run before fused experts are split")
        if transposed:  # [E, H, 2I] / [E, I, H] -> [E, 2I, H] / [E, H, I]
            tensor = tensor.transpose(1, 2)
        inter = tensor.shape[1] // 2
        for e, idx in enumerate(keep.experts):
            if idx.numel() == 0:
                continue
            idx = idx.to(device=tensor.device, dtype=torch.long)
            if kind == "gate_up":
                yield (
                    names.expert_tensor(self._arch, layer, e, 0, "weight"),
                    tensor[e, :inter].index_select(0, idx).contiguous(),
                )
                yield (
                    names.expert_tensor(self._arch, layer, e, 1, "weight"),
                    tensor[e, inter:].index_select(0, idx).contiguous(),
                )
            else:
                yield (
                    names.expert_tensor(self._arch, layer, e, 2, "weight"),
                    tensor[e].index_select(1, idx).contiguous(),
                )

    def load_weights(self, model: torch.nn.Module, model_config: ModelConfig) -> None:
        super().load_weights(model, model_config)
        if self._plan is not None:
            # Counted now: on CPU the stock post-load step repacks dense linear weights
            # (shared experts) into oneDNN handles that are no longer parameters.
            from .linear_method import CameraPrunedLinearMethod

            self.stats["shared_loaded_bytes"] = sum(
                t.numel() * t.element_size()
                for module in model.modules()
                if isinstance(getattr(module, "quant_method", None), CameraPrunedLinearMethod)
                for t in module.parameters(recurse=False)
            )

    # -- bookkeeping --------------------------------------------------------------------------------
    def _record_resident(self, model: torch.nn.Module) -> None:
        from .moe_method import CameraMoEMethod

        routed = 0
        for module in model.modules():
            if isinstance(getattr(module, "quant_method", None), CameraMoEMethod):
                routed += sum(t.numel() * t.element_size() for t in module.parameters(recurse=False))
        self.stats["routed_resident_bytes"] = routed
        path = os.environ.get(STATS_ENV)
        if path:
            Path(path).write_text(json.dumps(self.stats))


def register_loader() -> None:
    """Register :class:`CameraZeroMaskLoader` as ``--load-format camera`` (idempotent)."""
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, register_model_loader

    existing = _LOAD_FORMAT_TO_MODEL_LOADER.get(LOAD_FORMAT)
    if existing is CameraZeroMaskLoader:
        return
    if existing is not None:
        raise RuntimeError(
            f"load format {LOAD_FORMAT!r} is already registered by "
            f"{existing.__module__}.{existing.__qualname__}; "
            "camera-vllm cannot register its own"
        )
    register_model_loader(LOAD_FORMAT)(CameraZeroMaskLoader)
