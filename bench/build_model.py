"""Train the benchmark MoE on this CPU: a small real Qwen3-MoE on Shakespeare.

Reproducible recipe (seeded data order and init; CPU thread scheduling may still make
the last digits differ between machines): byte-level BPE with 4096 tokens trained on
the training works, a Qwen3-MoE (hidden 256, 4 layers, 8 experts, top-2, expert width
256), fp32 AdamW with warm-up and cosine decay for a fixed number of steps, validation
perplexity on held-out works.  The model is written to ``bench/.cache/models/<name>``
(outside git); ``make bench-model`` rebuilds it and records
``bench/results/bench-model.json``.

    python bench/build_model.py --steps 2000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import text_data  # noqa: E402

ROOT = Path(__file__).resolve().parent
MODELS = ROOT / ".cache" / "models"
RESULTS = ROOT / "results"


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text[i : i + 100_000] for i in range(0, len(text), 100_000)], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = (
        "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return fast


def build_model(vocab: int, args: argparse.Namespace):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden // 4,
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.expert_width,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        router_aux_loss_coef=0.01,
        output_router_logits=True,
        experts_implementation="grouped_mm",
    )
    return Qwen3MoeForCausalLM(cfg)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, max_windows: int = 64) -> float:
    model.eval()
    n = min(max_windows, (ids.numel() - 1) // seq_len)
    nll, count = 0.0, 0
    for w in range(n):
        chunk = ids[w * seq_len : (w + 1) * seq_len + 1].unsqueeze(0)
        logits = model(chunk[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        nll += float(loss)
        count += seq_len
    model.train()
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="qwen3moe-shakespeare")
    p.add_argument(
        "--steps", type=int, default=2000, help="optimizer steps (a step budget keeps runs reproducible)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-width", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    out = args.out or MODELS / args.name
    data_dir = ROOT / ".cache" / "text"
    train_path, held_path = text_data.write_split(data_dir)
    train_text, held_text = train_path.read_text(), held_path.read_text()

    tok = train_tokenizer(train_text, args.vocab)
    train_ids = torch.tensor(tok(train_text)["input_ids"], dtype=torch.long)
    held_ids = torch.tensor(tok(held_text)["input_ids"], dtype=torch.long)
    model = build_model(len(tok), args)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)

    warmup = min(100, args.steps // 10 + 1)
    start = time.time()
    tokens = 0
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        frac = step / args.steps
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, train_ids.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts.tolist()])
        outp = model(batch, labels=batch)  # the loss shifts labels itself; aux loss added
        loss = outp.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += batch[:, :-1].numel()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_s = time.time() - start

    ppl = perplexity(model, held_ids, 256)
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.save_pretrained(out)
    tok.save_pretrained(out)
    record = {
        "model": args.name,
        "path": str(out.relative_to(ROOT.parent)) if out.is_relative_to(ROOT.parent) else str(out),
        "params": n_params,
        "steps": args.steps,
        "train_tokens": tokens,
        "train_seconds": round(train_s, 1),
        "val_ppl": round(ppl, 3),
        "held_out_works": list(text_data.HELD_OUT),
        "args": vars(args) | {"out": os.path.relpath(out, ROOT.parent)},
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench-model.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return out


if __name__ == "__main__":
    main()
