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
transformers' mask helpers.

Peak memory: one decoder layer in the compute dtype plus the activations (and what the
callback holds).  Between layers the streamer drops every reference to the finished
layer (its original and compressed weights), closes the source's shard files (their
read pages count as resident memory) and returns freed heap to the system
(:func:`release_memory`), so memory does not grow with depth.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..arch import MoEArch
from ..checkpoint.source import SourceCheckpoint
from ..format import names
from .score import EnergyAccumulator, EnergySpec, LayerEnergies, LayerWeights, Routing, moe_forward, route

CalibFormat = Literal["auto", "text", "jsonl"]
DEFAULT_NUM_SEQS = 128  # the paper: WikiText-2, 128 x 2048
DEFAULT_SEQ_LEN = 2048


def _load_libc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc only; musl and macOS have none
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_libc_trim() if sys.platform.startswith("linux") else None


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the system.

    glibc keeps freed blocks of its arenas for reuse; with the tensor sizes of a layer
    (many allocations of a few MB just under the mmap threshold, which glibc raises as it
    sees them freed) the heap grows by about half a GB per layer unless trimmed.
    ``malloc_trim(0)`` returns the free pages; it is a no-op where glibc is absent.
    """
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


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


#: One in-memory calibration document: text, or token ids already tokenized by the model's tokenizer.
CalibDocument = str | tuple[int, ...]
_PATH_SUFFIXES = (".txt", ".jsonl", ".json", ".md", ".text")


@dataclass(frozen=True)
class CalibrationData:
    """Calibration documents in order: files (read as :func:`read_documents` says) and in-memory ones.

    ``items`` holds :class:`~pathlib.Path` (a file), ``str`` (the text of one document) or a
    tuple of ints (one document's token ids, tokenized by the model's own tokenizer without
    special tokens).  Every document becomes part of one token stream, EOS between
    documents, and windows are drawn from it the same way whatever form it came in.
    """

    items: tuple[Path | CalibDocument, ...]

    @property
    def files(self) -> list[Path]:
        return [i for i in self.items if isinstance(i, Path)]

    @property
    def documents(self) -> int:
        """How many in-memory (non-file) documents there are."""
        return sum(1 for i in self.items if not isinstance(i, Path))

    @property
    def needs_tokenizer(self) -> bool:
        return any(not isinstance(i, tuple) for i in self.items)

    def describe(self) -> str:
        """What an error message calls these documents."""
        parts = [str(f) for f in self.files]
        if self.documents:
            parts.append(f"{self.documents} in-memory document(s)")
        return ", ".join(parts)

    @classmethod
    def of(cls, calibration: CalibrationData | Iterable[str | Path]) -> CalibrationData:
        """Files given as paths (the CLI's ``--calib``): every item is a file, directories expanded."""
        if isinstance(calibration, CalibrationData):
            return calibration
        return cls(tuple(iter_files(calibration)))

    @classmethod
    def from_user(cls, calibration: object, *, text_key: str = "text") -> CalibrationData:
        """Classify what the Python API was given as calibration.

        * a :class:`~pathlib.Path`, or a ``str`` naming an existing file or directory: files;
        * any other ``str``: the text of one document;
        * a sequence of ints (or a 1-D integer tensor/array): one document's token ids;
        * a mapping (e.g. a row of a Hugging Face ``datasets.Dataset``): its ``text_key``
          field (text) or else its ``input_ids`` field (token ids);
        * an iterable (list, generator, ``datasets.Dataset``, 2-D tensor) of the above.

        :raises CalibrationError: naming the item that is none of these.
        """
        if isinstance(calibration, CalibrationData):
            return calibration
        if isinstance(calibration, (str, Path, Mapping)) or _is_id_sequence(calibration):
            calibration = [calibration]
        if not isinstance(calibration, Iterable):
            raise CalibrationError(
                f"calibration must be files, texts or token-id sequences, got {type(calibration).__name__}"
            )
        items: list[Path | CalibDocument] = []
        for n, item in enumerate(calibration):
            items.extend(_classify(item, n, text_key))
        if not items:
            raise CalibrationError("no calibration documents given")
        return cls(tuple(items))


def _is_id_sequence(x: object) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dim() == 1 and not x.is_floating_point()
    if hasattr(x, "ndim") and hasattr(x, "dtype") and hasattr(x, "tolist"):  # numpy, without importing it
        return x.ndim == 1 and getattr(x.dtype, "kind", "") in "iu"
    return (
        isinstance(x, Sequence)
        and not isinstance(x, (str, bytes))
        and len(x) > 0
        and all(isinstance(v, int) and not isinstance(v, bool) for v in x)
    )


def _classify(item: object, n: int, text_key: str) -> list[Path | CalibDocument]:
    if isinstance(item, Path):
        return list(iter_files([item])) if item.is_dir() else [item]
    if isinstance(item, str):
        try:
            exists = "\n" not in item and Path(item).exists()
        except OSError:  # e.g. a long text: "File name too long"
            exists = False
        if exists:
            return list(iter_files([item]))
        looks_like_path = item.strip() and not any(c.isspace() for c in item.strip())
        if looks_like_path and ("/" in item or item.lower().endswith(_PATH_SUFFIXES)):
            raise CalibrationError(
                f"calibration item {n} ({item!r}) looks like a file path but no such file exists; "
                "pass text with spaces, or a pathlib.Path to be told the file is missing"
            )
        return [item]
    if isinstance(item, Mapping):
        if text_key in item:
            value = item[text_key]
            if not isinstance(value, str):
                raise CalibrationError(f"calibration item {n}: field {text_key!r} is not a string")
            return [value]
        if "input_ids" in item:
            return _classify(item["input_ids"], n, text_key)
        keys = sorted(map(str, item))[:8]
        raise CalibrationError(
            f"calibration item {n} has no {text_key!r} or 'input_ids' field (keys: {keys}); "
            "choose the text field with text_key="
        )
    if _is_id_sequence(item):
        return [tuple(int(v) for v in (item.tolist() if hasattr(item, "tolist") else item))]  # type: ignore[union-attr]
    if isinstance(item, torch.Tensor) and item.dim() == 2 and not item.is_floating_point():
        return [tuple(int(v) for v in row) for row in item.tolist()]
    raise CalibrationError(
        f"calibration item {n} is a {type(item).__name__}: expected a path, a text, a sequence of "
        "token ids, or a mapping with a text/input_ids field"
    )


def _documents(data: CalibrationData, spec: CalibSpec) -> list[CalibDocument]:
    """Every document in order: each file's (as :func:`read_documents` reads it), then in-memory ones."""
    docs: list[CalibDocument] = []
    for item in data.items:
        if isinstance(item, Path):
            docs.extend(read_documents([item], spec.fmt, spec.text_key))
        elif isinstance(item, tuple) or item.strip():  # blank texts are skipped, as blank files are
            docs.append(item)
    return docs


def _model_eos(tokenizer, config: dict | None) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None and config is not None:
        eos = config.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
    return None if eos is None else int(eos)


def calibration_windows(
    data: CalibrationData,
    tokenizer,
    spec: CalibSpec,
    *,
    max_positions: int | None = None,
    eos: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """``[num_seqs, seq_len]`` int64 token windows drawn at seeded random offsets.

    :param tokenizer: the model's own transformers tokenizer (None only if every document
        is token ids); its EOS token separates documents, else ``eos``.
    :param max_positions: the model's ``max_position_embeddings``; bounds ``seq_len``.
    :param vocab_size: when given, token ids outside ``[0, vocab_size)`` are an error.
    """
    seq_len = spec.seq_len
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, max_positions or DEFAULT_SEQ_LEN)
    elif max_positions is not None and seq_len > max_positions:
        raise CalibrationError(
            f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_positions}"
        )
    if tokenizer is None and data.needs_tokenizer:
        raise CalibrationError("calibration text needs the model's tokenizer, and there is none")
    if tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for doc in _documents(data, spec):
        stream.extend(
            doc if isinstance(doc, tuple) else tokenizer(doc, add_special_tokens=False)["input_ids"]
        )
        if eos is not None:
            stream.append(int(eos))  # document boundary, as in pre-training data
    if vocab_size is not None:
        for n, doc in enumerate(d for d in data.items if isinstance(d, tuple)):
            bad = [t for t in doc if not 0 <= t < vocab_size]
            if bad:
                raise CalibrationError(
                    f"token-id calibration document {n}: id {bad[0]} is outside the model's vocabulary "
                    f"(vocab_size {vocab_size})"
                )
    if len(stream) < seq_len:
        raise CalibrationError(
            f"calibration text too short: {len(stream)} tokens in {data.describe()}; "
            f"need at least seq_len={seq_len}"
        )
    tokens = torch.tensor(stream, dtype=torch.int64)
    gen = torch.Generator().manual_seed(spec.seed)
    starts = torch.randint(0, len(stream) - seq_len + 1, (spec.num_seqs,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def tokenize_calibration(
    files: Sequence[str | Path], tokenizer, spec: CalibSpec, *, max_positions: int | None = None
) -> torch.Tensor:
    """``[num_seqs, seq_len]`` windows of calibration files (see :func:`calibration_windows`)."""
    if not files:
        raise CalibrationError("no calibration files given")
    return calibration_windows(CalibrationData.of(files), tokenizer, spec, max_positions=max_positions)


def _has_tokenizer(model_dir: Path) -> bool:
    return any(
        (model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )


def load_calibration(
    model_dir: str | Path, calibration: CalibrationData | Sequence[str | Path], spec: CalibSpec
) -> torch.Tensor:
    """Calibration windows, tokenized with the tokenizer stored in ``model_dir``.

    :param calibration: :class:`CalibrationData`, or a sequence of file paths (directories
        expanded).  A model without a tokenizer takes token-id documents only; documents
        are then separated by the config's ``eos_token_id``.
    """
    model_dir = Path(model_dir)
    data = CalibrationData.of(calibration)
    if not data.items:
        raise CalibrationError("no calibration files given")
    cfg = json.loads((model_dir / names.CONFIG_FILE).read_text())
    tok = None
    if data.needs_tokenizer or _has_tokenizer(model_dir):
        from transformers import AutoTokenizer

        if not _has_tokenizer(model_dir):
            raise CalibrationError(
                f"{model_dir} has no tokenizer: calibration text needs one (give token ids, or the tokenizer)"
            )
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    return calibration_windows(
        data,
        tok,
        spec,
        max_positions=cfg.get("max_position_embeddings"),
        eos=_model_eos(tok, cfg),
        vocab_size=cfg.get("vocab_size"),
    )


# -- the MoE block swapped into each decoder layer -------------------------------------------------
class CameraMoEBlock(nn.Module):
    """Drop-in for a transformers MoE block: config-driven router, per-expert weights of any width.

    While ``accumulator`` is set, every forward folds CAMERA statistics into it and, when
    ``keep_inputs`` is on, records the inputs and routing for the layer callback (on
    ``input_device``).  With ``keep_outputs`` it records its outputs; with ``reference``
    set (outputs recorded by an earlier pass over the same batches) it sums the squared
    difference to them and their squared norm, for :meth:`relative_error`.
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
        self.input_device = torch.device("cpu")
        self.inputs: list[torch.Tensor] = []
        self.routings: list[Routing] = []
        self.keep_outputs = False
        self.outputs: list[torch.Tensor] = []
        self.reference: list[torch.Tensor] | None = None
        self._err = [0.0, 0.0, 0]  # sum ||y - y_ref||^2, sum ||y_ref||^2, batches compared

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        routing = route(x, self.router, self.arch, self.shared_gate)
        if self.keep_inputs:
            # On the CPU by default: T x H for all calibration tokens may not fit next to the layer.
            dev = self.input_device
            self.inputs.append(x.detach().float().to(dev))
            r = routing
            shared = None if r.shared_weight is None else r.shared_weight.to(dev)
            self.routings.append(Routing(r.topk_ids.to(dev), r.topk_weights.to(dev), shared))
        out = moe_forward(x, self.weights, routing, self.accumulator)
        if self.keep_outputs:
            self.outputs.append(out.detach().cpu())
        if self.reference is not None:
            ref = self.reference[self._err[2]].to(out.device)
            self._err[0] += float((out - ref).double().square().sum())
            self._err[1] += float(ref.double().square().sum())
            self._err[2] += 1
        return out.to(hidden_states.dtype).reshape(shape)

    def relative_error(self) -> float:
        """``sum ||y - y_ref||^2 / sum ||y_ref||^2`` over the batches compared so far (0 if none)."""
        num, den, _ = self._err
        return num / den if den > 0 else 0.0


class _ReplayedAttention(nn.Module):
    """A decoder layer's attention that records its outputs, then replays them in the same order.

    The re-run of a compressed layer sees the same hidden states, so its attention output
    is the first pass's: replaying it is exact and skips the attention recompute.  The
    outputs are kept on the CPU between the passes (like the activations).
    """

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attention = attention
        self.recorded: list[object] = []
        self.replaying = False
        self._next = 0

    def forward(self, *args, **kwargs):
        if self.replaying:
            out = self.recorded[self._next]
            self._next += 1
            dev = kwargs.get("hidden_states", args[0] if args else None)
            return _tensors_to(out, dev.device if isinstance(dev, torch.Tensor) else None)
        out = self.attention(*args, **kwargs)
        self.recorded.append(_tensors_to(out, torch.device("cpu")))
        return out

    def replay(self) -> None:
        self.replaying, self._next = True, 0


def _tensors_to(obj, device: torch.device | None):
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device)
    if isinstance(obj, tuple):
        return tuple(_tensors_to(o, device) for o in obj)
    return obj


@dataclass
class MoELayerContext:
    """What an ``on_moe_layer`` callback sees for one MoE layer, before it is compressed.

    ``moe_input`` (``[T, H]`` fp32, after the post-attention norm) and ``routing`` cover
    all ``T = num_seqs * seq_len`` calibration tokens, computed on the outputs of the
    already-compressed earlier layers; they live on the CPU (on the streamer's device with
    ``keep_inputs_on_device``) and are None unless the streamer was asked to keep them
    (``keep_moe_inputs=True``).  ``weights`` are the
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
    :param keep_inputs_on_device: keep the MoE inputs handed to the callback on ``device``
        (no per-expert upload when quantizing on a GPU) instead of the CPU.
    """

    def __init__(
        self,
        source: SourceCheckpoint,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        batch_size: int = 4,
        attn_implementation: str = "sdpa",
        keep_inputs_on_device: bool = False,
    ):
        from transformers import AutoConfig

        self.source = source
        self.arch = source.arch
        self.dtype = dtype
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.keep_inputs_on_device = keep_inputs_on_device
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
        on_rerun: Callable[[int, float], None] | None = None,
        start_layer: int = 0,
        start_hidden: list[torch.Tensor] | None = None,
        on_layer_end: Callable[[int, list[torch.Tensor], LayerEnergies | None], None] | None = None,
    ) -> dict[int, LayerEnergies]:
        """Stream ``input_ids`` (``[N, L]``) through every layer; returns energies per MoE layer.

        For each MoE layer the energies are measured on inputs produced by the earlier
        layers *as compressed by the callback*.  When ``on_moe_layer`` returns a
        :class:`LayerWeights`, the layer is re-run with those weights before moving on.
        The re-run replays the layer's attention outputs from the first pass (its inputs
        did not change) and recomputes only the norms, the residual adds and the MoE block.
        ``final_hidden``, if given, receives the last layer's outputs (before the final norm).
        ``on_rerun(layer, rel_error)``, if given, receives for every re-run layer the relative
        squared error of its MoE block output against the first pass, from the re-run itself
        (``sum ||Y_new - Y||^2 / sum ||Y||^2`` over the calibration tokens).

        Resuming: ``start_layer`` > 0 skips the layers before it; ``start_hidden`` are then
        the hidden states entering ``start_layer`` (as ``on_layer_end`` received them from
        layer ``start_layer - 1``; the list is emptied, its tensors taken over), and only
        the layers run are in the result.
        ``on_layer_end(layer, hidden, energies)``, if given, is called after every layer (its
        callback and re-run done, the layer released) with the hidden states entering the
        next and the layer's energies (None for a dense layer).
        """
        from tqdm.auto import tqdm

        energy = energy or EnergySpec()
        if not 0 <= start_layer <= self.arch.num_layers:
            raise ValueError(f"start_layer {start_layer} is outside 0..{self.arch.num_layers}")
        if (start_layer > 0) != (start_hidden is not None):
            raise ValueError("start_hidden is needed exactly when start_layer > 0")
        if start_hidden is None:
            hidden = self.embed(input_ids)
        else:  # taken over, so that the caller's list does not keep a second copy alive
            hidden = list(start_hidden)
            start_hidden.clear()
        results: dict[int, LayerEnergies] = {}
        layers = range(start_layer, self.arch.num_layers)
        bar = tqdm(layers, desc="CAMERA layers", unit="layer", disable=not progress)
        for layer in bar:
            hidden, energies = self._stream_layer(
                layer, hidden, energy, on_moe_layer, keep_moe_inputs, on_rerun
            )
            if energies is not None:
                results[layer] = energies
            self.source.close()
            release_memory()
            if on_layer_end is not None:
                on_layer_end(layer, hidden, energies)
        if final_hidden is not None:
            final_hidden.extend(hidden)
        return results

    def _stream_layer(
        self,
        layer: int,
        hidden: list[torch.Tensor],
        energy: EnergySpec,
        on_moe_layer: MoELayerCallback | None,
        keep_moe_inputs: bool,
        on_rerun: Callable[[int, float], None] | None,
    ) -> tuple[list[torch.Tensor], LayerEnergies | None]:
        """One layer of :meth:`run`: (its outputs, its energies or None for a dense layer).

        Everything the layer allocated is unreferenced when this returns.
        """
        module = self.build_layer(layer)
        if layer not in self.arch.moe_layers:
            return self._run(module, layer, hidden), None
        block: CameraMoEBlock = module.mlp  # type: ignore[assignment]
        block.accumulator = EnergyAccumulator(block.weights)
        block.keep_inputs = keep_moe_inputs
        block.input_device = self.device if self.keep_inputs_on_device else torch.device("cpu")
        block.keep_outputs = on_rerun is not None
        # Only a callback can ask for a re-run; then keep what the re-run can reuse.
        attention = None
        if on_moe_layer is not None and isinstance(getattr(module, "self_attn", None), nn.Module):
            attention = _ReplayedAttention(module.self_attn)
            module.self_attn = attention
        outputs = self._run(module, layer, hidden)
        energies = block.accumulator.result(layer, energy)
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
        # The context holds the original weights and the kept inputs: drop it before the
        # re-run so that only the replacement is alive (not two copies of the experts).
        del ctx
        if replacement is not None:
            block.weights = replacement.to(self.dtype, self.device)
            del replacement
            if attention is not None:
                attention.replay()  # the hidden states are the same: only the MoE block changed
            if on_rerun is not None:
                block.reference, block.keep_outputs = block.outputs, False
            outputs = self._run(module, layer, hidden)
            if on_rerun is not None:
                on_rerun(layer, block.relative_error())
        block.weights = block.reference = None  # type: ignore[assignment]
        block.outputs = []
        return outputs, energies


def iter_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories into the files they contain (sorted), keep files as they are."""
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p])
    return out
