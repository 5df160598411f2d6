"""Resuming pieces: the writer's durable state, and the refusal of a run whose inputs differ.

End to end (a CLI run killed inside layer 1, resumed, compared byte for byte with an
uninterrupted run) is ``tests/hardening/test_determinism.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from camera_vllm.compress.run import PROGRESS_FILE, PROGRESS_VERSION, ResumeMismatch, RunProgress
from camera_vllm.compress.writer import PROGRESS_DIR, CheckpointWriter, resumable_temp_dirs

BOUND = 3000  # bytes: a shard every few tensors


def _layer_tensors(layer: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(layer)
    return [(f"layers.{layer}.t{i}", torch.randn(100 + 37 * i, generator=g)) for i in range(4)]


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def _shards(writer: CheckpointWriter) -> list[bytes]:
    writer._flush()
    return [p.read_bytes() for p in writer._shard_files]


def test_writer_restores_its_state_after_a_kill(tmp_path: Path) -> None:
    whole = CheckpointWriter(tmp_path / "a", max_shard_bytes=BOUND)
    with whole:
        for layer in range(4):
            for name, t in _layer_tensors(layer):
                whole.add(name, t)
        expected = _shards(whole)
    assert len(expected) > 3  # the bound cut shards inside layers

    out = tmp_path / "b"
    first = CheckpointWriter(out, max_shard_bytes=BOUND)
    first.__enter__()
    for layer in range(2):
        for name, t in _layer_tensors(layer):
            first.add(name, t)
        state = first.state()
        first.drop_stale()
    (first.progress_dir / PROGRESS_FILE).write_text(json.dumps({"writer": state}))
    for name, t in _layer_tensors(2)[:3]:  # killed half-way through layer 2, after a flush
        first.add(name, t)
    assert len(first._shard_files) > len(state["shards"])
    assert state["pending"], "some tensors were buffered at the boundary: they must be durable"
    killed = out.parent / f".b.tmp-{_dead_pid()}"
    first.tmp_dir.rename(killed)  # what a SIGKILLed process leaves

    assert resumable_temp_dirs(out) == [killed]
    with CheckpointWriter(out, max_shard_bytes=BOUND, resume=True) as second:
        assert second.resumed_from == killed and not killed.exists()
        second.restore(json.loads((second.progress_dir / PROGRESS_FILE).read_text())["writer"])
        assert sorted(p.name for p in second.tmp_dir.glob("shard-*")) == [f for f, _ in state["shards"]]
        for layer in range(2, 4):
            for name, t in _layer_tensors(layer):
                second.add(name, t)
        assert _shards(second) == expected
        assert second.total_bytes == whole.total_bytes


def test_resume_refuses_other_inputs_naming_them(tmp_path: Path) -> None:
    run_dir = tmp_path / ".out.tmp-1"
    (run_dir / PROGRESS_DIR).mkdir(parents=True)
    mine = {"model": "m1", "calibration windows": "c1", "method settings": "s1"}
    record = {"version": PROGRESS_VERSION, "fingerprint": {**mine, "calibration windows": "c2"}}
    (run_dir / PROGRESS_DIR / PROGRESS_FILE).write_text(json.dumps(record))
    with pytest.raises(ResumeMismatch, match=r"the calibration windows differ from the interrupted run"):
        RunProgress.check(run_dir, mine)
    record["fingerprint"] = {**mine, "model": "m0", "method settings": "s0"}
    (run_dir / PROGRESS_DIR / PROGRESS_FILE).write_text(json.dumps(record))
    with pytest.raises(ResumeMismatch, match=r"the model, method settings differ"):
        RunProgress.check(run_dir, mine)
    record["fingerprint"] = mine
    (run_dir / PROGRESS_DIR / PROGRESS_FILE).write_text(json.dumps({**record, "version": 0}))
    with pytest.raises(ResumeMismatch, match="progress format 0"):
        RunProgress.check(run_dir, mine)
    (run_dir / PROGRESS_DIR / PROGRESS_FILE).write_text(json.dumps(record))
    RunProgress.check(run_dir, mine)  # the same inputs: accepted


def test_only_dead_runs_of_this_output_are_resumable(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    dead = tmp_path / f".ckpt.tmp-{_dead_pid()}"
    live = tmp_path / f".ckpt.tmp-{os.getppid()}"
    no_progress = tmp_path / f".ckpt.tmp-{_dead_pid()}"
    other = tmp_path / f".other.tmp-{_dead_pid()}"
    for d in (dead, live, no_progress, other):
        d.mkdir()
        (d / ".camera_incomplete").write_text("camera-vllm: this checkpoint is being written\n")
        if d is not no_progress:
            (d / PROGRESS_DIR).mkdir()
            (d / PROGRESS_DIR / PROGRESS_FILE).write_text("{}")
    assert resumable_temp_dirs(out) == [dead]
