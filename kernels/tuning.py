"""Tile configs of the slab MoE kernels, kept as JSON data in ``configs/``.

Lookup order for a call with ``T`` tokens on device ``D`` and layer shape key
``H{H}_E{E}_K{top_k}``:

1. ``configs/<D>.json`` → ``"shapes"`` → shape key (written by ``bench/gpu_kernels.py --tune``);
2. ``configs/<D>.json`` top level;
3. ``configs/default.json``;
4. :data:`FALLBACK` below (same content as ``default.json``), so a missing or
   broken data file never stops the kernel.

Every level has the schema of ``default.json``: ``gemv_max_pairs`` (``T * top_k`` at
or below it takes the sorting-free GEMV path), optional ``gemv_min_ctas`` (the GEMV kernels
split K until their grid has at least this many CTAs: two per SM of an H100/H200 by
default, so batch 1 fills the GPU; 0 or absent = no split), ``gemv`` (``w13``/``w2`` tiles) and
``sorted`` (a list of ``{"max_tokens": int | null, "w13": ..., "w2": ...}`` picked by
the first ``max_tokens >= T``).  Only Python ints of shapes are used, so the choice
is static per batch size (CUDA-graph friendly).

fp32 activations on the sorted path get smaller tiles than the table's
(:func:`fp32_sorted`): their IEEE ``tl.dot`` runs on FMAs and needs far more registers per
tile than the tensor-core dot of bf16/fp16.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

FALLBACK: dict[str, Any] = {
    "gemv_max_pairs": 64,
    "gemv_min_ctas": 264,
    "gemv": {
        "w13": {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2},
        "w2": {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
    },
    "sorted": [
        {
            "max_tokens": 64,
            "w13": {"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2},
            "w2": {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
        },
        {
            "max_tokens": 512,
            "w13": {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
            "w2": {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
        },
        {
            "max_tokens": None,
            "w13": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
            "w2": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        },
    ],
}


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options of one kernel (``block_m`` is 1 on the GEMV path)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    @classmethod
    def from_dict(cls, d: dict[str, int], gemv: bool) -> TileConfig:
        return cls(
            block_m=1 if gemv else int(d["BLOCK_M"]),
            block_n=int(d["BLOCK_N"]),
            block_k=int(d["BLOCK_K"]),
            num_warps=int(d.get("num_warps", 4)),
            num_stages=int(d.get("num_stages", 2)),
        )

    def to_dict(self) -> dict[str, int]:
        d = {
            "BLOCK_N": self.block_n,
            "BLOCK_K": self.block_k,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }
        if self.block_m > 1:
            d["BLOCK_M"] = self.block_m
        return d


@dataclass(frozen=True)
class MoEConfig:
    """Which path runs (``"gemv"`` or ``"sorted"``) and the tiles of its two kernels."""

    path: str
    w13: TileConfig
    w2: TileConfig
    source: str = "fallback"
    min_ctas: int = 0  # GEMV path: split K until the grid has this many CTAs


# Tile caps of the sorted kernels with fp32 activations.  The IEEE dot lowers to FMAs whose
# operand layout keeps BLOCK_K-long A-row and B-column slices per thread, so the configured
# bf16 tiles need kilobytes of spill; at these caps (and >= 4 rows per warp) no build spills
# (tests/kernels/test_kernel_compile.py; bench/sm90_aot.py mirrors these numbers).
FP32_MAX_BLOCK_M = 32
FP32_MAX_BLOCK_N = 32
FP32_MAX_BLOCK_K = 32
FP32_ROWS_PER_WARP = 4
FP32_NUM_STAGES = 3  # at 2 stages the dense (16-bit) w13 build at M32 spills 32 bytes


def fp32_sorted_tile(tile: TileConfig) -> TileConfig:
    """``tile`` capped for fp32 activations on the sorted path (see ``FP32_MAX_BLOCK_*``).

    ``num_warps`` grows to ``block_m / FP32_ROWS_PER_WARP`` so each thread holds few rows;
    ``num_stages`` is ``FP32_NUM_STAGES``.
    """
    block_m = min(tile.block_m, FP32_MAX_BLOCK_M)
    return TileConfig(
        block_m=block_m,
        block_n=min(tile.block_n, FP32_MAX_BLOCK_N),
        block_k=min(tile.block_k, FP32_MAX_BLOCK_K),
        num_warps=max(tile.num_warps, block_m // FP32_ROWS_PER_WARP),
        num_stages=FP32_NUM_STAGES,
    )


def fp32_sorted(config: MoEConfig) -> MoEConfig:
    """The config a call with fp32 activations runs: sorted tiles capped, GEMV tiles unchanged.

    The GEMV kernels compute in fp32 for every activation dtype, so their tiles fit as they are.
    """
    if config.path != "sorted":
        return config
    return replace(config, w13=fp32_sorted_tile(config.w13), w2=fp32_sorted_tile(config.w2))


def device_file_name(device_name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3.json"``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


def shape_key(hidden_size: int, num_experts: int, top_k: int) -> str:
    return f"H{hidden_size}_E{num_experts}_K{top_k}"


@functools.cache
def _load(path: str) -> dict[str, Any] | None:
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as err:
        logger.warning("ignoring unreadable kernel config %s: %s", p, err)
        return None


def _valid(table: Any) -> bool:
    return isinstance(table, dict) and "gemv" in table and "sorted" in table and "gemv_max_pairs" in table


def _pick(table: dict[str, Any], num_tokens: int, top_k: int, source: str, path: str | None) -> MoEConfig:
    if path not in (None, "gemv", "sorted"):
        raise ValueError(f"unknown kernel path {path!r}; expected 'gemv' or 'sorted'")
    if path == "gemv" or (path is None and num_tokens * top_k <= int(table["gemv_max_pairs"])):
        g = table["gemv"]
        return MoEConfig(
            "gemv",
            TileConfig.from_dict(g["w13"], True),
            TileConfig.from_dict(g["w2"], True),
            source,
            int(table.get("gemv_min_ctas", 0)),
        )
    for entry in table["sorted"]:
        limit = entry.get("max_tokens")
        if limit is None or num_tokens <= int(limit):
            return MoEConfig(
                "sorted",
                TileConfig.from_dict(entry["w13"], False),
                TileConfig.from_dict(entry["w2"], False),
                source,
            )
    last = table["sorted"][-1]
    return MoEConfig(
        "sorted", TileConfig.from_dict(last["w13"], False), TileConfig.from_dict(last["w2"], False), source
    )


def get_config(
    num_tokens: int,
    top_k: int,
    hidden_size: int,
    num_experts: int,
    device_name: str | None = None,
    config_dir: Path | None = None,
    path: str | None = None,
) -> MoEConfig:
    """Tile config for a call with ``num_tokens`` tokens (see the module docstring for the order).

    ``path`` forces ``"gemv"`` or ``"sorted"`` (benchmarks, tests); by default the table's
    ``gemv_max_pairs`` decides.
    """
    directory = config_dir or CONFIG_DIR
    if device_name:
        dev = _load(str(directory / device_file_name(device_name)))
        if dev is not None:
            shaped = dev.get("shapes", {}).get(shape_key(hidden_size, num_experts, top_k))
            if _valid(shaped):
                return _pick(
                    shaped,
                    num_tokens,
                    top_k,
                    f"{device_file_name(device_name)}:{shape_key(hidden_size, num_experts, top_k)}",
                    path,
                )
            if _valid(dev):
                return _pick(dev, num_tokens, top_k, device_file_name(device_name), path)
    default = _load(str(directory / "default.json"))
    if _valid(default):
        return _pick(default, num_tokens, top_k, "default.json", path)
    return _pick(FALLBACK, num_tokens, top_k, "fallback", path)
