"""``CameraConfig``: vLLM's view of a CAMERA checkpoint's ``quantization_config``.

Importing this module registers nothing; :func:`camera_vllm.vllm_plugin.plugin.register`
does that.  The method classes are imported inside :meth:`CameraConfig.get_quant_method`,
so the config stays cheap to import and to unpickle in spawned workers.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from ..arch import moe_arch_from_config
from ..format import names
from ..format.schema import CameraFormatError, CameraQuantConfig

logger = logging.getLogger(__name__)

# Which linear layers of a shared expert a CAMERA checkpoint may shrink, as vLLM names
# them (its MergedColumnParallelLinear fuses the checkpoint's gate_proj and up_proj).
SHARED_GATE_UP = "gate_up_proj"
SHARED_DOWN = "down_proj"


def layer_index(prefix: str) -> int | None:
    """Decoder-layer index in a module path such as ``model.layers.3.mlp.experts`` (None if absent)."""
    parts = prefix.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdecimal():
            return int(parts[i + 1])
    return None


def _matches(prefix: str, expected: str) -> bool:
    return prefix == expected or prefix.endswith("." + expected)


class CameraConfig(QuantizationConfig):
    """CAMERA-P (``scheme: prune``) and CAMERA-Q (``scheme: mixed``, with or without pruning) checkpoints."""

    def __init__(self, camera: CameraQuantConfig | None = None) -> None:
        super().__init__()
        if camera is None:
            # vLLM builds the config with no arguments when --quantization camera is given
            # for a checkpoint whose config.json has no quantization_config.
            raise CameraFormatError(
                "--quantization camera needs a CAMERA checkpoint, but config.json has no "
                "'quantization_config'. Compress the model with camera-vllm first, or serve a "
                "zero-masked model (the CAMERA reference code's output) with --load-format camera "
                "and without --quantization"
            )
        self.camera = camera

    def __repr__(self) -> str:
        return (
            f"CameraConfig(scheme={self.camera.scheme!r}, bits={self.camera.bits}, "
            f"layers={len(self.camera.layers)})"
        )

    # -- QuantizationConfig interface ------------------------------------------------------------
    def get_name(self) -> str:
        return names.QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # Only consulted on GPUs.  CAMERA-P is plain torch; the CAMERA-Q Triton kernel
        # falls back to the torch reference where it cannot run, so no hard floor here.
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything lives in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CameraConfig:
        return cls(CameraQuantConfig.from_json_dict(config, source="config.json quantization_config"))

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: Any, user_quant: str | None, hf_config: Any = None
    ) -> None:
        # vLLM asks custom methods first: refuse a CAMERA config filed under another
        # quant_method, which would otherwise reach e.g. GPTQ and fail with an unrelated message.
        from .serving_guard import refuse_foreign_quant_method

        refuse_foreign_quant_method(hf_quant_cfg)
        return None

    def maybe_update_config(
        self, model_name: str, hf_config: Any = None, revision: str | None = None
    ) -> None:
        """Refuse a checkpoint that does not match its quantization_config, before any engine starts.

        Runs :func:`.serving_guard.validate_for_serving` (every tensor's name,
        shape and dtype against the config; values unless ``CAMERA_VALIDATE_VALUES=0``)
        and checks that the config describes this very model.
        """
        from .serving_guard import validate_for_serving

        validate_for_serving(model_name, revision=revision)
        if hf_config is None:
            return
        cfg = hf_config.to_dict()
        archs = cfg.get("architectures") or []
        if self.camera.architecture not in archs:
            raise CameraFormatError(
                f"{model_name}: quantization_config.architecture is {self.camera.architecture!r} "
                f"but config.json says {archs}"
            )
        arch = moe_arch_from_config(cfg)
        if arch.num_experts != self.camera.num_experts:
            raise CameraFormatError(
                f"{model_name}: quantization_config.num_experts={self.camera.num_experts} "
                f"but the model has {arch.num_experts} routed experts"
            )
        if set(self.camera.layers) != set(arch.moe_layers):
            raise CameraFormatError(
                f"{model_name}: quantization_config.layers covers {sorted(self.camera.layers)} "
                f"but the model's MoE layers are {list(arch.moe_layers)}"
            )
        logger.info("%s", load_summary(model_name, cfg))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm.model_executor.layers.fused_moe import RoutedExperts
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

        if isinstance(layer, RoutedExperts):
            from .moe_method import make_moe_method

            return make_moe_method(self, layer, prefix)
        if isinstance(layer, LinearBase):
            width = self.shared_width_for(prefix)
            if width is None:
                return UnquantizedLinearMethod()
            from .linear_method import make_shared_linear_method

            return make_shared_linear_method(self, width, prefix)
        return None

    # -- helpers used by the methods --------------------------------------------------------------
    def routed_widths(self, prefix: str) -> list[int]:
        """Per-global-expert widths of the MoE layer at ``prefix`` (raises if it is not described)."""
        index = layer_index(prefix)
        spec = None if index is None else self.camera.layer(index)
        if spec is None:
            raise CameraFormatError(
                f"{prefix}: vLLM built an MoE layer here but quantization_config.layers has no entry "
                f"for layer {index} (described layers: {sorted(self.camera.layers)})"
            )
        return spec.expert_widths

    def shared_width_for(self, prefix: str) -> int | None:
        """Kept width of the shared expert if ``prefix`` is one of its pruned linear layers, else None."""
        module = names.shared_expert_module(self.camera.architecture)
        index = layer_index(prefix)
        if module is None or index is None:
            return None
        spec = self.camera.layer(index)
        if spec is None or spec.shared_width is None:
            return None
        shared = names.shared_prefix(self.camera.architecture, index)
        if _matches(prefix, f"{shared}.{SHARED_GATE_UP}") or _matches(prefix, f"{shared}.{SHARED_DOWN}"):
            return spec.shared_width
        return None


def load_summary(model_name: str, cfg: dict[str, Any]) -> str:
    """The one line a served CAMERA model logs at start: scheme, layers, bits, bytes vs dense, backend."""
    from ..format.summary import summarize_camera_config
    from .stats_api import expert_backends

    s = summarize_camera_config(cfg)
    t = s["totals"]
    scheme = {"prune": "CAMERA-P", "mixed": "CAMERA-Q"}.get(s["scheme"], s["scheme"])
    parts = [f"camera-vllm: serving {model_name}: {scheme}, {s['num_moe_layers']} MoE layers"]
    if s["scheme"] == "mixed":
        parts.append(f"bits {s['bits']} (group {s['group_size']})")
    if t.get("kept_fraction") is not None:
        parts.append(f"{100 * t['kept_fraction']:.1f} % of micro-experts kept")
    if t.get("stored_bytes"):
        parts.append(
            f"expert bytes {t['stored_bytes'] / 2**20:.1f} MiB vs "
            f"{t['original_bytes'] / 2**20:.1f} MiB dense "
            f"({t['compression_ratio']:.2f}x)"
        )
    backends = expert_backends()
    parts.append(f"experts on {backends['camera_q'] if s['scheme'] == 'mixed' else backends['camera_p']}")
    return ", ".join(parts)
