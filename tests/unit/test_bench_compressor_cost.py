"""bench/compressor_cost.py: a child's own peak RSS, its exit code and its timeout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import compressor_cost  # bench/compressor_cost.py (pytest's pythonpath has bench/)

MIB = 2**20
# The children import compressor_cost from bench/ too.
BENCH = str(Path(compressor_cost.__file__).parent)
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (BENCH, os.environ.get("PYTHONPATH"))))}
CHILD = (
    "import compressor_cost as c; "
    "b = bytearray({n} * 2**20); b[::4096] = b'x' * len(b[::4096]); print(c.peak_rss_self())"
)


def test_peak_rss_is_the_childs_own():
    big = compressor_cost.run_measured([sys.executable, "-c", CHILD.format(n=300)], env=CHILD_ENV)
    assert big["returncode"] == 0
    assert int(big["stdout"]) >= 300 * MIB
    # This process now holds 400 MiB: ru_maxrss of a child spawned now can count them (kept across
    # exec), the child's own VmHWM does not.
    ballast = bytearray(400 * MIB)
    ballast[::4096] = b"x" * len(ballast[::4096])
    small = compressor_cost.run_measured([sys.executable, "-c", CHILD.format(n=1)], env=CHILD_ENV)
    assert small["returncode"] == 0
    assert int(small["stdout"]) < 100 * MIB
    assert small["wall_seconds"] > 0
    del ballast


def test_exit_code_and_timeout():
    assert compressor_cost.run_measured([sys.executable, "-c", "import sys; sys.exit(3)"])["returncode"] == 3
    res = compressor_cost.run_measured([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1.0)
    assert res["returncode"] != 0 and res["wall_seconds"] < 20
