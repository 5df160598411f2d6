"""Ahead-of-time sm_90 builds of the slab MoE kernels and what their machine code says, without a GPU.

Shared by ``tests/kernels/test_kernel_compile.py`` (every tile set compiles, nothing spills)
and ``bench/kernel_static.py`` (registers, spills and SASS instructions per weight).
Imports only the standard library; triton runs in a subprocess (:func:`compile_variants`)
because a process that has enabled ``TRITON_INTERPRET`` routes some IR building to the
interpreter.

A *variant* is a dict with ``kernel`` (a ``@triton.jit`` name in ``kernels/moe_slab.py``),
``act`` (activation dtype ``bf16``/``fp16``/``fp32``), ``bits`` (one bit-width per slot),
``dense_fp16``, ``ids`` (``i32``/``i64`` or ``None``), ``tiles`` (``BLOCK_*`` sizes),
``group_size``, ``warps``, ``stages`` and, optionally, ``split_k`` and ``act_splits`` (the
GEMV kernels' ``SPLIT_K`` and ``ACT_SPLITS``, default 1).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels" / "moe_slab.py"
CONFIG_DIR = ROOT / "kernels" / "configs"
_TRITON_SPEC = importlib.util.find_spec("triton")
NVIDIA_BIN = Path(_TRITON_SPEC.origin).parent / "backends" / "nvidia" / "bin" if _TRITON_SPEC else None
CUOBJDUMP = NVIDIA_BIN / "cuobjdump" if NVIDIA_BIN else None

H100_SHARED_BYTES = 232448  # 227 KiB per block
MAX_REGISTERS = 255  # per thread on sm_90

# Integer arguments compiled with Triton's "multiple of 16" specialization, as a launch
# on a real model gets them: the hidden size (a multiple of 16 in every common MoE
# model) and the strides equal to it.  Everything else (ragged slab widths, act strides
# and columns, tile starts, pair counts) stays unhinted, the specialization with the
# fewest vectorized loads.  Pointers are always hinted (torch allocations are 16-byte aligned).
ALIGNED_INTS = ["hidden", "stride_x", "stride_out"]


# kernels/tuning.py's FP32_MAX_BLOCK_* and FP32_ROWS_PER_WARP, mirrored without importing the
# package (tests/kernels/test_kernel_tuning.py checks that the two agree).
FP32_MAX_BLOCK = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}
FP32_ROWS_PER_WARP = 4
FP32_NUM_STAGES = 3


def fp32_sorted_tiles(tiles: dict[str, int], num_warps: int) -> tuple[dict[str, int], int, int]:
    """As ``tuning.fp32_sorted_tile`` does for fp32 activations: ``(capped tiles, num_warps, num_stages)``."""
    capped = {k: min(v, FP32_MAX_BLOCK.get(k, v)) for k, v in tiles.items()}
    return capped, max(num_warps, capped["BLOCK_M"] // FP32_ROWS_PER_WARP), FP32_NUM_STAGES


def config_tables(doc: dict) -> list[dict]:
    """The top-level table of a config file and each of its per-shape tables."""
    return [doc, *doc.get("shapes", {}).values()]


def block_k(configured: int, group_size: int) -> int:
    """As the launcher does: the largest K tile <= the configured one that divides the group size."""
    return next(bk for bk in (256, 128, 64, 32) if bk <= configured and group_size % bk == 0)


def config_kernel_tiles(config_dir: Path = CONFIG_DIR) -> dict[tuple, list[str]]:
    """``(kernel, tile sizes, num_warps, num_stages)`` -> where it comes from, over all config files."""
    found: dict[tuple, list[str]] = {}
    for path in sorted(config_dir.glob("*.json")):
        doc = json.loads(path.read_text())
        for t, table in enumerate(config_tables(doc)):
            where = path.name if t == 0 else f"{path.name}:shapes[{t - 1}]"
            entries = [("gemv", "gemv", table["gemv"])]
            entries += [("sorted", f"sorted[{i}]", e) for i, e in enumerate(table["sorted"])]
            for path_kind, label, entry in entries:
                for part in ("w13", "w2"):
                    tile = entry[part]
                    sizes = (("BLOCK_M", int(tile["BLOCK_M"])),) if path_kind == "sorted" else ()
                    sizes += (("BLOCK_N", int(tile["BLOCK_N"])), ("BLOCK_K", int(tile["BLOCK_K"])))
                    # Defaults as in tuning.TileConfig.from_dict.
                    key = (
                        f"_{part}_{path_kind}_kernel",
                        sizes,
                        int(tile.get("num_warps", 4)),
                        int(tile.get("num_stages", 2)),
                    )
                    found.setdefault(key, []).append(f"{where}:{label}.{part}")
    return found


COMPILER = r"""
import contextlib, importlib.util, io, json, os, re, sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as err:
    print("NOAPI" + json.dumps(str(err)))
    sys.exit(0)

path, out_dir, variants, aligned = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
spec = importlib.util.spec_from_file_location("moe_slab_aot", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)

def ptxas_report(log):
    # ptxas -v: "N bytes stack frame, N bytes spill stores, N bytes spill loads" and
    # "Used N registers"; absent when the kernel came from a cache.
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    used = re.search(r"Used (\d+) registers", log)
    if not (frame and used):
        return None
    stack, stores, loads = map(int, frame.groups())
    return {"regs": int(used.group(1)), "stack": stack, "spill_stores": stores, "spill_loads": loads}

results = []
for i, v in enumerate(variants):
    fn = getattr(module, v["kernel"])
    bits, act = v["bits"], "*" + v["act"]
    n = len(bits)
    # A dense slot's scale/zero pointers are its qweight (the launcher passes it: never read).
    aux = tuple("*i32" if b == 16 else "*fp16" for b in bits)
    types = {
        "x_ptr": act, "act_ptr": act if "sorted" in v["kernel"] else "*fp32", "out_ptr": "*fp32",
        "q_ptrs": ("*i32",) * n, "s_ptrs": aux, "z_ptrs": aux,
        "w_strides": ("i32",) * n, "act_cols": ("i32",) * n, "tile_starts": ("i32",) * (n + 1),
        "topk_ids_ptr": "*" + (v["ids"] or "i32"), "ids_ptr": "*" + (v["ids"] or "i32"),
        "topk_w_ptr": "*fp32",
        "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32",
        "sizes_ptr": "*i32", "col_off_ptr": "*i32", "row_off_ptr": "*i32", "grp_off_ptr": "*i32",
    }
    consts = dict(v["tiles"], BITS=tuple(bits), DENSE_FP16=v["dense_fp16"], COLS=tuple(range(n)),
                  GROUP_SIZE=v["group_size"], IEEE=v["act"] == "fp32", SPLIT_K=v.get("split_k", 1),
                  ACT_SPLITS=v.get("act_splits", 1))
    consts = {k: c for k, c in consts.items() if k in fn.arg_names}
    sig = {a: types.get(a, "constexpr" if a in consts else "i32") for a in fn.arg_names}
    # The divisibility hints a launch derives from its arguments (see ALIGNED_INTS).
    attrs = {}
    for j, a in enumerate(fn.arg_names):
        t = sig[a]
        for k, elem in enumerate(t if isinstance(t, tuple) else (t,)):
            if elem.startswith("*") or a in aligned:
                attrs[(j, k) if isinstance(t, tuple) else (j,)] = [["tt.divisibility", 16]]
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints there
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": v["warps"], "num_stages": v["stages"]})
        cubin = k.asm.get("cubin") or b""
        cubin_path = os.path.join(out_dir, f"{i}.cubin")
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        results.append({"ok": bool(cubin), "name": k.metadata.name, "shared": k.metadata.shared,
                        "cubin": cubin_path, "ptxas": ptxas_report(log.getvalue())})
    except Exception as err:
        results.append({"ok": False, "error": f"{type(err).__name__}: {err}"[-3000:]})
print("RESULTS" + json.dumps(results))
"""


class NoAOTCompiler(RuntimeError):
    """This triton has no ahead-of-time compile API (or is not installed)."""


def compile_variants(
    variants: list[dict], out_dir: Path, cache_dir: Path, kernels: Path = KERNELS, timeout: float = 1800
) -> list[dict]:
    """Compile each variant for sm_90 in a fresh subprocess; one result dict per variant.

    A result has ``ok``, and when it compiled ``name`` (the kernel's symbol), ``shared``
    (dynamic shared bytes), ``cubin`` (its path under ``out_dir``) and ``ptxas`` (the
    ``-v`` report, or ``None``); otherwise ``error``.  ``cache_dir`` should be empty so
    that every kernel really compiles (ptxas' report only exists then).
    """
    if _TRITON_SPEC is None:
        raise NoAOTCompiler("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            COMPILER,
            str(kernels),
            str(out_dir),
            json.dumps(variants),
            json.dumps(ALIGNED_INTS),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    lines = proc.stdout.splitlines()
    if any(ln.startswith("NOAPI") for ln in lines):
        raise NoAOTCompiler(f"this triton has no ahead-of-time compile API: {proc.stdout[-500:]}")
    line = next((ln for ln in lines if ln.startswith("RESULTS")), None)
    if line is None:
        raise RuntimeError(f"compiler subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULTS") :])


def resource_usage(cubin: str | Path) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage``: per function its ``REG``, ``STACK``, ``LOCAL``, ... counts.

    The output names each function on a line ``Function <name>:`` and lists its
    ``KEY:value`` counts on the next line(s).
    """
    out = subprocess.run(
        [str(CUOBJDUMP), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    usage: dict[str, dict[str, int]] = {}
    current = None
    for line in out.splitlines():
        head = re.match(r"\s*Function (\S+):\s*$", line)
        if head:
            current = usage.setdefault(head.group(1), {})
        elif current is not None:
            current.update({k: int(n) for k, n in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)})
    return usage


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def sass(cubin: str | Path) -> list[tuple[int, str, str]]:
    """``cuobjdump -sass``: ``(address, opcode, instruction text)`` of every instruction, in order.

    The opcode drops the predicate guard (``@P0``/``@!P0``) and keeps the modifiers
    (``LOP3.LUT``); a cubin here holds one kernel.
    """
    out = subprocess.run(
        [str(CUOBJDUMP), "-sass", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    instrs = []
    for line in out.splitlines():
        m = _SASS_LINE.match(line)
        if m:
            text = m.group(2)
            op = re.sub(r"^@!?U?P[0-9T]\s+", "", text).split()[0]
            instrs.append((int(m.group(1), 16), op, text))
    return instrs


def loops(instrs: list[tuple[int, str, str]]) -> list[dict]:
    """Every loop of a kernel: a back edge is a ``BRA`` to a lower address.

    Returns ``{start, end, count, innermost}`` per back edge: the loop body runs from the
    branch target ``start`` to the branch at ``end`` (inclusive), ``count`` instructions;
    ``innermost`` when no other back edge lies inside it.  ``BRA`` to its own address
    (the trap loop after ``EXIT``) is not a loop.
    """
    index = {addr: i for i, (addr, _, _) in enumerate(instrs)}
    found = []
    for i, (addr, op, text) in enumerate(instrs):
        if not op.startswith("BRA"):
            continue
        target = re.search(r"BRA(?:\.[A-Z.]+)?\s+(?:`\()?(?:\.L_x_\d+|0x([0-9a-f]+))", text)
        if not target or target.group(1) is None:
            continue
        dest = int(target.group(1), 16)
        if dest < addr and dest in index:
            found.append({"start": dest, "end": addr, "count": i - index[dest] + 1})
    for lp in found:
        lp["innermost"] = not any(
            o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"] and o["end"] != lp["end"]
            for o in found
        )
    return found


def main_loop(instrs: list[tuple[int, str, str]]) -> dict | None:
    """The innermost loop with the most instructions (the K loop of the kernels), or ``None``.

    Adds ``opcodes``: instruction counts by opcode (without modifiers) inside the body.
    """
    inner = [lp for lp in loops(instrs) if lp["innermost"]]
    if not inner:
        return None
    best = dict(max(inner, key=lambda lp: lp["count"]))
    ops: dict[str, int] = {}
    for addr, op, _ in instrs:
        if best["start"] <= addr <= best["end"]:
            base = op.split(".")[0]
            ops[base] = ops.get(base, 0) + 1
    best["opcodes"] = dict(sorted(ops.items(), key=lambda kv: -kv[1]))
    return best
