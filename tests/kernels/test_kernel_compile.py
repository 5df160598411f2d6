"""Compile the Triton kernels for an H100 (sm_90) ahead of time, without a GPU.

The interpreter checks what the kernels compute; it does not lower them.  This module
runs Triton's real compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled
ptxas) on every tile set that ``kernels/configs/*.json`` can hand the launcher (top
level and per-shape tables, ``gemv`` and every ``sorted`` entry), each with several
bit-width slot tuples that together cover 1/2/3/4/8/16 bits, dense slabs of bf16 and
fp16, bf16/fp16/fp32 activations and int32/int64 expert ids.  Per variant it checks:

* ptxas produced a cubin, so shape/layout/dtype errors that only a GPU build would
  hit show up here;
* the shared memory fits an H100 block (227 KiB; a launch fails with "out of
  resource" otherwise);
* no register spills, read from ``cuobjdump --dump-resource-usage`` of the cubin
  (``STACK`` and ``LOCAL`` must be 0: ptxas puts spilled registers on the stack) and
  cross-checked against ptxas' own ``-v`` report (spill stores/loads), with at most
  255 registers per thread.  A spill moves live tiles to local memory: still correct,
  but slow.  The registers of every variant are listed in pytest's terminal summary.
  The fp32 sorted variants are built at the capped tiles the launcher gives fp32
  activations (``tuning.fp32_sorted``, mirrored by ``sm90_aot.fp32_sorted_tiles``).

Arguments get the divisibility specialization a launch on a real model would (see
``ALIGNED_INTS``): it decides which loads vectorize, and so the register pressure.

The compiler runs in a subprocess without ``TRITON_INTERPRET``: once the interpreter
has been enabled in a process, Triton routes some IR building to it.  It gets a fresh
cache directory, so every run really compiles (and ptxas' report exists).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# Only look for triton: importing it here would fix this process's triton in compiled
# mode, and test_kernel_triton.py needs it interpreted on CPU.
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
# The AOT build and cuobjdump parsing, shared with bench/kernel_static.py (pytest's pythonpath has bench/).
from sm90_aot import (  # noqa: E402
    CUOBJDUMP,
    H100_SHARED_BYTES,
    MAX_REGISTERS,
    NoAOTCompiler,
    block_k,
    compile_variants,
    config_kernel_tiles,
    fp32_sorted_tiles,
    resource_usage,
)

QUANT_GROUP_SIZE = 128  # the usual quantization group of a layout with quantized slabs
DENSE_GROUP_SIZE = 256  # slab_weights.DENSE_GROUP_SIZE: a dense-only (CAMERA-P) layout

# Bit-width slot tuples compiled for every tile set, as (BITS, activation dtype,
# DENSE_FP16, topk_ids dtype).  Together they cover every bit-width (16 = dense slab),
# both dense dtypes, the three activation dtypes and both id dtypes.
SLOT_MIXES = [
    ((16,), "bf16", False, "i32"),  # CAMERA-P on a bf16 model (vLLM passes int32 ids)
    ((4, 2, 1), "bf16", False, "i64"),  # CAMERA-Q
    ((8, 3), "bf16", False, "i32"),  # 3 bits = two bit planes; 8 bits = the widest codes
    ((16, 4, 1), "bf16", False, "i64"),  # CAMERA-P+Q: a dense slab next to quantized ones
    ((16, 4, 1), "fp16", True, "i32"),  # P+Q on an fp16 model: the dense slab holds fp16
    ((8, 3), "fp32", False, "i32"),  # fp32 activations: IEEE dots on the sorted path
    # Single-slot builds (a model at one bit-width): one slot's unpacking alone gets other
    # registers than in a mix, and spilled at some tiles the mixes compiled cleanly.
    *(((b,), "bf16", False, "i32") for b in (1, 2, 3, 4, 8)),
    ((4,), "fp32", False, "i32"),
    ((16,), "fp32", False, "i32"),
]


def _variants() -> list[dict]:
    variants: dict[str, dict] = {}
    for (kernel, sizes, warps, stages), sources in config_kernel_tiles().items():
        for bits, dtype, dense_fp16, ids in SLOT_MIXES:
            group = DENSE_GROUP_SIZE if set(bits) == {16} else QUANT_GROUP_SIZE
            tiles, nw, ns = dict(sizes), warps, stages
            if dtype == "fp32" and "sorted" in kernel:  # as launch.py does (tuning.fp32_sorted)
                tiles, nw, ns = fp32_sorted_tiles(tiles, warps)
            tiles["BLOCK_K"] = block_k(tiles["BLOCK_K"], group)
            # What the kernel really sees: the w2 GEMV reads only the fp32 intermediate,
            # and the sorted kernels get int32 sorted ids instead of topk_ids.
            act = "fp32" if kernel == "_w2_gemv_kernel" else dtype
            ids = None if "sorted" in kernel else ids
            tile_name = "".join(f"{k[-1]}{v}" for k, v in tiles.items())  # BLOCK_M -> M
            name = "-".join(
                [kernel[1:-7], act, "b" + "_".join(map(str, bits)), f"{tile_name}w{nw}s{ns}"]
                + (["dense_fp16"] if dense_fp16 else [])
                + ([f"ids{ids[1:]}"] if ids else [])
            )
            # Several configured tile sets can give one build (the fp32 caps): list every source.
            variant = variants.setdefault(
                name,
                dict(
                    id=name,
                    kernel=kernel,
                    act=act,
                    bits=list(bits),
                    dense_fp16=dense_fp16,
                    ids=ids,
                    tiles=tiles,
                    group_size=group,
                    warps=nw,
                    stages=ns,
                    sources=[],
                ),
            )
            variant["sources"] += [src for src in sources if src not in variant["sources"]]
    return list(variants.values())


def _align_variants() -> list[dict]:
    """The routing kernel (``launch.moe_align_triton``) at every configured sorted ``BLOCK_M``
    for 1, 128, 256 and 1024 experts, with the launcher's own constexprs and warps."""
    # camera_kernels.launch imports torch but not triton (moe_slab is imported when launching).
    from camera_kernels.launch import moe_align_launch_options

    block_ms = sorted({dict(sizes)["BLOCK_M"] for (k, sizes, _, _) in config_kernel_tiles() if "sorted" in k})
    out = []
    for block_m in block_ms:
        for experts, ids in ((1, "i32"), (128, "i32"), (128, "i64"), (256, "i64"), (1024, "i64")):
            tiles = moe_align_launch_options(experts, block_m)
            warps = tiles.pop("num_warps")
            name = f"moe_align-M{block_m}-E{experts}-ids{ids[1:]}"
            out.append(
                dict(id=name, kernel="_moe_align_kernel", act="bf16", bits=[], dense_fp16=False, ids=ids,
                     tiles=tiles, group_size=QUANT_GROUP_SIZE, warps=warps, stages=2,
                     sources=["launch.moe_align_triton"])
            )  # fmt: skip
    return out


VARIANTS = _variants() + _align_variants()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    try:
        return compile_variants(
            VARIANTS, tmp_path_factory.mktemp("cubins"), tmp_path_factory.mktemp("triton_cache"), timeout=900
        )
    except NoAOTCompiler as err:
        pytest.skip(str(err))


class _UsageTable:
    """Prints the resource usage of every variant in pytest's terminal summary."""

    def __init__(self, rows: list[str]) -> None:
        self.rows = rows

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.write_sep(
            "-", "sm_90 resource usage (cuobjdump; spill bytes from ptxas -v; shared = dynamic bytes)"
        )
        for row in self.rows:
            terminalreporter.write_line(row)


@pytest.fixture(scope="module")
def resources(compiled, request) -> dict[str, dict | None]:
    """Per variant id: the cuobjdump counts of its kernel (``None`` when it did not compile)."""
    if not CUOBJDUMP.is_file():
        pytest.skip(f"no cuobjdump in this triton install ({CUOBJDUMP}): the register/spill check needs it")
    usage, rows = {}, []
    for v, r in zip(VARIANTS, compiled):
        u = resource_usage(r["cubin"]).get(r["name"]) if r["ok"] else None
        usage[v["id"]] = u
        if u is None:
            rows.append(f"{v['id']:<58} did not compile")
            continue
        p = r["ptxas"]
        spill = f"{p['spill_stores']}/{p['spill_loads']}" if p else "n/a"
        rows.append(
            f"{v['id']:<58} REG {u['REG']:3d}  STACK {u['STACK']:5d}  LOCAL {u['LOCAL']}"
            f"  spill st/ld {spill:>11}  shared {r['shared']}"
        )
    if not request.config.pluginmanager.has_plugin("kernel-compile-usage"):
        request.config.pluginmanager.register(_UsageTable(rows), "kernel-compile-usage")
    return usage


IDS = [v["id"] for v in VARIANTS]


@pytest.mark.kernel
@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=IDS)
def test_kernel_compiles_for_h100(compiled, index):
    v, result = VARIANTS[index], compiled[index]
    assert result["ok"], f"{v['id']} (from {', '.join(v['sources'])}): {result.get('error', 'no cubin')}"
    assert result["shared"] <= H100_SHARED_BYTES, f"{result['shared']} bytes of shared memory"


@pytest.mark.kernel
@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=IDS)
def test_kernel_does_not_spill(compiled, resources, index, record_property):
    v, result = VARIANTS[index], compiled[index]
    if not result["ok"]:
        pytest.fail(f"{v['id']} did not compile (see test_kernel_compiles_for_h100)")
    usage = resources[v["id"]]
    assert usage is not None, f"cuobjdump lists no function {result['name']}"
    record_property("registers", usage["REG"])
    where = f"{v['id']} (from {', '.join(v['sources'])}): cuobjdump {usage}, ptxas -v {result['ptxas']}"
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0, f"register spill: {where}"
    assert usage["REG"] <= MAX_REGISTERS, f"too many registers: {where}"
    ptxas = result["ptxas"]
    if ptxas is not None:  # the same build, as ptxas reported it
        assert ptxas["spill_stores"] == 0 and ptxas["spill_loads"] == 0, f"register spill: {where}"
        assert ptxas["regs"] == usage["REG"], f"ptxas and cuobjdump disagree: {where}"
