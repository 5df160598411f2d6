"""Perplexity of a checkpoint on held-out text, through vLLM serving and through the reference.

Both paths score the very same token windows: vLLM with ``prompt_logprobs`` (what a
served model computes), the reference with :func:`camera_vllm.reference.load` in fp32.

    python bench/ppl.py MODEL_DIR --text heldout.txt [--backend vllm|reference]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch


def token_windows(model_dir: str | Path, text: str, seq_len: int, count: int) -> list[list[int]]:
    """``count`` consecutive, non-overlapping windows of ``seq_len`` tokens from ``text``."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]
    n = min(count, len(ids) // seq_len)
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]


@torch.no_grad()
def ppl_reference(model_dir: str | Path, windows: list[list[int]]) -> float:
    """Perplexity from the transformers reference of the checkpoint (fp32)."""
    from camera_vllm import reference

    model = reference.load(model_dir, dtype=torch.float32)
    nll, count = 0.0, 0
    for w in windows:
        ids = torch.tensor([w])
        logits = model(ids).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += len(w) - 1
    return math.exp(nll / count)


def ppl_vllm(model_dir: str | Path, windows: list[list[int]], dtype: str = "float32") -> float:
    """Perplexity through a vLLM engine (prompt logprobs of every window)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(model_dir),
        dtype=dtype,
        max_model_len=max(len(w) for w in windows) + 8,
        enforce_eager=False,
        max_num_seqs=8,
        seed=0,
    )
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
    nll, count = 0.0, 0
    for w, out in zip(windows, outs):
        for pos, entry in enumerate(out.prompt_logprobs):
            if pos == 0 or entry is None:
                continue
            nll -= entry[w[pos]].logprob
            count += 1
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--text", required=True, type=Path)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--backend", choices=["vllm", "reference"], default="vllm")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    windows = token_windows(args.model, args.text.read_text(), args.seq_len, args.windows)
    fn = ppl_vllm if args.backend == "vllm" else ppl_reference
    result = {
        "model": args.model,
        "backend": args.backend,
        "ppl": fn(args.model, windows),
        "tokens": sum(len(w) - 1 for w in windows),
    }
    print(json.dumps(result) if args.json else result, flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
