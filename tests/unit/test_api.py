"""The Python API (camera_vllm.prune / quantize / analyze): every model form and calibration form
writes the same checkpoint bytes as the CLI on the same inputs; bad input gets a clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from calib_helpers import calib_args, write_calib_jsonl
from safetensors import safe_open

import camera_vllm
from camera_vllm.cli import main
from camera_vllm.compress.calibrate import CalibrationError
from camera_vllm.format import names
from camera_vllm.testing.tiny_models import _CORPUS, build_tiny_moe

# calib_args(): 4 windows of 32 tokens, seed 3, cpu, no progress bar.
RUN = dict(num_seqs=4, seq_len=32, seed=3, device="cpu", progress=False)
Q = dict(bits=[4, 2, 1], fractions=[0.25, 0.5, 0.25], group_size=32, method="rtn", prune_ratio=0.1)
Q_FLAGS = ["--bits", "4,2,1", "--fractions", "0.25,0.5,0.25", "--group-size", "32", "--method", "rtn"]
Q_FLAGS += ["--prune-ratio", "0.1"]


def _weights(ckpt: Path) -> bytes:
    return (ckpt / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("api")
    model = build_tiny_moe("qwen2_moe", root / "model", seed=4)
    calib = write_calib_jsonl(root / "calib.jsonl")
    texts = [json.loads(line)["text"] for line in calib.read_text().splitlines()]
    cli_p, cli_q = root / "cli-p", root / "cli-q"
    assert main(["prune", str(model), "--ratio", "0.3", "--out", str(cli_p), *calib_args(calib)]) == 0
    assert main(["quantize", str(model), "--out", str(cli_q), *Q_FLAGS, *calib_args(calib)]) == 0
    return {"root": root, "model": model, "calib": calib, "texts": texts, "cli_p": cli_p, "cli_q": cli_q}


# -- model forms -----------------------------------------------------------------------------------
def test_prune_from_a_directory_returns_the_cli_checkpoint(setup, tmp_path: Path) -> None:
    res = camera_vllm.prune(str(setup["model"]), 0.3, setup["calib"], tmp_path / "p", **RUN)
    assert res.path == (tmp_path / "p").resolve() and res.method == "camera-p"
    assert _weights(res.path) == _weights(setup["cli_p"])
    for name in (names.CONFIG_FILE, "tokenizer.json"):
        assert (res.path / name).read_bytes() == (setup["cli_p"] / name).read_bytes(), name
    # The result carries inspect's summary and the report.
    n = 8 * 64 + 96
    assert res.report["method"] == "CAMERA-P" and res.report["settings"]["ratio"] == 0.3
    routed_kept = sum(sum(info["kept_widths"]) for info in res.report["layers"].values())
    assert res.summary["totals"]["kept_micro_experts"] == routed_kept
    assert res.kept_fraction == pytest.approx(routed_kept / (2 * 8 * 64))
    assert all(info["removed"] == round(0.3 * n) for info in res.report["layers"].values())


def test_prune_an_in_memory_model(setup, tmp_path: Path) -> None:
    """Saved to a temporary directory for the call; the tokenizer comes from where it was loaded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(setup["model"]))
    res = camera_vllm.prune(model, 0.3, setup["calib"], tmp_path / "p", **RUN)
    assert _weights(res.path) == _weights(setup["cli_p"])
    assert (res.path / "tokenizer.json").is_file()


def test_in_memory_model_without_tokenizer_takes_token_ids(setup, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(setup["model"]))
    bare = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(setup["model"])))
    bare.load_state_dict(loaded.state_dict())  # same weights, and no directory to find a tokenizer in
    bare.name_or_path = bare.config._name_or_path = ""
    tok = AutoTokenizer.from_pretrained(str(setup["model"]))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in setup["texts"]]
    with pytest.raises(CalibrationError, match="has no tokenizer"):
        camera_vllm.prune(bare, 0.3, setup["texts"], tmp_path / "x", **RUN)
    # Documents are separated by config.json's eos_token_id, the tokenizer's EOS here.
    assert tok.eos_token_id == json.loads((setup["model"] / "config.json").read_text())["eos_token_id"]
    res = camera_vllm.prune(bare, 0.3, ids, tmp_path / "p", **RUN)
    assert _weights(res.path) == _weights(setup["cli_p"])
    # ... and with tokenizer= it also takes text, and the checkpoint gets the tokenizer.
    res = camera_vllm.prune(bare, 0.3, setup["texts"], tmp_path / "t", tokenizer=tok, **RUN)
    assert _weights(res.path) == _weights(setup["cli_p"]) and (res.path / "tokenizer.json").is_file()


def test_prune_a_cached_hub_id(setup, tmp_path: Path, monkeypatch) -> None:
    cache, commit = tmp_path / "hub", "2" * 40
    entry = cache / "models--org--tiny-api"
    shutil.copytree(setup["model"], entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    res = camera_vllm.prune("org/tiny-api", 0.3, setup["calib"], tmp_path / "p", **RUN)
    assert _weights(res.path) == _weights(setup["cli_p"])
    with pytest.raises(FileNotFoundError, match="org/absent is not .* in the local Hugging Face cache"):
        camera_vllm.prune("org/absent", 0.3, setup["calib"], tmp_path / "q", **RUN)


# -- calibration forms -----------------------------------------------------------------------------
def _datasets_rows(texts: list[str]):
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_dict({"text": texts})


@pytest.mark.parametrize("form", ["path-str", "texts", "token-ids", "tensors", "dataset", "id-records"])
def test_quantize_calibration_forms_match_the_cli(setup, tmp_path: Path, form: str) -> None:
    from transformers import AutoTokenizer

    texts = setup["texts"]
    tok = AutoTokenizer.from_pretrained(str(setup["model"]))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    calibration = {
        "path-str": lambda: str(setup["calib"]),
        "texts": lambda: texts,
        "token-ids": lambda: ids,
        "tensors": lambda: [torch.tensor(x) for x in ids],
        "dataset": lambda: _datasets_rows(texts),
        "id-records": lambda: ({"input_ids": x} for x in ids),  # a generator of dataset-style rows
    }[form]()
    res = camera_vllm.quantize(setup["model"], calibration, tmp_path / "q", **Q, **RUN)
    assert res.method == "camera-q"
    assert _weights(res.path) == _weights(setup["cli_q"])
    assert res.bits_per_weight == pytest.approx(res.report["avg_bits_achieved"])
    assert res.report["calibration_tokens"] == 4 * 32
    if form == "path-str":  # same inputs, same config (calibration settings included)
        cfg = (res.path / names.CONFIG_FILE).read_bytes()
        assert cfg == (setup["cli_q"] / names.CONFIG_FILE).read_bytes()
    else:
        qc = json.loads((res.path / names.CONFIG_FILE).read_text())["quantization_config"]
        assert qc["compression"]["calibration"]["documents"] == len(texts)


def test_a_text_string_is_text_not_a_file_name(setup, tmp_path: Path) -> None:
    """Once `OSError: File name too long`: a string that is no existing path is one document."""
    text = _CORPUS * 6
    as_file = tmp_path / "one.txt"
    as_file.write_text(text)
    cli = tmp_path / "cli"
    assert (
        main(["prune", str(setup["model"]), "--ratio", "0.3", "--out", str(cli), *calib_args(as_file)]) == 0
    )
    res = camera_vllm.prune(setup["model"], 0.3, text, tmp_path / "p", **RUN)
    assert _weights(res.path) == _weights(cli)


def test_analyze_in_memory_and_to_a_file_matches_the_cli(setup, tmp_path: Path) -> None:
    from camera_vllm.compress.score import load_energies

    out = tmp_path / "cli.safetensors"
    assert main(["analyze", str(setup["model"]), "--out", str(out), *calib_args(setup["calib"])]) == 0
    cli, _ = load_energies(out)
    res = camera_vllm.analyze(setup["model"], setup["texts"], **RUN)
    assert res.path is None and sorted(res.energies) == sorted(cli) == [0, 1]
    for layer, le in res.energies.items():
        for a, b in zip(le.expert_scores, cli[layer].expert_scores):
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0)  # stored as float32
    assert res.settings["calibration"]["tokens"] == 4 * 32
    written = camera_vllm.analyze(setup["model"], setup["calib"], tmp_path / "api.safetensors", **RUN)
    with safe_open(str(out), "pt") as f, safe_open(str(written.path), "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), g.get_tensor(k)), k


# -- errors ----------------------------------------------------------------------------------------
def test_bad_input_gets_a_clear_error(setup, tmp_path: Path) -> None:
    m, calib, out = setup["model"], setup["calib"], tmp_path / "x"
    with pytest.raises(TypeError, match="model must be a model directory, a hub id"):
        camera_vllm.prune(42, 0.3, calib, out, **RUN)
    with pytest.raises(FileNotFoundError, match="not a model directory, and not a hub id"):
        camera_vllm.prune(tmp_path / "nothing", 0.3, calib, out, **RUN)
    with pytest.raises(ValueError, match="ratio must be in"):
        camera_vllm.prune(m, 1.5, calib, out, **RUN)
    with pytest.raises(CalibrationError, match="looks like a file path but no such file exists"):
        camera_vllm.prune(m, 0.3, "data/missing.txt", out, **RUN)
    with pytest.raises(CalibrationError, match="missing.txt: calibration file not found"):
        camera_vllm.prune(m, 0.3, [tmp_path / "missing.txt"], out, **RUN)
    with pytest.raises(CalibrationError, match="calibration item 1 is a float"):
        camera_vllm.prune(m, 0.3, ["some text here", 1.5], out, **RUN)
    with pytest.raises(CalibrationError, match="item 0 has no 'text' or 'input_ids' field"):
        camera_vllm.prune(m, 0.3, [{"content": "x"}], out, **RUN)
    with pytest.raises(CalibrationError, match="id 100000 is outside the model's vocabulary"):
        camera_vllm.prune(m, 0.3, [[1, 2, 100000] * 20], out, **RUN)
    with pytest.raises(CalibrationError, match="no calibration documents"):
        camera_vllm.prune(m, 0.3, [], out, **RUN)
    with pytest.raises(ValueError, match="tokenizer= applies to in-memory models"):
        camera_vllm.prune(m, 0.3, calib, out, tokenizer=m, **RUN)
    with pytest.raises(ValueError, match="fractions= needs bits="):
        camera_vllm.quantize(m, calib, out, fractions=[1.0], **RUN)
    with pytest.raises(ValueError, match="multiple of 32"):
        camera_vllm.quantize(m, calib, out, avg_bits=3.0, group_size=48, **RUN)
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        camera_vllm.quantize(m, calib, out, avg_bits=3.0, threads=0, **RUN)
    with pytest.raises(FileExistsError, match="already exists"):
        camera_vllm.prune(m, 0.3, calib, setup["cli_p"], **RUN)
    assert not out.exists() and not list(tmp_path.glob(".x.*"))


# -- threads, import cost --------------------------------------------------------------------------
def test_threads_apply_for_the_run_only(setup, tmp_path: Path, monkeypatch) -> None:
    from camera_vllm.compress import run

    seen: list[int] = []
    stream = run.LayerStreamer.run

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return stream(self, *args, **kwargs)

    monkeypatch.setattr(run.LayerStreamer, "run", spy)
    before = torch.get_num_threads()
    camera_vllm.prune(setup["model"], 0.3, setup["calib"], tmp_path / "p", threads=2, **RUN)
    assert seen == [2] and torch.get_num_threads() == before
    # The default never exceeds the CPUs this process may use, nor torch's own setting.
    allowed = len(os.sched_getaffinity(0))
    assert 1 <= run.default_threads() <= min(allowed, torch.get_num_threads())


def test_import_camera_vllm_stays_cheap() -> None:
    code = (
        "import sys, camera_vllm, camera_vllm.api; f = camera_vllm.quantize; "
        "assert callable(f); assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_api_defaults_are_the_compressors() -> None:
    from camera_vllm import api
    from camera_vllm.compress.calibrate import DEFAULT_NUM_SEQS
    from camera_vllm.compress.score import DEFAULT_ALPHA

    assert (api.DEFAULT_ALPHA, api.DEFAULT_NUM_SEQS) == (DEFAULT_ALPHA, DEFAULT_NUM_SEQS)
