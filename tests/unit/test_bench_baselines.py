"""bench/baselines.py: the MC-like expert-level bit plan (exact solver, allocation) and its checkpoint."""

from __future__ import annotations

import itertools
import json
import random

import baselines
import pytest
import torch
from safetensors import safe_open

from camera_kernels.packing import dequantize
from camera_vllm.checkpoint.source import SourceCheckpoint
from camera_vllm.compress.calibrate import CalibSpec
from camera_vllm.compress.quantize.rtn import quantize_rtn
from camera_vllm.format import names
from camera_vllm.format.layout import stored_bytes
from camera_vllm.format.validate import validate
from camera_vllm.testing.tiny_models import _CORPUS, build_tiny_moe


def _brute(importance, errors, costs, budget, bits):
    best = None
    for pick in itertools.product(range(len(bits)), repeat=len(importance)):
        if sum(costs[e][i] for e, i in enumerate(pick)) > budget:
            continue
        loss = sum(importance[e] * errors[e][i] for e, i in enumerate(pick))
        if best is None or loss < best[0] - 1e-12:
            best = (loss, pick)
    return best


def test_solver_matches_brute_force_and_meets_budget():
    rng = random.Random(0)
    bits = (4, 3, 2, 1)
    for _ in range(25):
        n = rng.randint(1, 6)
        widths = [rng.choice([32, 64, 96]) for _ in range(n)]
        costs = [[stored_bytes([w], [b], 64, 32) for b in bits] for w in widths]
        errors = [sorted(rng.random() for _ in bits) for _ in range(n)]  # more bits -> less error
        importance = [rng.random() ** 3 for _ in range(n)]
        lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
        budget = rng.randint(lo, hi)
        got = baselines.solve_expert_bits(importance, errors, costs, budget, bits)
        idx = [bits.index(b) for b in got]
        assert sum(costs[e][i] for e, i in enumerate(idx)) <= budget
        loss = sum(importance[e] * errors[e][i] for e, i in enumerate(idx))
        assert loss == pytest.approx(_brute(importance, errors, costs, budget, bits)[0], rel=1e-9, abs=1e-12)


def test_solver_gives_important_experts_more_bits_and_refuses_impossible_budgets():
    bits = (4, 3, 2, 1)
    err = [0.009, 0.034, 0.12, 0.38]
    costs = [[stored_bytes([64], [b], 64, 32) for b in bits]] * 4
    budget = sum(stored_bytes([64], [2], 64, 32) for _ in range(4))  # mean 2 bits
    got = baselines.solve_expert_bits([0.1, 10.0, 0.01, 1.0], [err] * 4, costs, budget, bits)
    assert got[1] >= got[3] >= got[0] >= got[2] and got[1] > got[2]
    with pytest.raises(ValueError, match="below the cheapest"):
        baselines.solve_expert_bits([1.0] * 4, [err] * 4, costs, budget=10, bits=bits)
    with pytest.raises(ValueError, match="experts x bit-widths"):
        baselines.solve_expert_bits([1.0], [err[:2]], [costs[0]], budget, bits)


def test_importance_and_allocation_shapes():
    imp = baselines.expert_importance(torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.9, 0.1, 0.0]), 0.5)
    assert imp[0] > imp[1] > imp[2] == 0
    with pytest.raises(ValueError, match="gamma"):
        baselines.expert_importance(torch.ones(2), torch.ones(2), 1.5)
    alloc = baselines.expert_level_allocation([1, 4, 2], [64, 64, 32])
    assert alloc.bits == (4, 3, 2, 1)
    assert alloc.expert_slabs == [[0, 0, 0, 64], [64, 0, 0, 0], [0, 0, 32, 0]]


def test_mc_like_checkpoint(tmp_path):
    model = build_tiny_moe("qwen3_moe", tmp_path / "m", seed=5)
    calib = tmp_path / "calib.txt"
    calib.write_text(_CORPUS * 4)
    out = baselines.run_mc_like_q(
        model,
        tmp_path / "mc",
        3.0,
        [calib],
        method="rtn",
        group_size=32,
        calib=CalibSpec(num_seqs=4, seq_len=32, seed=1),
    )
    assert validate(out, check_values=True).ok
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    report = json.loads((out / names.REPORT_FILE).read_text())
    src = SourceCheckpoint(model)
    hidden = src.arch.hidden_size
    for layer, spec in cfg["layers"].items():
        plan = report["layers"][str(layer)]["expert_bits"]
        for e, slabs in enumerate(spec["expert_slabs"]):
            used = [b for b, n in zip(cfg["bits"], slabs) if n]
            assert used == [plan[e]], (layer, e, slabs)  # one bit-width per expert
        dense = 3 * hidden * sum(sum(s) for s in spec["expert_slabs"])
        stored = sum(stored_bytes(s, cfg["bits"], hidden, 32) for s in spec["expert_slabs"])
        assert 8 * stored / dense <= 3.0
    assert len({b for plan in report["layers"].values() for b in plan["expert_bits"]}) > 1
    # First MoE layer: the inputs are unquantized, so RTN of the original gate is what is stored.
    layer, e = src.arch.moe_layers[0], 0
    b = report["layers"][str(layer)]["expert_bits"][e]
    gate = src.expert_weights(layer)[0][e]
    want = quantize_rtn(gate.float().T, b, 32, clip_search=True).dequantize()
    name = names.expert_tensor(src.arch.architecture, layer, e, 0, names.slab_suffix(names.QWEIGHT, b))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        t = [
            f.get_tensor(name.replace(names.slab_suffix(names.QWEIGHT, b), names.slab_suffix(k, b)))
            for k in names.QUANT_SUFFIXES
        ]
    got = dequantize(*t, b, hidden, 32)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-3)
