"""``camera-vllm quantize`` end to end on a tiny model: checkpoint, report, plots, validate, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from calib_helpers import calib_args, write_calib_jsonl

from camera_vllm.cli import main
from camera_vllm.format import names
from camera_vllm.testing.tiny_models import build_tiny_moe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cliq")
    model = build_tiny_moe("qwen2_moe", root / "model", seed=4)
    calib = write_calib_jsonl(root / "calib.jsonl")
    return root, model, calib


def test_quantize_writes_checkpoint_report_and_plots(setup, capsys) -> None:
    root, model, calib = setup
    out = root / "q"
    rc = main(
        [
            "quantize",
            str(model),
            "--out",
            str(out),
            "--avg-bits",
            "2.75",
            "--bits",
            "4,2,1",
            "--group-size",
            "32",
            "--prune-ratio",
            "0.1",
            "--alpha",
            "0.8",
            "--save-scores",
            str(root / "scores.safetensors"),
            *calib_args(calib),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"CAMERA-Q checkpoint: {out.resolve()}" in printed
    report = json.loads((out / names.REPORT_FILE).read_text())
    assert report["method"] == "CAMERA-Q" and report["architecture"] == "Qwen2MoeForCausalLM"
    s = report["settings"]
    assert (s["avg_bits"], s["bits"], s["group_size"], s["method"], s["scope"]) == (
        2.75,
        [4, 2, 1],
        32,
        "gptq",
        "layer",
    )
    assert s["prune_ratio"] == 0.1 and s["alpha"] == 0.8 and report["calibration_tokens"] == 4 * 32
    assert 2.7 <= report["avg_bits_achieved"] <= 2.75
    assert f"{report['avg_bits_achieved']:.4f} bits per expert weight" in printed
    n = 8 * 64 + 96
    for info in report["layers"].values():
        assert info["micro_experts_by_bits"]["0"] == info["removed"] == round(0.1 * n)
        assert set(info) >= {"expert_slabs", "shared_slabs", "avg_bits", "expert_bytes", "output_rel_error"}
    assert sorted(report["plots"]) == [
        "camera_report_bits.png",
        "camera_report_energy.png",
        "camera_report_widths.png",
    ]
    for png in report["plots"]:
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    qc = json.loads((out / names.CONFIG_FILE).read_text())["quantization_config"]
    assert qc["scheme"] == "mixed" and qc["compression"]["method"] == "camera-q"
    assert qc["compression"]["quant_algorithm"] == "gptq" and qc["compression"]["calibration"]["files"] == [
        calib.name
    ]
    assert set(qc["bits"]) <= {4, 2, 1}
    assert (root / "scores.safetensors").is_file()
    assert main(["validate", str(out)]) == 0
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # after validate's line
    assert summary["totals"]["stored_bytes"] == report["expert_bytes"]
    assert summary["totals"]["bits_per_original_weight"] == pytest.approx(report["avg_bits_achieved"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--avg-bits", "3", "--group-size", "48"], "multiple of 32"),
        (["--fractions", "0.5,0.5"], "--fractions needs --bits"),
        (["--bits", "4,2", "--fractions", "0.5,0.6", "--group-size", "32"], "sum to 1"),
        (["--avg-bits", "0.5", "--group-size", "32"], "unreachable"),
    ],
)
def test_quantize_rejects_bad_settings(setup, capsys, extra: list[str], message: str) -> None:
    root, model, calib = setup
    rc = main(["quantize", str(model), "--out", str(root / "bad"), *extra, *calib_args(calib)])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (root / "bad").exists()


def test_avg_bits_and_fractions_are_exclusive(setup) -> None:
    root, model, calib = setup
    with pytest.raises(SystemExit):
        main(
            [
                "quantize",
                str(model),
                "--out",
                str(root / "x"),
                "--avg-bits",
                "3",
                "--fractions",
                "1",
                *calib_args(calib),
            ]
        )
