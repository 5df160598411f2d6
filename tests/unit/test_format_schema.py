"""The quantization_config schema, tensor names and slab layout: good and bad inputs, messages checked."""

from __future__ import annotations

import copy
import math

import pytest

from camera_vllm.format import names
from camera_vllm.format.layout import expert_tensors, slab_tensors, stored_bytes
from camera_vllm.format.schema import CameraFormatError, CameraQuantConfig

PRUNE = {
    "quant_method": "camera",
    "format_version": 1,
    "scheme": "prune",
    "bits": [16],
    "architecture": "Qwen2MoeForCausalLM",
    "num_experts": 2,
    "original_intermediate_size": 64,
    "original_shared_intermediate_size": 96,
    "layers": {"0": {"expert_slabs": [[40], [0]], "shared_slabs": [90]}, "1": {"expert_slabs": [[64], [12]]}},
    "compression": {"method": "camera-p", "ratio": 0.3},
}
MIXED = {
    "quant_method": "CAMERA",
    "scheme": "mixed",
    "bits": [4, 2, 1],
    "group_size": 64,
    "architecture": "Qwen3MoeForCausalLM",
    "num_experts": 2,
    "original_intermediate_size": 128,
    "layers": {"3": {"expert_slabs": [[8, 96, 16], [0, 40, 8]]}},
}


def _with(base: dict, path: list, value) -> dict:
    data = copy.deepcopy(base)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


def test_prune_config_parses_and_round_trips() -> None:
    qc = CameraQuantConfig.from_json_dict(PRUNE)
    assert not qc.is_quantized
    assert qc.layer(0).expert_widths == [40, 0] and qc.layer(0).shared_width == 90
    assert qc.layer(1).shared_width is None and qc.layer(2) is None
    assert qc.max_width(1) == 64
    data = qc.to_json_dict()
    assert list(data["layers"]) == ["0", "1"] and "group_size" not in data
    assert CameraQuantConfig.from_json_dict(data) == qc


def test_mixed_config_parses() -> None:
    qc = CameraQuantConfig.from_json_dict(MIXED)
    assert qc.quant_method == "camera" and qc.is_quantized and qc.format_version == names.FORMAT_VERSION
    assert qc.layer(3).expert_widths == [120, 48]


@pytest.mark.parametrize(
    "base, path, value, message",
    [
        (PRUNE, ["format_version"], 7, "unknown CAMERA format_version 7"),
        (PRUNE, ["quant_method"], "gptq", "quant_method"),
        (PRUNE, ["bits"], [8], "scheme 'prune' stores unquantized experts: bits must be [16]"),
        (PRUNE, ["scheme"], "sparse", "scheme"),
        (PRUNE, ["num_experts"], 3, "layer 0: expert_slabs lists 2 experts, num_experts is 3"),
        (
            PRUNE,
            ["layers", "0", "expert_slabs"],
            [[65], [0]],
            "width 65 exceeds original_intermediate_size 64",
        ),
        (PRUNE, ["layers", "0", "expert_slabs"], [[-1], [0]], "expert 0 has a negative slab size"),
        (PRUNE, ["layers", "0", "shared_slabs"], [97], "shared_slabs [97] out of range"),
        (PRUNE, ["original_shared_intermediate_size"], None, "original_shared_intermediate_size is not"),
        (PRUNE, ["layers", "1", "expert_slabs"], [[64, 0], [12, 0]], "expert 0: 2 slab sizes for bits [16]"),
        (PRUNE, ["surprise"], 1, "surprise"),
        (PRUNE, ["num_experts"], 0, "num_experts"),
        (MIXED, ["bits"], [4, 5], "unsupported bit-width(s) [5]"),
        (MIXED, ["bits"], [2, 4, 1], "bits must be distinct and in descending order"),
        (MIXED, ["group_size"], 48, "group_size must be a positive multiple of 32"),
        (MIXED, ["group_size"], None, "group_size must be a positive multiple of 32"),
    ],
)
def test_bad_configs_name_the_problem(base: dict, path: list, value, message: str) -> None:
    with pytest.raises(CameraFormatError) as err:
        CameraQuantConfig.from_json_dict(_with(base, path, value), source="ckpt/config.json")
    text = str(err.value)
    assert text.startswith("ckpt/config.json: invalid CAMERA quantization_config")
    assert message in text


def test_missing_required_field_and_non_object() -> None:
    data = copy.deepcopy(PRUNE)
    del data["architecture"]
    with pytest.raises(CameraFormatError, match="architecture: Field required"):
        CameraQuantConfig.from_json_dict(data)
    with pytest.raises(CameraFormatError, match="quantization_config: expected a JSON object, got list"):
        CameraQuantConfig.from_json_dict([1, 2])


def test_tensor_names_per_architecture() -> None:
    assert names.expert_tensor("MixtralForCausalLM", 3, 7, 0, "weight") == (
        "model.layers.3.block_sparse_moe.experts.7.w1.weight"
    )
    assert names.expert_tensor("MixtralForCausalLM", 3, 7, 2, "weight").endswith("experts.7.w2.weight")
    assert names.expert_tensor("Qwen3MoeForCausalLM", 0, 1, 1, names.slab_suffix("qweight", 4)) == (
        "model.layers.0.mlp.experts.1.up_proj.qweight_b4"
    )
    assert (
        names.shared_tensor("Qwen2MoeForCausalLM", 2, 2, "weight")
        == "model.layers.2.mlp.shared_expert.down_proj.weight"
    )
    assert names.shared_tensor("DeepseekV2ForCausalLM", 1, 0, "weight").endswith(
        "mlp.shared_experts.gate_proj.weight"
    )
    with pytest.raises(ValueError, match="has no shared expert"):
        names.shared_prefix("OlmoeForCausalLM", 0)
    with pytest.raises(ValueError, match="unknown slab tensor kind"):
        names.slab_suffix("g_idx", 4)


def test_layout_shapes() -> None:
    pruned = expert_tensors([10], [16], 64, None)
    assert [(t.suffix, t.shape) for p in (0, 1, 2) for t in pruned[p]] == [
        ("weight", (10, 64)),
        ("weight", (10, 64)),
        ("weight", (64, 10)),
    ]
    assert expert_tensors([0], [16], 64, None) == {0: [], 1: [], 2: []}
    # gate/up pack along H (64 -> 2 words per bit-plane), down along the slab width n.
    gate = slab_tensors(0, 40, 3, 64, 32)
    assert [(t.suffix, t.shape, t.dtype) for t in gate] == [
        ("qweight_b3", (math.ceil(64 / 32) * 3, 40), "int32"),
        ("scales_b3", (2, 40), "float16"),
        ("zeros_b3", (2, 40), "float16"),
    ]
    down = slab_tensors(2, 40, 2, 64, 32)
    assert [t.shape for t in down] == [(math.ceil(40 / 32) * 2, 64), (2, 64), (2, 64)]
    assert slab_tensors(1, 0, 4, 64, 32) == []
    mixed = expert_tensors([8, 0, 5], [4, 2, 1], 64, 32)
    assert [t.suffix for t in mixed[2]] == [
        "qweight_b4",
        "scales_b4",
        "zeros_b4",
        "qweight_b1",
        "scales_b1",
        "zeros_b1",
    ]
    assert stored_bytes([10], [16], 64, None, model_bytes=2) == 3 * 10 * 64 * 2
