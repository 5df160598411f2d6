"""Every checkpoint of the catalogue is refused by ``camera-vllm validate``, naming the culprit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hardening_catalogue import CASE_IDS, CASES, by_id, edit_qc, qc_of

from camera_vllm.cli import main
from camera_vllm.format.schema import CameraFormatError
from camera_vllm.format.validate import validate
from camera_vllm.vllm_plugin.serving_guard import validate_for_serving


def test_good_checkpoints_validate_cleanly(good: dict[str, Path]) -> None:
    for kind, path in good.items():
        report = validate(path)
        assert report.ok and not report.warnings, f"{kind}: {report}"
        assert report.tensors_checked > 0
        assert validate_for_serving(path) is not None
    qc = qc_of(good["P"])
    assert [w for [w] in qc["layers"]["0"]["expert_slabs"]][5] == 0  # the width-0 expert the catalogue uses
    assert qc_of(good["Q"])["bits"] == [4, 2]


def test_catalogue_is_large_and_covers_both_schemes() -> None:
    assert len(CASES) >= 40
    assert {c.base for c in CASES} == {"P", "Q"}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_validate_refuses(case_id: str, good: dict[str, Path], tmp_path: Path, capsys) -> None:
    case = by_id(case_id)
    bad = Path(shutil.copytree(good[case.base], tmp_path / case_id))
    fragments = case.corrupt(bad)
    assert main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "error(s)" in out
    for fragment in fragments:
        assert fragment in out, f"{case_id}: {fragment!r} not in\n{out}"
    # The serving hook refuses it with the same words.
    with pytest.raises(CameraFormatError) as err:
        validate_for_serving(bad)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert f"refusing to serve {bad}" in str(err.value)


def test_unused_bit_width_is_a_warning(good_q: Path, tmp_path: Path, capsys) -> None:
    d = Path(shutil.copytree(good_q, tmp_path / "q"))

    def change(qc: dict) -> None:
        qc["bits"].append(1)
        for spec in qc["layers"].values():
            spec["expert_slabs"] = [s + [0] for s in spec["expert_slabs"]]
            spec["shared_slabs"] = spec["shared_slabs"] + [0]

    edit_qc(d, change)
    report = validate(d)
    assert report.ok, str(report)
    assert report.warnings == [
        "config.json: quantization_config.bits lists width(s) [1] that no slab of any layer uses"
    ]
    assert main(["validate", str(d)]) == 0
    assert "warning: config.json: quantization_config.bits lists width(s) [1]" in capsys.readouterr().out


def test_value_scan_can_be_skipped_for_serving(good_p: Path, tmp_path: Path, monkeypatch) -> None:
    """CAMERA_VALIDATE_VALUES=0 skips only the value scan; structure is still checked."""
    d = Path(shutil.copytree(good_p, tmp_path / "p"))
    by_id("nan_in_expert_weight").corrupt(d)
    monkeypatch.setenv("CAMERA_VALIDATE_VALUES", "0")
    assert validate_for_serving(d) is not None
    monkeypatch.setenv("CAMERA_VALIDATE_VALUES", "1")
    with pytest.raises(CameraFormatError, match="NaN/inf"):
        validate_for_serving(d)
    monkeypatch.setenv("CAMERA_VALIDATE_VALUES", "0")
    by_id("missing_router").corrupt(d)
    with pytest.raises(CameraFormatError, match="model.layers.1.mlp.gate.weight: missing"):
        validate_for_serving(d)


def test_console_script_exit_codes(good_p: Path, tmp_path: Path) -> None:
    """The real process: exit 0 on the good checkpoint, 1 on a bad one, message on stdout."""
    bad = Path(shutil.copytree(good_p, tmp_path / "bad"))
    fragments = by_id("shared_expert_deleted_and_undescribed").corrupt(bad)
    script = [sys.executable, "-m", "camera_vllm.cli", "validate"]
    ok = subprocess.run([*script, str(good_p)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and f"{good_p}: OK" in ok.stdout
    res = subprocess.run([*script, str(bad), "--no-values"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    for fragment in fragments:
        assert fragment in res.stdout
    layer0 = json.loads((bad / "config.json").read_text())["quantization_config"]["layers"]["0"]
    assert "shared_slabs" not in layer0


def test_foreign_quant_method_on_a_camera_config_is_refused(good_p: Path) -> None:
    """What the plugin's override_quantization_method hook calls: CAMERA-shaped + other quant_method."""
    from camera_vllm.vllm_plugin.serving_guard import refuse_foreign_quant_method

    qc = qc_of(good_p)
    refuse_foreign_quant_method(qc)  # a CAMERA config: fine
    refuse_foreign_quant_method({"quant_method": "gptq", "bits": 4, "group_size": 128})  # a real GPTQ one
    refuse_foreign_quant_method(["not", "a", "dict"])
    with pytest.raises(CameraFormatError, match="quant_method is 'gptq', not 'camera'"):
        refuse_foreign_quant_method({**qc, "quant_method": "gptq"})


@pytest.mark.parametrize(
    "change",
    [
        lambda cfg: cfg.update(hidden_size="64"),
        lambda cfg: cfg.pop("num_hidden_layers"),
        lambda cfg: cfg.update(architectures=[]),
        lambda cfg: cfg.update(architectures="Qwen2MoeForCausalLM"),
        lambda cfg: cfg.update(num_experts=None),
        lambda cfg: cfg.update(vocab_size="320"),
        lambda cfg: cfg["quantization_config"].update(layers=None),
        lambda cfg: cfg["quantization_config"].update(bits="4,2"),
        lambda cfg: cfg["quantization_config"]["layers"]["0"].update(expert_slabs=[[1.5, 2]] * 8),
        lambda cfg: cfg.update(quantization_config="camera"),
    ],
    ids=[
        "hidden_size_str", "no_num_hidden_layers", "no_architectures", "architectures_str",
        "num_experts_null", "vocab_size_str", "layers_null", "bits_str", "fractional_slab", "qc_str",
    ],
)  # fmt: skip
def test_validate_reports_instead_of_crashing(change, good_q: Path, tmp_path: Path) -> None:
    """Garbage in config.json gives errors in the report, never an exception out of validate()."""
    d = Path(shutil.copytree(good_q, tmp_path / "q"))
    cfg = json.loads((d / "config.json").read_text())
    change(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    report = validate(d)
    assert not report.ok
    prefixes = ("config.json", "tensor", "model.safetensors")
    assert all(e.startswith(prefixes) for e in report.errors), report.errors
