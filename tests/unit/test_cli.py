"""camera-vllm CLI end to end on a tiny model: analyze, prune (report + plots), validate, inspect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from calib_helpers import calib_args, write_calib_jsonl
from safetensors import safe_open

from camera_vllm.cli import main
from camera_vllm.format import names
from camera_vllm.testing.tiny_models import build_tiny_moe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    model = build_tiny_moe("deepseek_v2", root / "model", seed=2)
    calib = write_calib_jsonl(root / "calib.jsonl")
    return root, model, calib


@pytest.fixture(scope="module")
def pruned(setup) -> Path:
    root, model, calib = setup
    out = root / "pruned"
    rc = main(
        ["prune", str(model), "--ratio", "0.3", "--out", str(out), "--alpha", "0.8", *calib_args(calib)]
    )
    assert rc == 0
    return out


def test_prune_writes_checkpoint_report_and_plots(pruned: Path) -> None:
    report = json.loads((pruned / names.REPORT_FILE).read_text())
    assert report["method"] == "CAMERA-P" and report["architecture"] == "DeepseekV2ForCausalLM"
    assert report["settings"]["ratio"] == 0.3 and report["settings"]["alpha"] == 0.8
    assert report["settings"]["scope"] == "layer"
    assert report["calibration_tokens"] == 4 * 32
    assert sorted(report["layers"]) == ["1", "2"]
    n = 8 * 32 + 64
    for info in report["layers"].values():
        assert info["removed"] == round(0.3 * n)
        assert sum(info["kept_widths"]) + info["shared_kept"] == n - round(0.3 * n)
    assert report["params"]["experts_after"] < report["params"]["experts_before"]
    assert report["params"]["model_before"] - report["params"]["model_after"] == (
        report["params"]["experts_before"] - report["params"]["experts_after"]
    )
    assert sorted(report["plots"]) == ["camera_report_energy.png", "camera_report_widths.png"]
    for png in report["plots"]:
        assert (pruned / png).read_bytes()[:8] == PNG_MAGIC
    # Tokenizer and generation files travel with the checkpoint.
    assert (pruned / "tokenizer.json").is_file() and (pruned / "generation_config.json").is_file()


def test_validate_and_inspect(pruned: Path, tmp_path: Path, capsys) -> None:
    assert main(["validate", str(pruned)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["inspect", str(pruned)]) == 0
    text = capsys.readouterr().out
    assert "DeepseekV2ForCausalLM" in text and "scheme prune" in text
    assert main(["inspect", str(pruned), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    qc = json.loads((pruned / "config.json").read_text())["quantization_config"]
    by_layer = {info["layer"]: info for info in summary["layers"]}
    assert by_layer[1]["expert_widths"] == [w for [w] in qc["layers"]["1"]["expert_slabs"]]
    # Damage one tensor: validate exits 1 and names it.
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in pruned.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    with safe_open(str(broken / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    victim = names.shared_tensor("DeepseekV2ForCausalLM", 2, 1, "weight")
    tensors[victim][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(tensors, str(broken / "model.safetensors"))
    assert main(["validate", str(broken)]) == 1
    assert f"tensor {victim} has 1 NaN/inf" in capsys.readouterr().out


def test_analyze_writes_scores_and_sidecar(setup, capsys) -> None:
    root, model, calib = setup
    out = root / "scores.safetensors"
    assert main(["analyze", str(model), "--out", str(out), "--normalize-sum", *calib_args(calib)]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["energy"] == {"alpha": 0.9, "normalize_sum": True}
    assert sidecar["settings"]["calibration"]["tokens"] == 4 * 32
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("layers.1.experts.energy").shape == (8, 32)
        assert f.get_tensor("layers.2.shared.energy").shape == (64,)
        assert int(f.get_tensor("layers.1.experts.tokens").sum()) == 4 * 32 * 2
        assert "layers.0.experts.energy" not in f.keys()  # the dense first layer has no experts


def test_errors_exit_2_with_a_message(setup, pruned: Path, capsys) -> None:
    root, model, calib = setup
    assert main(["prune", str(model), "--ratio", "0.3", "--out", str(pruned), *calib_args(calib)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["prune", str(model), "--ratio", "1.5", "--out", str(root / "x"), *calib_args(calib)]) == 2
    assert "ratio must be in [0, 1)" in capsys.readouterr().err
    empty = root / "empty.txt"
    empty.write_text("")
    assert main(["analyze", str(model), "--out", str(root / "s.safetensors"), *calib_args(empty)]) == 2
    assert "empty.txt: calibration file has no text" in capsys.readouterr().err
    # An unwritable --out is an error message before calibration, not a traceback after it.
    assert main(["prune", str(model), "--ratio", "0.3", "--out", "/proc/camera-x", *calib_args(empty)]) == 2
    assert "cannot create the checkpoint under /proc" in capsys.readouterr().err


def test_console_script_help() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "camera_vllm.cli", "--help"], capture_output=True, text=True, check=True
    )
    for cmd in ("analyze", "prune", "validate", "inspect"):
        assert cmd in res.stdout


def test_version(capsys) -> None:
    from camera_vllm import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith(f"camera-vllm {__version__} (checkpoint format ")
    assert "vllm 0.32" in out and "torch " in out


def test_prune_a_cached_hub_id(setup, tmp_path: Path, monkeypatch, capsys) -> None:
    """`camera-vllm prune ORG/NAME` reads the model from the local Hugging Face cache (no network),
    its card names the hub id as base model; offline and not cached is a one-line error."""
    import shutil

    import yaml

    root, model, calib = setup
    cache, commit = tmp_path / "hub", "1" * 40
    entry = cache / "models--org--tiny-moe"
    snap = entry / "snapshots" / commit
    shutil.copytree(model, snap)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    # huggingface_hub reads its environment at import: point its constants at the emulated cache.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    out = tmp_path / "p"
    assert main(["prune", "org/tiny-moe", "--ratio", "0.3", "--out", str(out), *calib_args(calib)]) == 0
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["base_model"] == "org/tiny-moe"
    capsys.readouterr()
    assert (
        main(["prune", "org/absent", "--ratio", "0.3", "--out", str(tmp_path / "q"), *calib_args(calib)]) == 2
    )
    err = capsys.readouterr().err
    assert "org/absent is not (completely) in the local Hugging Face cache" in err and "hf download" in err
    assert (
        main(
            [
                "prune",
                str(tmp_path / "nothing"),
                "--ratio",
                "0.3",
                "--out",
                str(tmp_path / "q"),
                *calib_args(calib),
            ]
        )
        == 2
    )
    assert "not a model directory, and not a hub id" in capsys.readouterr().err
    assert (
        main(
            [
                "prune",
                str(model),
                "--revision",
                "v1",
                "--ratio",
                "0.3",
                "--out",
                str(tmp_path / "q"),
                *calib_args(calib),
            ]
        )
        == 2
    )
    assert "--revision v1 applies to hub ids" in capsys.readouterr().err
