"""Kernel tile configs: JSON data, lookup order and fallback."""

from __future__ import annotations

import json

from camera_kernels import tuning
from camera_kernels.tuning import (
    FALLBACK,
    TileConfig,
    device_file_name,
    fp32_sorted,
    fp32_sorted_tile,
    get_config,
    shape_key,
)


def test_kernel_default_json_equals_builtin_fallback():
    # The fallback exists for a missing/broken data file; it must not drift from the data.
    data = json.loads((tuning.CONFIG_DIR / "default.json").read_text())
    data.pop("_comment")
    assert data == FALLBACK


def test_kernel_config_paths_by_token_count():
    assert get_config(1, 8, 2048, 128).path == "gemv"
    assert get_config(8, 8, 2048, 128).path == "gemv"  # 64 pairs
    mid = get_config(16, 8, 2048, 128)
    assert mid.path == "sorted" and mid.w13.block_m == 16
    assert get_config(2048, 8, 2048, 128).w13.block_m == 64


def test_kernel_device_file_and_shape_entry_win(tmp_path):
    (tmp_path / "default.json").write_text(json.dumps(FALLBACK))
    device = dict(FALLBACK, gemv_max_pairs=4)
    shaped = dict(FALLBACK, gemv_max_pairs=1000)
    device["shapes"] = {shape_key(2048, 64, 6): shaped}
    (tmp_path / device_file_name("NVIDIA H100 80GB HBM3")).write_text(json.dumps(device))
    assert device_file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"
    cfg = get_config(2, 8, 2048, 128, "NVIDIA H100 80GB HBM3", tmp_path)
    assert cfg.path == "sorted" and cfg.source == "NVIDIA_H100_80GB_HBM3.json"
    cfg = get_config(100, 6, 2048, 64, "NVIDIA H100 80GB HBM3", tmp_path)
    assert cfg.path == "gemv" and cfg.source.endswith(shape_key(2048, 64, 6))
    assert get_config(2, 8, 2048, 128, "Other GPU", tmp_path).source == "default.json"


def test_kernel_broken_config_falls_back(tmp_path):
    (tmp_path / "default.json").write_text("{not json")
    cfg = get_config(1, 1, 64, 4, None, tmp_path)
    assert cfg.source == "fallback" and cfg.path == "gemv"


def test_kernel_fp32_caps_sorted_tiles_only():
    cfg = get_config(2048, 8, 2048, 128)
    capped = fp32_sorted(cfg)
    for tile in (capped.w13, capped.w2):
        assert tile.block_m <= tuning.FP32_MAX_BLOCK_M and tile.block_n <= tuning.FP32_MAX_BLOCK_N
        assert tile.block_k <= tuning.FP32_MAX_BLOCK_K
        assert tile.num_warps >= tile.block_m // tuning.FP32_ROWS_PER_WARP
    assert capped.path == "sorted" and capped.source == cfg.source
    gemv = get_config(1, 8, 2048, 128)
    assert fp32_sorted(gemv) == gemv  # GEMV math is fp32 for every dtype: tiles unchanged
    small = TileConfig(16, 16, 32, 4, tuning.FP32_NUM_STAGES)
    assert fp32_sorted_tile(small) == small  # already within the caps


def test_kernel_fp32_caps_match_the_aot_mirror():
    # bench/sm90_aot.py (no package import there) builds the fp32 variants with a copy of the caps.
    import sm90_aot

    for m, n, k, warps in [(16, 64, 128, 4), (32, 64, 64, 4), (64, 128, 64, 8), (16, 16, 32, 2)]:
        tile = fp32_sorted_tile(TileConfig(m, n, k, warps, 3))
        tiles, nw, ns = sm90_aot.fp32_sorted_tiles({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, warps)
        assert (tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["BLOCK_K"], nw, ns) == (
            tile.block_m,
            tile.block_n,
            tile.block_k,
            tile.num_warps,
            tile.num_stages,
        )
