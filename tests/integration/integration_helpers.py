"""Helpers shared by the integration tests and their vLLM subprocess scripts (no vLLM import here).

Checkpoints are pruned with a weight-norm score: the tests check serving exactness,
not the quality of the CAMERA energy, so any deterministic score will do.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from camera_vllm.checkpoint.keeps import LayerKeep
from camera_vllm.checkpoint.source import SourceCheckpoint
from camera_vllm.compress.prune import select_keep, write_pruned_checkpoint
from camera_vllm.testing.tiny_models import build_tiny_moe

ZEROED_EXPERT = 3  # routed expert forced to width 0 in every MoE layer
SHARED_FORCED = 8  # shared-expert micro-experts forced out of every layer

PROMPTS = [
    "The quick brown fox",
    "Mixture of experts models route every token",
    "To be, or not to be",
    "All the world's a stage, and all the men and women",
]
MAX_TOKENS = 16


def norm_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Per micro-expert ``|gate_i| * |up_i| * |down_:,i|`` (non-negative)."""
    return gate.double().norm(dim=1) * up.double().norm(dim=1) * down.double().norm(dim=0)


def prune_checkpoint(
    source_dir: Path,
    out_dir: Path,
    ratio: float,
    *,
    zero_expert: int | None = ZEROED_EXPERT,
    shared_forced: int = SHARED_FORCED,
) -> Path:
    """Layer-pooled CAMERA-P of ``source_dir``; optionally forces a width-0 expert and shared pruning."""
    source = SourceCheckpoint(source_dir)
    keeps: dict[int, LayerKeep] = {}
    for layer in source.arch.moe_layers:
        gates, ups, downs = source.expert_weights(layer)
        scores = [norm_scores(g, u, d) for g, u, d in zip(gates, ups, downs)]
        if zero_expert is not None:
            scores[zero_expert] = torch.full_like(scores[zero_expert], -1.0)  # ranks below every real score
        shared_scores = None
        shared = source.shared_weights(layer)
        if shared is not None:
            shared_scores = norm_scores(*shared)
            shared_scores[:shared_forced] = -1.0
        keeps[layer] = select_keep(scores, ratio, shared_scores=shared_scores, scope="layer")
    return write_pruned_checkpoint(
        source,
        out_dir,
        keeps,
        compression={"method": "camera-p", "ratio": ratio, "score": "weight-norm (test)"},
    )


def build_pruned(arch: str, root: Path, ratio: float = 0.5) -> tuple[Path, Path]:
    """(original dir, pruned dir) of a tiny ``arch`` model under ``root``."""
    original = build_tiny_moe(arch, root / f"{arch}-orig", dtype=torch.float32)
    pruned = prune_checkpoint(original, root / f"{arch}-p{int(ratio * 100)}", ratio)
    return original, pruned


def write_zero_padded(pruned_dir: Path, out_dir: Path) -> Path:
    """The dense, unquantized equivalent of a CAMERA-P checkpoint.

    Pruned micro-experts become zero rows/columns.

    Exact for SwiGLU (a zero gate/up row gives silu(0) * 0 = 0, a zero down column adds
    0), so stock vLLM on this directory computes the same function as the plugin on the
    pruned one, through vLLM's own MoE kernel.
    """
    from safetensors.torch import load_file, save_file

    from camera_vllm.format import names

    cfg = json.loads((pruned_dir / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    arch, full, full_shared = (
        qc["architecture"],
        qc["original_intermediate_size"],
        qc.get("original_shared_intermediate_size"),
    )
    tensors = load_file(pruned_dir / "model.safetensors")
    hidden = cfg["hidden_size"]

    def pad(prefix: str, proj_names: tuple[str, str, str], width: int, size: int) -> None:
        for proj, pname in enumerate(proj_names):
            name = f"{prefix}.{pname}.weight"
            dense = torch.zeros((size, hidden) if proj < 2 else (hidden, size))
            if width:
                kept = tensors[name]
                if proj < 2:
                    dense[:width] = kept
                else:
                    dense[:, :width] = kept
            tensors[name] = dense

    for layer, spec in qc["layers"].items():
        layer = int(layer)
        for e, slabs in enumerate(spec["expert_slabs"]):
            pad(names.expert_prefix(arch, layer, e), names.proj_names(arch), sum(slabs), full)
        if spec.get("shared_slabs") is not None:
            pad(
                names.shared_prefix(arch, layer),
                ("gate_proj", "up_proj", "down_proj"),
                sum(spec["shared_slabs"]),
                full_shared,
            )
    shutil.copytree(pruned_dir, out_dir)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


def quant_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())["quantization_config"]


def reference_greedy(
    model_dir: Path, prompts: list[str] = PROMPTS, max_tokens: int = MAX_TOKENS
) -> list[list[int]]:
    """Greedy token ids of :func:`camera_vllm.reference.load` (fp32), ``max_tokens`` each, EOS ignored."""
    return [list(t) for t in _reference_greedy(str(model_dir), tuple(prompts), max_tokens)]


@functools.cache
def _reference_greedy(
    model_dir: str, prompts: tuple[str, ...], max_tokens: int
) -> tuple[tuple[int, ...], ...]:
    from transformers import AutoTokenizer

    from camera_vllm import reference

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = reference.load(model_dir, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tok(prompt)["input_ids"]])
            for _ in range(max_tokens):
                logits = model(ids).logits[0, -1]
                ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
            out.append(tuple(ids[0, -max_tokens:].tolist()))
    return tuple(out)


def vllm_env(arch: str) -> dict[str, str]:
    """Environment for a vLLM child process on this CPU machine."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if arch == "deepseek_v2":
        env["VLLM_MLA_DISABLE"] = "1"  # the CPU MLA decode kernel rejects the tiny model's block size
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DRIVER = Path(__file__).resolve().parent / "vllm_driver.py"
# bench/emulate_avx2/sitecustomize.py: vLLM loads its AVX2 library (vllm._C_AVX2) in every process.
EMULATE_AVX2 = Path(__file__).resolve().parents[2] / "bench" / "emulate_avx2"
# What every engine of these tests shares unless it says otherwise (fp32: the oracle's dtype).
ENGINE_DEFAULTS: dict[str, Any] = {
    "dtype": "float32",
    "max_model_len": 256,
    "max_num_seqs": 4,
    "seed": 0,
    "model_loader_extra_config": {"enable_weights_track": True},
}
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": MAX_TOKENS, "ignore_eos": True}


def run_engines(
    engines: list[dict[str, Any]],
    root: Path,
    name: str,
    env: dict[str, str],
    timeout_s: float,
    what: str,
    *,
    emulate_avx2: bool = False,
) -> dict[str, Any]:
    """Run ``engines`` (see ``vllm_driver.py``) one after another in ONE subprocess.

    Each engine's ``engine`` keyword arguments start from :data:`ENGINE_DEFAULTS`, its
    ``prompts`` default to :data:`PROMPTS` and its ``sampling`` to :data:`GREEDY`.  Spec,
    result and log are ``root/NAME.{spec.json,json,log}``; ``env`` is the child's environment
    (``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` is added when an engine has probes, which
    ``collective_rpc`` ships as functions).  ``emulate_avx2`` makes vLLM load its AVX2 library
    in every process, as on a CPU without AVX-512.  Returns the driver's output
    (``{"driver_pid", "camera_registered", "runs": {id: result}}``); raises RuntimeError with
    the log's tail when the driver failed or an engine has no result.
    """
    full = [
        {
            "prompts": PROMPTS,
            "sampling": GREEDY,
            **e,
            "engine": {**ENGINE_DEFAULTS, **e.get("engine", {})},
        }
        for e in engines
    ]
    env = dict(env)
    if any(e.get("probes") or e.get("rank_probes") for e in full):
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    if emulate_avx2:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(EMULATE_AVX2), env.get("PYTHONPATH")) if p)
    root.mkdir(parents=True, exist_ok=True)
    spec, out, log = root / f"{name}.spec.json", root / f"{name}.json", root / f"{name}.log"
    spec.write_text(json.dumps({"engines": full}, indent=1))
    out.unlink(missing_ok=True)
    with open(log, "wb") as fh:
        proc = subprocess.run(
            [sys.executable, str(DRIVER), str(spec), str(out)],
            check=False,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=timeout_s,
        )
    result = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    missing = [e["id"] for e in full if e["id"] not in result["runs"]]
    if proc.returncode != 0 or missing:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        raise RuntimeError(
            f"{what} failed (exit {proc.returncode}, no result for {missing}); log {log}:\n{tail}"
        )
    return result
