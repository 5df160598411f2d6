"""vLLM with the camera plugin refuses every checkpoint of the catalogue, naming the problem.

All bad checkpoints go through ONE subprocess (``tests/integration/vllm_driver.py``) that builds vLLM's engine
config for each, with weight tracking on, exactly as ``vllm serve`` / ``LLM(...)`` do before
any engine process starts.  For every case that reaches the plugin the error must carry
the same fragments ``camera-vllm validate`` prints, and its traceback must pass through
``camera_vllm/vllm_plugin/`` (the refusal is the plugin's, not an accident elsewhere).
Cases that fail earlier in vLLM/transformers (config.json missing or not JSON,
quantization_config not a dict) must still fail, with their own words.

Also ``--quantization`` contradicting the checkpoint: fp8 on a CAMERA checkpoint, camera on
a plain model.  The good P and Q checkpoints must pass (so a refusal means something).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hardening_catalogue import CASES
from integration.integration_helpers import run_engines, vllm_env

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

PLUGIN_DIR = "camera_vllm/vllm_plugin/"
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def refusals(good: dict[str, Path], source: Path, tmp_path_factory: pytest.TempPathFactory):
    """(expected fragments per id, vLLM's results) for the catalogue plus the --quantization cases."""
    root = tmp_path_factory.mktemp("vllm-refuse")
    manifest, expected = [], {}
    for case in CASES:
        bad = Path(shutil.copytree(good[case.base], root / case.id))
        fragments = case.corrupt(bad)
        expected[case.id] = (case.vllm_fragments or fragments, not case.before_plugin)
        manifest.append({"id": case.id, "model": str(bad), "quantization": case.quantization})
    extra = [
        ("good_p", good["P"], None),
        ("good_q", good["Q"], None),
        ("good_q_explicit_camera", good["Q"], "camera"),
        ("fp8_on_camera_checkpoint", good["P"], "fp8"),
        ("camera_on_plain_model", source, "camera"),
    ]
    manifest += [{"id": i, "model": str(m), "quantization": q} for i, m, q in extra]
    # vLLM's engine config only (what `vllm serve` and LLM(...) build before any engine process
    # starts: the plugin's CameraConfig checks the checkpoint there), each refusal recorded.
    engines = [
        {
            "id": e["id"],
            "model": e["model"],
            "stage": "config",
            "engine": {"quantization": e["quantization"], "enforce_eager": True},
            "capture_errors": True,
        }
        for e in manifest
    ]
    data = run_engines(engines, root, "results", vllm_env("qwen2_moe"), TIMEOUT_S, "vLLM config building")
    assert data["camera_registered"], "the camera quantization method was not registered (entry point?)"
    return expected, {i: _outcome(run) for i, run in data["runs"].items()}


def _outcome(run: dict) -> dict:
    """A config build as the tests read it: ``ok`` and vLLM's quantization, or the refusal's
    exception types, message and ``(file, function)`` frames through every wrapped cause."""
    if "error" in run:
        return {"ok": False, "types": run["types"], "message": run["message"], "frames": run["chain_frames"]}
    return {"ok": True, **run}


def _through_plugin(result: dict) -> bool:
    """Raised as a CameraFormatError through a frame of the plugin package (pydantic wraps it)."""
    return "CameraFormatError" in result["types"] and any(PLUGIN_DIR in f for f, _ in result["frames"])


def test_good_checkpoints_pass(refusals) -> None:
    _, results = refusals
    for key in ("good_p", "good_q", "good_q_explicit_camera"):
        assert results[key]["ok"], f"{key}: {results[key].get('message')}"
        assert results[key]["quantization"] == "camera"
        assert results[key]["quant_config"].startswith("camera_vllm.vllm_plugin.")


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_vllm_refuses(case_id: str, refusals) -> None:
    expected, results = refusals
    fragments, via_plugin = expected[case_id]
    result = results[case_id]
    assert not result["ok"], f"{case_id}: vLLM accepted a broken checkpoint"
    for fragment in fragments:
        assert fragment in result["message"], f"{case_id}: {fragment!r} not in\n{result['message']}"
    if via_plugin:
        assert _through_plugin(result), f"{case_id}: refused outside the plugin:\n{result['message']}"


def test_quantization_argument_contradicting_the_checkpoint(refusals) -> None:
    _, results = refusals
    fp8 = results["fp8_on_camera_checkpoint"]
    assert not fp8["ok"]
    assert "(camera) does not match" in fp8["message"] and "(fp8)" in fp8["message"]
    plain = results["camera_on_plain_model"]
    assert not plain["ok"]
    assert "--quantization camera needs a CAMERA checkpoint" in plain["message"]
    assert _through_plugin(plain)
