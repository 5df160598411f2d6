"""Read a safetensors file's header (8-byte length + JSON) without reading any tensor.

Parsed here directly, not through the ``safetensors`` library, so that a truncated file, a
file with trailing bytes, overlapping or gapped tensor data and malformed entries are all
reported by name before any tensor is read.  Stdlib only.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from .schema import CameraFormatError

__all__ = ["FLOAT_TAGS", "TAG_BYTES", "TensorInfo", "read_safetensors_header"]

#: Bytes per element of every safetensors dtype tag.
TAG_BYTES = {
    "F64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I64": 8,
    "U64": 8,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
#: The floating-point dtype tags.
FLOAT_TAGS = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor name -> :class:`TensorInfo` from a safetensors file's header.

    Raises :class:`CameraFormatError` naming the file when the header is unreadable or
    the file is shorter than the header declares (truncated).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CameraFormatError(f"{path.name}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CameraFormatError(
                f"{path.name}: truncated safetensors file (header of {n} bytes, file {size} bytes)"
            )
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CameraFormatError(f"{path.name}: unreadable safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CameraFormatError(f"{path.name}: safetensors header is not a JSON object")
    out: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(v) for v in meta["data_offsets"])
            dtype, shape = str(meta["dtype"]), tuple(int(d) for d in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise CameraFormatError(f"{path.name}: malformed header entry for tensor {name!r}") from None
        if dtype not in TAG_BYTES:
            raise CameraFormatError(f"{path.name}: tensor {name} has unknown dtype {dtype!r}")
        if any(d < 0 for d in shape) or start < 0 or stop < start:
            raise CameraFormatError(
                f"{path.name}: tensor {name} has a malformed header entry (shape {list(shape)},"
                f" data_offsets [{start}, {stop}])"
            )
        want = math.prod(shape) * TAG_BYTES[dtype]
        if stop - start != want:
            raise CameraFormatError(
                f"{path.name}: tensor {name} spans {stop - start} bytes but shape {list(shape)} {dtype}"
                f" needs {want}"
            )
        out[name] = TensorInfo(path.name, dtype, shape, stop - start)
        spans.append((start, stop, name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            what = "overlaps the tensor before it" if start < end else f"leaves a gap at byte {end}"
            raise CameraFormatError(f"{path.name}: tensor {name} data ({start}..{stop}) {what}")
        end = stop
    if 8 + n + end > size:
        raise CameraFormatError(
            f"{path.name}: truncated safetensors file: data ends at byte {8 + n + end}, file has {size} bytes"
        )
    if 8 + n + end < size:
        raise CameraFormatError(
            f"{path.name}: {size - 8 - n - end} trailing bytes after the last tensor (data ends at byte"
            f" {8 + n + end}, file has {size}); the file is corrupt or was overwritten in place"
        )
    return out
