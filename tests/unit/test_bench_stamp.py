"""bench/stamp.py: one stamp layout, the command line recorded, dirty trees refused unless allowed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import stamp  # bench/stamp.py (pytest's pythonpath has bench/)

KEYS = {"machine", "versions", "commit", "dirty", "argv", "utc"}


def _git(repo: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A one-commit checkout with a code file and the benchmark output folders."""
    for rel in ("code.py", "bench/results/r.json", "docs/d.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("0\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "c")
    return tmp_path


def test_clean_tree_stamp_has_the_one_layout(repo: Path) -> None:
    # Results and docs written by earlier benchmarks of the same run leave the code clean.
    (repo / "bench/results/r.json").write_text("1\n")
    (repo / "docs/d.md").write_text("1\n")
    (repo / "untracked.py").write_text("x\n")
    s = stamp.stamp(argv=["bench/x.py", "--quick"], root=repo)
    assert set(s) == KEYS
    assert s["commit"] == _git(repo, "rev-parse", "HEAD") and s["dirty"] is False
    assert s["argv"] == ["bench/x.py", "--quick"]
    assert s["utc"].endswith("Z") and len(s["utc"]) == len("2026-01-01T00:00:00Z")
    assert set(s["machine"]) == {"platform", "processor", "cpu_count", "cpu", "device"}
    assert set(s["machine"]["cpu"]) == {"model", "flags"}
    assert set(s["versions"]) == {"python", "torch", "transformers", "triton", "vllm"}
    assert s["versions"]["torch"]  # installed here


def test_dirty_tree_is_refused_unless_allowed(repo: Path) -> None:
    (repo / "code.py").write_text("1\n")
    with pytest.raises(stamp.DirtyTree, match=r"dirty tree \(code\.py\).*--allow-dirty"):
        stamp.stamp(root=repo)
    s = stamp.stamp(allow_dirty=True, root=repo)
    assert s["dirty"] is True and s["commit"] == _git(repo, "rev-parse", "HEAD")


def test_no_checkout_counts_as_dirty(tmp_path: Path) -> None:
    with pytest.raises(stamp.DirtyTree, match="not a git checkout"):
        stamp.stamp(root=tmp_path)
    assert stamp.stamp(allow_dirty=True, root=tmp_path)["dirty"] is True


def test_allow_dirty_flag() -> None:
    import argparse

    p = argparse.ArgumentParser()
    stamp.add_stamp_args(p)
    assert p.parse_args([]).allow_dirty is False and p.parse_args(["--allow-dirty"]).allow_dirty is True
