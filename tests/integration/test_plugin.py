"""The vLLM plugin's registration, configuration parsing and error messages (no engine started)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from integration_helpers import quant_config, vllm_env

from camera_vllm.format.schema import CameraFormatError

pytestmark = pytest.mark.vllm  # imports vllm (a few seconds), but starts no engine


def _run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_imports_register_nothing() -> None:
    out = _run(
        "import sys, camera_vllm; print('vllm' in sys.modules);"
        "import camera_vllm.vllm_plugin.config;"
        "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS;"
        "print('camera' in QUANTIZATION_METHODS); import torch;"
        "print(hasattr(torch.ops.camera_vllm, 'moe_slab'))"
    )
    assert out.split() == ["False", "False", "False"]


def test_register_is_idempotent() -> None:
    out = _run(
        "import camera_vllm; camera_vllm.register(); camera_vllm.register();"
        "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config;"
        "from camera_vllm.vllm_plugin.config import CameraConfig;"
        "print(QUANTIZATION_METHODS.count('camera'), get_quantization_config('camera') is CameraConfig)"
    )
    assert out == "1 True"


def test_from_config_errors_are_precise(checkpoints) -> None:
    from camera_vllm.vllm_plugin.config import CameraConfig

    _, pruned = checkpoints("qwen2_moe")
    qc = quant_config(pruned)
    assert CameraConfig.from_config(qc).camera.scheme == "prune"
    bad = {**qc, "format_version": 99}
    with pytest.raises(
        CameraFormatError, match="config.json quantization_config: invalid .*format_version: .*99"
    ):
        CameraConfig.from_config(bad)
    with pytest.raises(CameraFormatError, match="needs a CAMERA checkpoint"):
        CameraConfig()


def test_prefix_routing(checkpoints) -> None:
    from camera_vllm.vllm_plugin.config import CameraConfig, layer_index

    assert layer_index("model.layers.12.mlp.experts") == 12 and layer_index("lm_head") is None
    for arch, shared in (("qwen2_moe", "shared_expert"), ("deepseek_v2", "shared_experts")):
        _, pruned = checkpoints(arch)
        qc = quant_config(pruned)
        cfg = CameraConfig.from_config(qc)
        layer = max(int(k) for k in qc["layers"])
        width = sum(qc["layers"][str(layer)]["shared_slabs"])
        assert cfg.shared_width_for(f"model.layers.{layer}.mlp.{shared}.gate_up_proj") == width
        assert cfg.shared_width_for(f"model.layers.{layer}.mlp.{shared}.down_proj") == width
        assert cfg.shared_width_for(f"model.layers.{layer}.mlp.gate_up_proj") is None
        assert cfg.shared_width_for(f"model.layers.{layer}.self_attn.o_proj") is None
        assert cfg.routed_widths(f"model.layers.{layer}.mlp.experts") == [
            sum(s) for s in qc["layers"][str(layer)]["expert_slabs"]
        ]
    _, pruned = checkpoints("deepseek_v2")
    cfg = CameraConfig.from_config(quant_config(pruned))
    assert cfg.shared_width_for("model.layers.0.mlp.gate_up_proj") is None  # the dense first layer
    with pytest.raises(CameraFormatError, match="no entry for layer 0"):
        cfg.routed_widths("model.layers.0.mlp.experts")


def _engine_config_error(model_dir, quantization: str, arch: str) -> str:
    code = (
        "from vllm.engine.arg_utils import EngineArgs\n"
        "try:\n"
        f"    EngineArgs(model={str(model_dir)!r}, quantization={quantization!r}, dtype='float32',"
        " max_model_len=256).create_engine_config()\n"
        "except Exception as e:\n"
        "    print(type(e).__name__ + ': ' + str(e))\n"
        "else:\n"
        "    print('no error')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=vllm_env(arch),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_mismatching_quantization_is_rejected(checkpoints) -> None:
    _, pruned = checkpoints("qwen3_moe")
    err = _engine_config_error(pruned, "fp8", "qwen3_moe")
    assert "does not match" in err and "camera" in err and "fp8" in err, err


def test_broken_checkpoint_is_refused_before_the_engine_starts(checkpoints, tmp_path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    _, pruned = checkpoints("qwen3_moe")
    bad = shutil.copytree(pruned, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    err = _engine_config_error(bad, "camera", "qwen3_moe")
    assert "refusing to serve" in err and "model.layers.1.mlp.experts.5.up_proj.weight" in err, err


def test_quantization_camera_needs_a_camera_checkpoint(checkpoints) -> None:
    original, _ = checkpoints("qwen3_moe")
    err = _engine_config_error(original, "camera", "qwen3_moe")
    assert "needs a CAMERA checkpoint" in err, err
