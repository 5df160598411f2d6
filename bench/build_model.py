"""Train a benchmark MoE on this CPU: a small real model on real offline text.

Two seeded recipes (``--preset``; CPU thread scheduling may still make the last digits
differ between machines), each a byte-level BPE trained on the training text, fp32 AdamW
with warm-up and cosine decay for a fixed number of steps, and validation perplexity on
held-out works (``bench/text_data.py``):

* ``shakespeare`` (the default, the first benchmark model, ``make bench-model``): a
  Qwen3-MoE (hidden 256, 4 layers, 8 experts, top-2, expert width 256), BPE 4096, on
  Shakespeare; records ``bench/results/bench-model.json``.
* ``hard`` (``make bench-model-hard``): a fine-grained Qwen2-MoE like the ones users serve
  (hidden 256, 6 layers, 32 routed experts of width 128, top-4, a shared expert of width
  512 behind a sigmoid ``shared_expert_gate``), BPE 4096, on the mixed Shakespeare + KJV +
  Python-docs text; perplexity per domain; records ``bench/results/bench-model-hard.json``.

The model is written to ``bench/.cache/models/<name>`` (outside git).  ``--smoke`` runs a
few steps into ``bench/.cache/models/<name>-smoke`` and records nothing under
``bench/results`` (a check that the recipe runs end to end).

    python bench/build_model.py                  # the first model
    python bench/build_model.py --preset hard    # the harder one (~35 min on 2 cores)
    python bench/build_model.py --preset hard --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import text_data
import torch
from stamp import add_stamp_args, stamp
from tqdm import tqdm

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


# Each preset is the full recipe: flags given on the command line override single fields.
PRESETS: dict[str, dict] = {
    "shakespeare": {
        "name": "qwen3moe-shakespeare",
        "arch": "qwen3_moe",
        "data": "shakespeare",
        "steps": 2000,
        "vocab": 4096,
        "hidden": 256,
        "layers": 4,
        "experts": 8,
        "top_k": 2,
        "expert_width": 256,
        "shared_width": 0,
        "seq_len": 128,
        "batch": 16,
        "lr": 3e-3,
        "results": "bench-model.json",
    },
    # Qwen1.5-MoE's proportions (60 experts, top-4, shared expert = 4 routed widths),
    # scaled to what trains in ~35 minutes here; routed experts are ~75 % of the weights.
    "hard": {
        "name": "qwen2moe-mixed",
        "arch": "qwen2_moe",
        "data": "mixed",
        "steps": 1800,
        "vocab": 4096,
        "hidden": 256,
        "layers": 6,
        "experts": 32,
        "top_k": 4,
        "expert_width": 128,
        "shared_width": 512,
        "seq_len": 256,
        "batch": 8,
        "lr": 2e-3,
        "results": "bench-model-hard.json",
    },
}
SMOKE_STEPS = 5


def build_model(vocab: int, args: argparse.Namespace):
    """A freshly initialised (seeded by the caller) MoE of ``args``' shape, grouped_mm experts."""
    common = dict(
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
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        router_aux_loss_coef=0.01,
        output_router_logits=True,
        experts_implementation="grouped_mm",
    )
    if args.arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        if args.shared_width:
            raise SystemExit("--shared-width: Qwen3-MoE has no shared expert (use --arch qwen2_moe)")
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, norm_topk_prob=True))
    if args.arch == "qwen2_moe":
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

        if args.shared_width <= 0:
            raise SystemExit("--shared-width: a Qwen2-MoE needs a shared expert width > 0")
        cfg = Qwen2MoeConfig(
            **common,
            shared_expert_intermediate_size=args.shared_width,
            norm_topk_prob=False,  # as Qwen1.5-MoE / Qwen2-MoE ship
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        return Qwen2MoeForCausalLM(cfg)
    raise SystemExit(f"--arch {args.arch!r}: expected qwen3_moe or qwen2_moe")


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, max_windows: int = 64) -> float:
    """Perplexity over the first ``max_windows`` non-overlapping ``seq_len`` windows of ``ids``."""
    model.eval()
    n = min(max_windows, (ids.numel() - 1) // seq_len)
    if n < 1:
        raise ValueError(f"{ids.numel()} tokens: too few for one window of {seq_len}")
    nll, count = 0.0, 0
    for w in range(n):
        chunk = ids[w * seq_len : (w + 1) * seq_len + 1].unsqueeze(0)
        logits = model(chunk[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        nll += float(loss)
        count += seq_len
    model.train()
    return math.exp(nll / count)


def load_data(data: str, seed: int) -> tuple[str, dict[str, str], dict]:
    """(training text, domain -> held-out text, what the record says about the data)."""
    text_dir = ROOT / ".cache" / "text"
    if data == "shakespeare":
        train_path, held_path = text_data.write_split(text_dir)
        info = {"held_out_works": list(text_data.HELD_OUT)}
        return train_path.read_text(), {"shakespeare": held_path.read_text()}, info
    if data == "mixed":
        train_path, held_paths = text_data.write_mixed(text_dir, seed=seed)
        picked = text_data.mixed_documents(seed)
        info = {
            "data": {
                "domains": list(text_data.DOMAINS),
                "cap_chars_per_domain": text_data.MIXED_CAP_CHARS,
                "train_documents": {d: sum(1 for dd, _ in picked if dd == d) for d in text_data.DOMAINS},
                "train_chars": len(train_path.read_text()),
                "held_out": {
                    "shakespeare": list(text_data.HELD_OUT),
                    "kjv": list(text_data.KJV_HELD_OUT),
                    "python_docs": list(text_data.PYDOCS_HELD_OUT),
                },
            }
        }
        return train_path.read_text(), {d: p.read_text() for d, p in held_paths.items()}, info
    raise SystemExit(f"--data {data!r}: expected shakespeare or mixed")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with every flag not given taken from ``--preset``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="shakespeare")
    p.add_argument("--name")
    p.add_argument("--arch", choices=("qwen3_moe", "qwen2_moe"))
    p.add_argument("--data", choices=("shakespeare", "mixed"))
    p.add_argument("--steps", type=int, help="optimizer steps (a step budget keeps runs reproducible)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--expert-width", type=int)
    p.add_argument("--shared-width", type=int, help="shared expert width (qwen2_moe only)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"{SMOKE_STEPS} steps (unless --steps) into <name>-smoke; nothing written to bench/results",
    )
    add_stamp_args(p)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.steps is None and args.smoke:
        args.steps = SMOKE_STEPS
    for key, value in preset.items():
        if key != "results" and getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke:
        args.name = f"{args.name}-smoke"
    if args.steps < 1:
        raise SystemExit(f"--steps {args.steps}: must be at least 1")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    # Before hours of training; a smoke run never records results, so it may run dirty.
    here = stamp(allow_dirty=args.allow_dirty or args.smoke, argv=argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    out = args.out or MODELS / args.name
    train_text, held_texts, data_info = load_data(args.data, args.seed)

    tok = train_tokenizer(train_text, args.vocab)
    train_ids = torch.tensor(tok(train_text)["input_ids"], dtype=torch.long)
    held_ids = {d: torch.tensor(tok(t)["input_ids"], dtype=torch.long) for d, t in held_texts.items()}
    model = build_model(len(tok), args)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
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
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / (time.time() - start):.0f}")
    train_s = time.time() - start

    eval_windows = 4 if args.smoke else 64
    ppl = {d: perplexity(model, ids, 256, eval_windows) for d, ids in held_ids.items()}
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.save_pretrained(out)
    tok.save_pretrained(out)
    record = {
        "model": args.name,
        "preset": args.preset,
        "path": str(out.relative_to(ROOT.parent)) if out.is_relative_to(ROOT.parent) else str(out),
        "params": n_params,
        "routed_expert_params": n_expert,
        "steps": args.steps,
        "train_tokens": tokens,
        "train_seconds": round(train_s, 1),
        "tokens_per_second": round(tokens / train_s, 1),
        # One number for the one-domain model (as the first record has it), else per domain.
        "val_ppl": round(ppl["shakespeare"], 3)
        if args.data == "shakespeare"
        else {d: round(v, 3) for d, v in ppl.items()},
        "val_windows": {d: min(eval_windows, (ids.numel() - 1) // 256) for d, ids in held_ids.items()},
        **data_info,
        "args": vars(args) | {"out": os.path.relpath(out, ROOT.parent)},
        "torch_threads": torch.get_num_threads(),
        "stamp": here,
    }
    text = json.dumps(record, indent=2) + "\n"
    (out / "build.json").write_text(text)
    if not args.smoke:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / PRESETS[args.preset]["results"]).write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
