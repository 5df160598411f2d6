"""CAMERA energies and routing against transformers and against an independent per-token loop."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from camera_vllm.checkpoint.source import SourceCheckpoint
from camera_vllm.compress.calibrate import LayerStreamer
from camera_vllm.compress.score import (
    EnergySpec,
    LayerWeights,
    load_energies,
    moe_forward,
    route,
    save_energies,
)
from camera_vllm.testing.tiny_models import ARCHITECTURES, build_tiny_moe


def _patch_config(model_dir: Path, **changes) -> Path:
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(changes)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    return model_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny models of all five architectures.

    ``deepseek_v2`` is patched to ``norm_topk_prob=False`` (transformers' DeepseekV2
    ignores the flag, DeepSeek's code and vLLM honour it; with False all agree) and a
    routed scaling factor of 2.5 so that the scaling is exercised.  ``deepseek_v2_norm``
    keeps the builder's ``norm_topk_prob=True``.
    """
    root = tmp_path_factory.mktemp("tiny")
    out = {a: build_tiny_moe(a, root / a, seed=3) for a in ARCHITECTURES}
    shutil.copytree(out["deepseek_v2"], root / "deepseek_v2_norm")
    out["deepseek_v2_norm"] = root / "deepseek_v2_norm"
    _patch_config(out["deepseek_v2_norm"], norm_topk_prob=True, routed_scaling_factor=1.0)
    _patch_config(out["deepseek_v2"], norm_topk_prob=False, routed_scaling_factor=2.5)
    return out


def _hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa").eval()


def _ids(n: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 300, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_router_matches_transformers_gate(models, arch: str) -> None:
    src = SourceCheckpoint(models[arch])
    model = _hf_model(models[arch])
    x = torch.randn(64, src.arch.hidden_size, generator=torch.Generator().manual_seed(1))
    torch.set_grad_enabled(False)  # restored below; transformers modules carry requires_grad params
    try:
        _check_router_layers(src, model, x, arch)
    finally:
        torch.set_grad_enabled(True)


def _check_router_layers(src, model, x, arch: str) -> None:
    for layer in src.arch.moe_layers:
        mlp = model.model.layers[layer].mlp
        _, hf_w, hf_ids = mlp.gate(x)
        hf_dense = torch.zeros(64, src.arch.num_experts).scatter_add_(1, hf_ids, hf_w.float())
        shared_gate = mlp.shared_expert_gate.weight if hasattr(mlp, "shared_expert_gate") else None
        mine = route(x, mlp.gate.weight, src.arch, shared_gate)
        assert mine.topk_ids.shape == (64, src.arch.top_k)
        torch.testing.assert_close(mine.dense(src.arch.num_experts), hf_dense, rtol=1e-5, atol=1e-6)
        if arch == "qwen2_moe":
            torch.testing.assert_close(
                mine.shared_weight, torch.sigmoid(mlp.shared_expert_gate(x)).reshape(-1)
            )
        elif arch == "deepseek_v2":
            assert torch.equal(mine.shared_weight, torch.ones(64))
            # The scaling factor is applied: routed weights sum to 2.5 * (top-k softmax mass) < 2.5.
            assert float(mine.topk_weights.sum(-1).max()) < 2.5
            assert float(mine.topk_weights.sum(-1).max()) > 1.0


def test_deepseek_norm_topk_prob_is_honoured(models) -> None:
    # transformers' DeepseekV2 gate does not renormalise; config (and vLLM) say it must.
    src = SourceCheckpoint(models["deepseek_v2_norm"])
    assert src.arch.norm_topk_prob
    model = _hf_model(models["deepseek_v2_norm"])
    x = torch.randn(32, src.arch.hidden_size, generator=torch.Generator().manual_seed(2))
    gate = model.model.layers[1].mlp.gate
    _, hf_w, hf_ids = gate(x)
    mine = route(x, gate.weight, src.arch)
    expected = torch.zeros(32, 8).scatter_add_(1, hf_ids, hf_w / hf_w.sum(-1, keepdim=True))
    torch.testing.assert_close(mine.dense(8), expected)
    torch.testing.assert_close(mine.topk_weights.sum(-1), torch.ones(32))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_camera_block_matches_transformers_moe_block(models, arch: str) -> None:
    src = SourceCheckpoint(models[arch])
    model = _hf_model(models[arch])
    streamer = LayerStreamer(src)
    x = torch.randn(1, 40, src.arch.hidden_size, generator=torch.Generator().manual_seed(4))
    for layer in src.arch.moe_layers:
        mine = streamer.build_layer(layer).mlp(x)
        with torch.no_grad():
            ref = model.model.layers[layer].mlp(x)
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layer_streaming_reproduces_the_full_model(models, arch: str) -> None:
    ids = _ids(3, 20)
    src = SourceCheckpoint(models[arch])
    final: list[torch.Tensor] = []
    energies = LayerStreamer(src, batch_size=2).run(ids, progress=False, final_hidden=final)
    assert sorted(energies) == list(src.arch.moe_layers)
    assert all(e.total_tokens == ids.numel() for e in energies.values())
    model = _hf_model(models[arch])
    captured = {}
    last = model.model.layers[-1]
    last.register_forward_hook(lambda m, i, o: captured.setdefault("y", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(ids)
    torch.testing.assert_close(torch.cat(final), captured["y"], rtol=1e-4, atol=1e-5)


# -- energy against an independent per-token loop ------------------------------------------------
_NAMES = {  # checkpoint names, spelled out here on purpose (not via camera_vllm.format.names)
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2", None),
    "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj", "shared_expert"),
    "deepseek_v2": ("mlp", "gate_proj", "up_proj", "down_proj", "shared_experts"),
}


def _naive_stats(model_dir: Path, arch: str, layer: int, xs: torch.Tensor):
    """Per-token Python loop in float64: returns ({expert: (S, M, down_sq)}, shared or None)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    block, gname, uname, dname, shared_name = _NAMES.get(
        arch, ("mlp", "gate_proj", "up_proj", "down_proj", None)
    )
    n_exp = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
    k = cfg["num_experts_per_tok"]
    renorm = True if arch == "mixtral" else bool(cfg.get("norm_topk_prob", False))
    scale = float(cfg.get("routed_scaling_factor", 1.0))
    p = f"model.layers.{layer}.{block}"
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        w = {n: f.get_tensor(n).double() for n in f.keys() if n.startswith(p + ".")}
    router = w[f"{p}.gate.weight"]
    silu = lambda v: v / (1.0 + torch.exp(-v))  # noqa: E731
    stats = {}
    for e in range(n_exp):
        inter = w[f"{p}.experts.{e}.{gname}.weight"].shape[0]
        stats[e] = [torch.zeros(inter, dtype=torch.float64), torch.zeros(inter, dtype=torch.float64)]
    shared = None
    if shared_name:
        sw = w[f"{p}.{shared_name}.gate_proj.weight"].shape[0]
        shared = [torch.zeros(sw, dtype=torch.float64), torch.zeros(sw, dtype=torch.float64)]
    for x in xs.double():
        logits = [float(router[e] @ x) for e in range(n_exp)]
        mx = max(logits)
        exps = [math.exp(v - mx) for v in logits]
        probs = [v / sum(exps) for v in exps]
        chosen = sorted(range(n_exp), key=lambda e: -probs[e])[:k]
        weights = [probs[e] for e in chosen]
        if renorm:
            weights = [v / sum(weights) for v in weights]
        for e, g in zip(chosen, weights):
            a = silu(w[f"{p}.experts.{e}.{gname}.weight"] @ x) * (w[f"{p}.experts.{e}.{uname}.weight"] @ x)
            c2 = (g * scale * a) ** 2
            stats[e][0] += c2
            stats[e][1] = torch.maximum(stats[e][1], c2)
        if shared is not None:
            g = 1.0
            if arch == "qwen2_moe":
                g = 1.0 / (1.0 + math.exp(-float(w[f"{p}.shared_expert_gate.weight"][0] @ x)))
            a = silu(w[f"{p}.{shared_name}.gate_proj.weight"] @ x) * (
                w[f"{p}.{shared_name}.up_proj.weight"] @ x
            )
            c2 = (g * a) ** 2
            shared[0] += c2
            shared[1] = torch.maximum(shared[1], c2)
    out = {e: (s, m, (w[f"{p}.experts.{e}.{dname}.weight"] ** 2).sum(0)) for e, (s, m) in stats.items()}
    shared_out = None
    if shared is not None:
        shared_out = (shared[0], shared[1], (w[f"{p}.{shared_name}.down_proj.weight"] ** 2).sum(0))
    return out, shared_out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_energy_matches_naive_per_token_loop(models, arch: str) -> None:
    ids = _ids(2, 12, seed=5)
    model_dir = models[arch]
    src = SourceCheckpoint(model_dir)
    spec = EnergySpec(alpha=0.3)
    energies = LayerStreamer(src, batch_size=1).run(ids, energy=spec, progress=False)
    # MoE inputs captured from transformers' own forward, independent of the streamer.
    model = _hf_model(model_dir)
    inputs: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(module, args) -> None:  # returns None: the forward's input is left alone
            inputs[layer] = args[0].reshape(-1, args[0].shape[-1]).clone()

        return hook

    for layer in src.arch.moe_layers:
        model.model.layers[layer].mlp.register_forward_pre_hook(capture(layer))
    with torch.no_grad():
        model(ids)
    for layer in src.arch.moe_layers:
        naive, naive_shared = _naive_stats(model_dir, arch, layer, inputs[layer])
        le = energies[layer]
        for e, (s, m, dn) in naive.items():
            got = le.experts[e]
            torch.testing.assert_close(got.sum_sq, s, rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(got.max_sq, m, rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(got.down_sq, dn, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(le.expert_scores[e], dn * (0.7 * s + 0.3 * m), rtol=1e-4, atol=1e-9)
        if naive_shared is None:
            assert le.shared is None
        else:
            s, m, dn = naive_shared
            torch.testing.assert_close(le.shared.sum_sq, s, rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(le.shared_score, dn * (0.7 * s + 0.3 * m), rtol=1e-4, atol=1e-9)
        # The routed token counts add up to T * top_k.
        assert sum(st.tokens for st in le.experts) == ids.numel() * src.arch.top_k


def test_alpha_and_normalize_sum_semantics() -> None:
    from camera_vllm.compress.score import ChannelStats

    st = ChannelStats(
        torch.tensor([4.0, 0.0], dtype=torch.float64),
        torch.tensor([1.0, 3.0], dtype=torch.float64),
        torch.tensor([2.0, 1.0], dtype=torch.float64),
    )
    torch.testing.assert_close(
        st.energy(EnergySpec(alpha=1.0), 4), torch.tensor([2.0, 3.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        st.energy(EnergySpec(alpha=0.0), 4), torch.tensor([8.0, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        st.energy(EnergySpec(alpha=0.5, normalize_sum=True), 4), torch.tensor([2.0, 1.5], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="alpha"):
        EnergySpec(alpha=1.5)


def test_moe_forward_handles_ragged_and_empty_experts() -> None:
    from camera_vllm.arch import MoEArch

    arch = MoEArch("Qwen3MoeForCausalLM", 8, 1, 3, 2, True, 4, None, False, 1.0, (0,))
    g = torch.Generator().manual_seed(0)
    full = LayerWeights(
        [torch.randn(4, 8, generator=g) for _ in range(3)],
        [torch.randn(4, 8, generator=g) for _ in range(3)],
        [torch.randn(8, 4, generator=g) for _ in range(3)],
    )
    x = torch.randn(10, 8, generator=g)
    routing = route(x, torch.randn(3, 8, generator=g), arch)
    from camera_vllm.checkpoint.keeps import LayerKeep

    keep = LayerKeep((torch.tensor([0, 2]), torch.tensor([], dtype=torch.long), torch.tensor([0, 1, 2, 3])))
    pruned = full.prune(keep)
    assert pruned.widths == [2, 0, 4]
    # Zero-masking the removed channels of the full weights gives the same output.
    masked = LayerWeights(
        [t.clone() for t in full.gates], [t.clone() for t in full.ups], [t.clone() for t in full.downs]
    )
    for e, k in enumerate(keep.experts):
        drop = torch.ones(4, dtype=torch.bool)
        drop[k] = False
        masked.gates[e][drop] = 0
        masked.ups[e][drop] = 0
        masked.downs[e][:, drop] = 0
    torch.testing.assert_close(moe_forward(x, pruned, routing), moe_forward(x, masked, routing))


def test_save_and_load_energies_round_trip(models, tmp_path) -> None:
    src = SourceCheckpoint(models["qwen2_moe"])
    energies = LayerStreamer(src).run(_ids(1, 10), energy=EnergySpec(alpha=0.25), progress=False)
    path = save_energies(tmp_path / "scores.safetensors", energies, {"note": "test"})
    assert json.loads(path.with_suffix(".json").read_text())["settings"] == {"note": "test"}
    loaded, settings = load_energies(path)
    assert settings == {"note": "test"}
    assert sorted(loaded) == sorted(energies)
    for layer, le in energies.items():
        assert loaded[layer].spec == EnergySpec(alpha=0.25)
        for a, b in zip(le.expert_scores, loaded[layer].expert_scores):
            torch.testing.assert_close(a.float(), b.float())
        torch.testing.assert_close(le.shared_score.float(), loaded[layer].shared_score.float())
    # Re-scoring with another alpha from the stored raw statistics.
    realpha, _ = load_energies(path, EnergySpec(alpha=1.0))
    st = energies[0].experts[0]
    torch.testing.assert_close(realpha[0].expert_scores[0].float(), (st.down_sq * st.max_sq).float())
