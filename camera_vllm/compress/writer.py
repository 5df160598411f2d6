"""Write a CAMERA checkpoint atomically as a normal Hugging Face model directory.

Everything goes into a temporary sibling directory that carries an
``.camera_incomplete`` marker; only a complete directory that passes
:func:`~camera_vllm.format.validate.validate` (headers, shapes, config) is renamed into
place.  A run killed half-way therefore never leaves something at ``out_dir`` that looks
valid.  What a killed run leaves behind (``.<name>.tmp-<pid>``, or ``.<name>.old-<pid>``
when it was replacing an existing directory) is removed by the next writer of the same
``out_dir`` once process ``<pid>`` is gone (see :func:`remove_stale_temp_dirs`).
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
from safetensors.torch import save_file

from ..format import names
from ..format.schema import CameraFormatError, CameraQuantConfig
from .model_card import MODEL_CARD_FILE, base_model_id, render_model_card

# Files of the source model that are not weights and travel unchanged.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_SKIP_NAMES = {names.CONFIG_FILE, names.INDEX_FILE, names.REPORT_FILE, names.INCOMPLETE_MARKER}

DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3

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
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)$")
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
        log.warning("removing %s, left by a killed camera-vllm run (pid %d)", item, pid)
        shutil.rmtree(item, ignore_errors=True)
        removed.append(item)
    return removed


class CheckpointWriter:
    """Collects tensors into safetensors shards and commits the directory in one rename.

    Use as a context manager; leaving the block with an exception removes the
    temporary directory and leaves ``out_dir`` untouched.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        overwrite: bool = False,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
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
        self.total_bytes = 0

    # -- context manager ---------------------------------------------------------------------------
    def __enter__(self) -> CheckpointWriter:
        remove_stale_temp_dirs(self.out_dir)
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)
        (self.tmp_dir / names.INCOMPLETE_MARKER).write_text(
            _MARKER_TEXT.format(pid=os.getpid(), host=socket.gethostname())
        )
        return self

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
        for n in self._pending:
            self._weight_map[n] = path.name
        self._pending, self._pending_bytes = {}, 0

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
