"""CAMERA-P and CAMERA-Q served with two worker processes: tensor parallel and expert parallel.

Qwen2-MoE exercises both the routed experts (the MoE methods) and the shared expert
(the pruned / slab linear methods).  The checkpoints are built so the split is uneven:

* CAMERA-P: every routed expert keeps an odd number of micro-experts (one keeps 1,
  so rank 1 holds nothing of it; one keeps 0), the shared expert an odd 71;
* CAMERA-Q: RTN 4/2/1-bit slabs at group size 32 on top of 25 % pruning, so many
  slabs span several groups with a short last one and the ranks get unequal shares.

All four engines (P and Q, ``--tensor-parallel-size 2`` without and with
``--enable-expert-parallel``, ``--enforce-eager``) run one after another in ONE
subprocess (``vllm_driver.py``).  Eager because a torch.compile start with two workers
costs minutes on a small CPU machine; the compiled op path is covered single-process.
Greedy tokens (fp32) must equal the transformers oracle
(:func:`camera_vllm.reference.load`), which the single-process tests
(test_vllm_greedy.py, test_vllm_mixed.py) hold equal to single-process serving.  Each
rank also reports its share of every CAMERA layer, checked against the split rule of
:mod:`camera_vllm.format.sharding`.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from integration_helpers import PROMPTS, quant_config, reference_greedy, run_engines, vllm_env

from camera_vllm.checkpoint.keeps import LayerKeep
from camera_vllm.checkpoint.source import SourceCheckpoint
from camera_vllm.compress.prune import write_pruned_checkpoint
from camera_vllm.format import sharding
from camera_vllm.testing.tiny_models import build_tiny_moe

TIMEOUT_S = 1800
ARCH = "qwen2_moe"  # moe_intermediate_size 64, shared 96, 8 experts
ODD_WIDTHS = (63, 1, 35, 0, 17, 41, 9, 27)  # kept micro-experts per routed expert (original 64)
SHARED_WIDTH = 71  # of 96
# engine -> (checkpoint, mode, parallel)
ENGINES = {
    "p-tp2": ("p", "eager", "tp2"),
    "p-tp2ep": ("p", "eager", "tp2ep"),
    "q-tp2": ("q", "eager", "tp2"),
    "q-tp2ep": ("q", "eager", "tp2ep"),
}


def build_odd_pruned(original: Path, out: Path) -> Path:
    """CAMERA-P of ``original`` keeping :data:`ODD_WIDTHS` / :data:`SHARED_WIDTH` micro-experts.

    Micro-experts are kept by weight norm.
    """
    if (out / "config.json").exists():
        return out
    source = SourceCheckpoint(original)
    keeps = {}
    for layer in source.arch.moe_layers:
        gates, ups, downs = source.expert_weights(layer)
        # Rotate the widths per layer so both layers differ.
        widths = ODD_WIDTHS[layer % len(ODD_WIDTHS) :] + ODD_WIDTHS[: layer % len(ODD_WIDTHS)]
        experts = []
        for g, u, d, w in zip(gates, ups, downs, widths):
            score = g.double().norm(dim=1) * u.double().norm(dim=1) * d.double().norm(dim=0)
            experts.append(torch.sort(torch.argsort(score, descending=True)[:w]).values)
        sg, su, sd = source.shared_weights(layer)
        shared_score = sg.double().norm(dim=1) * su.double().norm(dim=1) * sd.double().norm(dim=0)
        shared = torch.sort(torch.argsort(shared_score, descending=True)[:SHARED_WIDTH]).values
        keeps[layer] = LayerKeep(tuple(experts), shared)
    return write_pruned_checkpoint(
        source, out, keeps, compression={"method": "camera-p", "score": "weight-norm (test)"}
    )


def build_checkpoints(root: Path) -> dict[str, Path]:
    """``{"original", "p", "q"}`` directories of the tiny Qwen2-MoE under ``root`` (reused if present)."""
    from vllm_mixed_helpers import build_mixed

    root.mkdir(parents=True, exist_ok=True)
    original = root / f"{ARCH}-orig"
    if not (original / "config.json").exists():
        build_tiny_moe(ARCH, original, dtype=torch.float32)
    _, q = build_mixed(ARCH, root, prune_ratio=0.25)
    return {"original": original, "p": build_odd_pruned(original, root / f"{ARCH}-p-odd"), "q": q}


@functools.cache
def run_parallel(root: Path) -> dict[str, Any]:
    """Build the checkpoints and run :data:`ENGINES` in one subprocess; ``{engine: result, "_dirs": ...}``."""
    dirs = build_checkpoints(root)
    engines = [
        {
            "id": engine,
            "model": str(dirs[ck]),
            "engine": {
                "enforce_eager": mode == "eager",
                "tensor_parallel_size": 2,
                "enable_expert_parallel": par == "tp2ep",
                "gpu_memory_utilization": 0.3,  # on CPU: the share of RAM reserved, per worker
            },
            "rank_probes": {"ranks": "rank_layers"},
            "labels": {"mode": mode, "parallel": par},
        }
        for engine, (ck, mode, par) in ENGINES.items()
    ]
    env = vllm_env(ARCH)
    env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per rank (else "Not enough allowed NUMA nodes")
    env["VLLM_CACHE_ROOT"] = str(root / "vllm-cache")
    start = time.perf_counter()
    runs: dict[str, Any] = run_engines(engines, root, "parallel", env, TIMEOUT_S, "vLLM parallel runs")[
        "runs"
    ]
    runs["_dirs"] = dirs
    runs["_process_s"] = round(time.perf_counter() - start, 1)
    return runs


@pytest.fixture(scope="session")
def parallel_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "camera-parallel"


@pytest.fixture(scope="session")
def parallel_ckpts(parallel_root: Path) -> dict[str, Path]:
    return build_checkpoints(parallel_root)


@pytest.fixture(scope="session")
def parallel_runs(parallel_root: Path) -> dict[str, Any]:
    return run_parallel(parallel_root)


def _layer_specs(model_dir: Path) -> tuple[dict[str, Any], dict[int, Any]]:
    qc = quant_config(model_dir)
    return qc, {int(k): v for k, v in qc["layers"].items()}


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


def test_checkpoints_split_unevenly(parallel_ckpts: dict[str, Path]) -> None:
    """Guards the serving tests against an easy case: the shares of the two ranks really differ."""
    _, p_layers = _layer_specs(parallel_ckpts["p"])
    for spec in p_layers.values():
        widths = [sum(s) for s in spec["expert_slabs"]]
        assert sorted(widths) == sorted(ODD_WIDTHS) and sum(spec["shared_slabs"]) == SHARED_WIDTH
    qc, q_layers = _layer_specs(parallel_ckpts["q"])
    g = qc["group_size"]
    sizes = [
        n for spec in q_layers.values() for s in [*spec["expert_slabs"], spec["shared_slabs"]] for n in s
    ]
    # Slabs of 2+ groups with a short last group: the ranks hold unequal, non-empty shares.
    uneven = [n for n in sizes if n > g and n % g]
    assert len(uneven) >= 4, sizes
    assert any(n % g for spec in q_layers.values() for n in spec["shared_slabs"] if n > g)


@pytest.mark.vllm
@pytest.mark.parametrize("engine", list(ENGINES))
def test_parallel_greedy_equals_oracle(engine: str, parallel_runs: dict[str, Any]) -> None:
    ckpt, _, parallel = ENGINES[engine]
    model_dir = parallel_runs["_dirs"][ckpt]
    got = parallel_runs[engine]
    assert got["quantization"] == "camera" and got["parallel"] == parallel
    want = reference_greedy(model_dir)
    for prompt, g, w in zip(PROMPTS, got["tokens"], want):
        assert g == w, f"{engine}: vLLM and the oracle diverge on {prompt!r}:\n vllm   {g}\n oracle {w}"


@pytest.mark.vllm
@pytest.mark.parametrize("engine", list(ENGINES))
def test_ranks_hold_their_share(engine: str, parallel_runs: dict[str, Any]) -> None:
    """Every rank holds exactly what the split rule gives it, and together the ranks hold everything."""
    ckpt, _, parallel = ENGINES[engine]
    qc, layers = _layer_specs(parallel_runs["_dirs"][ckpt])
    ranks = parallel_runs[engine]["ranks"]
    assert len(ranks) == 2
    group = qc.get("group_size")
    num_experts = qc["num_experts"]
    routed_names = set(ranks[0]["routed"])
    assert len(routed_names) == len(layers) and routed_names == set(ranks[1]["routed"])
    for name in routed_names:
        spec = layers[_layer_of(name)]
        per_rank = [r["routed"][name] for r in ranks]
        if parallel == "tp2ep":
            # Experts whole on one rank each (MoE tp size 1), every expert on exactly one rank.
            assert all(info["tp"] == [0, 1] for info in per_rank)
            held = [e for info in per_rank for e in info["experts"]]
            assert (
                sorted(held) == list(range(num_experts)) and len(per_rank[0]["experts"]) == num_experts // 2
            )
            for info in per_rank:
                for local, e in enumerate(info["experts"]):
                    if ckpt == "p":
                        assert info["widths"][local] == sum(spec["expert_slabs"][e])
                    else:
                        assert info["slabs"][local] == spec["expert_slabs"][e]
        else:
            assert [info["tp"] for info in per_rank] == [[0, 2], [1, 2]]
            for r, info in enumerate(per_rank):
                assert info["experts"] == list(range(num_experts))
                if ckpt == "p":
                    widths = [s[0] for s in spec["expert_slabs"]]
                    assert info["widths"] == list(sharding.share_sizes(sharding.prune_shares(widths, 2, r)))
                else:
                    shares = sharding.mixed_shares(spec["expert_slabs"], group, 2, r)
                    assert info["slabs"] == [list(sharding.share_sizes(s)) for s in shares]
            # Nothing dropped: the ranks' shares add up to the checkpoint's widths.
            for e, slabs in enumerate(spec["expert_slabs"]):
                if ckpt == "p":
                    assert sum(info["widths"][e] for info in per_rank) == slabs[0]
                else:
                    assert [a + b for a, b in zip(*(info["slabs"][e] for info in per_rank))] == slabs
    # The shared expert is tensor-parallel in both modes (attention/dense TP group of 2).
    shared_names = set(ranks[0]["shared"])
    assert len(shared_names) == 2 * len(layers)
    for name in shared_names:
        spec = layers[_layer_of(name)]
        for r, rank in enumerate(ranks):
            info = rank["shared"][name]
            assert info["tp"] == [r, 2]
            if ckpt == "p":
                assert info["range"] == list(sharding.prune_shares(spec["shared_slabs"], 2, r)[0])
            else:
                shares = sharding.mixed_shares([spec["shared_slabs"]], group, 2, r)[0]
                assert info["slabs"] == list(sharding.share_sizes(shares))


def test_data_parallel_is_refused_clearly() -> None:
    from types import SimpleNamespace

    from camera_vllm.vllm_plugin.moe_method import check_parallel_support

    check_parallel_support(SimpleNamespace(dp_size=1, tp_size=2, ep_size=1), "model.layers.0.mlp.experts")
    with pytest.raises(
        NotImplementedError, match=r"model\.layers\.0\.mlp\.experts: .*data parallelism \(got dp=2\)"
    ):
        check_parallel_support(SimpleNamespace(dp_size=2, tp_size=1, ep_size=2), "model.layers.0.mlp.experts")
