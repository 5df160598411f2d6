"""vLLM serves CAMERA-Q (scheme "mixed") checkpoints exactly: greedy tokens equal the oracle in fp32.

Every checkpoint is the tiny fp32 model quantized with RTN into 4/2/1-bit slabs
(fractions .25/.5/.25, group size 32), the shared expert (Qwen2-MoE, DeepSeek-V2)
quantized too; one more is pruned (0.25) and quantized (P+Q).  All engines run one
after another in ONE subprocess (``vllm_driver.py``), so vLLM is imported once.
Modes: torch.compile (vLLM's default on CPU, which traces into the MoE method with
fullgraph) on Qwen3-MoE and Qwen2-MoE, ``--enforce-eager`` on the others.

The oracle is :func:`camera_vllm.reference.load` (transformers, fp32), except for
DeepSeek-V2, whose stock vLLM CPU implementation disagrees with transformers even
unquantized (see test_vllm_greedy.py): there the oracle is stock vLLM on the dense
dequantized equivalent, one sequence at a time.
"""

from __future__ import annotations

import json

import pytest
from integration_helpers import PROMPTS, reference_greedy
from vllm_mixed_helpers import CASES, STOCK_VLLM_ORACLE, run_forced_backend, run_mixed_cases


@pytest.fixture(scope="session")
def mixed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return run_mixed_cases(tmp_path_factory.getbasetemp() / "camera-q")


@pytest.mark.vllm
@pytest.mark.parametrize("case", list(CASES))
def test_vllm_mixed_greedy_equals_oracle(case: str, mixed_runs: dict[str, dict]) -> None:
    arch, ratio, mode, _ = CASES[case]
    info = mixed_runs[case]
    qc = json.loads((info["dir"] / "config.json").read_text())["quantization_config"]
    assert qc["scheme"] == "mixed" and qc["bits"] == [4, 2, 1]
    # Every bit-width is really used, and the shared expert is quantized where there is one.
    used = {
        b for spec in qc["layers"].values() for s in spec["expert_slabs"] for b, n in zip(qc["bits"], s) if n
    }
    assert used == {4, 2, 1}
    if arch in ("qwen2_moe", "deepseek_v2"):
        assert all(spec.get("shared_slabs") for spec in qc["layers"].values())
    if ratio:
        widths = [sum(s) for spec in qc["layers"].values() for s in spec["expert_slabs"]]
        assert sum(widths) < len(widths) * qc["original_intermediate_size"]

    got = info["result"]
    assert got["quantization"] == "camera"
    assert (got["compilation_mode"] == "0") == (mode == "eager"), got["compilation_mode"]
    assert got["memory"]["methods"].get("CameraMixedMoEMethod") == len(qc["layers"])
    # The engine computed the experts with the compiled CPU kernel (the oracle is independent of it).
    assert got["memory"]["slab_backend"] == "cpu", got["memory"]["slab_backend"]
    if arch in STOCK_VLLM_ORACLE:
        assert info["stock"]["quantization"] is None
        want = info["stock"]["tokens"]
    else:
        want = reference_greedy(info["dir"])
    for prompt, g, w in zip(PROMPTS, got["tokens"], want):
        assert g == w, f"{case}: vLLM and the oracle diverge on {prompt!r}:\n vllm   {g}\n oracle {w}"


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_quantization_changes_the_model(arch: str, mixed_runs: dict[str, dict]) -> None:
    """Guards the test above against vacuity: the 4/2/1-bit model does not reproduce the original."""
    info = mixed_runs[arch]
    assert reference_greedy(info["original"]) != reference_greedy(info["dir"])


@pytest.mark.vllm
def test_vllm_mixed_through_the_triton_backend_equals_oracle(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """CAMERA_VLLM_BACKEND=triton: the Triton launcher and kernels (interpreted on CPU) serve
    inside a vLLM engine, and greedy tokens equal the oracle."""
    info = run_forced_backend(tmp_path_factory.getbasetemp() / "camera-q", "triton")["q"]
    got = info["result"]
    assert got["memory"]["slab_backend"] == "triton", got["memory"]["slab_backend"]
    want = reference_greedy(info["dir"])
    for prompt, g, w in zip(PROMPTS, got["tokens"], want):
        assert g == w, f"triton backend: vLLM and the oracle diverge on {prompt!r}:\n vllm   {g}\n oracle {w}"


@pytest.mark.vllm
def test_vllm_prune_through_the_triton_backend_equals_oracle(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """CAMERA_VLLM_BACKEND=triton: a CAMERA-P checkpoint (bf16 weights, served in fp32) runs as one
    16-bit dense slab per layer on the Triton slab kernels inside a vLLM engine (the CUDA path),
    and greedy tokens equal the fp32 oracle."""
    info = run_forced_backend(tmp_path_factory.getbasetemp() / "camera-q", "triton")["p"]
    got = info["result"]
    from camera_vllm.vllm_plugin.moe_method import DENSE_SLAB, W13

    # Every CAMERA-P layer holds a dense slab, and its ragged tensors are freed.
    shapes = {name: shape for name, shape, _, _ in got["memory"]["mlp_tensors"]}
    ragged = [n for n in shapes if n.endswith("." + W13)]
    dense = [n for n in shapes if n.endswith("." + DENSE_SLAB + "w13_qweight")]
    assert ragged and len(dense) == len(ragged), sorted(shapes)
    assert all(shapes[n][0] == 0 for n in ragged), {n: shapes[n] for n in ragged}
    # ... computed by the slab op on one 16-bit slab holding the checkpoint's bf16 weights.
    computations = got["memory"]["prune_computations"]
    assert [{k: v for k, v in c.items() if k != "group_size"} for c in computations] == [
        {"op": "moe_slab", "bits": [16], "dense_dtype": "bfloat16"}
    ], computations
    want = reference_greedy(info["dir"])
    for prompt, g, w in zip(PROMPTS, got["tokens"], want):
        assert g == w, (
            f"CAMERA-P on triton: vLLM and the oracle diverge on {prompt!r}:\n vllm   {g}\n oracle {w}"
        )
