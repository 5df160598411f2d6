"""Calibration data, and a GPTQ-style layer-by-layer pass over a model that never loads it whole.

Calibration text comes from plain-text or JSON-lines files (one document per line, text
under ``text_key``, default ``"text"``).  Documents are tokenized with the model's own
tokenizer without special tokens, joined with the EOS token into one stream, and
``num_seqs`` windows of ``seq_len`` tokens are drawn at seeded random offsets.

:class:`LayerStreamer` embeds those sequences and then, for each decoder layer:
builds that one transformers decoder layer (on ``meta``, then materialised with only
its own weights read through :class:`SourceCheckpoint`), swaps its MoE block for
:class:`CameraMoEBlock` (router from config facts + per-expert weights of any width),
runs it to collect the MoE block inputs and the CAMERA energies, hands them to an
``on_moe_layer`` callback, and, if the callback returns new expert weights (pruned or
quantized), re-runs the layer with them so that the next layer sees the compressed
outputs.  Rotary embeddings and masks come from the model's own rotary class and
transformers' mask helpers.  Peak memory: one decoder layer plus the activations.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..arch import MoEArch
from ..format import names
from .score import EnergyAccumulator, EnergySpec, LayerEnergies, LayerWeights, Routing, moe_forward, route
from .source import SourceCheckpoint

CalibFormat = Literal["auto", "text", "jsonl"]
DEFAULT_NUM_SEQS = 128  # the paper: WikiText-2, 128 x 2048
DEFAULT_SEQ_LEN = 2048


class CalibrationError(ValueError):
    """Calibration files are missing, empty, malformed or too short; the message names the file."""


@dataclass(frozen=True)
class CalibSpec:
    """Which calibration sequences to draw."""

    num_seqs: int = DEFAULT_NUM_SEQS
    seq_len: int | None = None  # None: min(2048, the model's max_position_embeddings)
    seed: int = 0
    fmt: CalibFormat = "auto"  # auto: *.jsonl / *.json -> jsonl, anything else -> text
    text_key: str = "text"

    def __post_init__(self) -> None:
        if self.num_seqs <= 0:
            raise ValueError(f"num_seqs must be positive, got {self.num_seqs}")
        if self.seq_len is not None and self.seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")


def read_documents(
    files: Sequence[str | Path], fmt: CalibFormat = "auto", text_key: str = "text"
) -> list[str]:
    """Documents from text files (one document per file) or JSON-lines files (one per line)."""
    if not files:
        raise CalibrationError("no calibration files given")
    docs: list[str] = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise CalibrationError(f"{path}: calibration file not found")
        kind = fmt if fmt != "auto" else ("jsonl" if path.suffix.lower() in (".jsonl", ".json") else "text")
        raw = path.read_text(encoding="utf-8", errors="replace")
        found: list[str] = []
        if kind == "text":
            if raw.strip():
                found.append(raw)
        elif kind == "jsonl":
            for lineno, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CalibrationError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(rec, dict) or text_key not in rec:
                    raise CalibrationError(
                        f"{path}:{lineno}: record has no {text_key!r} field (choose it with --text-key)"
                    )
                if not isinstance(rec[text_key], str):
                    raise CalibrationError(f"{path}:{lineno}: field {text_key!r} is not a string")
                if rec[text_key].strip():
                    found.append(rec[text_key])
        else:
            raise CalibrationError(f"unknown calibration format {fmt!r}; expected auto, text or jsonl")
        if not found:
            raise CalibrationError(f"{path}: calibration file has no text")
        docs.extend(found)
    return docs


def tokenize_calibration(
    files: Sequence[str | Path], tokenizer, spec: CalibSpec, *, max_positions: int | None = None
) -> torch.Tensor:
    """``[num_seqs, seq_len]`` int64 token windows drawn at seeded random offsets.

    :param tokenizer: a transformers tokenizer (the model's own).
    :param max_positions: the model's ``max_position_embeddings``; bounds ``seq_len``.
    """
    seq_len = spec.seq_len
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, max_positions or DEFAULT_SEQ_LEN)
    elif max_positions is not None and seq_len > max_positions:
        raise CalibrationError(
            f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_positions}"
        )
    docs = read_documents(files, spec.fmt, spec.text_key)
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(int(eos))  # document boundary, as in pre-training data
    if len(stream) < seq_len:
        shown = ", ".join(str(f) for f in files)
        raise CalibrationError(
            f"calibration text too short: {len(stream)} tokens in {shown}; need at least seq_len={seq_len}"
        )
    tokens = torch.tensor(stream, dtype=torch.int64)
    gen = torch.Generator().manual_seed(spec.seed)
    starts = torch.randint(0, len(stream) - seq_len + 1, (spec.num_seqs,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def load_calibration(model_dir: str | Path, files: Sequence[str | Path], spec: CalibSpec) -> torch.Tensor:
    """Tokenize calibration files with the tokenizer stored in ``model_dir``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    cfg = json.loads((Path(model_dir) / names.CONFIG_FILE).read_text())
    return tokenize_calibration(files, tok, spec, max_positions=cfg.get("max_position_embeddings"))


# -- the MoE block swapped into each decoder layer -------------------------------------------------
class CameraMoEBlock(nn.Module):
    """Drop-in for a transformers MoE block: config-driven router, per-expert weights of any width.

    While ``accumulator`` is set, every forward folds CAMERA statistics into it and, when
    ``keep_inputs`` is on, records the inputs and routing for the layer callback.
    """

    def __init__(
        self, arch: MoEArch, router: torch.Tensor, weights: LayerWeights, shared_gate: torch.Tensor | None
    ):
        super().__init__()
        self.arch = arch
        self.router = router
        self.shared_gate = shared_gate
        self.weights = weights
        self.accumulator: EnergyAccumulator | None = None
        self.keep_inputs = False
        self.inputs: list[torch.Tensor] = []
        self.routings: list[Routing] = []

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        routing = route(x, self.router, self.arch, self.shared_gate)
        if self.keep_inputs:
            # Kept on the CPU: T x H for all calibration tokens may not fit next to the layer.
            self.inputs.append(x.detach().float().cpu())
            r = routing
            shared = None if r.shared_weight is None else r.shared_weight.cpu()
            self.routings.append(Routing(r.topk_ids.cpu(), r.topk_weights.cpu(), shared))
        out = moe_forward(x, self.weights, routing, self.accumulator)
        return out.to(hidden_states.dtype).reshape(shape)


@dataclass
class MoELayerContext:
    """What an ``on_moe_layer`` callback sees for one MoE layer, before it is compressed.

    ``moe_input`` (``[T, H]`` fp32, after the post-attention norm) and ``routing`` cover
    all ``T = num_seqs * seq_len`` calibration tokens, computed on the outputs of the
    already-compressed earlier layers; they live on the CPU and are None unless the
    streamer was asked to keep them (``keep_moe_inputs=True``).  ``weights`` are the
    layer's current (uncompressed) expert weights in the compute dtype, on the
    streamer's device; ``energies`` are on the CPU.  Return new :class:`LayerWeights`
    (any widths, any device) to have the layer re-run with them, or None to keep it.
    """

    layer: int
    arch: MoEArch
    weights: LayerWeights
    energies: LayerEnergies
    moe_input: torch.Tensor | None = None
    routing: Routing | None = None

    def expert_inputs(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs ``[n_e, H]``, router weights ``[n_e]``) of the tokens routed to ``expert``."""
        if self.moe_input is None or self.routing is None:
            raise RuntimeError("MoE inputs were not kept; run the streamer with keep_moe_inputs=True")
        tok, slot = (self.routing.topk_ids == expert).nonzero(as_tuple=True)
        return self.moe_input[tok], self.routing.topk_weights[tok, slot]

    def shared_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs ``[T, H]``, shared-expert weights ``[T]``)."""
        if self.moe_input is None or self.routing is None or self.routing.shared_weight is None:
            raise RuntimeError("no shared-expert inputs kept (no shared expert, or keep_moe_inputs=False)")
        return self.moe_input, self.routing.shared_weight


MoELayerCallback = Callable[[MoELayerContext], LayerWeights | None]


def _layer_classes(config) -> tuple[type, type]:
    """(decoder layer class, rotary embedding class) of a transformers config's architecture."""
    import transformers

    arch = config.architectures[0]
    model_cls = getattr(transformers, arch)
    module = sys.modules[model_cls.__module__]
    decoder_name = model_cls._no_split_modules[0]
    decoder_cls = getattr(module, decoder_name)
    rotary = [getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding")]
    preferred = getattr(module, decoder_name.replace("DecoderLayer", "RotaryEmbedding"), None)
    if preferred is None and len(rotary) != 1:
        raise RuntimeError(f"cannot find the rotary embedding class of {arch} in {module.__name__}")
    return decoder_cls, preferred or rotary[0]


class LayerStreamer:
    """Run calibration sequences through a model one decoder layer at a time.

    :param source: the model directory.
    :param dtype: compute dtype of attention/norms (MoE math and energies are always fp32).
    :param device: where layers run; activations between layers stay on the CPU.
    :param batch_size: sequences per forward.
    """

    def __init__(
        self,
        source: SourceCheckpoint,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        batch_size: int = 4,
        attn_implementation: str = "sdpa",
    ):
        from transformers import AutoConfig

        self.source = source
        self.arch = source.arch
        self.dtype = dtype
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.config = AutoConfig.from_pretrained(str(source.path))
        self.config._attn_implementation = attn_implementation
        self.decoder_cls, rotary_cls = _layer_classes(self.config)
        self.rotary = rotary_cls(config=self.config).to(self.device)

    # -- building one layer ------------------------------------------------------------------------
    def layer_weights(self, layer: int) -> LayerWeights:
        gates, ups, downs = self.source.expert_weights(layer)
        return LayerWeights(list(gates), list(ups), list(downs), self.source.shared_weights(layer)).to(
            self.dtype, self.device
        )

    def build_layer(self, layer: int, weights: LayerWeights | None = None) -> nn.Module:
        """One decoder layer with its own weights; MoE layers get a :class:`CameraMoEBlock`."""
        with torch.device("meta"):
            module = self.decoder_cls(self.config, layer)
        prefix = f"model.layers.{layer}."
        moe = layer in self.arch.moe_layers
        if moe:
            a = self.arch.architecture
            mp = names.moe_prefix(a, layer)
            shared_gate = None
            if self.arch.shared_expert_gate:
                shared_gate = self.source.get(f"{mp}.shared_expert_gate.weight").to(self.device, self.dtype)
            router = self.source.get(f"{mp}.gate.weight").to(self.device, self.dtype)
            module.mlp = CameraMoEBlock(self.arch, router, weights or self.layer_weights(layer), shared_gate)
        state = module.state_dict()
        loaded = {}
        for key in state:
            name = prefix + key
            if not self.source.has(name):
                raise KeyError(
                    f"{self.source.path}: tensor {name!r} needed by {type(module).__name__} is missing"
                )
            loaded[key] = self.source.get(name).to(self.device, self.dtype)
        module.load_state_dict(loaded, strict=True, assign=True)
        still_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if still_meta:  # e.g. a non-persistent buffer this architecture builds at init
            raise RuntimeError(
                f"layer {layer}: {type(module).__name__} tensors not materialised: {still_meta[:5]}"
            )
        # Every checkpoint tensor of the layer must be used, else a renamed weight would pass silently.
        used = {prefix + k for k in loaded} | (self._moe_tensor_names(layer) if moe else set())
        unused = sorted(n for n in self.source.weight_map if n.startswith(prefix) and n not in used)
        if unused:
            raise RuntimeError(f"layer {layer}: checkpoint tensors not understood: {unused[:5]}")
        return module.eval()

    def _moe_tensor_names(self, layer: int) -> set[str]:
        mp = names.moe_prefix(self.arch.architecture, layer)
        extra = {f"{mp}.gate.weight"}
        if self.arch.shared_expert_gate:
            extra.add(f"{mp}.shared_expert_gate.weight")
        return self.source.expert_tensor_names(layer) | self.source.shared_tensor_names(layer) | extra

    # -- running -----------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Token embeddings of the calibration sequences, in batches (kept on the CPU)."""
        table = self.source.get("model.embed_tokens.weight").to(self.dtype)
        return [table[b] for b in torch.split(input_ids, self.batch_size)]

    def _masks(self, h: torch.Tensor, position_ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kw = dict(
            config=self.config,
            inputs_embeds=h,
            attention_mask=None,
            past_key_values=None,
            position_ids=position_ids,
        )
        masks = {"full_attention": create_causal_mask(**kw)}
        if getattr(self.config, "layer_types", None) and "sliding_attention" in self.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
        elif getattr(self.config, "sliding_window", None):
            masks["full_attention"] = create_sliding_window_causal_mask(**kw)
        return masks

    def _layer_type(self, layer: int) -> str:
        types = getattr(self.config, "layer_types", None)
        return types[layer] if types else "full_attention"

    @torch.no_grad()
    def _run(self, module: nn.Module, layer: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for h in hidden:
            h = h.to(self.device)
            pos = torch.arange(h.shape[1], device=self.device).unsqueeze(0)
            pe = self.rotary(h, pos)
            mask = self._masks(h, pos)[self._layer_type(layer)]
            y = module(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            y = y[0] if isinstance(y, tuple) else y
            out.append(y.to("cpu"))
        return out

    @torch.no_grad()
    def run(
        self,
        input_ids: torch.Tensor,
        *,
        energy: EnergySpec | None = None,
        on_moe_layer: MoELayerCallback | None = None,
        keep_moe_inputs: bool = False,
        progress: bool = True,
        final_hidden: list[torch.Tensor] | None = None,
    ) -> dict[int, LayerEnergies]:
        """Stream ``input_ids`` (``[N, L]``) through every layer; returns energies per MoE layer.

        For each MoE layer the energies are measured on inputs produced by the earlier
        layers *as compressed by the callback*.  When ``on_moe_layer`` returns a
        :class:`LayerWeights`, the layer is re-run with those weights before moving on.
        ``final_hidden``, if given, receives the last layer's outputs (before the final norm).
        """
        from tqdm.auto import tqdm

        energy = energy or EnergySpec()
        hidden = self.embed(input_ids)
        results: dict[int, LayerEnergies] = {}
        bar = tqdm(range(self.arch.num_layers), desc="CAMERA layers", unit="layer", disable=not progress)
        for layer in bar:
            module = self.build_layer(layer)
            if layer not in self.arch.moe_layers:
                hidden = self._run(module, layer, hidden)
                continue
            block: CameraMoEBlock = module.mlp  # type: ignore[assignment]
            block.accumulator = EnergyAccumulator(block.weights)
            block.keep_inputs = keep_moe_inputs
            outputs = self._run(module, layer, hidden)
            energies = block.accumulator.result(layer, energy)
            results[layer] = energies
            ctx = MoELayerContext(layer, self.arch, block.weights, energies)
            if keep_moe_inputs:
                ctx.moe_input = torch.cat(block.inputs)
                r = block.routings
                ctx.routing = Routing(
                    torch.cat([x.topk_ids for x in r]),
                    torch.cat([x.topk_weights for x in r]),
                    None if r[0].shared_weight is None else torch.cat([x.shared_weight for x in r]),  # type: ignore[misc]
                )
            block.accumulator, block.keep_inputs, block.inputs, block.routings = None, False, [], []
            replacement = on_moe_layer(ctx) if on_moe_layer is not None else None
            if replacement is not None:
                block.weights = replacement.to(self.dtype, self.device)
                outputs = self._run(module, layer, hidden)
            hidden = outputs
            del module, block, ctx
        if final_hidden is not None:
            final_hidden.extend(hidden)
        return results


def iter_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories into the files they contain (sorted), keep files as they are."""
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p])
    return out
