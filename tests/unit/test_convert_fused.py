"""``camera-vllm convert`` on every expert layout transformers 5 produces, for all five architectures.

transformers >= 5 keeps each layer's routed experts fused in memory
(``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``), so
``torch.save(model.state_dict())`` (the reference code's ``prune_model_dict.pt``) and
``save_pretrained(save_original_format=False)`` write them fused, the latter with Mixtral's
MoE block renamed ``mlp``; plain ``save_pretrained`` writes them per expert under the
original names.  Some models store the fused tensors transposed (``[E, H, 2I]``,
``[E, I, H]``).  Converting the same zero-masked model from each layout must give the
same CAMERA-P checkpoint, tensor for tensor, with the widths the mask implies.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from camera_vllm.arch import moe_arch_from_config
from camera_vllm.checkpoint.source import SourceCheckpoint, canonical_name
from camera_vllm.checkpoint.zero_mask import detect_keeps
from camera_vllm.compress.convert import StateDictSource, convert_zero_masked
from camera_vllm.format import names
from camera_vllm.format.validate import validate
from camera_vllm.testing.tiny_models import ARCHITECTURES, build_tiny_moe

EMPTY = 3  # expert zeroed entirely


def _masked_model(original: Path):
    """The transformers model of ``original`` with micro-experts zeroed.

    Returns (model, widths, shared widths).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    arch = moe_arch_from_config(model.config.to_dict())
    inter, widths, shared_widths = arch.intermediate_size, {}, {}
    with torch.no_grad():
        for j, layer in enumerate(arch.moe_layers):
            mlp = model.model.layers[layer].mlp
            gate_up, down = mlp.experts.gate_up_proj, mlp.experts.down_proj
            masks = {
                (EMPTY + j) % arch.num_experts: list(range(inter)),
                (1 + j) % arch.num_experts: list(range(j, inter, 3)),
            }
            w = [inter] * arch.num_experts
            for e, chans in masks.items():
                gate_up[e, chans] = 0
                gate_up[e, [inter + c for c in chans]] = 0
                down[e][:, chans] = 0
                w[e] = inter - len(chans)
            decoy = (6 + j) % arch.num_experts  # gate row and down column zero, up row not: kept
            gate_up[decoy, 2] = 0
            down[decoy][:, 2] = 0
            widths[layer] = w
            if arch.has_shared_expert:
                shared = getattr(mlp, names.shared_expert_module(arch.architecture))
                cut = list(range(0, arch.shared_intermediate_size, 4))
                shared.gate_proj.weight[cut] = 0
                shared.up_proj.weight[cut] = 0
                shared.down_proj.weight[:, cut] = 0
                shared_widths[layer] = arch.shared_intermediate_size - len(cut)
    return model, widths, shared_widths


def _copy_side_files(original: Path, out: Path) -> None:
    for f in original.iterdir():
        if (
            f.is_file()
            and not f.name.endswith((".safetensors", ".index.json"))
            and not (out / f.name).exists()
        ):
            shutil.copy(f, out / f.name)


def _transposed(fused_dir: Path, out: Path) -> Path:
    """``fused_dir`` with every fused expert tensor stored transposed ([E, H, 2I], [E, I, H])."""
    shutil.copytree(fused_dir, out)
    tensors = load_file(out / "model.safetensors")
    for k in list(tensors):
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[k] = tensors[k].transpose(1, 2).contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module", params=ARCHITECTURES)
def layouts(request, tmp_path_factory) -> dict:
    arch = request.param
    root = tmp_path_factory.mktemp(f"fused-{arch}")
    original = build_tiny_moe(arch, root / "orig")
    model, widths, shared_widths = _masked_model(original)
    per_expert, fused = root / "per-expert", root / "fused"
    model.save_pretrained(per_expert)
    model.save_pretrained(fused, save_original_format=False)
    for d in (per_expert, fused):
        _copy_side_files(original, d)
    pt = root / "prune_model_dict.pt"
    torch.save(model.state_dict(), pt)
    return {
        "arch": arch,
        "root": root,
        "original": original,
        "per_expert": per_expert,
        "fused": fused,
        "transposed": _transposed(fused, root / "transposed"),
        "pt": pt,
        "widths": widths,
        "shared_widths": shared_widths,
    }


def test_transformers_writes_the_layouts_this_test_assumes(layouts) -> None:
    """Guards the fixtures: per-expert names on disk by default, fused (and Mixtral's ``mlp``) otherwise."""
    fused_keys = set(load_file(layouts["fused"] / "model.safetensors"))
    per_keys = set(load_file(layouts["per_expert"] / "model.safetensors"))
    src = SourceCheckpoint(layouts["per_expert"])
    a, layer = src.arch.architecture, src.arch.moe_layers[0]
    assert names.expert_tensor(a, layer, 0, 0, "weight") in per_keys
    assert f"model.layers.{layer}.mlp.experts.gate_up_proj" in fused_keys
    assert not any(".experts.0." in k for k in fused_keys)
    state = torch.load(layouts["pt"], weights_only=True)
    assert state[f"model.layers.{layer}.mlp.experts.gate_up_proj"].shape == (
        src.arch.num_experts,
        2 * src.arch.intermediate_size,
        src.arch.hidden_size,
    )


def test_fused_orientation_is_read_from_the_shapes(layouts) -> None:
    for key, transposed in (("fused", False), ("transposed", True)):
        src = SourceCheckpoint(layouts[key])
        for layer in src.arch.moe_layers:
            fused = src.fused_experts(layer)
            assert fused is not None and fused.transposed is transposed
            assert fused.gate_up == names.moe_prefix(src.arch.architecture, layer) + ".experts.gate_up_proj"
    assert (
        SourceCheckpoint(layouts["per_expert"]).fused_experts(
            SourceCheckpoint(layouts["per_expert"]).arch.moe_layers[0]
        )
        is None
    )


def test_every_layout_reads_the_same_experts(layouts) -> None:
    ref = SourceCheckpoint(layouts["per_expert"])
    others = [SourceCheckpoint(layouts["fused"]), SourceCheckpoint(layouts["transposed"])]
    others.append(
        StateDictSource(
            layouts["original"], torch.load(layouts["pt"], weights_only=True), "prune_model_dict.pt"
        )
    )
    for layer in ref.arch.moe_layers:
        want = ref.expert_weights(layer)
        for src in others:
            got = src.expert_weights(layer)
            for w_list, g_list in zip(want, got):
                for w, g in zip(w_list, g_list):
                    torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert set(others[0].weight_map) - set(ref.weight_map) == {
        names.moe_prefix(ref.arch.architecture, layer) + f".experts.{p}"
        for layer in ref.arch.moe_layers
        for p in ("gate_up_proj", "down_proj")
    }


def test_convert_gives_one_checkpoint_from_every_layout(layouts) -> None:
    root = layouts["root"]
    outs = {
        "per_expert": convert_zero_masked(layouts["per_expert"], root / "out-per-expert", overwrite=True),
        "fused": convert_zero_masked(layouts["fused"], root / "out-fused", overwrite=True),
        "transposed": convert_zero_masked(layouts["transposed"], root / "out-transposed", overwrite=True),
        "pt": convert_zero_masked(
            layouts["original"], root / "out-pt", state_dict_path=layouts["pt"], overwrite=True
        ),
    }
    ref = load_file(outs["per_expert"] / "model.safetensors")
    qc = json.loads((outs["per_expert"] / "config.json").read_text())["quantization_config"]
    for layer, w in layouts["widths"].items():
        assert [sum(s) for s in qc["layers"][str(layer)]["expert_slabs"]] == w
        if layouts["shared_widths"]:
            assert qc["layers"][str(layer)]["shared_slabs"] == [layouts["shared_widths"][layer]]
    for key, out in outs.items():
        report = validate(out)
        assert report.ok, f"{key}: {report}"
        got = load_file(out / "model.safetensors")
        assert set(got) == set(ref), f"{key}: tensor names differ: {sorted(set(got) ^ set(ref))[:6]}"
        for name, t in ref.items():
            torch.testing.assert_close(got[name], t, rtol=0, atol=0, msg=f"{key}: {name}")
        got_qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert got_qc["layers"] == qc["layers"], key
    # The per-expert tensors carry the masked model's kept channels, in order.
    src = SourceCheckpoint(layouts["per_expert"])
    a = src.arch.architecture
    for layer in src.arch.moe_layers:
        keep = detect_keeps(src)[layer]
        _, _, downs = src.expert_weights(layer)
        for e, idx in enumerate(keep.experts):
            name = names.expert_tensor(a, layer, e, 2, "weight")
            if idx.numel() == 0:
                assert name not in ref
            else:
                torch.testing.assert_close(ref[name], downs[e][:, idx], rtol=0, atol=0)


def test_canonical_name_maps_transformers_in_memory_names() -> None:
    assert (
        canonical_name("MixtralForCausalLM", "model.layers.3.mlp.gate.weight")
        == "model.layers.3.block_sparse_moe.gate.weight"
    )
    assert (
        canonical_name("MixtralForCausalLM", "model.layers.0.mlp.experts.gate_up_proj")
        == "model.layers.0.block_sparse_moe.experts.gate_up_proj"
    )
    assert (
        canonical_name("MixtralForCausalLM", "model.layers.0.self_attn.q_proj.weight")
        == "model.layers.0.self_attn.q_proj.weight"
    )
    assert (
        canonical_name("Qwen3MoeForCausalLM", "model.layers.3.mlp.gate.weight")
        == "model.layers.3.mlp.gate.weight"
    )


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("fused-errors")
    original = build_tiny_moe("qwen3_moe", root / "orig")
    model, _, _ = _masked_model(original)
    return original, {k: v.clone() for k, v in model.state_dict().items()}


def test_fused_tensors_of_the_wrong_shape_are_named(qwen3, tmp_path: Path) -> None:
    original, state = qwen3[0], dict(qwen3[1])
    name = "model.layers.1.mlp.experts.down_proj"
    state[name] = state[name][:, :, :10]
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj .*down_proj \[8, 64, 10\]"
    ):
        StateDictSource(original, state, "bad.pt")


def test_half_a_fused_pair_is_refused(qwen3) -> None:
    original, state = qwen3[0], dict(qwen3[1])
    del state["model.layers.0.mlp.experts.down_proj"]
    with pytest.raises(KeyError, match=r"experts\.gate_up_proj' is stored but .*experts\.down_proj"):
        StateDictSource(original, state, "half.pt")


def test_missing_experts_are_named_by_layer(qwen3) -> None:
    original, state = qwen3[0], dict(qwen3[1])
    del state["model.layers.1.mlp.experts.down_proj"], state["model.layers.1.mlp.experts.gate_up_proj"]
    with pytest.raises(KeyError, match="routed experts of layer 1 are missing"):
        StateDictSource(original, state, "partial.pt")
