"""A ``TorchDispatchMode`` that records the aten calls which make the host wait for the device.

Under CUDA graphs (vLLM's default) any of them inside the expert op aborts engine start
("operation not permitted when stream is capturing"), and without graphs each is a stall per
layer per step.  The mode sees every aten call, whatever Python API issued it, so it also
catches what patching ``Tensor.item``/``tolist`` cannot: ``t[i] = 0`` (a Python scalar lifted to
a CPU tensor and copied to the device), boolean-mask indexing, ``nonzero`` and ``bincount``.

Only calls made from project code count (``camera_vllm/`` and ``kernels/``): frames inside
Triton (its interpreter turns kernels into numpy work on CPU tensors) or the test itself are
not the op's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
PROJECT_DIRS = (str(ROOT / "camera_vllm") + "/", str(ROOT / "kernels") + "/")

# Ops whose result size or value the host must read from the device (schema names).
SYNCING_OPS = frozenset(
    {
        "aten::_local_scalar_dense",  # .item(), int(t), bool(t), .tolist()
        "aten::nonzero",
        "aten::bincount",
        "aten::masked_select",
        "aten::unique_consecutive",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::repeat_interleave",  # tensor repeats: the output size is device data
        # torch.tensor(...) and `t[i] = scalar`: a host tensor is created and copied to the
        # device (in torch 2.13 that copy synchronises, and graph capture refuses it).
        "aten::lift_fresh",
    }
)
INDEX_OPS = frozenset({"aten::index", "aten::index_put", "aten::index_put_"})
COPY_OPS = frozenset({"aten::_to_copy", "aten::copy_"})


@dataclass(frozen=True)
class SyncCall:
    """One flagged aten call and the project line that made it."""

    op: str
    where: str

    def __str__(self) -> str:
        return f"{self.op} at {self.where}"


def _project_caller() -> str | None:
    """``file:line`` of the innermost project frame, or None when the call comes from Triton
    (its interpreter) or from outside the project."""
    frame = sys._getframe(2)
    found = None
    while frame is not None:
        name = frame.f_code.co_filename
        if "/triton/" in name:
            return None
        if found is None and name.startswith(PROJECT_DIRS):
            found = f"{Path(name).relative_to(ROOT)}:{frame.f_lineno}"
        frame = frame.f_back
    return found


def _syncs(name: str, args: tuple, kwargs: dict) -> bool:
    if name in SYNCING_OPS:
        return True
    if name in INDEX_OPS:  # a boolean mask: the result size is its number of True values
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    if name in COPY_OPS:  # between host and device
        src = args[1] if name == "aten::copy_" else args[0]
        dst_device = args[0].device if name == "aten::copy_" else kwargs.get("device")
        return dst_device is not None and torch.device(dst_device) != src.device
    return False


class HostSyncRecorder(TorchDispatchMode):
    """Records a :class:`SyncCall` for every syncing aten call made from project code."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[SyncCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func._schema.name, args, kwargs):
            where = _project_caller()
            if where is not None:
                self.calls.append(SyncCall(str(func), where))
        return func(*args, **kwargs)
