"""Where one CPU decode step goes: the expert op's share of a token, dense bf16 vs CAMERA-P/Q.

Explains the one-request column of the speed table (docs/speed.md): how much of a step the
expert op is, and how much faster each checkpoint's op is than dense's at one token.
Each checkpoint of the speed benchmark (built by ``bench/speed_cpu.py --prepare-only``) is
served in this process by vLLM (default torch.compile mode, bf16, one request) and one
generation is profiled with ``torch.profiler``::

    python bench/decode_profile.py [--models dense,p50,q225] [--tokens 64]

Writes ``bench/results/decode-profile.json``: per model, wall ms per token (without the
profiler) and, from the profile, the expert op's ms per token and its share of the profiled
CPU time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

from stamp import add_stamp_args, stamp

ROOT = Path(__file__).resolve().parent
MODELS = ROOT / ".cache" / "speed" / "qwen3moe-h1024-l8-e32k4-i768"
OUT = ROOT / "results" / "decode-profile.json"
# The expert ops of each model; CAMERA layers use one of the plugin's three (vllm_plugin/ops.py).
EXPERT_OPS = {
    "dense": ("_C::cpu_fused_moe",),
    "camera": ("camera_vllm::moe_ragged", "camera_vllm::moe_cpu_buckets", "camera_vllm::moe_slab"),
}


def profile_model(name: str, tokens: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(MODELS / name),
        dtype="bfloat16",
        max_model_len=256,
        max_num_seqs=8,
        seed=0,
        distributed_executor_backend="uni",
    )
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(3, 35))}
    llm.generate([prompt], params, use_tqdm=False)  # warm-up: compile, caches
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        walls.append((time.perf_counter() - t0) * 1e3 / tokens)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate([prompt], params, use_tqdm=False)
    events = {e.key: e for e in prof.key_averages()}
    ops = EXPERT_OPS["dense" if name == "dense" else "camera"]
    total_us = sum(e.self_cpu_time_total for e in events.values())
    if not any(op in events for op in ops):
        raise RuntimeError(f"{name}: the profile holds none of the expert ops {ops}: renamed?")
    expert_us = sum(events[op].cpu_time_total for op in ops if op in events)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return {
        "model": name,
        "ms_per_token": round(sorted(walls)[1], 3),
        "expert_op": "+".join(op for op in ops if op in events),
        "expert_ms_per_token": round(expert_us / 1e3 / tokens, 3),
        "expert_share_of_profile": round(expert_us / total_us, 3) if total_us else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="dense,p50,q225", help="checkpoints under " + str(MODELS))
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    add_stamp_args(ap)
    args = ap.parse_args()
    here = stamp(allow_dirty=args.allow_dirty)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker runs here, under the profiler
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    names = args.models.split(",")
    missing = [n for n in names if not (MODELS / n / "config.json").is_file()]
    if missing:
        raise SystemExit(
            f"missing checkpoints {missing} under {MODELS}: run bench/speed_cpu.py --prepare-only"
        )
    rows = []
    for name in names:
        rows.append(profile_model(name, args.tokens))
        print(json.dumps(rows[-1]), flush=True)
    dense = next((r for r in rows if r["model"] == "dense"), None)
    if dense:
        for r in rows:
            r["speedup_vs_dense"] = round(dense["ms_per_token"] / r["ms_per_token"], 3)
            r["expert_speedup_vs_dense"] = round(dense["expert_ms_per_token"] / r["expert_ms_per_token"], 3)
        # Amdahl: the step's speed-up if the expert op cost nothing (from the profile's share).
        share = dense["expert_share_of_profile"]
        bound = round(1.0 / (1.0 - share), 3) if share is not None and share < 1 else None
    else:
        bound = None
    result = {
        "benchmark": "decode-profile",
        "stamp": here,
        "tokens": args.tokens,
        "concurrency": 1,
        "rows": rows,
        "speedup_bound_if_experts_were_free": bound,
        "loadavg_1min": os.getloadavg()[0],
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
