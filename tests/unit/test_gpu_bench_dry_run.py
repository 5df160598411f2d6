"""bench/gpu_kernels.py: the dry run end to end, and its CUDA-graph honesty rules.

The dry run (tiny shapes, CPU, Triton interpreter) runs in a subprocess of its own: the
interpreter must be switched on before triton is first imported, which this process may
already have done in compiled mode.  The graph rules are checked on ``time_calls`` /
``time_baseline`` with a stand-in for ``torch.cuda`` (no GPU here): a kernel call that
cannot be captured is an error, never an eager number; a baseline that cannot be is
timed eagerly and says so.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_kernels.py"
KINDS = {("routed", "camera-q"), ("routed", "camera-p"), ("shared", "camera-q")}


def load_bench():
    """The script as a module (its top level imports neither torch nor the kernels)."""
    name = "gpu_kernels_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.kernel
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter)")
def test_gpu_bench_dry_run(tmp_path):
    out = tmp_path / "x.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and doc["error"] is None and doc["dry_run"] is True
    # No CUDA graphs on CPU: timed eagerly by wall clock, and the JSON says so.
    assert doc["clock"] == "cpu_wall" and doc["graphs"] is False

    checks = doc["correctness"]
    assert checks and all(c["ok"] for c in checks), checks
    for kind in KINDS:
        paths = {c["path"] for c in checks if (c["layer"], c["scheme"]) == kind}
        assert paths == {"gemv", "sorted"}, (kind, paths)

    rows = doc["rows"]
    tokens = {r["tokens"] for r in rows}
    for kind in KINDS:
        mine = [r for r in rows if (r["layer"], r["scheme"]) == kind]
        assert {r["tokens"] for r in mine} == tokens, kind
        for r in mine:
            assert r["ms"] > 0 and r["bf16_ms"] > 0 and r["speedup_vs_bf16"] > 0, r
            assert r["timing"] == "eager" and r["bf16_timing"] == "eager", r
            assert r["weight_bytes"] > 0 and r["avg_bits"] > 0, r
    q_routed = [r for r in rows if (r["layer"], r["scheme"]) == ("routed", "camera-q")]
    assert {r["bits_target"] for r in q_routed} == {2.25, 2.5}
    for r in rows:
        if r["scheme"] == "camera-p":  # one dense slab, about half the width kept
            assert r["bits"] == [16] and r["bits_target"] == 16.0 and 0.45 <= r["keep_frac"] <= 0.55, r
        if r["layer"] == "shared":
            assert r["E"] == r["top_k"] == 1 and r["bits_target"] == 2.25, r
    # The CAMERA-P rows are timed against the bf16 baseline of the full-width layer.
    full = {r["tokens"]: r["bf16_ms"] for r in q_routed}
    for r in rows:
        if r["scheme"] == "camera-p":
            assert r["bf16_ms"] == full[r["tokens"]]


class FakeCuda:
    """Just enough of ``torch.cuda`` for ``time_calls``; an op that syncs fails while capturing."""

    def __init__(self) -> None:
        self.capturing = False
        self.captures = 0

    def install(self, monkeypatch) -> None:
        fake = self

        class Stream:
            def wait_stream(self, other) -> None:
                pass

        class CUDAGraph:
            def __init__(self) -> None:
                self.calls = []

            def replay(self) -> None:
                pass

        class Event:
            def __init__(self, enable_timing=False) -> None:
                pass

            def record(self) -> None:
                pass

            def elapsed_time(self, other) -> float:
                return 2.0

        @contextlib.contextmanager
        def graph(g):
            fake.captures += 1
            fake.capturing = True
            try:
                yield
            finally:
                fake.capturing = False

        for name, value in {
            "synchronize": lambda *a: None,
            "Stream": Stream,
            "current_stream": lambda *a: Stream(),
            "stream": lambda s: contextlib.nullcontext(),
            "CUDAGraph": CUDAGraph,
            "graph": graph,
            "Event": Event,
        }.items():
            monkeypatch.setattr(torch.cuda, name, value, raising=False)

    def syncing_op(self) -> None:
        if self.capturing:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


CUDA = types.SimpleNamespace(type="cuda")


def test_gpu_bench_capture_failure_is_an_error(monkeypatch):
    bench = load_bench()
    fake = FakeCuda()
    fake.install(monkeypatch)
    what = "slab_moe_triton camera-p P50, shape X, 16 tokens, gemv path"
    with pytest.raises(bench.GraphCaptureError) as info:
        bench.time_calls([fake.syncing_op], CUDA, 4, True, what)
    assert what in str(info.value) and "operation not permitted" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    # --no-graph: the same op times eagerly, on purpose, and says so.
    assert bench.time_calls([fake.syncing_op], CUDA, 4, False, what) == (0.5, "eager")
    # A capturable op is timed from the graph.
    assert bench.time_calls([lambda: None], CUDA, 4, True, what) == (0.5, "cuda_graph")


def test_gpu_bench_uncapturable_baseline_is_timed_eagerly_and_labelled(monkeypatch):
    bench = load_bench()
    fake = FakeCuda()
    fake.install(monkeypatch)
    capturable = types.SimpleNamespace(eager_reason=None)
    ms, mode, reason = bench.time_baseline(capturable, [fake.syncing_op], CUDA, 4, True, "bf16")
    assert (ms, mode) == (0.5, "eager") and reason.startswith("capture failed: RuntimeError")
    # Known not to be capturable (the mm loop reads counts on the host): no capture tried.
    loop = types.SimpleNamespace(eager_reason="mm_loop syncs to read the expert counts")
    before = fake.captures
    got = bench.time_baseline(loop, [fake.syncing_op], CUDA, 4, True, "bf16")
    assert got == (0.5, "eager", loop.eager_reason)
    assert fake.captures == before
    assert bench.time_baseline(capturable, [lambda: None], CUDA, 4, True, "bf16") == (0.5, "cuda_graph", None)
