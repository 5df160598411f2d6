"""Write a CAMERA checkpoint atomically as a normal Hugging Face model directory.

Everything goes into a temporary sibling directory that carries an
``.camera_incomplete`` marker; only a complete directory that passes
:func:`~camera_vllm.format.validate.validate` (headers, shapes, config) is renamed into
place.  A run killed half-way therefore never leaves something at ``out_dir`` that looks
valid.  What a killed run leaves behind (``.<name>.tmp-<pid>``, or ``.<name>.old-<pid>``
when it was replacing an existing directory) is removed by the next writer of the same
``out_dir`` once process ``<pid>`` is gone (see :func:`remove_stale_temp_dirs`), or, with
``resume=True``, adopted and continued (see :meth:`CheckpointWriter.state`).

Memory: tensors are buffered until a shard reaches ``max_shard_bytes`` (512 MiB by
default) and then written, so the writer never holds more than one shard.  For resuming,
:meth:`CheckpointWriter.state` makes the buffered tensors durable too (``pending-N``
files under :data:`PROGRESS_DIR`, each tensor written once there and once in its shard);
the whole progress directory is removed before the checkpoint is validated and published.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..format import names
from ..format.schema import CameraFormatError, CameraQuantConfig
from .model_card import MODEL_CARD_FILE, base_model_id, render_model_card

# Files of the source model that are not weights and travel unchanged.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_SKIP_NAMES = {names.CONFIG_FILE, names.INDEX_FILE, names.REPORT_FILE, names.INCOMPLETE_MARKER}

#: Bytes of tensors buffered before a shard is written: bounds the writer's memory.
DEFAULT_MAX_SHARD_BYTES = 512 * 1024**2
#: Directory (inside the temporary checkpoint) of a run's resumable progress.
PROGRESS_DIR = ".camera_progress"
_SHARD_FILE = re.compile(r"^shard-\d{5}\.safetensors$")

log = logging.getLogger(__name__)

_MARKER_TEXT = "camera-vllm: this checkpoint is being written by pid {pid} on host {host}\n"
_MARKER_HOST = re.compile(r" by pid \d+ on host (?P<host>\S+)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _temp_dir_pattern(out: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)$")


def resumable_temp_dirs(out_dir: str | Path) -> list[Path]:
    """Temporary directories of ``out_dir`` left by killed runs on this host that recorded progress.

    Newest progress first.  Those of live processes and of other hosts are never listed.
    """
    out = Path(out_dir).resolve()
    host = socket.gethostname()
    found: list[tuple[float, Path]] = []
    if not out.parent.is_dir():
        return []
    for item in out.parent.iterdir():
        m = _temp_dir_pattern(out).match(item.name)
        if m is None or m.group(1) != "tmp" or not item.is_dir():
            continue
        pid = int(m.group(2))
        record = item / PROGRESS_DIR / "progress.json"
        marker = item / names.INCOMPLETE_MARKER
        if pid == os.getpid() or _pid_alive(pid) or not record.is_file() or not marker.is_file():
            continue
        owner = _MARKER_HOST.search(marker.read_text(errors="replace"))
        if owner is not None and owner.group("host") != host:
            continue
        found.append((record.stat().st_mtime, item))
    return [p for _, p in sorted(found, key=lambda t: (-t[0], t[1].name))]


def remove_stale_temp_dirs(out_dir: str | Path) -> list[Path]:
    """Remove what killed writers of ``out_dir`` left behind; returns the removed paths.

    A sibling ``.<name>.tmp-<pid>`` or ``.<name>.old-<pid>`` is stale when no process
    ``<pid>`` runs on this host.  A temporary directory whose marker names another host
    (a shared filesystem) is left alone; one without a marker (killed between removing
    the marker and the final rename) is judged by its pid alone.
    """
    out = Path(out_dir).resolve()
    host = socket.gethostname()
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    pattern = _temp_dir_pattern(out)
    for item in sorted(out.parent.iterdir()):
        m = pattern.match(item.name)
        if m is None or not item.is_dir():
            continue
        pid = int(m.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        marker = item / names.INCOMPLETE_MARKER
        if marker.is_file():
            owner = _MARKER_HOST.search(marker.read_text(errors="replace"))
            if owner is not None and owner.group("host") != host:
                continue
        hint = " (--resume would have continued it)" if (item / PROGRESS_DIR).is_dir() else ""
        log.warning("removing %s, left by a killed camera-vllm run (pid %d)%s", item, pid, hint)
        shutil.rmtree(item, ignore_errors=True)
        removed.append(item)
    return removed


class CheckpointWriter:
    """Collects tensors into safetensors shards and commits the directory in one rename.

    Use as a context manager; leaving the block with an exception removes the
    temporary directory and leaves ``out_dir`` untouched.  With ``resume``, entering
    adopts the newest resumable temporary directory of a killed run (renamed to this
    process's); :attr:`resumed_from` names it, and the caller restores the writer with
    :meth:`restore` from the :meth:`state` it recorded.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        overwrite: bool = False,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        resume: bool = False,
    ):
        self.out_dir = Path(out_dir).resolve()
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir} already exists (pass overwrite/--overwrite to replace it)")
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}"
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[dict[str, torch.Tensor]] = []
        self._shard_files: list[Path] = []
        self._weight_map: dict[str, str] = {}
        self._shard_names: list[list[str]] = []  # tensor names of every shard, in add order
        # Durable copies of buffered tensors (for resuming): [file name, tensor names] under
        # PROGRESS_DIR; _stale_spills were flushed into a shard and go once the record moves on.
        self._spills: list[tuple[str, list[str]]] = []
        self._stale_spills: list[str] = []
        self._spill_seq = 0
        self.total_bytes = 0
        self.resume = resume
        self.resumed_from: Path | None = None

    # -- context manager ---------------------------------------------------------------------------
    def __enter__(self) -> CheckpointWriter:
        adopt = resumable_temp_dirs(self.out_dir)[:1] if self.resume else []
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        if adopt:
            adopt[0].rename(self.tmp_dir)  # ours now: a stale-directory sweep no longer sees it
            self.resumed_from = adopt[0]
            log.info("resuming the run left in %s", adopt[0])
        remove_stale_temp_dirs(self.out_dir)
        if not adopt:
            self.tmp_dir.mkdir(parents=True)
        (self.tmp_dir / names.INCOMPLETE_MARKER).write_text(
            _MARKER_TEXT.format(pid=os.getpid(), host=socket.gethostname())
        )
        return self

    @property
    def progress_dir(self) -> Path:
        """Where a run keeps its resumable progress (removed before the checkpoint is published)."""
        return self.tmp_dir / PROGRESS_DIR

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    # -- tensors -----------------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; shards are flushed to disk as they fill."""
        if name in self._weight_map or name in self._pending:
            raise ValueError(f"tensor {name!r} written twice")
        tensor = tensor.detach().contiguous().cpu()
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        index = len(self._shard_files)
        path = self.tmp_dir / f"shard-{index:05d}.safetensors"
        save_file(dict(sorted(self._pending.items())), str(path), metadata={"format": "pt"})
        self._shard_files.append(path)
        self._shard_names.append(list(self._pending))
        for n in self._pending:
            self._weight_map[n] = path.name
        self._pending, self._pending_bytes = {}, 0
        self._stale_spills.extend(f for f, _ in self._spills)
        self._spills = []

    # -- resuming ----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Make every tensor added so far durable; return what :meth:`restore` rebuilds the writer from.

        Buffered tensors not yet in a shard are written to a ``pending-N`` file under
        :attr:`progress_dir` (only those added since the last call).  Files that a later
        :meth:`state` no longer references are removed by :meth:`drop_stale`, which the
        caller runs once it has recorded the new state durably.
        """
        spilled = {n for _, ns in self._spills for n in ns}
        new = [n for n in self._pending if n not in spilled]
        if new:
            self.progress_dir.mkdir(exist_ok=True)
            fname = f"pending-{self._spill_seq:05d}.safetensors"
            self._spill_seq += 1
            save_file({n: self._pending[n] for n in new}, str(self.progress_dir / fname))
            self._spills.append((fname, new))
        return {
            "shards": [[p.name, list(ns)] for p, ns in zip(self._shard_files, self._shard_names)],
            "pending": [[f, list(ns)] for f, ns in self._spills],
            "pending_seq": self._spill_seq,
            "total_bytes": self.total_bytes,
        }

    def drop_stale(self) -> None:
        """Remove ``pending`` files whose tensors are in shards (after the new state was recorded)."""
        for fname in self._stale_spills:
            (self.progress_dir / fname).unlink(missing_ok=True)
        self._stale_spills = []

    def restore(self, state: dict[str, Any]) -> None:
        """Rebuild the writer as it was when ``state`` was taken; drop what was written after it."""
        shards = [(str(f), [str(n) for n in ns]) for f, ns in state["shards"]]
        spills = [(str(f), [str(n) for n in ns]) for f, ns in state["pending"]]
        keep_shards = {f for f, _ in shards}
        for item in self.tmp_dir.iterdir():  # shards written after the recorded state
            if _SHARD_FILE.match(item.name) and item.name not in keep_shards:
                item.unlink()
        keep_spills = {f for f, _ in spills}
        if self.progress_dir.is_dir():
            for item in self.progress_dir.glob("pending-*.safetensors"):
                if item.name not in keep_spills:
                    item.unlink()
        self._shard_files = [self.tmp_dir / f for f, _ in shards]
        self._shard_names = [ns for _, ns in shards]
        self._weight_map = {n: f for f, ns in shards for n in ns}
        self._pending, self._pending_bytes = {}, 0
        for fname, tensor_names in spills:
            with safe_open(str(self.progress_dir / fname), "pt") as f:
                for n in tensor_names:
                    t = f.get_tensor(n)
                    self._pending[n] = t
                    self._pending_bytes += t.numel() * t.element_size()
        self._spills, self._stale_spills = spills, []
        self._spill_seq = int(state["pending_seq"])
        self.total_bytes = int(state["total_bytes"])

    # -- commit ------------------------------------------------------------------------------------
    def commit(
        self,
        *,
        source_dir: str | Path,
        config: dict[str, Any],
        quant_config: CameraQuantConfig,
        report: dict[str, Any] | None = None,
        extra_files: dict[str, bytes] | None = None,
    ) -> Path:
        """Write config/index/side files, then atomically move the directory to ``out_dir``."""
        self._flush()
        shutil.rmtree(self.progress_dir, ignore_errors=True)  # a published checkpoint is not resumable
        n = len(self._shard_files)
        final_names: dict[str, str] = {}
        for i, path in enumerate(self._shard_files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.tmp_dir / final)
            final_names[path.name] = final
        weight_map = {k: final_names[v] for k, v in sorted(self._weight_map.items())}
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.tmp_dir / names.INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

        source = Path(source_dir)
        for item in sorted(source.iterdir()):
            if item.name in _SKIP_NAMES or item.name.startswith(".") or item.suffix in _SKIP_SUFFIXES:
                continue
            if item.is_file():
                shutil.copyfile(item, self.tmp_dir / item.name)

        # The source's README describes the source model: this directory gets its own card.
        card = render_model_card(
            base_model=base_model_id(config, source),
            out_name=self.out_dir.name,
            quant_config=quant_config,
            report=report,
        )
        (self.tmp_dir / MODEL_CARD_FILE).write_text(card)
        cfg = dict(config)
        cfg["quantization_config"] = quant_config.to_json_dict()
        (self.tmp_dir / names.CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if report is not None:
            (self.tmp_dir / names.REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        for fname, data in (extra_files or {}).items():
            (self.tmp_dir / fname).write_bytes(data)

        _make_world_readable(self.tmp_dir)
        marker = self.tmp_dir / names.INCOMPLETE_MARKER
        marker_text = marker.read_text()
        marker.unlink()
        # Nothing that fails validation is ever published (headers, shapes, config; values
        # are the caller's choice: they need a full read).
        from ..format.validate import validate

        check = validate(self.tmp_dir, check_values=False)
        if not check.ok:
            marker.write_text(marker_text)
            raise CameraFormatError(
                f"the checkpoint written for {self.out_dir} does not validate; not published:\n{check}"
            )
        _fsync_dir(self.tmp_dir)
        if self.out_dir.exists():
            if not self.overwrite:
                raise FileExistsError(f"{self.out_dir} appeared while writing; not replacing it")
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
            self.out_dir.rename(old)
            self.tmp_dir.rename(self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp_dir.rename(self.out_dir)
        _fsync_path(self.out_dir.parent)  # the rename itself
        return self.out_dir


#: Modes of a published checkpoint: serving containers run as another user (uid 10001)
#: and mount it read-only, and safetensors writes its files 0600.
FILE_MODE, DIR_MODE = 0o644, 0o755


def _make_world_readable(root: Path) -> None:
    root.chmod(DIR_MODE)
    for item in root.rglob("*"):
        item.chmod(DIR_MODE if item.is_dir() else FILE_MODE)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Make the shard files (and the directory entries) durable before the rename publishes them.
    for item in path.iterdir():
        if item.is_file():
            with open(item, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_path(path)
