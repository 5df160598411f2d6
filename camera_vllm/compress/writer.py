"""Write a CAMERA checkpoint atomically as a normal Hugging Face model directory.

Everything goes into a temporary sibling directory that carries an
``.camera_incomplete`` marker; only a complete directory is renamed into place. A run
killed half-way therefore never leaves something at ``out_dir`` that looks valid.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..format import names
from ..format.schema import CameraQuantConfig

# Files of the source model that are not weights and travel unchanged.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_SKIP_NAMES = {names.CONFIG_FILE, names.INDEX_FILE, names.REPORT_FILE, names.INCOMPLETE_MARKER}

DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3


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
    def __enter__(self) -> "CheckpointWriter":
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)
        (self.tmp_dir / names.INCOMPLETE_MARKER).write_text("camera-vllm: this checkpoint is being written\n")
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

        cfg = dict(config)
        cfg["quantization_config"] = quant_config.to_json_dict()
        (self.tmp_dir / names.CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if report is not None:
            (self.tmp_dir / names.REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        for fname, data in (extra_files or {}).items():
            (self.tmp_dir / fname).write_bytes(data)

        _fsync_dir(self.tmp_dir)
        (self.tmp_dir / names.INCOMPLETE_MARKER).unlink()
        if self.out_dir.exists():
            if not self.overwrite:
                raise FileExistsError(f"{self.out_dir} appeared while writing; not replacing it")
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
            self.out_dir.rename(old)
            self.tmp_dir.rename(self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp_dir.rename(self.out_dir)
        return self.out_dir


def _fsync_dir(path: Path) -> None:
    # Make the shard files durable before the rename publishes the directory.
    for item in path.iterdir():
        if item.is_file():
            with open(item, "rb") as fh:
                os.fsync(fh.fileno())
