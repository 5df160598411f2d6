"""A catalogue of broken CAMERA checkpoints: each case damages a copy of a good one.

Every case is a function ``corrupt(dir) -> fragments``: it damages the checkpoint in
``dir`` (a copy of the good CAMERA-P or CAMERA-Q checkpoint named by ``Case.base``) and
returns the message fragments that must appear in the refusal (file, tensor or field
names).  The same catalogue is run through ``camera-vllm validate`` and through vLLM's
config building with the plugin loaded (``tests/integration/vllm_driver.py``).  ``vllm_fragments``, where
given, replaces the fragments for vLLM; ``before_plugin`` marks the cases that vLLM or
transformers refuse before the plugin can run, in their own words.

Nothing here imports vLLM.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from camera_vllm.format import names

ARCH = "Qwen2MoeForCausalLM"
ST = "model.safetensors"
ZERO_WIDTH_EXPERT = 5  # the good CAMERA-P checkpoint prunes this expert of layer 0 to width 0
# run_camera_q settings of the good CAMERA-Q checkpoint (and of the interrupted/determinism runs).
Q_ARGS: dict[str, Any] = dict(bits=[4, 2], fractions=[0.5, 0.5], group_size=32, method="rtn", prune_ratio=0.1)


def E(layer: int, expert: int, proj: int, suffix: str) -> str:  # noqa: N802 - reads like the template
    return names.expert_tensor(ARCH, layer, expert, proj, suffix)


def S(layer: int, proj: int, suffix: str) -> str:  # noqa: N802
    return names.shared_tensor(ARCH, layer, proj, suffix)


# -- file helpers ----------------------------------------------------------------------------------
def load_tensors(d: Path, fname: str = ST) -> dict[str, torch.Tensor]:
    with safe_open(str(d / fname), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def edit_tensors(d: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    t = load_tensors(d)
    change(t)
    save_file(t, str(d / ST), metadata={"format": "pt"})


def read_config(d: Path) -> dict[str, Any]:
    return json.loads((d / names.CONFIG_FILE).read_text())


def edit_config(d: Path, change: Callable[[dict[str, Any]], None]) -> None:
    cfg = read_config(d)
    change(cfg)
    (d / names.CONFIG_FILE).write_text(json.dumps(cfg, indent=2))


def edit_qc(d: Path, change: Callable[[dict[str, Any]], None]) -> None:
    edit_config(d, lambda cfg: change(cfg["quantization_config"]))


def qc_of(d: Path) -> dict[str, Any]:
    return read_config(d)["quantization_config"]


def raw_parts(d: Path) -> tuple[dict[str, Any], bytes]:
    """(header dict, data bytes) of model.safetensors."""
    blob = (d / ST).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_raw(d: Path, header: dict[str, Any], data: bytes) -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    (d / ST).write_bytes(struct.pack("<Q", len(head)) + head + data)


def shard(d: Path) -> tuple[str, str]:
    """Split model.safetensors into two shards with an index (a valid sharded checkpoint)."""
    t = load_tensors(d)
    (d / ST).unlink()
    keys = sorted(t)
    files = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    weight_map = {}
    for fname, part in zip(files, (keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        save_file({k: t[k] for k in part}, str(d / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (d / names.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def full_slab_expert(d: Path, layer: int = 0) -> int:
    """A routed expert of ``layer`` whose every slab is non-empty (CAMERA-Q)."""
    slabs = qc_of(d)["layers"][str(layer)]["expert_slabs"]
    return next(e for e, s in enumerate(slabs) if all(n > 0 for n in s))


# -- cases -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    base: str  # "P" (CAMERA-P) or "Q" (CAMERA-Q)
    corrupt: Callable[[Path], tuple[str, ...]]
    vllm_fragments: tuple[str, ...] | None = None  # what vLLM's refusal says, where it differs
    before_plugin: bool = False  # refused by vLLM/transformers before the plugin runs
    quantization: str | None = None  # --quantization passed to vLLM for this case


CASES: list[Case] = []


def case(
    base: str,
    *,
    vllm: tuple[str, ...] | None = None,
    before_plugin: bool = False,
    quantization: str | None = None,
):
    def register(fn: Callable[[Path], tuple[str, ...]]) -> Callable[[Path], tuple[str, ...]]:
        CASES.append(Case(fn.__name__, base, fn, vllm, before_plugin, quantization))
        return fn

    return register


# ---- safetensors files
@case("Q")
def truncated_file(d: Path) -> tuple[str, ...]:
    blob = (d / ST).read_bytes()
    (d / ST).write_bytes(blob[:-100])
    return (f"{ST}: truncated safetensors file",)


@case("P")
def empty_weights_file(d: Path) -> tuple[str, ...]:
    (d / ST).write_bytes(b"")
    return (f"{ST}: truncated safetensors file (0 bytes, no header)",)


@case("P")
def corrupt_header_json(d: Path) -> tuple[str, ...]:
    blob = bytearray((d / ST).read_bytes())
    blob[8:12] = b"{{x}"  # the header's first bytes: no longer JSON
    (d / ST).write_bytes(bytes(blob))
    return (f"{ST}: unreadable safetensors header",)


@case("P")
def header_length_beyond_file(d: Path) -> tuple[str, ...]:
    blob = (d / ST).read_bytes()
    (d / ST).write_bytes(struct.pack("<Q", len(blob) * 10) + blob[8:])
    return (f"{ST}: truncated safetensors file (header of {len(blob) * 10} bytes",)


@case("P")
def trailing_bytes(d: Path) -> tuple[str, ...]:
    with open(d / ST, "ab") as fh:
        fh.write(b"\0" * 64)
    return (f"{ST}: 64 trailing bytes after the last tensor",)


@case("Q")
def header_offsets_disagree_with_shape(d: Path) -> tuple[str, ...]:
    header, data = raw_parts(d)
    victim = "model.norm.weight"
    header[victim]["shape"] = [header[victim]["shape"][0] * 2]  # bytes stay: the shape lies
    write_raw(d, header, data)
    return (f"{ST}: tensor {victim} spans", "needs")


@case("P")
def header_overlapping_tensors(d: Path) -> tuple[str, ...]:
    header, data = raw_parts(d)
    first, second = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    same = ("shape", "dtype")
    assert [header[first][k] for k in same] == [header[second][k] for k in same]
    header[second]["data_offsets"] = header[first]["data_offsets"]  # two tensors, one byte range
    write_raw(d, header, data)
    return (f"{ST}: tensor", "overlaps the tensor before it")


@case("P")
def index_points_to_missing_shard(d: Path) -> tuple[str, ...]:
    _, second = shard(d)
    (d / second).unlink()
    return (f"{second}: listed in {names.INDEX_FILE} but missing",)


@case("P")
def index_unreadable(d: Path) -> tuple[str, ...]:
    shard(d)
    (d / names.INDEX_FILE).write_text('{"weight_map": ')
    return (f"{names.INDEX_FILE}: unreadable",)


@case("Q")
def index_misplaces_tensor(d: Path) -> tuple[str, ...]:
    first, second = shard(d)
    index = json.loads((d / names.INDEX_FILE).read_text())
    moved = sorted(index["weight_map"])[0]
    index["weight_map"][moved] = second
    (d / names.INDEX_FILE).write_text(json.dumps(index))
    return (f"{first}: tensor {moved} is indexed under {second}",)


@case("P")
def no_weights(d: Path) -> tuple[str, ...]:
    (d / ST).unlink()
    return ("no safetensors weights",)


@case("Q")
def incomplete_marker(d: Path) -> tuple[str, ...]:
    (d / names.INCOMPLETE_MARKER).write_text("camera-vllm: this checkpoint is being written\n")
    return (f"{names.INCOMPLETE_MARKER}: present",)


# ---- config.json
@case("P", vllm=("Invalid repository ID or local directory", "'config.json'"), before_plugin=True)
def config_missing(d: Path) -> tuple[str, ...]:
    (d / names.CONFIG_FILE).unlink()
    return ("config.json: missing",)


@case("P", vllm=("config.json' is not a valid JSON file",), before_plugin=True)
def config_invalid_json(d: Path) -> tuple[str, ...]:
    text = (d / names.CONFIG_FILE).read_text()
    (d / names.CONFIG_FILE).write_text(text[: len(text) // 2])
    return ("config.json: not valid JSON",)


@case("Q", vllm=("config.json has no 'quantization_config'",), quantization="camera")
def camera_tensors_without_quantization_config(d: Path) -> tuple[str, ...]:
    # --quantization camera on a directory whose config.json lost its quantization_config.
    edit_config(d, lambda cfg: cfg.pop("quantization_config"))
    return ("config.json: no quantization_config",)


# ---- quantization_config: structure
# transformers fails on this while reading config.json, before vLLM asks any quantization
# method; its message does not name the field (a known limitation, see docs/security.md).
@case("P", vllm=("'list' object has no attribute 'to_dict'",), before_plugin=True)
def qc_not_a_dict(d: Path) -> tuple[str, ...]:
    edit_config(d, lambda cfg: cfg.update(quantization_config=["camera"]))
    return ("quantization_config: expected a JSON object, got list",)


@case("Q")
def qc_missing_field(d: Path) -> tuple[str, ...]:
    edit_qc(d, lambda qc: qc.pop("original_intermediate_size"))
    return ("original_intermediate_size: Field required",)


@case("Q")
def qc_extra_field(d: Path) -> tuple[str, ...]:
    edit_qc(d, lambda qc: qc.update(zero_point_offset=8))
    return ("zero_point_offset: Extra inputs are not permitted",)


@case("Q")
def qc_layer_key_not_an_int(d: Path) -> tuple[str, ...]:
    edit_qc(d, lambda qc: qc["layers"].update(first=qc["layers"]["0"]))
    return ("layers.first",)


@case("P")
def quant_method_not_camera(d: Path) -> tuple[str, ...]:
    edit_qc(d, lambda qc: qc.update(quant_method="gptq"))
    return ("quantization_config.quant_method is 'gptq', not 'camera'",)


@case("Q")
def unknown_format_version(d: Path) -> tuple[str, ...]:
    edit_qc(d, lambda qc: qc.update(format_version=2))
    return ("unknown CAMERA format_version 2",)


@case("Q")
def unsupported_bit_width(d: Path) -> tuple[str, ...]:
    edit_qc(d, lambda qc: qc.update(bits=[5, qc["bits"][1]]))
    return ("unsupported bit-width(s) [5]",)


@case("Q")
def bits_not_descending(d: Path) -> tuple[str, ...]:
    def change(qc: dict[str, Any]) -> None:
        qc["bits"] = qc["bits"][::-1]
        for spec in qc["layers"].values():
            spec["expert_slabs"] = [s[::-1] for s in spec["expert_slabs"]]
            spec["shared_slabs"] = spec["shared_slabs"][::-1]

    edit_qc(d, change)
    return ("bits must be distinct and in descending order",)


@case("Q")
def group_size_not_multiple_of_32(d: Path) -> tuple[str, ...]:
    edit_qc(d, lambda qc: qc.update(group_size=48))
    return ("group_size must be a positive multiple of 32", "48")


@case("P")
def prune_scheme_with_quant_bits(d: Path) -> tuple[str, ...]:
    edit_qc(d, lambda qc: qc.update(bits=[4]))
    return ("scheme 'prune' stores unquantized experts: bits must be [16]",)


@case("P")
def negative_slab_size(d: Path) -> tuple[str, ...]:
    edit_qc(d, lambda qc: qc["layers"]["1"]["expert_slabs"].__setitem__(2, [-1]))
    return ("expert 2 has a negative slab size",)


# ---- quantization_config vs config.json
@case("P")
def architecture_disagrees_with_config(d: Path) -> tuple[str, ...]:
    edit_qc(d, lambda qc: qc.update(architecture="Qwen3MoeForCausalLM"))
    return ("quantization_config.architecture Qwen3MoeForCausalLM != config.json architectures", ARCH)


@case("P")
def num_experts_disagrees_with_config(d: Path) -> tuple[str, ...]:
    def change(qc: dict[str, Any]) -> None:
        qc["num_experts"] = 9
        for spec in qc["layers"].values():
            spec["expert_slabs"].append([0])

    edit_qc(d, change)
    return ("quantization_config.num_experts 9 != config.json's 8",)


@case("Q")
def original_intermediate_size_disagrees(d: Path) -> tuple[str, ...]:
    edit_qc(d, lambda qc: qc.update(original_intermediate_size=96))
    return ("quantization_config.original_intermediate_size 96 != config.json's expert width 64",)


@case("P")
def original_shared_size_disagrees(d: Path) -> tuple[str, ...]:
    edit_qc(d, lambda qc: qc.update(original_shared_intermediate_size=128))
    return (
        "quantization_config.original_shared_intermediate_size 128 != config.json's shared expert width 96",
    )


@case("P")
def moe_layer_missing_from_qc(d: Path) -> tuple[str, ...]:
    edit_qc(d, lambda qc: qc["layers"].pop("1"))
    return ("quantization_config.layers lacks MoE layers [1]",)


@case("P")
def shared_expert_deleted_and_undescribed(d: Path) -> tuple[str, ...]:
    # The colleague's finding: every shared-expert tensor gone and shared_slabs removed.
    def change(qc: dict[str, Any]) -> None:
        for spec in qc["layers"].values():
            spec.pop("shared_slabs")
        qc.pop("original_shared_intermediate_size")

    edit_qc(d, change)
    edit_tensors(d, lambda t: [t.pop(k) for k in list(t) if ".shared_expert." in k])
    return (
        "quantization_config.layers.0.shared_slabs missing",
        "quantization_config.original_shared_intermediate_size None != config.json's shared expert width 96",
    )


@case("Q")
def shared_slabs_missing_tensors_kept(d: Path) -> tuple[str, ...]:
    edit_qc(d, lambda qc: qc["layers"]["1"].pop("shared_slabs"))
    return ("quantization_config.layers.1.shared_slabs missing", f"unexpected expert tensor {S(1, 0, '')}")


@case("P")
def expert_width_disagrees_with_tensors(d: Path) -> tuple[str, ...]:
    def change(qc: dict[str, Any]) -> None:
        qc["layers"]["0"]["expert_slabs"][0][0] -= 1

    edit_qc(d, change)
    return (f"{ST}: tensor {E(0, 0, 0, 'weight')} has shape", "expected")


@case("P")
def expert_width_beyond_original(d: Path) -> tuple[str, ...]:
    edit_qc(d, lambda qc: qc["layers"]["0"]["expert_slabs"].__setitem__(0, [65]))
    return ("layer 0 expert 0: width 65 exceeds original_intermediate_size 64",)


@case("Q")
def slab_sizes_do_not_add_up(d: Path) -> tuple[str, ...]:
    e = full_slab_expert(d)
    b_hi, b_lo = qc_of(d)["bits"]

    def change(qc: dict[str, Any]) -> None:
        s = qc["layers"]["0"]["expert_slabs"][e]
        s[0], s[1] = s[0] + 1, s[1] - 1  # same width, one micro-expert moved to the other slab

    edit_qc(d, change)
    return (
        f"tensor {E(0, e, 0, names.slab_suffix('qweight', b_hi))} has shape",
        f"tensor {E(0, e, 1, names.slab_suffix('qweight', b_lo))} has shape",
    )


# ---- tensors
@case("P")
def wrong_tensor_shape(d: Path) -> tuple[str, ...]:
    name = E(1, 2, 2, "weight")
    edit_tensors(d, lambda t: t.__setitem__(name, t[name][:, :-1].contiguous()))
    return (f"{ST}: tensor {name} has shape",)


@case("Q")
def missing_expert_tensor(d: Path) -> tuple[str, ...]:
    e = full_slab_expert(d, 1)
    name = E(1, e, 2, names.slab_suffix("qweight", qc_of(d)["bits"][0]))
    edit_tensors(d, lambda t: t.pop(name))
    return (f"tensor {name}: missing",)


@case("P")
def unknown_expert_tensor(d: Path) -> tuple[str, ...]:
    name = E(0, 0, 0, "bogus")
    edit_tensors(d, lambda t: t.__setitem__(name, torch.zeros(4)))
    return (f"unexpected expert tensor {name}",)


@case("Q")
def unknown_slab_width_tensor(d: Path) -> tuple[str, ...]:
    e = full_slab_expert(d)
    name = E(0, e, 0, names.slab_suffix("qweight", 3))  # bits are [4, 2]: no b3 slab exists
    edit_tensors(d, lambda t: t.__setitem__(name, torch.zeros(6, 4, dtype=torch.int32)))
    return (f"unexpected expert tensor {name}",)


@case("P")
def expert_index_beyond_num_experts(d: Path) -> tuple[str, ...]:
    name = E(1, 8, 0, "weight")
    edit_tensors(d, lambda t: t.__setitem__(name, t[E(1, 0, 0, "weight")].clone()))
    return (f"unexpected expert tensor {name}",)


@case("P")
def zero_width_expert_has_tensors(d: Path) -> tuple[str, ...]:
    name = E(0, ZERO_WIDTH_EXPERT, 1, "weight")
    edit_tensors(d, lambda t: t.__setitem__(name, torch.zeros(3, 64)))
    return (f"unexpected expert tensor {name}",)


@case("P")
def missing_shared_tensor(d: Path) -> tuple[str, ...]:
    name = S(1, 2, "weight")
    edit_tensors(d, lambda t: t.pop(name))
    return (f"tensor {name}: missing",)


@case("P")
def missing_router(d: Path) -> tuple[str, ...]:
    name = "model.layers.1.mlp.gate.weight"
    edit_tensors(d, lambda t: t.pop(name))
    return (f"tensor {name}: missing",)


@case("Q")
def missing_lm_head(d: Path) -> tuple[str, ...]:
    edit_tensors(d, lambda t: t.pop("lm_head.weight"))
    return ("tensor lm_head.weight: missing",)


@case("P")
def nan_in_expert_weight(d: Path) -> tuple[str, ...]:
    name = E(0, 1, 0, "weight")
    edit_tensors(d, lambda t: t[name].view(-1).__setitem__(7, math.nan))
    return (f"{ST}: tensor {name} has 1 NaN/inf value(s)",)


@case("Q")
def inf_in_norm_weight(d: Path) -> tuple[str, ...]:
    edit_tensors(d, lambda t: t["model.norm.weight"].__setitem__(3, math.inf))
    return (f"{ST}: tensor model.norm.weight has 1 NaN/inf value(s)",)


def _scale_case(value: float, fragment: str) -> Callable[[Path], tuple[str, ...]]:
    def corrupt(d: Path) -> tuple[str, ...]:
        e = full_slab_expert(d)
        name = E(0, e, 2, names.slab_suffix("scales", qc_of(d)["bits"][1]))
        edit_tensors(d, lambda t: t[name].view(-1).__setitem__(0, value))
        return (f"{ST}: tensor {name} has 1 {fragment}",)

    return corrupt


for _value, _tag, _fragment in (
    (math.nan, "nan", "NaN/inf value(s)"),
    (math.inf, "inf", "NaN/inf value(s)"),
    (0.0, "zero", "zero or negative scale(s)"),
    (-0.5, "negative", "zero or negative scale(s)"),
):
    _fn = _scale_case(_value, _fragment)
    _fn.__name__ = f"{_tag}_scale"
    case("Q")(_fn)


@case("Q")
def qweight_stored_as_float(d: Path) -> tuple[str, ...]:
    e = full_slab_expert(d)
    name = E(0, e, 1, names.slab_suffix("qweight", qc_of(d)["bits"][0]))
    edit_tensors(d, lambda t: t.__setitem__(name, t[name].float()))
    return (f"{ST}: tensor {name} has dtype F32, expected I32",)


@case("Q")
def scales_stored_as_bf16(d: Path) -> tuple[str, ...]:
    e = full_slab_expert(d)
    name = E(0, e, 0, names.slab_suffix("scales", qc_of(d)["bits"][0]))
    edit_tensors(d, lambda t: t.__setitem__(name, t[name].to(torch.bfloat16)))
    return (f"{ST}: tensor {name} has dtype BF16, expected F16",)


@case("P")
def expert_dtype_differs_from_model(d: Path) -> tuple[str, ...]:
    name = E(1, 3, 1, "weight")
    edit_tensors(d, lambda t: t.__setitem__(name, t[name].to(torch.bfloat16)))
    return (f"{ST}: tensor {name} has dtype BF16, expected F32",)


CASE_IDS = [c.id for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS), "duplicate case names"


def by_id(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)
