"""The compressor at real scale: wall, CPU and peak memory per layer on real-shape MoE layers.

Builds (once, cached in ``bench/.cache/scale``) random bf16 models with the exact layer
shapes of three model families users compress, with a few decoder layers only:

* ``qwen3-30b-a3b``: 128 experts x 768, top-8, hidden 2048 (48 layers in the real model);
* ``deepseek-v2-lite``: 64 routed experts x 1408 plus 2 shared, top-6, hidden 2048, the
  first layer dense (27 layers, 26 of them MoE);
* ``mixtral-8x7b``: 8 experts x 14336, top-2, hidden 4096 (32 layers).

and runs the CLI on them as a user does (``camera-vllm analyze | prune | quantize``,
default options apart from the calibration size and ``--device cpu``), each phase in a
fresh child process measured from outside: wall (``perf_counter``), CPU time and peak
resident memory (``os.wait4``'s rusage of that child; this parent imports no torch, so the
``ru_maxrss`` carried over the fork is ~30 MB).

Per-layer cost: runs at two depths (``--layers 2,4``) give a straight-line fit
``fixed + layers x per_layer``; with one depth the whole run is charged to its layers (an
upper bound).  Runs at two calibration sizes fit the per-layer cost as
``a + b x tokens``, which projects to the CLI default (128 x 2048 tokens); with one size
the projection scales only the token-proportional part... which is unknown, so both ends
are reported (``per_layer`` kept as is, and scaled by the token ratio).

GPU columns are estimates from FLOPs and bytes (labelled so), not measurements.

    python bench/compressor_scale.py [--models qwen3-30b-a3b,...] [--phases analyze,prune,rtn,gptq]
        [--layers 2] [--calib 16x512] [--threads 1] [--allow-dirty]

Results: ``bench/results/compressor-scale.json`` and ``docs/compressor-scale.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "compressor-scale.json"
DOC = ROOT.parent / "docs" / "compressor-scale.md"
CACHE = ROOT / ".cache" / "scale"
SHARD_BYTES = 1 << 30  # ~1 GiB shards: real checkpoints come in several files
DEFAULT_CALIB_TOKENS = 128 * 2048  # the CLI default (num_seqs x seq_len, where the context allows)


@dataclass(frozen=True)
class Shape:
    """A real model's layer shapes; ``layers`` is the real model's depth."""

    name: str
    arch: str
    layers: int
    moe_layers: int
    hidden: int
    experts: int
    width: int
    top_k: int
    shared_width: int  # 0: no shared expert
    config: dict[str, Any]

    def expert_params_per_layer(self) -> int:
        return 3 * self.hidden * (self.experts * self.width + self.shared_width)


SHAPES: dict[str, Shape] = {
    "qwen3-30b-a3b": Shape(
        "qwen3-30b-a3b", "qwen3_moe", 48, 48, 2048, 128, 768, 8, 0,
        dict(
            hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
            num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
            norm_topk_prob=True, decoder_sparse_step=1,
        ),
    ),
    "deepseek-v2-lite": Shape(
        "deepseek-v2-lite", "deepseek_v2", 27, 26, 2048, 64, 1408, 6, 2 * 1408,
        dict(
            hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64,
            n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, num_attention_heads=16,
            num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
            qk_rope_head_dim=64, v_head_dim=128, norm_topk_prob=False, topk_method="greedy",
            routed_scaling_factor=1.0, n_group=1, topk_group=1,
        ),
    ),
    "mixtral-8x7b": Shape(
        "mixtral-8x7b", "mixtral", 32, 32, 4096, 8, 14336, 2, 0,
        dict(
            hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        ),
    ),
}  # fmt: skip

PHASES: dict[str, list[str]] = {
    "analyze": ["analyze"],
    "prune": ["prune", "--ratio", "0.5"],
    "rtn": ["quantize", "--avg-bits", "2.25", "--method", "rtn"],
    "gptq": ["quantize", "--avg-bits", "2.25", "--method", "gptq"],
}


# -- the synthetic models ----------------------------------------------------------------------------
def build_model(shape: Shape, moe_layers: int, out: Path) -> Path:
    """A random bf16 model with ``shape``'s layers (``moe_layers`` MoE layers), written shard by shard.

    The model is built on the meta device and each tensor drawn on its own (seeded by its
    name), so building a Mixtral-shape layer never holds more than one shard in memory.
    """
    done = out / "config.json"
    if done.exists():
        return out
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import save_file

    from camera_vllm.testing.tiny_models import build_tokenizer

    cls = {
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    }[shape.arch]
    dense_first = shape.layers - shape.moe_layers
    tok = build_tokenizer(2048)
    cfg = cls[0](
        **shape.config,
        vocab_size=len(tok),
        num_hidden_layers=moe_layers + dense_first,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        torch_dtype="bfloat16",
    )
    with torch.device("meta"):
        model = cls[1](cfg)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".partial"
    tmp.mkdir(exist_ok=True)
    current: dict[str, torch.Tensor] = {}
    size, written = 0, 0
    for name, p in model.state_dict().items():
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if name.endswith("norm.weight") or "layernorm" in name:
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > SHARD_BYTES:  # one shard in memory at a time
            save_file(current, str(tmp / f"part-{written:05d}.safetensors"))
            current, size, written = {}, 0, written + 1
        current[name] = t
        size += nbytes
    save_file(current, str(tmp / f"part-{written:05d}.safetensors"))
    files = sorted(tmp.glob("*.safetensors"))
    weight_map: dict[str, str] = {}
    for i, f in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        with safe_open(str(f), "pt") as h:
            weight_map.update(dict.fromkeys(h.keys(), final))
        f.rename(out / final)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tok.save_pretrained(out)
    tmp.rmdir()
    cfg.architectures = [cls[1].__name__]  # what from_pretrained and the CLI read
    cfg.save_pretrained(out)  # config.json last: its presence marks a complete model
    return out


def calibration_file(path: Path) -> Path:
    """Plain text for calibration: the offline corpus (bench/text_data.py), else a built-in paragraph."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from text_data import split  # a sibling: bench/ is this script's sys.path[0]

            text = split()[0]
        except Exception:  # the corpus is optional: cost hardly depends on the words
            from camera_vllm.testing.tiny_models import _CORPUS

            text = _CORPUS * 20000
        path.write_text(text)
    return path


# -- measuring one phase -----------------------------------------------------------------------------
def run_phase(model: Path, phase: str, calib: Path, num_seqs: int, seq_len: int, threads: int) -> dict:
    """Run one CLI phase in a child; wall, CPU seconds and peak RSS of that child."""
    out = CACHE / "out" / f"{model.name}-{phase}"
    cmd = [sys.executable, "-m", "camera_vllm.cli", *PHASES[phase], str(model), "--out", str(out)]
    cmd += ["--calib", str(calib), "--num-seqs", str(num_seqs), "--seq-len", str(seq_len)]
    cmd += ["--device", "cpu", "--no-progress"]
    if phase != "analyze":
        cmd.append("--overwrite")
    cmd += ["--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n{log[-4000:]}")
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 3),
    }


# -- projections -------------------------------------------------------------------------------------
def per_layer_fit(points: list[tuple[int, float]]) -> tuple[float, float, str]:
    """(fixed, per_layer, how) from (layers, seconds) points."""
    if len(points) >= 2:
        (l0, t0), (l1, t1) = points[0], points[-1]
        slope = (t1 - t0) / (l1 - l0)
        return t0 - slope * l0, slope, f"fit over {l0} and {l1} layers"
    layers, t = points[0]
    return 0.0, t / layers, f"whole {layers}-layer run charged to its layers (upper bound)"


def gpu_estimate(shape: Shape, phase: str, tokens: int) -> dict[str, float]:
    """Seconds per MoE layer on one A100 / H100, from FLOPs and bytes only (an estimate).

    fp32 math (the compressor's default dtype; TF32 off) at 30 % of peak: A100 19.5 TFLOP/s,
    H100 67 TFLOP/s; the layer's fp32 weights read once at 1.5 / 3.35 TB/s.  Forward per token:
    top-k experts (+shared) x 6 H n FLOPs; the re-run of CAMERA-P/Q doubles it; GPTQ adds
    per expert the Hessian (2 t_e H^2 for gate/up, 2 t_e n^2 for down) and the column sweep
    (~2 rows x cols^2 per matrix).
    """
    h, n, e, k = shape.hidden, shape.width, shape.experts, shape.top_k
    fwd = tokens * 6 * h * (k * n + shape.shared_width)
    flops = fwd * (1 if phase == "analyze" else 2)
    if phase == "gptq":
        t_e = tokens * k / e
        hess = e * (2 * t_e * h * h * 2 + 2 * t_e * n * n)
        sweep = e * (2 * (2 * n) * h * h + 2 * h * n * n)
        flops += hess + sweep
    byts = 4 * shape.expert_params_per_layer() * 2
    return {
        gpu: round(max(flops / (peak * 0.3), byts / bw), 3)
        for gpu, peak, bw in (("a100", 19.5e12, 1.5e12), ("h100", 67e12, 3.35e12))
    }


# -- main --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3-30b-a3b", help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument("--phases", default="analyze,prune,rtn,gptq", help=f"comma list of {list(PHASES)}")
    ap.add_argument("--layers", default="2", help="MoE layer depths to run, e.g. 2,4 (fit per layer)")
    ap.add_argument("--calib", default="16x512", help="calibration sizes NUMxLEN, comma list")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--allow-dirty", action="store_true", help="record results from an uncommitted tree")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of the existing results file that this run does not measure again",
    )
    args = ap.parse_args(argv)

    from stamp import stamp

    st = stamp(allow_dirty=args.allow_dirty, argv=argv)  # refuses a dirty tree without --allow-dirty
    calib = calibration_file(CACHE / "calib.txt")
    depths = [int(x) for x in args.layers.split(",")]
    sizes = [tuple(int(v) for v in c.split("x")) for c in args.calib.split(",")]
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        shape = SHAPES[name]
        for depth in depths:
            model = build_model(shape, depth, CACHE / "models" / f"{name}-{depth}l")
            for num_seqs, seq_len in sizes:
                for phase in args.phases.split(","):
                    m = run_phase(model, phase, calib, num_seqs, seq_len, args.threads)
                    row = {"model": name, "moe_layers": depth, "phase": phase, "num_seqs": num_seqs}
                    row |= {"seq_len": seq_len, "threads": args.threads, **m}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    if args.merge and RESULTS.exists():
        key = ("model", "moe_layers", "phase", "num_seqs", "seq_len")
        new = {tuple(r[k] for k in key) for r in rows}
        old = json.loads(RESULTS.read_text())
        kept = [
            r | {"commit": old["stamp"]["commit"]} for r in old["rows"] if tuple(r[k] for k in key) not in new
        ]
        rows = kept + [r | {"commit": st["commit"]} for r in rows]
    result = {"stamp": st, "rows": rows, "projections": project(rows)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    write_doc(result)
    print(f"wrote {RESULTS} and {DOC}")


def project(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-layer cost and full-model projections per (model, phase)."""
    out = []
    for name in sorted({r["model"] for r in rows}):
        shape = SHAPES[name]
        for phase in PHASES:
            rs = [r for r in rows if r["model"] == name and r["phase"] == phase]
            if not rs:
                continue
            tokens_list = sorted({r["num_seqs"] * r["seq_len"] for r in rs})
            tok = tokens_list[0]
            at = sorted((r["moe_layers"], r["cpu_s"]) for r in rs if r["num_seqs"] * r["seq_len"] == tok)
            fixed, per_layer, how = per_layer_fit(at)
            full_small = fixed + shape.moe_layers * per_layer
            if len(tokens_list) >= 2:
                hi = tokens_list[-1]
                at_hi = sorted(
                    (r["moe_layers"], r["cpu_s"]) for r in rs if r["num_seqs"] * r["seq_len"] == hi
                )
                _, per_layer_hi = per_layer_fit(at_hi)[:2]
                b = (per_layer_hi - per_layer) / (hi - tok)
                a = per_layer - b * tok
                per_layer_default = (a + b * DEFAULT_CALIB_TOKENS, a + b * DEFAULT_CALIB_TOKENS)
            else:
                per_layer_default = (per_layer, per_layer * DEFAULT_CALIB_TOKENS / tok)
            peak = max(r["peak_rss_gib"] for r in rs)
            out.append(
                {
                    "model": name,
                    "phase": phase,
                    "calib_tokens": tok,
                    "per_layer_cpu_s": round(per_layer, 1),
                    "fit": how,
                    "peak_rss_gib": peak,
                    "full_model_cpu_h_at_measured_calib": round(full_small / 3600, 2),
                    "full_model_cpu_h_at_default_calib": [
                        round((fixed + shape.moe_layers * p) / 3600, 2) for p in per_layer_default
                    ],
                    "gpu_estimate_s_per_layer_default_calib": gpu_estimate(
                        shape, phase, DEFAULT_CALIB_TOKENS
                    ),
                    "gpu_estimate_full_model_min_default_calib": {
                        g: round(s * shape.moe_layers / 60, 1)
                        for g, s in gpu_estimate(shape, phase, DEFAULT_CALIB_TOKENS).items()
                    },
                }
            )
    return out


def write_doc(result: dict[str, Any]) -> None:
    """docs/compressor-scale.md from the results."""
    st = result["stamp"]
    cpu = st["machine"]["cpu"].get("model") or st["machine"]["processor"]
    lines = [
        "# The compressor at real scale",
        "",
        "Generated by `bench/compressor_scale.py` from `bench/results/compressor-scale.json`"
        f" (commit {st.get('commit', '?')[:10]}, {cpu}, {st['machine']['cpu_count']} CPUs).",
        "Random bf16 models with the real layer shapes, a few decoder layers; each phase is the CLI",
        "with default options (calibration size as listed, `--device cpu`), in its own process.",
        "CPU seconds are the child's user+system time (robust to a shared machine at one thread);",
        "wall is what it took here.",
        "",
        "## Measured",
        "",
        *(
            [
                f"Rows come from commits {', '.join(sorted({r['commit'][:10] for r in result['rows']}))}"
                " (`--merge`).",
                "",
            ]
            if len({r.get("commit") for r in result["rows"]}) > 1
            else []
        ),
        "| model | MoE layers | phase | calibration | wall s | CPU s | peak RSS GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['moe_layers']} | {r['phase']} | {r['num_seqs']} x {r['seq_len']} "
            f"| {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_gib']} |"
        )
    lines += [
        "",
        "## Projected to the full models",
        "",
        "Per-layer CPU time from the measured runs (see `fit`), times the real model's MoE layers.",
        "At the CLI's default calibration (128 x 2048 tokens) the range runs from 'per-layer cost",
        "does not grow with tokens' to 'it grows in proportion' unless two calibration sizes were",
        "measured. GPU columns are **estimates** from FLOPs and bytes (fp32 at 30 % of peak), not",
        "measurements.",
        "",
        "| model | phase | per layer CPU s | fit | full model CPU h (measured calib) "
        "| full model CPU h (default calib) | A100 est. min | H100 est. min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in result["projections"]:
        lo, hi = p["full_model_cpu_h_at_default_calib"]
        rng = f"{lo}" if lo == hi else f"{lo} - {hi}"
        g = p["gpu_estimate_full_model_min_default_calib"]
        lines.append(
            f"| {p['model']} | {p['phase']} | {p['per_layer_cpu_s']} | {p['fit']} "
            f"| {p['full_model_cpu_h_at_measured_calib']} | {rng} | {g['a100']} | {g['h100']} |"
        )
    DOC.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
