"""Random-initialised tiny MoE models of every supported architecture, built offline.

Used by the tests and the demo: each builds in about a second, with a small byte-level
BPE tokenizer (with a chat template) trained on a built-in paragraph, so vLLM's
OpenAI server can serve it.  Weights are random: good for exactness, never for quality.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

ARCHITECTURES = ("qwen3_moe", "qwen2_moe", "deepseek_v2", "mixtral", "olmoe")

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Mixture of experts models route every token "
    "to a few experts. Each expert is a sum of micro-experts: one row of the gate and up "
    "projections and one column of the down projection. To be, or not to be, that is the question. "
    "All the world's a stage, and all the men and women merely players. 0123456789 !?,.;:'\"()-\n"
)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer with ``vocab_size`` entries (special tokens included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _common(vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        # vLLM's CPU attention takes head sizes 32, 64, 80, ... only: 2 heads of 32.
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def _qwen3_moe(vocab: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        **_common(vocab),
        head_dim=32,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
    )
    return Qwen3MoeForCausalLM(cfg)


def _qwen2_moe(vocab: int):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        **_common(vocab),
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=1,
    )
    return Qwen2MoeForCausalLM(cfg)


def _deepseek_v2(vocab: int):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    common = _common(vocab)
    common["num_key_value_heads"] = common["num_attention_heads"]  # required by transformers' DeepseekV2
    cfg = DeepseekV2Config(
        **common,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=2,
        # transformers' DeepseekV2 gate never renormalises while vLLM honours the flag:
        # False keeps the two in agreement.
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        norm_topk_prob=False,
        topk_method="greedy",
        routed_scaling_factor=1.5,
        n_group=1,
        topk_group=1,
        # vLLM's MLA accepts kv_lora_rank + qk_rope_head_dim in {320, 512, 576}; serve with
        # VLLM_MLA_DISABLE=1 on CPU (head size 16 + 64).
        kv_lora_rank=256,
        q_lora_rank=None,
        qk_nope_head_dim=16,
        qk_rope_head_dim=64,
        v_head_dim=32,
    )
    cfg.num_hidden_layers = 3  # one dense layer, then two MoE layers
    return DeepseekV2ForCausalLM(cfg)


def _mixtral(vocab: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        **_common(vocab), head_dim=32, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2
    )
    return MixtralForCausalLM(cfg)


def _olmoe(vocab: int):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    common = _common(vocab)
    common["num_key_value_heads"] = common["num_attention_heads"]
    cfg = OlmoeConfig(
        **common, intermediate_size=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False
    )
    return OlmoeForCausalLM(cfg)


_BUILDERS: dict[str, Callable[[int], torch.nn.Module]] = {
    "qwen3_moe": _qwen3_moe,
    "qwen2_moe": _qwen2_moe,
    "deepseek_v2": _deepseek_v2,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
}


def build_tiny_moe(
    arch: str, out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a random tiny ``arch`` MoE (weights, config, tokenizer) to ``out_dir``.

    Weights are drawn with a larger std than HF's default so that routing and the
    CAMERA energies are far from uniform (a tiny random model with std 0.02 barely
    differs from its own pruned versions).
    """
    if arch not in _BUILDERS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = _BUILDERS[arch](len(tok))
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(out)
    tok.save_pretrained(out)
    gen = out / "generation_config.json"
    if not gen.exists():
        gen.write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    return out
