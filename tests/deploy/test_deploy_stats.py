"""/camera/stats: the pure summary and the vLLM endpoint plugin, without starting vLLM.

The plugin is exercised through the same two calls vLLM 0.32's API server makes
(``attach_router`` in ``build_app``, ``init_state`` in ``init_app_state``), on a bare
FastAPI app with FastAPI's TestClient.
"""

from __future__ import annotations

import asyncio
import json
from argparse import Namespace
from importlib.metadata import entry_points

import pytest

from camera_vllm.format.schema import CameraFormatError
from camera_vllm.vllm_plugin import stats_api
from camera_vllm.vllm_plugin.stats_api import (
    STATS_PATH,
    CameraStatsPlugin,
    NotACameraCheckpoint,
    summarize_camera_config,
)

H = 64


def _mixed_config() -> dict:
    """A CAMERA-Q config.json (bf16, hidden 64, group 32), bytes worked out by hand below."""
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "hidden_size": H,
        "dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "CAMERA",  # vLLM lowercases; so must we
            "format_version": 1,
            "scheme": "mixed",
            "bits": [4, 2],
            "group_size": 32,
            "architecture": "Qwen2MoeForCausalLM",
            "num_experts": 2,
            "original_intermediate_size": 64,
            "original_shared_intermediate_size": 96,
            "layers": {"0": {"expert_slabs": [[8, 16], [0, 0]], "shared_slabs": [32, 32]}},
            "compression": {"method": "camera", "alpha": 0.5},
        },
    }


def _prune_config(widths: list[list[int]], dtype: str = "float32") -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": H,
        "torch_dtype": dtype,
        "quantization_config": {
            "quant_method": "camera",
            "format_version": 1,
            "scheme": "prune",
            "bits": [16],
            "architecture": "Qwen3MoeForCausalLM",
            "num_experts": len(widths[0]),
            "original_intermediate_size": 64,
            "layers": {str(i): {"expert_slabs": [[w] for w in ws]} for i, ws in enumerate(widths)},
        },
    }


def test_deploy_stats_mixed_bytes_match_hand_count():
    s = summarize_camera_config(_mixed_config())
    assert s["format_version"] == 1 and s["scheme"] == "mixed" and s["bits"] == [4, 2]
    assert s["checkpoint_dtype"] == "bfloat16" and s["hidden_size"] == H
    (layer,) = s["layers"]

    # Expert 0: 8 micro-experts at 4 bits + 16 at 2 bits; expert 1 pruned away entirely.
    # gate/up slab (K=H=64, G=32): qweight 2*b rows x n int32 + scales/zeros 2 x n fp16 each;
    # down slab (K=n): ceil(n/32)*b rows x 64 int32 + 2 x ceil(n/32) x 64 fp16.
    def slab(n, b):  # bytes of one slab: gate + up + down
        gate_up = 2 * (8 * b * n + 8 * n)
        down = ((n + 31) // 32) * (b * 64 * 4 + 2 * 64 * 2)
        return gate_up + down

    expert0 = slab(8, 4) + slab(16, 2)
    shared = slab(32, 4) + slab(32, 2)
    assert (expert0, shared) == (3456, 6144)
    original = 2 * 3 * H * 64 * 2 + 3 * H * 96 * 2
    assert layer["stored_bytes"] == expert0 + shared
    assert layer["original_bytes"] == original
    assert layer["bytes_saved"] == original - expert0 - shared
    assert layer["expert_width"] == {"min": 0, "max": 24, "mean": 12.0, "total": 24}
    assert layer["empty_experts"] == 1
    assert layer["micro_experts_by_bits"] == {"4": 8, "2": 16}
    assert layer["shared_width"] == 64 and layer["shared_micro_experts_by_bits"] == {"4": 32, "2": 32}
    assert layer["kept_fraction"] == pytest.approx(24 / 128)
    kept_weights = 3 * H * (24 + 64)
    assert layer["effective_bits_per_kept_weight"] == pytest.approx(8 * (expert0 + shared) / kept_weights)
    t = s["totals"]
    assert t["bytes_saved"] == original - 9600 and t["stored_bytes"] == 9600
    assert t["compression_ratio"] == pytest.approx(original / 9600)
    assert t["kept_shared_micro_experts"] == 64 and t["original_shared_micro_experts"] == 96
    assert s["compression"] == {"method": "camera", "alpha": 0.5}
    json.dumps(s)  # JSON-serialisable as is


def test_deploy_stats_prune_widths_and_bytes():
    s = summarize_camera_config(_prune_config([[64, 48, 32, 0], [16, 16, 16, 16]]))
    assert s["scheme"] == "prune" and s["num_moe_layers"] == 2 and s["checkpoint_dtype"] == "float32"
    l0, l1 = s["layers"]
    assert l0["stored_bytes"] == 3 * H * (64 + 48 + 32) * 4
    assert l0["original_bytes"] == 4 * 3 * H * 64 * 4
    assert l0["effective_bits_per_kept_weight"] == pytest.approx(32.0)
    assert l1["expert_width"]["mean"] == 16 and l1["empty_experts"] == 0
    assert s["totals"]["kept_micro_experts"] == 144 + 64
    assert s["totals"]["micro_experts_by_bits"] == {"16": 208}
    assert "expert_widths" not in l0
    detailed = summarize_camera_config(_prune_config([[64, 48, 32, 0]]), experts=True)
    assert detailed["layers"][0]["expert_widths"] == [64, 48, 32, 0]


def test_deploy_stats_without_hidden_size_reports_no_bytes():
    cfg = _prune_config([[8, 8]])
    del cfg["hidden_size"]
    s = summarize_camera_config(cfg)
    assert s["totals"]["bytes_saved"] is None and s["layers"][0]["stored_bytes"] is None
    assert s["layers"][0]["expert_width"]["total"] == 16


def test_deploy_stats_rejects_non_camera_and_invalid():
    with pytest.raises(NotACameraCheckpoint):
        summarize_camera_config({"hidden_size": 8})
    with pytest.raises(NotACameraCheckpoint):
        summarize_camera_config({"quantization_config": {"quant_method": "awq"}})
    bad = _prune_config([[8, 8]])
    bad["quantization_config"]["format_version"] = 99
    with pytest.raises(CameraFormatError, match="format_version"):
        summarize_camera_config(bad)


# ------------------------------------------------------------------------------------------------
# The endpoint plugin on a bare FastAPI app
# ------------------------------------------------------------------------------------------------
def _app(model_dir, api_key=None):
    from fastapi import FastAPI

    app = FastAPI()
    plugin = CameraStatsPlugin()
    # What vLLM's load_endpoint_plugins checks before attaching.
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin

    assert isinstance(plugin, EndpointPlugin)
    plugin.attach_router(app)
    args = Namespace(model=str(model_dir), api_key=[api_key] if api_key else None, served_model_name=["tiny"])
    app.state.args = args
    asyncio.run(plugin.init_state(None, app.state, args))
    return app


def test_deploy_stats_endpoint_serves_json(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.delenv(stats_api.PUBLIC_ENV, raising=False)
    (tmp_path / "config.json").write_text(json.dumps(_mixed_config()))
    client = TestClient(_app(tmp_path, api_key="s3cret"))
    assert client.get(STATS_PATH).status_code == 401
    assert client.get(STATS_PATH, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.get(STATS_PATH, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["format_version"] == 1 and body["totals"]["stored_bytes"] == 9600
    assert body["model"]["path"] == str(tmp_path) and body["model"]["served_model_name"] == ["tiny"]
    assert "expert_widths" not in body["layers"][0]
    r = client.get(STATS_PATH + "?experts=true", headers={"Authorization": "Bearer s3cret"})
    assert r.json()["layers"][0]["expert_slabs"] == [[8, 16], [0, 0]]
    assert STATS_PATH in client.get("/openapi.json").json()["paths"]


def test_deploy_stats_endpoint_key_from_env_and_public_switch(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    (tmp_path / "config.json").write_text(json.dumps(_prune_config([[8, 8]])))
    monkeypatch.setenv("VLLM_API_KEY", "envkey")
    monkeypatch.delenv(stats_api.PUBLIC_ENV, raising=False)
    client = TestClient(_app(tmp_path))
    assert client.get(STATS_PATH).status_code == 401
    assert client.get(STATS_PATH, headers={"Authorization": "Bearer envkey"}).status_code == 200
    monkeypatch.setenv(stats_api.PUBLIC_ENV, "1")
    assert TestClient(_app(tmp_path)).get(STATS_PATH).status_code == 200


def test_deploy_stats_endpoint_non_camera_is_404(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8, "architectures": ["X"]}))
    r = TestClient(_app(tmp_path)).get(STATS_PATH)
    assert r.status_code == 404 and "not a CAMERA checkpoint" in r.json()["error"]["message"]


def test_deploy_stats_endpoint_uses_engine_model_config_for_hub_ids(monkeypatch):
    """A hub id is not a directory: the config vLLM loaded (ModelConfig.hf_config) is used."""
    monkeypatch.delenv("VLLM_API_KEY", raising=False)

    class HFConfig:
        def to_dict(self):
            return _prune_config([[32, 64]])

    engine = Namespace(
        model_config=Namespace(model="org/tiny-camera", hf_config=HFConfig(), served_model_name="tiny-camera")
    )
    s = stats_api.collect_stats(engine, Namespace(model="org/tiny-camera"))
    assert s["model"] == {
        "path": "org/tiny-camera",
        "served_model_name": ["tiny-camera"],
        "config_source": "vllm ModelConfig.hf_config",
    }
    assert s["layers"][0]["expert_width"]["total"] == 96
    assert s["expert_backend"]["camera_q"] in ("triton", "cpu", "reference")


@pytest.mark.parametrize(
    ("setting", "device", "want"),
    [
        ("", "cuda", "triton"),
        ("", "cpu", "cpu"),
        ("", "xpu", "reference"),
        ("reference", "cuda", "reference"),
        ("triton", "cpu", "triton"),
    ],
)
def test_deploy_stats_names_the_expert_backend(monkeypatch, setting, device, want):
    monkeypatch.setenv("CAMERA_VLLM_BACKEND", setting)
    got = stats_api.expert_backends(device)
    assert got["camera_q"] == want and got["setting"] == (setting or "auto") and got["device"] == device
    # CAMERA-P runs on the same kernels (a dense slab) except on CPU under auto.
    on_slabs = got["camera_p"] == f"{want} on a 16-bit dense slab"
    assert on_slabs is (device != "cpu" or bool(setting)), got["camera_p"]


def test_deploy_stats_endpoint_plugin_entry_point_declared():
    """The installed camera-vllm must declare the endpoint plugin (pyproject.toml)."""
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.endpoint_plugins")}
    assert eps.get("camera_stats") == "camera_vllm.vllm_plugin.stats_api:CameraStatsPlugin", (
        'pyproject.toml lacks [project.entry-points."vllm.endpoint_plugins"] '
        'camera_stats = "camera_vllm.vllm_plugin.stats_api:CameraStatsPlugin" (then reinstall)'
    )


def test_deploy_stats_for_a_zero_masked_model_under_load_format_camera(tmp_path):
    """--load-format camera serves a directory without quantization_config: the stats describe
    the CAMERA-P config the workers derive from its zeros; without that flag it is not CAMERA."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from camera_vllm.testing.tiny_models import build_tiny_moe

    orig = build_tiny_moe("qwen2_moe", tmp_path / "orig")
    masked = tmp_path / "masked"
    shutil.copytree(orig, masked)
    sd = load_file(str(orig / "model.safetensors"))
    layer1 = "model.layers.1.mlp.experts"
    for name in list(sd):
        if name.startswith(f"{layer1}.3."):  # a whole expert pruned
            sd[name] = torch.zeros_like(sd[name])
    for proj in ("gate_proj", "up_proj"):  # 10 channels of expert 1
        sd[f"{layer1}.1.{proj}.weight"][:10] = 0
    sd[f"{layer1}.1.down_proj.weight"][:, :10] = 0
    save_file(sd, str(masked / "model.safetensors"), metadata={"format": "pt"})

    def engine(load_format):
        return Namespace(
            model_config=Namespace(model=str(masked), served_model_name=None),
            vllm_config=Namespace(load_config=Namespace(load_format=load_format)),
        )

    s = stats_api.collect_stats(engine("camera"), Namespace(model=str(masked)))
    width = 64  # tiny qwen2_moe moe_intermediate_size
    by_layer = {entry["layer"]: entry for entry in s["layers"]}
    assert by_layer[0]["expert_width"]["total"] == 8 * width
    assert by_layer[1]["expert_width"] == {
        "min": 0,
        "max": width,
        "mean": (7 * width - 10) / 8,
        "total": 7 * width - 10,
    }
    assert "zero-mask scan" in s["model"]["config_source"]
    with pytest.raises(stats_api.NotACameraCheckpoint):
        stats_api.collect_stats(engine("auto"), Namespace(model=str(masked)))


def test_deploy_load_summary_line(monkeypatch):
    """The one INFO line a served model logs at start names the scheme, layers, size and backend."""
    from camera_vllm.vllm_plugin.config import load_summary

    monkeypatch.setenv("CAMERA_VLLM_BACKEND", "triton")
    line = load_summary("m", _mixed_config())
    s = summarize_camera_config(_mixed_config())
    assert line.startswith("camera-vllm: serving m: CAMERA-Q, 1 MoE layers, bits [4, 2] (group 32)")
    assert f"({s['totals']['compression_ratio']:.2f}x)" in line and line.endswith("experts on triton")
    monkeypatch.setenv("CAMERA_VLLM_BACKEND", "reference")
    line = load_summary("p", _prune_config([[32, 64]]))
    assert "CAMERA-P" in line and "75.0 % of micro-experts kept" in line
    assert line.endswith("experts on reference on a 16-bit dense slab")
