"""The compressor's Python API: :func:`prune` (CAMERA-P), :func:`quantize` (CAMERA-Q), :func:`analyze`.

The ``camera-vllm analyze|prune|quantize`` commands are a thin layer over these functions
(argument parsing, then one call), so a call here and the command with the same inputs
write byte-identical checkpoints.

``model`` is any of

* a local Hugging Face model directory (``str`` or :class:`~pathlib.Path`);
* a hub id ``ORG/NAME``, looked up in the local Hugging Face cache first and downloaded
  otherwise (unless ``HF_HUB_OFFLINE`` is set), as the CLI does; ``revision`` picks a
  branch, tag or commit;
* an in-memory ``transformers`` model (e.g. from ``AutoModelForCausalLM.from_pretrained``):
  it is saved with ``save_pretrained`` into a temporary directory that lives for the call
  (so the disk needs room for one more copy of it).  Its tokenizer is ``tokenizer=``, or
  the one in the local directory it was loaded from; without one, calibration must be
  token ids.

``calibration`` is any of

* a path (:class:`~pathlib.Path`, or a ``str`` naming an existing file or directory), or a
  list of them: ``.txt`` files are one document each, ``.jsonl``/``.json`` one document
  per line (field ``text_key``), a directory every file under it;
* a text (any other ``str``) or a list of texts, one document each;
* an iterable of token-id sequences (lists of ints, 1-D integer tensors or arrays, or a
  2-D tensor of rows), already tokenized by the model's tokenizer without special tokens;
* any iterable of mappings with a ``text_key`` or ``input_ids`` field: a Hugging Face
  ``datasets.Dataset`` works as it is (``load_dataset(...)["train"]``).

Whatever the form, the documents are joined into one token stream (EOS between them)
and ``num_seqs`` windows of ``seq_len`` tokens are drawn from it at offsets seeded by
``seed``: the same documents give the same windows, so a list of texts and a JSON-lines
file holding them compress identically.

Importing this module is cheap: torch and transformers load when a function is called.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .compress.calibrate import CalibrationData
    from .compress.run import RunOptions
    from .compress.score import EnergySpec, LayerEnergies

__all__ = ["AnalysisResult", "CompressionResult", "analyze", "prune", "quantize"]

#: A model directory, a hub id, or an in-memory ``transformers`` model.
ModelLike = Any
#: Files, texts, token-id sequences, or an iterable (e.g. a ``datasets.Dataset``) of them.
CalibrationLike = Any

DEFAULT_NUM_SEQS = 128  # the paper: 128 x 2048 tokens of WikiText-2
DEFAULT_ALPHA = 0.9  # == camera_vllm.compress.score.DEFAULT_ALPHA (checked by the tests)


@dataclass(frozen=True)
class CompressionResult:
    """What :func:`prune` and :func:`quantize` wrote.

    :ivar path: the checkpoint directory (validated; servable with ``vllm serve``).
    :ivar method: ``"camera-p"`` or ``"camera-q"``.
    :ivar summary: the checkpoint summary of ``camera-vllm inspect --json``
        (:func:`camera_vllm.format.summary.summarize_camera_config`).
    :ivar report: ``camera_report.json``: settings, per-layer numbers, timings.
    """

    path: Path
    method: str
    summary: dict[str, Any]
    report: dict[str, Any]

    @property
    def bits_per_weight(self) -> float | None:
        """Stored expert bits per original expert weight (scales and zeros counted)."""
        return self.summary.get("totals", {}).get("bits_per_original_weight")

    @property
    def kept_fraction(self) -> float | None:
        """Share of the routed experts' micro-experts kept (1.0 without pruning)."""
        return self.summary.get("totals", {}).get("kept_fraction")


@dataclass(frozen=True)
class AnalysisResult:
    """What :func:`analyze` measured.

    :ivar energies: per MoE layer, the CAMERA statistics and energies of every micro-expert.
    :ivar settings: model, energy and calibration settings (the JSON sidecar's ``settings``).
    :ivar path: the safetensors file written, or None when ``out`` was not given.
    """

    energies: dict[int, LayerEnergies]
    settings: dict[str, Any]
    path: Path | None


# -- shared arguments ------------------------------------------------------------------------------
def _run_options(
    *,
    num_seqs: int,
    seq_len: int | None,
    seed: int,
    calib_format: str,
    text_key: str,
    device: str,
    threads: int | None,
    batch_size: int,
    overwrite: bool,
    save_scores: str | os.PathLike | None,
    progress: bool,
    resume: bool = False,
) -> RunOptions:
    from .compress.calibrate import CalibSpec
    from .compress.run import RunOptions

    calib = CalibSpec(num_seqs=num_seqs, seq_len=seq_len, seed=seed, fmt=calib_format, text_key=text_key)  # type: ignore[arg-type]
    return RunOptions(
        calib=calib,
        device=device,
        threads=threads,
        batch_size=batch_size,
        overwrite=overwrite,
        scores_out=None if save_scores is None else Path(save_scores),
        progress=progress,
        resume=resume,
    )


def _energy(alpha: float, normalize_sum: bool) -> EnergySpec:
    from .compress.score import EnergySpec

    return EnergySpec(alpha=alpha, normalize_sum=normalize_sum)


def _calibration(calibration: CalibrationLike, text_key: str) -> CalibrationData:
    from .compress.calibrate import CalibrationData

    return CalibrationData.from_user(calibration, text_key=text_key)


def _is_transformers_model(model: object) -> bool:
    return callable(getattr(model, "save_pretrained", None)) and hasattr(model, "config")


def _model_name(model: Any) -> str:
    name = Path(str(getattr(model, "name_or_path", "") or "model").rstrip("/")).name
    return re.sub(r"[^\w.-]", "_", name) or "model"


@contextmanager
def _model_dir(model: ModelLike, revision: str | None, tokenizer: Any) -> Iterator[Path]:
    """A local directory holding ``model`` for the length of the block."""
    if isinstance(model, (str, os.PathLike)):
        if tokenizer is not None:
            raise ValueError(
                f"tokenizer= applies to in-memory models; {os.fspath(model)} is read with its own tokenizer"
            )
        from .compress.hub import resolve_model

        yield resolve_model(os.fspath(model), revision)
        return
    if not _is_transformers_model(model):
        raise TypeError(
            "model must be a model directory, a hub id ORG/NAME or an in-memory transformers model, "
            f"got {type(model).__name__}"
        )
    if revision is not None:
        raise ValueError(f"revision={revision!r} applies to hub ids, not to an in-memory model")
    if tokenizer is None:
        origin = Path(str(getattr(model, "name_or_path", "") or ""))
        if str(origin) and origin.is_dir() and (origin / "tokenizer_config.json").is_file():
            tokenizer = origin
    with tempfile.TemporaryDirectory(prefix="camera-vllm-model-") as tmp:
        path = Path(tmp) / _model_name(model)
        model.save_pretrained(path)
        if tokenizer is not None:
            if isinstance(tokenizer, (str, os.PathLike)):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
            tokenizer.save_pretrained(path)
        yield path


def _check_out(out: str | os.PathLike, overwrite: bool) -> None:
    """The output checks of the run, early: before an in-memory model is saved."""
    from .compress.run import check_run_setup

    check_run_setup(Path(out).resolve(), overwrite=overwrite)


def _result(path: Path, method: str) -> CompressionResult:
    from .format import names
    from .format.summary import summarize_camera_config

    config = json.loads((path / names.CONFIG_FILE).read_text())
    report = json.loads((path / names.REPORT_FILE).read_text())
    return CompressionResult(path, method, summarize_camera_config(config), report)


# -- the three entry points ----------------------------------------------------------------------------
def prune(
    model: ModelLike,
    ratio: float,
    calibration: CalibrationLike,
    out: str | os.PathLike,
    *,
    scope: Literal["layer", "expert"] = "layer",
    alpha: float = DEFAULT_ALPHA,
    normalize_sum: bool = False,
    num_seqs: int = DEFAULT_NUM_SEQS,
    seq_len: int | None = None,
    seed: int = 0,
    calib_format: Literal["auto", "text", "jsonl"] = "auto",
    text_key: str = "text",
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = 4,
    overwrite: bool = False,
    save_scores: str | os.PathLike | None = None,
    revision: str | None = None,
    tokenizer: Any = None,
    progress: bool = True,
    resume: bool = False,
) -> CompressionResult:
    """CAMERA-P: remove the lowest-energy ``ratio`` of micro-experts; write a servable checkpoint.

    :param model: model directory, hub id or in-memory transformers model (module doc).
    :param ratio: share of micro-experts removed, in ``[0, 1)``.
    :param calibration: files, texts, token ids or a dataset (module doc).
    :param out: the checkpoint directory to write (must not exist unless ``overwrite``).
    :param scope: ``"layer"`` ranks a layer's routed and shared micro-experts together
        (the paper); ``"expert"`` removes the same share inside every expert.
    :param alpha: weight of the max term in the CAMERA energy (1.0 = max only).
    :param normalize_sum: divide the energy's token sum by the number of tokens.
    :param num_seqs: calibration windows; ``seq_len`` their length (default
        ``min(2048, max_position_embeddings)``); ``seed`` their offsets.
    :param calib_format: how to read files: ``auto`` (``.jsonl``/``.json`` are JSON lines).
    :param text_key: the text field of JSON-lines records and dataset rows.
    :param device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
    :param threads: torch threads for the run (default: the CPUs this process may use,
        capped by torch's default).
    :param batch_size: calibration sequences per layer forward.
    :param save_scores: also save the energies to this ``.safetensors`` file.
    :param revision: branch, tag or commit of a hub id.
    :param tokenizer: for an in-memory model: its tokenizer (object or directory).
    :param progress: show a per-layer progress bar.
    :param resume: continue a run of the same settings into ``out`` that was killed,
        at its first unfinished layer (same bytes as an uninterrupted run); refused,
        naming what differs, if the model, calibration or settings changed.  Needs a
        model directory (an in-memory model is written to a new directory each run).
    :raises ValueError: bad settings, before any calibration work (the message names them).
    """
    from .compress.pipeline import PruneMethod, run_camera_p

    PruneMethod(ratio, scope)  # a bad ratio/scope fails before the model is opened
    options = _run_options(
        num_seqs=num_seqs,
        seq_len=seq_len,
        seed=seed,
        calib_format=calib_format,
        text_key=text_key,
        device=device,
        threads=threads,
        batch_size=batch_size,
        overwrite=overwrite,
        save_scores=save_scores,
        progress=progress,
        resume=resume,
    )
    _check_out(out, overwrite)
    data = _calibration(calibration, text_key)
    with _model_dir(model, revision, tokenizer) as model_dir:
        path = run_camera_p(
            model_dir,
            Path(out),
            ratio,
            data,
            scope=scope,
            energy=_energy(alpha, normalize_sum),
            options=options,
        )
    return _result(path, "camera-p")


def quantize(
    model: ModelLike,
    calibration: CalibrationLike,
    out: str | os.PathLike,
    *,
    avg_bits: float | None = None,
    bits: Sequence[int] | None = None,
    fractions: Sequence[float] | None = None,
    group_size: int = 128,
    method: Literal["gptq", "rtn"] = "gptq",
    scope: Literal["layer", "expert"] = "layer",
    prune_ratio: float = 0.0,
    allow_prune: bool = False,
    damp: float = 0.01,
    act_order: bool = False,
    router_weighted: bool = True,
    sequential: bool = True,
    alpha: float = DEFAULT_ALPHA,
    normalize_sum: bool = False,
    num_seqs: int = DEFAULT_NUM_SEQS,
    seq_len: int | None = None,
    seed: int = 0,
    calib_format: Literal["auto", "text", "jsonl"] = "auto",
    text_key: str = "text",
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = 4,
    overwrite: bool = False,
    save_scores: str | os.PathLike | None = None,
    revision: str | None = None,
    tokenizer: Any = None,
    progress: bool = True,
    resume: bool = False,
) -> CompressionResult:
    """CAMERA-Q: micro-experts at mixed bit-widths by energy; write a servable checkpoint.

    Give ``avg_bits`` (a budget of stored bits per original expert weight, packed codes,
    fp16 scales and zeros all counted, met in every layer; ``bits`` are then the candidate
    widths, default 4, 3, 2, 1) or ``bits`` with ``fractions`` (the share of the kept
    micro-experts at each width, highest energy at the most bits).

    :param group_size: quantization group along each matrix's input dim (multiple of 32).
    :param method: ``"gptq"`` (the paper's; keeps RTN per matrix where that is better on
        the calibration data) or ``"rtn"``.
    :param scope: ``"layer"`` ranks a layer's micro-experts together; ``"expert"`` gives
        every expert the same split.
    :param prune_ratio: also remove this share of micro-experts first (0 bits).
    :param allow_prune: with ``avg_bits``: let the allocator prune where that is cheapest.
    :param damp: relative GPTQ Hessian damping; ``act_order``: visit inputs by decreasing
        Hessian diagonal.
    :param router_weighted: weight GPTQ Hessians by the squared router weight.
    :param sequential: down's Hessian from the activations of the quantized gate/up.

    The model, calibration and run parameters are those of :func:`prune`.
    :raises ValueError: bad settings (e.g. an unreachable ``avg_bits``), before calibrating.
    """
    from .compress.quantize.pipeline import QuantSpec, run_camera_q
    from .compress.quantize.slabs import SlabQuantOptions

    if fractions is not None and bits is None:
        raise ValueError("fractions= needs bits= (one fraction per bit-width)")
    spec = QuantSpec(
        avg_bits=avg_bits,
        bits=None if bits is None else tuple(int(b) for b in bits),
        fractions=None if fractions is None else tuple(float(f) for f in fractions),
        group_size=group_size,
        method=method,
        scope=scope,
        prune_ratio=prune_ratio,
        allow_prune=allow_prune,
        router_weighted=router_weighted,
        sequential=sequential,
        options=SlabQuantOptions(damp=damp, act_order=act_order),
    )
    options = _run_options(
        num_seqs=num_seqs,
        seq_len=seq_len,
        seed=seed,
        calib_format=calib_format,
        text_key=text_key,
        device=device,
        threads=threads,
        batch_size=batch_size,
        overwrite=overwrite,
        save_scores=save_scores,
        progress=progress,
        resume=resume,
    )
    _check_out(out, overwrite)
    data = _calibration(calibration, text_key)
    with _model_dir(model, revision, tokenizer) as model_dir:
        path = run_camera_q(
            model_dir, Path(out), data, spec, energy=_energy(alpha, normalize_sum), options=options
        )
    return _result(path, "camera-q")


def analyze(
    model: ModelLike,
    calibration: CalibrationLike,
    out: str | os.PathLike | None = None,
    *,
    alpha: float = DEFAULT_ALPHA,
    normalize_sum: bool = False,
    num_seqs: int = DEFAULT_NUM_SEQS,
    seq_len: int | None = None,
    seed: int = 0,
    calib_format: Literal["auto", "text", "jsonl"] = "auto",
    text_key: str = "text",
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = 4,
    revision: str | None = None,
    tokenizer: Any = None,
    progress: bool = True,
) -> AnalysisResult:
    """CAMERA energies of every micro-expert of the unmodified model.

    :param out: also write them to this ``.safetensors`` file (and a ``.json`` sidecar);
        read it back with :func:`camera_vllm.compress.score.load_energies`.

    The other parameters are those of :func:`prune`.
    """
    from .compress.pipeline import score_model
    from .compress.score import save_energies

    options = _run_options(
        num_seqs=num_seqs,
        seq_len=seq_len,
        seed=seed,
        calib_format=calib_format,
        text_key=text_key,
        device=device,
        threads=threads,
        batch_size=batch_size,
        overwrite=False,
        save_scores=None,
        progress=progress,
    )
    data = _calibration(calibration, text_key)
    with _model_dir(model, revision, tokenizer) as model_dir:
        energies, settings = score_model(
            model_dir, data, energy=_energy(alpha, normalize_sum), options=options
        )
    path = None if out is None else save_energies(Path(out), energies, settings)
    return AnalysisResult(energies, settings, path)
