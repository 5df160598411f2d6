"""CAMERA-Q in vLLM keeps the experts packed: resident bytes match the checkpoint, nothing dense.

The numbers come from the worker process of the engines started by
``vllm_mixed_helpers.run_mixed_cases`` (shared with test_vllm_mixed.py): after loading
and serving, the bytes of every parameter and buffer owned by a CAMERA-Q MoE layer
or a quantized shared-expert projection, and the shape/dtype of every tensor in the
MoE blocks.
"""

from __future__ import annotations

import pytest
from vllm_mixed_helpers import CASES, run_mixed_cases

from camera_vllm.format.inspect import summarize

TOLERANCE = 0.03


@pytest.fixture(scope="session")
def mixed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return run_mixed_cases(tmp_path_factory.getbasetemp() / "camera-q")


def _dense_shapes(cfg: dict, qc: dict) -> set[tuple[int, ...]]:
    """Shapes an unquantized (dense or zero-padded) expert or shared expert would have in vLLM."""
    h, i, e = cfg["hidden_size"], qc["original_intermediate_size"], qc["num_experts"]
    shapes = {(e, 2 * i, h), (e, h, i), (e, i, h), (2 * i, h), (i, h), (h, i)}
    s = qc.get("original_shared_intermediate_size")
    if s:
        shapes |= {(2 * s, h), (s, h), (h, s)}
    return shapes


@pytest.mark.vllm
@pytest.mark.parametrize("case", list(CASES))
def test_resident_expert_bytes_match_checkpoint(case: str, mixed_runs: dict) -> None:
    import json

    info = mixed_runs[case]
    memory = info["result"]["memory"]
    want = summarize(info["dir"])["totals"]["stored_bytes"]
    got = memory["routed_bytes"] + memory["shared_bytes"]
    assert want > 0 and abs(got - want) <= TOLERANCE * want, (
        f"{case}: CAMERA layers hold {got} bytes in vLLM, the checkpoint's experts are {want} bytes"
    )
    cfg = json.loads((info["dir"] / "config.json").read_text())
    qc = cfg["quantization_config"]
    if qc.get("original_shared_intermediate_size"):
        assert memory["shared_bytes"] > 0 and memory["methods"].get("CameraSlabLinearMethod")
    # No MoE block holds a float tensor shaped like a dense expert (DeepSeek's dense
    # first layers are not MoE blocks and legitimately hold dense MLPs).
    dense = _dense_shapes(cfg, qc)
    moe = tuple(f"layers.{layer}." for layer in qc["layers"])
    offenders = [
        t for t in memory["mlp_tensors"] if t[3] and tuple(t[1]) in dense and any(m in t[0] for m in moe)
    ]
    assert not offenders, f"{case}: dense float expert tensors resident in vLLM: {offenders[:5]}"
    # ... and the check above does see the MoE blocks' tensors (it is not vacuous).
    names = [t[0] for t in memory["mlp_tensors"]]
    assert any(".w13_qweight_b4" in n for n in names) and any(".w2_scales_b1" in n for n in names)
