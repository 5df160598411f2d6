"""Same inputs and seed -> byte-identical checkpoints, across processes (different hash seeds).

Each run is a separate ``camera-vllm`` process doing ``prune`` and ``quantize`` (GPTQ, the
default) on the same tiny model and calibration file into its own directory.  Every file
of the two checkpoints must be identical byte for byte (weights, config.json, tokenizer,
plots), except ``camera_report.json``, which must be identical once its timing fields
(``timings_s``) are removed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from camera_vllm.format import names
from camera_vllm.format.validate import validate

TIME_KEYS = {"timings_s"}

SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from camera_vllm.cli import main
model, calib, out = sys.argv[1:4]
common = ["--calib", calib, "--num-seqs", "4", "--seq-len", "32", "--seed", "5", "--device", "cpu",
          "--no-progress"]
assert main(["prune", model, "--ratio", "0.35", "--out", out + "/p", *common]) == 0
assert main(["quantize", model, "--out", out + "/q", "--bits", "4,2,1", "--fractions", "0.25,0.5,0.25",
             "--group-size", "32", "--prune-ratio", "0.1", *common]) == 0
"""


def _strip_times(obj: Any, stripped: set[str]) -> Any:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in TIME_KEYS:
                stripped.add(k)
                continue
            out[k] = _strip_times(v, stripped)
        return out
    if isinstance(obj, list):
        return [_strip_times(v, stripped) for v in obj]
    return obj


def _run(source: Path, calib: Path, out: Path, hash_seed: str) -> None:
    out.mkdir()
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(source), str(calib), str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def test_two_runs_are_byte_identical(source: Path, calib_file: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _run(source, calib_file, a, "1")
    _run(source, calib_file, b, "2")
    for kind in ("p", "q"):
        da, db = a / kind, b / kind
        assert validate(da).ok and validate(db).ok
        files = sorted(p.name for p in da.iterdir())
        assert files == sorted(p.name for p in db.iterdir())
        assert {"model.safetensors", names.CONFIG_FILE, names.REPORT_FILE} <= set(files)
        for name in files:
            if name == names.REPORT_FILE:
                continue
            assert (da / name).read_bytes() == (db / name).read_bytes(), f"{kind}/{name} differs between runs"
        stripped: set[str] = set()
        ra = _strip_times(json.loads((da / names.REPORT_FILE).read_text()), stripped)
        rb = _strip_times(json.loads((db / names.REPORT_FILE).read_text()), stripped)
        assert stripped == TIME_KEYS  # the report has timings, and nothing else was ignored
        assert ra == rb, f"{kind}/{names.REPORT_FILE} differs beyond its timings"
    qc = json.loads((a / "q" / names.CONFIG_FILE).read_text())["quantization_config"]
    assert qc["bits"] == [4, 2, 1] and qc["compression"]["quant_algorithm"] == "gptq"


# -- resuming ----------------------------------------------------------------------------------------
HERE = Path(__file__).resolve().parent
RESUME_COMMON = ["--num-seqs", "4", "--seq-len", "32", "--seed", "5", "--device", "cpu", "--no-progress"]
RESUME_KINDS = {
    "p": ["prune", "{model}", "--ratio", "0.35"],
    "rtn": ["quantize", "{model}", "--bits", "4,2,1", "--fractions", "0.25,0.5,0.25", "--group-size", "32",
            "--prune-ratio", "0.1", "--method", "rtn"],
    "gptq": ["quantize", "{model}", "--bits", "4,2,1", "--fractions", "0.25,0.5,0.25", "--group-size", "32",
             "--prune-ratio", "0.1", "--method", "gptq"],
}  # fmt: skip
RESUME_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from camera_vllm.cli import main
for args in json.loads(sys.argv[1]):
    assert main(args) == 0, args
"""


def _args(kind: str, model: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    cmd = [a.replace("{model}", str(model)) for a in RESUME_KINDS[kind]]
    return [*cmd, "--out", str(out), "--calib", str(calib), *RESUME_COMMON, *extra]


def _cli(runs: list[list[str]], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, json.dumps(runs)], capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip


def test_killed_at_layer_1_resumes_to_the_same_bytes(source: Path, calib_file: Path, tmp_path: Path) -> None:
    """Kill each method inside layer 1 (of 2) and resume: byte-identical to an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir()
    parts.mkdir()
    res = _cli([_args(k, source, calib_file, whole / k) for k in RESUME_KINDS], env)
    assert res.returncode == 0, res.stdout + res.stderr
    for kind in RESUME_KINDS:
        out = parts / kind
        cmd = [sys.executable, str(HERE / "run_cli_killed_at.py"), "in-layer-1"]
        killed = subprocess.run(
            [*cmd, *_args(kind, source, calib_file, out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert killed.returncode == -9, killed.stdout + killed.stderr
        assert not out.exists()
        left = sorted(parts.glob(f".{kind}.tmp-*"))
        assert len(left) == 1 and (left[0] / ".camera_progress" / "progress.json").is_file()
        record = json.loads((left[0] / ".camera_progress" / "progress.json").read_text())
        assert record["next_layer"] == 1 and record["layers"] == [0]
        assert not validate(left[0]).ok  # a half-written output never validates
    # Different calibration windows: refused, naming them, and the partial run is kept.
    bad = _cli([_args("rtn", source, calib_file, parts / "rtn", "--resume", "--seed", "6")], env)
    assert bad.returncode != 0 and "calibration windows differ" in bad.stderr, bad.stderr
    assert len(list(parts.glob(".rtn.tmp-*"))) == 1 and not (parts / "rtn").exists()
    res = _cli([_args(k, source, calib_file, parts / k, "--resume") for k in RESUME_KINDS], env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming at layer 1" in res.stderr
    for kind in RESUME_KINDS:
        a, b = whole / kind, parts / kind
        assert validate(b).ok
        assert list(parts.glob(f".{kind}.*")) == []
        files = sorted(p.name for p in a.iterdir())
        assert files == sorted(p.name for p in b.iterdir())
        for name in files:
            if name != names.REPORT_FILE:
                assert (a / name).read_bytes() == (b / name).read_bytes(), (
                    f"{kind}/{name} differs after resuming"
                )
        stripped: set[str] = set()
        ra = _strip_times(json.loads((a / names.REPORT_FILE).read_text()), stripped)
        rb = _strip_times(json.loads((b / names.REPORT_FILE).read_text()), stripped)
        assert ra == rb, f"{kind}/{names.REPORT_FILE} differs beyond its timings after resuming"
