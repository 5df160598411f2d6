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
