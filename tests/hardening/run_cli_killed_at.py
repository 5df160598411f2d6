"""Run the camera-vllm CLI in this process and SIGKILL it at a chosen point inside the checkpoint writer.

    python run_cli_killed_at.py POINT COMMAND ARGS...      (e.g. ``after-shard prune MODEL --ratio ...``)

The kill is a real SIGKILL of this process (no ``finally``, no ``__exit__``), delivered
right after the writer step named by POINT has happened in the unmodified writer code:

* ``after-shard``: the first safetensors shard is on disk; config.json is not written yet;
* ``marker-removed``: everything is written and the ``.camera_incomplete`` marker is gone,
  the directory not yet renamed into place;
* ``old-moved``: ``--overwrite`` of an existing checkpoint: the old directory has been moved
  aside, the new one not yet renamed into place;
* ``in-layer-K``: in the middle of decoder layer K: its MoE block compressed (a CAMERA-Q
  layer's tensors handed to the writer) and its re-run started; layers < K recorded.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys

import torch

from camera_vllm.cli import main
from camera_vllm.compress import calibrate, writer
from camera_vllm.format import names


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    if point == "after-shard":
        flush = writer.CheckpointWriter._flush

        def _flush(self) -> None:
            flush(self)
            if self._shard_files:
                _die()

        writer.CheckpointWriter._flush = _flush  # type: ignore[method-assign]
    elif point == "marker-removed":
        unlink = pathlib.Path.unlink

        def _unlink(self, *args, **kwargs) -> None:
            unlink(self, *args, **kwargs)
            if self.name == names.INCOMPLETE_MARKER:
                _die()

        pathlib.Path.unlink = _unlink  # type: ignore[method-assign]
    elif point == "old-moved":
        rename = pathlib.Path.rename

        def _rename(self, target):
            result = rename(self, target)
            if ".old-" in pathlib.Path(target).name:
                _die()
            return result

        pathlib.Path.rename = _rename  # type: ignore[method-assign]
    elif point.startswith("in-layer-"):
        target, calls = int(point.removeprefix("in-layer-")), []
        run = calibrate.LayerStreamer._run

        def _run(self, module, layer, hidden):
            if layer == target:
                calls.append(layer)
                if len(calls) == 2:  # the second pass over the layer: the re-run
                    _die()
            return run(self, module, layer, hidden)

        calibrate.LayerStreamer._run = _run  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    install(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
