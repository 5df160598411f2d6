"""What camera-vllm needs to know about each supported MoE architecture, read from config.json.

Nothing here is hard-coded per checkpoint: top-k, renormalisation, shared experts and
which layers are MoE all come from the model's config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "Qwen3MoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
    "MixtralForCausalLM",
    "OlmoeForCausalLM",
)


@dataclass(frozen=True)
class MoEArch:
    """Routing and shape facts of one MoE model, as its config defines them."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    intermediate_size: int
    shared_intermediate_size: int | None
    shared_expert_gate: bool  # Qwen2-MoE scales its shared expert by sigmoid(gate(x))
    routed_scaling_factor: float
    moe_layers: tuple[int, ...]

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_intermediate_size is not None and self.shared_intermediate_size > 0


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def _num_experts(cfg: Mapping[str, Any], *keys: str) -> int:
    # transformers 5.x writes some configs under an alias (Qwen3-MoE: num_local_experts),
    # original checkpoints use the other name: accept either.
    for key in keys:
        if cfg.get(key) is not None:
            return int(cfg[key])
    raise KeyError(f"config.json has none of {keys}")


def _architecture(cfg: Mapping[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    if not archs:
        raise ValueError("config.json has no 'architectures' entry")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; camera-vllm supports {SUPPORTED_ARCHITECTURES}")
    return arch


def moe_arch_from_config(cfg: Mapping[str, Any]) -> MoEArch:
    """Build :class:`MoEArch` from a config.json dict (or ``PretrainedConfig.to_dict()``)."""
    arch = _architecture(cfg)
    n_layers = int(cfg["num_hidden_layers"])
    hidden = int(cfg["hidden_size"])
    if arch in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):
        n_exp = _num_experts(cfg, "num_experts", "num_local_experts")
        step = int(_get(cfg, "decoder_sparse_step", 1))
        dense = set(_get(cfg, "mlp_only_layers", []))
        layers = tuple(i for i in range(n_layers) if i not in dense and n_exp > 0 and (i + 1) % step == 0)
        shared = (
            int(_get(cfg, "shared_expert_intermediate_size", 0)) if arch == "Qwen2MoeForCausalLM" else None
        )
        return MoEArch(
            arch,
            hidden,
            n_layers,
            n_exp,
            int(cfg["num_experts_per_tok"]),
            bool(_get(cfg, "norm_topk_prob", arch == "Qwen3MoeForCausalLM")),
            int(cfg["moe_intermediate_size"]),
            shared or None,
            arch == "Qwen2MoeForCausalLM" and bool(shared),
            1.0,
            layers,
        )
    if arch in ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"):
        if arch == "DeepseekV3ForCausalLM" or _get(cfg, "topk_method", "greedy") not in ("greedy",):
            # Grouped / sigmoid routing is not yet reproduced by the analysis.
            raise ValueError(
                f"{arch} with topk_method={cfg.get('topk_method')!r} is not supported yet (greedy only)"
            )
        first_dense = int(_get(cfg, "first_k_dense_replace", 0))
        freq = int(_get(cfg, "moe_layer_freq", 1))
        layers = tuple(i for i in range(n_layers) if i >= first_dense and i % freq == 0)
        n_shared = int(_get(cfg, "n_shared_experts", 0))
        return MoEArch(
            arch,
            hidden,
            n_layers,
            _num_experts(cfg, "n_routed_experts", "num_experts"),
            int(cfg["num_experts_per_tok"]),
            bool(_get(cfg, "norm_topk_prob", False)),
            int(cfg["moe_intermediate_size"]),
            n_shared * int(cfg["moe_intermediate_size"]) or None,
            False,
            float(_get(cfg, "routed_scaling_factor", 1.0)),
            layers,
        )
    if arch == "MixtralForCausalLM":
        return MoEArch(
            arch,
            hidden,
            n_layers,
            _num_experts(cfg, "num_local_experts", "num_experts"),
            int(cfg["num_experts_per_tok"]),
            True,
            int(cfg["intermediate_size"]),
            None,
            False,
            1.0,
            tuple(range(n_layers)),
        )
    # OlmoeForCausalLM
    return MoEArch(
        arch,
        hidden,
        n_layers,
        _num_experts(cfg, "num_experts", "num_local_experts"),
        int(cfg["num_experts_per_tok"]),
        bool(_get(cfg, "norm_topk_prob", False)),
        int(cfg["intermediate_size"]),
        None,
        False,
        1.0,
        tuple(range(n_layers)),
    )
