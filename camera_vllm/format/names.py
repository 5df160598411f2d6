"""Names that appear in a CAMERA checkpoint: config keys and tensor-name templates.

Every other module builds tensor names through these helpers instead of matching
substrings, so the on-disk naming lives in exactly one place.
"""

from __future__ import annotations

from .projection import PROJECTIONS, Projection

QUANT_METHOD = "camera"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)

# Bit-widths a quantized slab may use.  16 means "unquantized, model dtype" and is
# only valid as the single slab of a pruning-only (CAMERA-P) checkpoint.
QUANT_BITS = (1, 2, 3, 4, 8)
UNQUANTIZED_BITS = 16

CONFIG_FILE = "config.json"
REPORT_FILE = "camera_report.json"
INDEX_FILE = "model.safetensors.index.json"
# Written first, removed last: a directory that still has it is incomplete.
INCOMPLETE_MARKER = ".camera_incomplete"

# Suffixes of quantized slab tensors, e.g. ``gate_proj.qweight_b4``.  They avoid
# the suffixes vLLM remaps by default (``g_idx``, ``*_zero_point``, ``k_scale`` ...).
QWEIGHT = "qweight"
SCALES = "scales"
ZEROS = "zeros"
QUANT_SUFFIXES = (QWEIGHT, SCALES, ZEROS)


def _vocabulary(mixtral: bool) -> tuple[str, str, str]:
    gate, up, down = (p.mixtral_name if mixtral else p.hf_name for p in PROJECTIONS)
    return gate, up, down


# Per-architecture names of the three expert projections in HF checkpoints: Mixtral's
# w1/w3/w2, everyone else's gate_proj/up_proj/down_proj (see :class:`Projection`).
_PROJ_NAMES: dict[str, tuple[str, str, str]] = {
    "MixtralForCausalLM": _vocabulary(mixtral=True),
}
_DEFAULT_PROJ_NAMES = _vocabulary(mixtral=False)

# Name of the MoE block inside a decoder layer, as written in checkpoints.
_MOE_MODULE: dict[str, str] = {
    "MixtralForCausalLM": "block_sparse_moe",
}

# Where the shared expert(s) of an MoE block live, per architecture.
_SHARED_EXPERT_MODULE: dict[str, str] = {
    "Qwen2MoeForCausalLM": "shared_expert",
    "DeepseekV2ForCausalLM": "shared_experts",
    "DeepseekV3ForCausalLM": "shared_experts",
    "DeepseekForCausalLM": "shared_experts",
}


def proj_names(architecture: str) -> tuple[str, str, str]:
    """(gate, up, down) projection names used in checkpoints of ``architecture``."""
    return _PROJ_NAMES.get(architecture, _DEFAULT_PROJ_NAMES)


def shared_expert_module(architecture: str) -> str | None:
    """Attribute name of the shared expert MLP inside an MoE block, or None."""
    return _SHARED_EXPERT_MODULE.get(architecture)


def moe_prefix(architecture: str, layer: int) -> str:
    """Checkpoint prefix of the MoE block of ``layer``, e.g. ``model.layers.3.mlp``."""
    return f"model.layers.{layer}.{_MOE_MODULE.get(architecture, 'mlp')}"


def expert_prefix(architecture: str, layer: int, expert: int) -> str:
    return f"{moe_prefix(architecture, layer)}.experts.{expert}"


def shared_prefix(architecture: str, layer: int) -> str:
    module = shared_expert_module(architecture)
    if module is None:
        raise ValueError(f"{architecture} has no shared expert")
    return f"{moe_prefix(architecture, layer)}.{module}"


def slab_suffix(kind: str, bits: int) -> str:
    """Suffix of one quantized slab tensor, e.g. ``slab_suffix('qweight', 4) == 'qweight_b4'``."""
    if kind not in QUANT_SUFFIXES:
        raise ValueError(f"unknown slab tensor kind {kind!r}; expected one of {QUANT_SUFFIXES}")
    return f"{kind}_b{bits}"


def expert_tensor(architecture: str, layer: int, expert: int, proj: int, suffix: str) -> str:
    """Full name of one routed-expert tensor; ``proj`` is a :class:`Projection` (or 0/1/2)."""
    name = proj_names(architecture)[Projection(proj)]
    return f"{expert_prefix(architecture, layer, expert)}.{name}.{suffix}"


def shared_tensor(architecture: str, layer: int, proj: int, suffix: str) -> str:
    """Full name of one shared-expert tensor (always the HF names gate_proj/up_proj/down_proj)."""
    return f"{shared_prefix(architecture, layer)}.{Projection(proj).hf_name}.{suffix}"
