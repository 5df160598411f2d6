"""Converting zero-masked pruning output (the CAMERA reference code's) into CAMERA-P."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from camera_vllm.checkpoint.source import SourceCheckpoint
from camera_vllm.checkpoint.zero_mask import zero_channel_keep
from camera_vllm.cli import main as cli_main
from camera_vllm.compress.convert import convert_zero_masked
from camera_vllm.format.validate import validate
from camera_vllm.testing.tiny_models import build_tiny_moe


def _mask(sd: dict[str, torch.Tensor], arch: str) -> dict[str, list[int]]:
    """Zero micro-experts the way the reference code does; returns the widths expected."""
    src_prefix = "model.layers.1.mlp"
    # Expert 3 loses every channel; expert 1 loses channels 0..9; the shared expert 5 channels.
    for k in list(sd):
        if f"{src_prefix}.experts.3." in k:
            sd[k] = torch.zeros_like(sd[k])
        if f"{src_prefix}.experts.1.gate_proj" in k or f"{src_prefix}.experts.1.up_proj" in k:
            sd[k][:10] = 0
        if f"{src_prefix}.experts.1.down_proj" in k:
            sd[k][:, :10] = 0
        if f"{src_prefix}.shared_expert.gate_proj" in k or f"{src_prefix}.shared_expert.up_proj" in k:
            sd[k][5:10] = 0
        if f"{src_prefix}.shared_expert.down_proj" in k:
            sd[k][:, 5:10] = 0
    # Expert 2: channel 0 only has a zero gate row: not pruned (all three must be zero).
    sd[f"{src_prefix}.experts.2.gate_proj.weight"][0] = 0
    return {"1": [64, 54, 64, 0, 64, 64, 64, 64], "shared": [91]}


class Evil:
    """An arbitrary class: unpickling it needs code, which weights_only=True refuses."""


@pytest.fixture(scope="module")
def masked(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], dict]:
    root = tmp_path_factory.mktemp("convert")
    model = build_tiny_moe("qwen2_moe", root / "orig")
    sd = load_file(str(model / "model.safetensors"))
    expected = _mask(sd, "qwen2_moe")
    return model, sd, expected


def test_zero_channel_keep_requires_all_three_vectors_zero() -> None:
    gate, up, down = torch.ones(4, 3), torch.ones(4, 3), torch.ones(3, 4)
    gate[0] = 0
    gate[1], up[1], down[:, 1] = 0, 0, 0
    assert zero_channel_keep(gate, up, down).tolist() == [0, 2, 3]


def test_convert_state_dict_file(masked, tmp_path: Path) -> None:
    model, sd, expected = masked
    pt = tmp_path / "prune_model_dict.pt"
    torch.save(sd, pt)
    out = convert_zero_masked(model, tmp_path / "out", state_dict_path=pt)
    report = validate(out)
    assert report.ok, report
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert [s[0] for s in layers["1"]["expert_slabs"]] == expected["1"]
    assert layers["1"]["shared_slabs"] == expected["shared"]
    assert [s[0] for s in layers["0"]["expert_slabs"]] == [64] * 8
    # The kept channels carry the masked model's values, in order.
    conv = load_file(str(out / "model.safetensors"))
    kept = conv["model.layers.1.mlp.experts.1.down_proj.weight"]
    torch.testing.assert_close(
        kept, sd["model.layers.1.mlp.experts.1.down_proj.weight"][:, 10:], rtol=0, atol=0
    )
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" not in conv


def test_convert_zero_masked_directory_via_cli(masked, tmp_path: Path) -> None:
    model, sd, expected = masked
    masked_dir = tmp_path / "masked"
    masked_dir.mkdir()
    for f in model.iterdir():
        if f.suffix != ".safetensors":
            (masked_dir / f.name).write_bytes(f.read_bytes())
    save_file(sd, str(masked_dir / "model.safetensors"), metadata={"format": "pt"})
    assert cli_main(["convert", str(masked_dir), "--out", str(tmp_path / "out")]) == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert [s[0] for s in cfg["layers"]["1"]["expert_slabs"]] == expected["1"]
    assert SourceCheckpoint(masked_dir).arch.num_experts == 8


def test_convert_rejects_a_pickle_that_is_not_a_state_dict(masked, tmp_path: Path) -> None:
    model, _, _ = masked
    bad = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_zero_masked(model, tmp_path / "out", state_dict_path=bad)
    assert not (tmp_path / "out").exists()


def test_convert_names_missing_tensors(masked, tmp_path: Path) -> None:
    model, sd, _ = masked
    partial = {k: v for k, v in sd.items() if "layers.1." not in k}
    pt = tmp_path / "partial.pt"
    torch.save(partial, pt)
    with pytest.raises(KeyError, match="missing from the state dict"):
        convert_zero_masked(model, tmp_path / "out", state_dict_path=pt)
