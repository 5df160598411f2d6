"""The CAMERA energy of every micro-expert, and the routing it depends on.

Micro-expert ``j`` of an expert is the triple (row ``j`` of W_gate, row ``j`` of W_up,
column ``j`` of W_down).  Over ``T`` calibration tokens, with the router weight ``g_t``
the token gives the owning expert (0 when not routed there; 1 or the sigmoid
shared-expert gate for shared experts)::

    c_tj = g_t * SiLU(W_gate[j] . x_t) * (W_up[j] . x_t)
    S_j  = sum_t c_tj^2                   (optionally divided by T: ``normalize_sum``)
    M_j  = max_t c_tj^2
    E_j  = ||W_down[:, j]||^2 * ((1 - alpha) * S_j + alpha * M_j)

Default ``alpha`` is :data:`DEFAULT_ALPHA` = 0.9, the value of the reference code's
DeepSeek script, i.e. the setting behind the paper's DeepSeek-MoE-16B numbers (the
reference code's generic default is 1.0, max only).  With the unnormalised sum and
thousands of calibration tokens the sum term dominates, so the score behaves like the
channel's total output energy with the max term rescuing rare but large channels;
``normalize_sum`` turns it into a mean/max blend whose balance does not depend on T.

Per-batch reductions run in fp32 whatever the model dtype; running totals are kept in
float64 so that long calibration runs do not lose small contributions.

Everything here is plain tensor code (no transformers), so it is easy to test against
an independent per-token loop.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..arch import MoEArch
from ..checkpoint.keeps import LayerKeep
from .prune import prune_expert

DEFAULT_ALPHA = 0.9
ENERGY_METADATA_KEY = "camera_energies"


# -- specs and containers --------------------------------------------------------------------------
@dataclass(frozen=True)
class EnergySpec:
    """How per-channel statistics become one CAMERA energy."""

    alpha: float = DEFAULT_ALPHA
    normalize_sum: bool = False  # divide S_j by the number of calibration tokens T

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclass
class LayerWeights:
    """Expert weights of one MoE layer: per routed expert (possibly ragged widths) and shared.

    ``gates[e]``/``ups[e]`` are ``[I_e, H]``, ``downs[e]`` is ``[H, I_e]``; ``shared`` is
    ``(gate [S, H], up [S, H], down [H, S])`` or None.
    """

    gates: list[torch.Tensor]
    ups: list[torch.Tensor]
    downs: list[torch.Tensor]
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def widths(self) -> list[int]:
        return [int(g.shape[0]) for g in self.gates]

    @property
    def shared_width(self) -> int | None:
        return None if self.shared is None else int(self.shared[0].shape[0])

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LayerWeights:
        def cv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        return LayerWeights(
            [cv(t) for t in self.gates],
            [cv(t) for t in self.ups],
            [cv(t) for t in self.downs],
            None if self.shared is None else tuple(cv(t) for t in self.shared),  # type: ignore[arg-type]
        )

    def prune(self, keep: LayerKeep) -> LayerWeights:
        """Weights with only the micro-experts in ``keep`` (physically removed, not masked)."""
        if len(keep.experts) != len(self.gates):
            raise ValueError(f"keep-set has {len(keep.experts)} experts, layer has {len(self.gates)}")
        parts = [
            prune_expert(g, u, d, k.to(g.device))
            for g, u, d, k in zip(self.gates, self.ups, self.downs, keep.experts)
        ]
        shared = self.shared
        if shared is not None and keep.shared is not None:
            shared = prune_expert(*shared, keep.shared.to(shared[0].device))
        return LayerWeights([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts], shared)


@dataclass
class Routing:
    """Router decision for ``T`` tokens: top-k experts and their weights (fp32)."""

    topk_ids: torch.Tensor  # [T, k] int64
    topk_weights: torch.Tensor  # [T, k] float32, renormalised/scaled as the config says
    shared_weight: torch.Tensor | None = None  # [T] float32: 1 or sigmoid(shared_expert_gate(x))

    def dense(self, num_experts: int) -> torch.Tensor:
        """``[T, E]`` matrix of router weights, 0 where a token is not routed (order-free view)."""
        out = torch.zeros(
            self.topk_ids.shape[0], num_experts, dtype=torch.float32, device=self.topk_ids.device
        )
        return out.scatter_add_(1, self.topk_ids, self.topk_weights.float())


@dataclass
class ChannelStats:
    """Per-channel statistics of one expert (routed or shared) over the calibration tokens."""

    sum_sq: torch.Tensor  # [I] float64: sum_t c_tj^2
    max_sq: torch.Tensor  # [I] float64: max_t c_tj^2
    down_sq: torch.Tensor  # [I] float64: ||W_down[:, j]||^2
    tokens: int = 0  # tokens that reached this expert (routed), or all tokens (shared)

    def energy(self, spec: EnergySpec, total_tokens: int) -> torch.Tensor:
        s = self.sum_sq / max(total_tokens, 1) if spec.normalize_sum else self.sum_sq
        return self.down_sq * ((1.0 - spec.alpha) * s + spec.alpha * self.max_sq)


@dataclass
class LayerEnergies:
    """CAMERA statistics and energies of one MoE layer."""

    layer: int
    experts: list[ChannelStats]
    shared: ChannelStats | None
    total_tokens: int
    spec: EnergySpec = field(default_factory=EnergySpec)

    @property
    def expert_scores(self) -> list[torch.Tensor]:
        """Energy ``E_j`` per routed expert (float64, ``[I_e]`` each)."""
        return [s.energy(self.spec, self.total_tokens) for s in self.experts]

    @property
    def shared_score(self) -> torch.Tensor | None:
        return None if self.shared is None else self.shared.energy(self.spec, self.total_tokens)

    def all_scores(self) -> torch.Tensor:
        """Every micro-expert energy of the layer, routed then shared, flattened."""
        parts = self.expert_scores + ([self.shared_score] if self.shared is not None else [])
        return torch.cat([p.flatten() for p in parts]) if parts else torch.zeros(0, dtype=torch.float64)


# -- routing ---------------------------------------------------------------------------------------
def route(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    arch: MoEArch,
    shared_gate_weight: torch.Tensor | None = None,
) -> Routing:
    """Router weights exactly as the architecture's config defines them.

    softmax over experts (fp32) -> top-k (``num_experts_per_tok``) -> renormalise when
    ``norm_topk_prob`` -> multiply by ``routed_scaling_factor``.  Shared experts get weight
    1, or ``sigmoid(shared_expert_gate(x))`` for Qwen2-MoE.  Note: transformers'
    native DeepseekV2 ignores ``norm_topk_prob``; DeepSeek's own code and vLLM honour it,
    and so does this function (serving is what the scores must match).

    :param x: ``[T, H]`` MoE block inputs.
    :param gate_weight: ``[E, H]`` router weight.
    """
    xf = x.float()
    logits = xf @ gate_weight.float().T
    probs = torch.softmax(logits, dim=-1)
    top_w, top_i = torch.topk(probs, arch.top_k, dim=-1)
    if arch.norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    if arch.routed_scaling_factor != 1.0:
        top_w = top_w * arch.routed_scaling_factor
    shared_w = None
    if arch.has_shared_expert:
        if arch.shared_expert_gate:
            if shared_gate_weight is None:
                raise ValueError(f"{arch.architecture}: shared_expert_gate weight is required")
            shared_w = torch.sigmoid(xf @ shared_gate_weight.float().T).reshape(-1)
        else:
            shared_w = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    return Routing(top_i, top_w, shared_w)


def group_by_expert(topk_ids: torch.Tensor, num_experts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per expert: (token indices, top-k slot) of the tokens routed to it."""
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    groups = []
    for idx in torch.split(order, counts):
        groups.append((idx // k, idx % k))
    return groups


# -- energy accumulation and the MoE forward -------------------------------------------------------
def expert_activation(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``SiLU(x W_gate^T) * (x W_up^T)`` in fp32: ``[n, H] -> [n, I]`` (the down projection's input)."""
    xf = x.float()
    return F.silu(xf @ gate.float().T) * (xf @ up.float().T)


class EnergyAccumulator:
    """Running per-channel sum and max of ``c^2`` for every expert of one layer."""

    def __init__(self, weights: LayerWeights):
        dev = weights.gates[0].device if weights.gates else torch.device("cpu")

        def stats(down: torch.Tensor) -> ChannelStats:
            w = down.shape[1]
            z = torch.zeros(w, dtype=torch.float64, device=dev)
            return ChannelStats(z.clone(), z.clone(), down.float().square().sum(0).double())

        self.experts = [stats(d) for d in weights.downs]
        self.shared = None if weights.shared is None else stats(weights.shared[2])
        self.total_tokens = 0

    def add(self, stats: ChannelStats, c: torch.Tensor) -> None:
        """Fold ``c`` (``[n, I]`` router-weighted activations of ``n`` tokens) into ``stats``."""
        if c.shape[0] == 0 or c.shape[1] == 0:
            stats.tokens += int(c.shape[0])
            return
        sq = c.float().square()
        stats.sum_sq += sq.sum(0).double()
        torch.maximum(stats.max_sq, sq.amax(0).double(), out=stats.max_sq)
        stats.tokens += int(c.shape[0])

    def result(self, layer: int, spec: EnergySpec) -> LayerEnergies:
        """The layer's statistics, moved to the CPU (ranking and reports run there)."""

        def cpu(s: ChannelStats) -> ChannelStats:
            return ChannelStats(s.sum_sq.cpu(), s.max_sq.cpu(), s.down_sq.cpu(), s.tokens)

        shared = None if self.shared is None else cpu(self.shared)
        return LayerEnergies(layer, [cpu(s) for s in self.experts], shared, self.total_tokens, spec)


def moe_forward(
    x: torch.Tensor,
    weights: LayerWeights,
    routing: Routing,
    accumulator: EnergyAccumulator | None = None,
) -> torch.Tensor:
    """Output of an MoE block (routed + shared experts) in fp32, folding energies on the way.

    Ragged expert widths (pruned experts, width 0 included) are fine: each expert is its
    own pair of GEMMs.  ``x`` is ``[T, H]``; returns ``[T, H]`` float32.
    """
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    groups = group_by_expert(routing.topk_ids, len(weights.gates))
    for e, (tok, slot) in enumerate(groups):
        if tok.numel() == 0:
            continue
        a = expert_activation(x[tok], weights.gates[e], weights.ups[e])
        c = a * routing.topk_weights[tok, slot].float().unsqueeze(1)
        if accumulator is not None:
            accumulator.add(accumulator.experts[e], c)
        if c.shape[1]:
            out.index_add_(0, tok, c @ weights.downs[e].float().T)
    if weights.shared is not None:
        g, u, d = weights.shared
        assert routing.shared_weight is not None, "routing lacks the shared-expert weight"
        c = expert_activation(x, g, u) * routing.shared_weight.float().unsqueeze(1)
        if accumulator is not None:
            accumulator.add(accumulator.shared, c)  # type: ignore[arg-type]
        if c.shape[1]:
            out += c @ d.float().T
    if accumulator is not None:
        accumulator.total_tokens += int(x.shape[0])
    return out


# -- persistence -----------------------------------------------------------------------------------
def save_energies(path: str | Path, energies: dict[int, LayerEnergies], settings: dict[str, Any]) -> Path:
    """Write energies and raw statistics to a safetensors file plus a JSON sidecar.

    Keys (per MoE layer ``L``; routed stats are ``[E, I]``, shared ``[S]``)::

        layers.L.experts.{energy,sum_sq,max_sq,down_sq}   float32
        layers.L.experts.tokens                           int64 [E]
        layers.L.shared.{energy,sum_sq,max_sq,down_sq}    float32 (if a shared expert exists)

    The sidecar ``<path minus suffix>.json`` holds ``settings`` (alpha, calibration ...)
    and per-layer token totals; the same JSON is stored in the safetensors metadata.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    layer_meta: dict[str, Any] = {}
    for layer, le in sorted(energies.items()):
        widths = {s.sum_sq.numel() for s in le.experts}
        if len(widths) > 1:
            raise ValueError(f"layer {layer}: ragged expert widths {sorted(widths)} cannot be stacked")
        p = f"layers.{layer}"
        scores = le.expert_scores
        tensors[f"{p}.experts.energy"] = torch.stack(scores).float()
        for name in ("sum_sq", "max_sq", "down_sq"):
            tensors[f"{p}.experts.{name}"] = torch.stack([getattr(s, name) for s in le.experts]).float()
        tensors[f"{p}.experts.tokens"] = torch.tensor([s.tokens for s in le.experts], dtype=torch.int64)
        if le.shared is not None:
            tensors[f"{p}.shared.energy"] = le.shared_score.float()  # type: ignore[union-attr]
            for name in ("sum_sq", "max_sq", "down_sq"):
                tensors[f"{p}.shared.{name}"] = getattr(le.shared, name).float()
        layer_meta[str(layer)] = {"total_tokens": le.total_tokens}
    meta = {
        "settings": settings,
        "energy": asdict(next(iter(energies.values())).spec) if energies else {},
        "layers": layer_meta,
    }
    text = json.dumps(meta, indent=2, sort_keys=True, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={ENERGY_METADATA_KEY: text}
    )
    path.with_suffix(".json").write_text(text + "\n")
    return path


def load_energies(
    path: str | Path, spec: EnergySpec | None = None
) -> tuple[dict[int, LayerEnergies], dict[str, Any]]:
    """Read a file written by :func:`save_energies`; ``spec`` overrides the stored alpha/normalisation."""
    path = Path(path)
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get(ENERGY_METADATA_KEY, "{}"))
        keys = set(f.keys())
        get = f.get_tensor
        spec = spec or EnergySpec(**meta.get("energy", {}))
        out: dict[int, LayerEnergies] = {}
        for layer_s, info in meta.get("layers", {}).items():
            p = f"layers.{layer_s}"
            ss, mx, dn = (get(f"{p}.experts.{n}").double() for n in ("sum_sq", "max_sq", "down_sq"))
            tok = get(f"{p}.experts.tokens").tolist()
            experts = [ChannelStats(ss[e], mx[e], dn[e], int(tok[e])) for e in range(ss.shape[0])]
            shared = None
            if f"{p}.shared.sum_sq" in keys:
                shared = ChannelStats(
                    *(get(f"{p}.shared.{n}").double() for n in ("sum_sq", "max_sq", "down_sq")),
                    tokens=int(info["total_tokens"]),
                )
            out[int(layer_s)] = LayerEnergies(int(layer_s), experts, shared, int(info["total_tokens"]), spec)
    return out, meta.get("settings", {})
