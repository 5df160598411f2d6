"""The ``quantization_config`` block of a CAMERA checkpoint's config.json.

Example (CAMERA-Q, 2 experts, slabs at 4/2/1 bits, shared expert present)::

    "quantization_config": {
      "quant_method": "camera",
      "format_version": 1,
      "scheme": "mixed",                 # "prune" (CAMERA-P) or "mixed" (CAMERA-Q, P+Q)
      "bits": [4, 2, 1],                 # slab order inside every expert, widest first
      "group_size": 64,                  # along each matrix's input dim ("mixed" only)
      "architecture": "Qwen2MoeForCausalLM",
      "num_experts": 2,
      "original_intermediate_size": 128,
      "original_shared_intermediate_size": 256,
      "layers": {
        "0": {"expert_slabs": [[8, 96, 16], [0, 40, 8]], "shared_slabs": [64, 160, 32]}
      },
      "compression": {...}               # provenance only (method, ratio, alpha, calibration)
    }

``expert_slabs[e][i]`` is the number of micro-experts of expert ``e`` stored at
``bits[i]``; its width is the sum.  A CAMERA-P checkpoint has ``bits == [16]``
(unquantized, model dtype) and one entry per expert.  Pruned micro-experts are simply
absent; an expert may have width 0.  Layers missing from ``layers`` are not MoE
layers (e.g. DeepSeek's first dense layers).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .names import FORMAT_VERSION, QUANT_METHOD, SUPPORTED_FORMAT_VERSIONS, UNQUANTIZED_BITS
from .quant_params import check_bits, check_group_size


class CameraFormatError(ValueError):
    """A CAMERA checkpoint or its configuration is malformed; the message names the culprit."""


class LayerSpec(BaseModel):
    """Slab sizes of one MoE layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    expert_slabs: list[list[int]] = Field(description="[num_experts][len(bits)] micro-experts per slab")
    shared_slabs: list[int] | None = Field(default=None, description="[len(bits)] for the shared expert")

    @field_validator("expert_slabs")
    @classmethod
    def _non_negative(cls, v: list[list[int]]) -> list[list[int]]:
        for e, slabs in enumerate(v):
            if any(n < 0 for n in slabs):
                raise ValueError(f"expert {e} has a negative slab size: {slabs}")
        return v

    @property
    def expert_widths(self) -> list[int]:
        """Kept micro-experts per routed expert."""
        return [sum(s) for s in self.expert_slabs]

    @property
    def shared_width(self) -> int | None:
        return None if self.shared_slabs is None else sum(self.shared_slabs)


class CameraQuantConfig(BaseModel):
    """Typed view of a CAMERA ``quantization_config``; construction validates it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quant_method: Literal["camera"] = QUANT_METHOD
    format_version: int = FORMAT_VERSION
    scheme: Literal["prune", "mixed"]
    bits: list[int]
    group_size: int | None = None
    architecture: str
    num_experts: int = Field(gt=0)
    original_intermediate_size: int = Field(gt=0)
    original_shared_intermediate_size: int | None = None
    layers: dict[int, LayerSpec]
    compression: dict[str, Any] = Field(default_factory=dict)

    @field_validator("quant_method", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(
                f"unknown CAMERA format_version {v}; this camera-vllm reads {SUPPORTED_FORMAT_VERSIONS}"
                " (upgrade camera-vllm or re-export the checkpoint)"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> CameraQuantConfig:
        if self.scheme == "prune":
            if self.bits != [UNQUANTIZED_BITS]:
                raise ValueError(
                    f"scheme 'prune' stores unquantized experts: bits must be [16], got {self.bits}"
                )
        else:
            check_bits(self.bits, descending=True)
            check_group_size(self.group_size)
        for layer, spec in self.layers.items():
            if len(spec.expert_slabs) != self.num_experts:
                raise ValueError(
                    f"layer {layer}: expert_slabs lists {len(spec.expert_slabs)} experts, "
                    f"num_experts is {self.num_experts}"
                )
            for e, slabs in enumerate(spec.expert_slabs):
                if len(slabs) != len(self.bits):
                    raise ValueError(
                        f"layer {layer} expert {e}: {len(slabs)} slab sizes for bits {self.bits}"
                    )
                if sum(slabs) > self.original_intermediate_size:
                    raise ValueError(
                        f"layer {layer} expert {e}: width {sum(slabs)} exceeds original_intermediate_size "
                        f"{self.original_intermediate_size}"
                    )
            if spec.shared_slabs is not None:
                if self.original_shared_intermediate_size is None:
                    raise ValueError(
                        f"layer {layer}: shared_slabs given but original_shared_intermediate_size is not"
                    )
                if len(spec.shared_slabs) != len(self.bits):
                    raise ValueError(
                        f"layer {layer}: {len(spec.shared_slabs)} shared slab sizes for bits {self.bits}"
                    )
                if (
                    any(n < 0 for n in spec.shared_slabs)
                    or sum(spec.shared_slabs) > self.original_shared_intermediate_size
                ):
                    raise ValueError(f"layer {layer}: shared_slabs {spec.shared_slabs} out of range")
        return self

    # -- convenience -------------------------------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        return self.scheme == "mixed"

    def layer(self, index: int) -> LayerSpec | None:
        return self.layers.get(index)

    def max_width(self, index: int) -> int:
        """Widest routed expert of a layer (what a zero-padded dense layout would need)."""
        spec = self.layers[index]
        return max(spec.expert_widths, default=0)

    def to_json_dict(self) -> dict[str, Any]:
        """The dict written into config.json (layer keys as strings)."""
        data = self.model_dump(mode="json", exclude_none=True)
        data["layers"] = {str(k): v for k, v in sorted(data["layers"].items(), key=lambda kv: int(kv[0]))}
        return data

    @classmethod
    def from_json_dict(cls, data: Any, *, source: str = "quantization_config") -> CameraQuantConfig:
        """Parse and validate; raises :class:`CameraFormatError` naming ``source`` and the field."""
        if not isinstance(data, dict):
            raise CameraFormatError(f"{source}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()
            )
            raise CameraFormatError(f"{source}: invalid CAMERA quantization_config: {problems}") from None
