"""What every compression run shares: run options, set-up checks, calibration, the layer stream,
the atomic writer and the final validation.

CAMERA-P (:mod:`.pipeline`) and CAMERA-Q (:mod:`.quantize.pipeline`) differ only in what
they do to each MoE layer and in what they write; both are a :class:`LayerMethod` run by
:func:`compress_checkpoint`::

    check the output, the device and the method's settings   (before any work)
    tokenize the calibration data
    open the checkpoint writer (a temporary sibling directory)
    stream the layers: score -> method.on_moe_layer -> re-run the MoE block
    method.finish: write its tensors, build config + report + plots
    commit (validated, one rename), validate again, return the path

Resuming (``RunOptions.resume`` / ``--resume``): after every layer the run records its
progress inside the temporary directory (``.camera_progress/``, see :class:`RunProgress`):
the writer's state (tensors already in shards, buffered ones in ``pending-N`` files), each
finished MoE layer's energies and method state (keep-set / allocation, exactly), the
hidden states entering the next layer, and a fingerprint of everything the result
depends on.  A resumed run adopts that directory, refuses if any fingerprint part
differs (naming it), and continues at the first unfinished layer with exactly the
inputs that layer would have seen, so its bytes are those of an uninterrupted run.
Disk cost: one copy of the hidden states (``num_seqs x seq_len x hidden`` in the compute
dtype: 2 GiB for 128 x 2048 tokens of a 2048-wide fp32 model), written once per layer,
plus a few MB of statistics per layer; buffered tensors are written twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import __version__
from ..checkpoint.source import SourceCheckpoint
from ..format import names
from ..format.schema import CameraQuantConfig
from ..format.validate import validate
from .calibrate import CalibrationData, CalibSpec, LayerStreamer, MoELayerCallback, load_calibration
from .score import ChannelStats, EnergySpec, LayerEnergies, save_energies
from .writer import PROGRESS_DIR, CheckpointWriter, resumable_temp_dirs

log = logging.getLogger(__name__)

Calibration = CalibrationData | Sequence[str | Path]
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class RunOptions:
    """How a compression runs, as opposed to what it computes (:class:`~.quantize.pipeline.QuantSpec`).

    :param calib: which calibration windows to draw (count, length, seed, file format).
    :param device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
    :param dtype: compute dtype of attention and norms (MoE math and energies are fp32).
    :param threads: torch intra-op threads for the run (restored afterwards); None:
        :func:`default_threads`.
    :param batch_size: calibration sequences per layer forward.
    :param overwrite: replace an existing output directory.
    :param scores_out: also save the energies there (safetensors + JSON sidecar).
    :param progress: show the per-layer progress bar.
    :param resume: continue the run that a killed process left for the same output
        (same model, calibration and settings, else refused); start afresh if there is none.
    """

    calib: CalibSpec = field(default_factory=CalibSpec)
    device: str | torch.device = "auto"
    dtype: torch.dtype = torch.float32
    threads: int | None = None
    batch_size: int = 4
    overwrite: bool = False
    scores_out: str | Path | None = None
    progress: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {[str(d) for d in _COMPUTE_DTYPES]}, got {self.dtype}")
        if not isinstance(self.calib, CalibSpec):
            raise TypeError(f"calib must be a CalibSpec, got {type(self.calib).__name__}")


# -- set-up checks ---------------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; a device this machine lacks raises ``ValueError``.

    Called before calibration starts, so ``--device cuda`` on a machine without a GPU fails
    in a second, not after the calibration text is tokenized.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"--device {device!r} is not a device ({err}); use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu (or auto)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: the compressor runs on cpu or cuda")
    return dev


def check_run_setup(out: Path, *, overwrite: bool, batch_size: int = 1) -> None:
    """Refuse, before any work, an output directory that cannot be written and bad run options.

    ``out`` must not exist (unless ``overwrite``) and must not be a file; the checkpoint is
    written into a sibling temporary directory, so its parent (or the nearest existing
    ancestor, when parents will be created) must accept a new directory: probed by creating
    and removing one, which also catches read-only mounts.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a checkpoint directory")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"--out {out}: {ancestor} is a file, so no directory can be made under it")
    try:
        probe = Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=ancestor))
    except OSError as err:
        raise PermissionError(
            f"--out {out}: cannot create the checkpoint under {ancestor} ({err.strerror})"
        ) from None
    probe.rmdir()


def check_scores_out(scores_out: str | Path | None, out: Path) -> None:
    if scores_out is not None and out in Path(scores_out).resolve().parents:
        raise ValueError(f"scores_out {scores_out} must not be inside the checkpoint directory {out}")


# -- threads ---------------------------------------------------------------------------------------
def default_threads() -> int:
    """Threads a run uses by default: the CPUs this process may run on, capped by torch's setting.

    ``torch.get_num_threads()`` is torch's default (physical cores, or ``OMP_NUM_THREADS``)
    unless something lowered it; the affinity mask is what a container or ``taskset`` allows.
    Taking the smaller never oversubscribes (torch's default alone ignores the mask).
    """
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = os.cpu_count() or 1
    return max(1, min(allowed, torch.get_num_threads()))


@contextmanager
def thread_limit(threads: int | None) -> Iterator[int]:
    """``torch.set_num_threads`` for the block (``None``: :func:`default_threads`), then restored."""
    n = default_threads() if threads is None else threads
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


# -- calibration and the layer stream ----------------------------------------------------------------
def calib_settings(data: CalibrationData, calib: CalibSpec, ids: torch.Tensor) -> dict[str, Any]:
    """The calibration block of a report / energies sidecar (in-memory documents only counted)."""
    out: dict[str, Any] = {
        "files": [str(f) for f in data.files],
        "format": calib.fmt,
        "text_key": calib.text_key,
        "num_seqs": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "seed": calib.seed,
        "tokens": int(ids.numel()),
    }
    if data.documents:
        out["documents"] = data.documents
    return out


@dataclass
class CalibratedRun:
    """An opened model, its calibration windows and a streamer ready to run them."""

    source: SourceCheckpoint
    device: torch.device
    data: CalibrationData
    ids: torch.Tensor
    options: RunOptions
    streamer: LayerStreamer
    seconds_calibration: float

    def base_settings(self, energy: EnergySpec) -> dict[str, Any]:
        """Energy, device, batch size and calibration: the settings every method records."""
        out: dict[str, Any] = {
            **asdict(energy),
            "device": str(self.device),
            "batch_size": self.options.batch_size,
            "calibration": calib_settings(self.data, self.options.calib, self.ids),
        }
        if self.options.dtype != torch.float32:
            out["compute_dtype"] = str(self.options.dtype).removeprefix("torch.")
        return out

    def compression_calibration(self, energy: EnergySpec) -> dict[str, Any]:
        """The calibration block of ``quantization_config.compression``: file names only."""
        calib = self.base_settings(energy)["calibration"]
        return {**calib, "files": [f.name for f in self.data.files]}


def open_run(
    model_dir: str | Path,
    calibration: Calibration,
    options: RunOptions,
    *,
    device: torch.device | None = None,
    source: SourceCheckpoint | None = None,
) -> CalibratedRun:
    """Open the model, tokenize the calibration data and build the layer streamer."""
    dev = device if device is not None else resolve_device(options.device)
    source = source if source is not None else SourceCheckpoint(model_dir)
    data = CalibrationData.of(calibration)
    t0 = time.perf_counter()
    ids = load_calibration(model_dir, data, options.calib)
    seconds = time.perf_counter() - t0
    # On a GPU the MoE inputs stay there: each expert's slice is gathered on the device.
    streamer = LayerStreamer(
        source,
        dtype=options.dtype,
        device=dev,
        batch_size=options.batch_size,
        keep_inputs_on_device=dev.type == "cuda",
    )
    return CalibratedRun(source, dev, data, ids, options, streamer, seconds)


# -- the shared orchestration ------------------------------------------------------------------------
@dataclass
class Finished:
    """What a method hands back after the stream: config, report and extra files to commit."""

    quant_config: CameraQuantConfig
    report: dict[str, Any]
    extra_files: dict[str, bytes]
    log_line: str = ""


class LayerMethod(Protocol):
    """One per-layer compression method (CAMERA-P, CAMERA-Q) as :func:`compress_checkpoint` runs it."""

    #: Name of the stream phase in the report's timings, e.g. ``score_and_prune``.
    stream_phase: str
    #: Whether ``on_moe_layer`` needs the MoE inputs and routing of every token.
    keep_moe_inputs: bool

    def check(self, source: SourceCheckpoint) -> None:
        """Fail (or warn) before calibration when the settings cannot work on this model."""

    def settings(self) -> dict[str, Any]:
        """The method's own settings, recorded first in the report's settings."""

    def layer_callback(self, add: Callable[[str, torch.Tensor], None]) -> MoELayerCallback:
        """The streamer's ``on_moe_layer``; ``add`` queues a checkpoint tensor."""

    def on_rerun(self, layer: int, rel_error: float) -> None:
        """The re-run's relative MoE-output error of ``layer``."""

    def layer_state(self, layer: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What the method kept of finished ``layer`` (tensors, JSON), for resuming; exact."""

    def restore_layer(self, layer: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Take back :meth:`layer_state` of ``layer`` (after :meth:`layer_callback`) on resume."""

    def finish(
        self,
        writer: CheckpointWriter,
        run: CalibratedRun,
        energies: dict[int, LayerEnergies],
        settings: dict[str, Any],
        compression_calibration: dict[str, Any],
        timings: dict[str, float],
    ) -> Finished:
        """Add the remaining tensors to ``writer``; return config, report and plots."""


# -- resuming --------------------------------------------------------------------------------------
PROGRESS_FILE = "progress.json"
PROGRESS_VERSION = 1


class ResumeMismatch(ValueError):
    """``--resume`` found an interrupted run whose inputs or settings differ; the message names them."""


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def run_fingerprint(
    run: CalibratedRun, method: LayerMethod, energy: EnergySpec, threads: int
) -> dict[str, str]:
    """A digest per input the written bytes depend on, keyed by what an error message calls it.

    The model is identified by its path, config and the size and modification time of
    every weight file (not their contents: hashing a 60 GB model would cost minutes);
    the calibration by the token windows themselves; threads count because float sums
    may group differently with another thread count.
    """
    src = run.source
    files = sorted({*src.stored_map.values(), names.CONFIG_FILE})
    stats = {f: [(st := (src.path / f).stat()).st_size, st.st_mtime_ns] for f in files}
    ids = run.ids.contiguous()
    parts = {
        "model": {"path": str(src.path.resolve()), "config": src.config, "files": stats},
        "calibration windows": {
            "settings": calib_settings(run.data, run.options.calib, ids),
            "tokens": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
        },
        "method settings": {"phase": method.stream_phase, **method.settings()},
        "energy settings": asdict(energy),
        "run options (device, dtype, batch size, threads)": [
            str(run.device),
            str(run.options.dtype),
            run.options.batch_size,
            threads,
        ],
        "camera-vllm version": __version__,
    }
    return {k: _digest(v) for k, v in parts.items()}


def _energies_state(e: LayerEnergies) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    stats = [*(("e", i, s) for i, s in enumerate(e.experts)), *([("s", 0, e.shared)] if e.shared else [])]
    for kind, i, st in stats:
        for field_name in ("sum_sq", "max_sq", "down_sq"):
            tensors[f"energy.{kind}{i}.{field_name}"] = getattr(st, field_name).detach().cpu().clone()
    meta = {
        "tokens": [s.tokens for s in e.experts],
        "shared_tokens": None if e.shared is None else e.shared.tokens,
        "total_tokens": e.total_tokens,
    }
    return tensors, meta


def _energies_from_state(
    layer: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], energy: EnergySpec
) -> LayerEnergies:
    def stats(key: str, tokens: int) -> ChannelStats:
        return ChannelStats(*(tensors[f"energy.{key}.{n}"] for n in ("sum_sq", "max_sq", "down_sq")), tokens)

    experts = [stats(f"e{i}", t) for i, t in enumerate(meta["tokens"])]
    shared = None if meta["shared_tokens"] is None else stats("s0", meta["shared_tokens"])
    return LayerEnergies(layer, experts, shared, meta["total_tokens"], energy)


class RunProgress:
    """A run's resumable progress under ``writer.progress_dir`` (see the module docstring).

    Files: ``progress.json`` (fingerprint, next layer, writer state; replaced atomically
    after everything it names is on disk), ``layer-L.safetensors`` per finished MoE layer
    (energies and method state, JSON in the metadata) and ``hidden-L.safetensors`` (the
    hidden states after layer L; only the newest is kept).
    """

    def __init__(
        self,
        writer: CheckpointWriter,
        fingerprint: dict[str, str],
        method: LayerMethod,
        energy: EnergySpec,
        num_layers: int,
    ):
        self.writer, self.fingerprint, self.method = writer, fingerprint, method
        self.energy, self.num_layers = energy, num_layers
        self.energies: dict[int, LayerEnergies] = {}
        self._layers: list[int] = []
        self._hidden: str | None = None

    @property
    def dir(self) -> Path:
        return self.writer.progress_dir

    @staticmethod
    def check(temp_dir: Path, fingerprint: dict[str, str]) -> None:
        """Refuse (:class:`ResumeMismatch`) a recorded run whose fingerprint differs from ``fingerprint``."""
        record_path = temp_dir / PROGRESS_DIR / PROGRESS_FILE
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError) as err:
            raise ResumeMismatch(f"cannot resume from {record_path}: unreadable ({err})") from None
        if record.get("version") != PROGRESS_VERSION:
            raise ResumeMismatch(
                f"cannot resume from {temp_dir}: progress format {record.get('version')!r}, "
                f"this camera-vllm writes {PROGRESS_VERSION}; rerun without --resume to start over"
            )
        theirs = record.get("fingerprint", {})
        differ = [k for k in fingerprint if theirs.get(k) != fingerprint[k]]
        if differ:
            raise ResumeMismatch(
                f"cannot resume from {temp_dir}: the {', '.join(differ)} differ from the interrupted "
                "run's; rerun with the same inputs and settings, or without --resume to start over"
            )

    def load(self) -> tuple[int, list[torch.Tensor] | None]:
        """Restore writer and method from the record; (first layer to run, hidden states entering it)."""
        record = json.loads((self.dir / PROGRESS_FILE).read_text())
        self.writer.restore(record["writer"])
        for layer in record["layers"]:
            with safe_open(str(self.dir / f"layer-{layer}.safetensors"), "pt") as f:
                meta = json.loads((f.metadata() or {})["state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            self.energies[layer] = _energies_from_state(layer, tensors, meta["energies"], self.energy)
            self.method.restore_layer(layer, tensors, meta["method"])
        self._layers = list(record["layers"])
        start, self._hidden = int(record["next_layer"]), record["hidden"]
        for item in self.dir.glob("hidden-*.safetensors"):  # written after the record
            if item.name != self._hidden:
                item.unlink()
        if start >= self.num_layers:
            return start, None
        with safe_open(str(self.dir / str(self._hidden)), "pt") as f:
            hidden = [f.get_tensor(f"h.{i}") for i in range(len(f.keys()))]
        return start, hidden

    def record(self, layer: int, hidden: list[torch.Tensor], energies: LayerEnergies | None) -> None:
        """The streamer's ``on_layer_end``: make ``layer`` durable, then move the record on."""
        self.dir.mkdir(exist_ok=True)
        if energies is not None:
            tensors, meta = _energies_state(energies)
            mt, mm = self.method.layer_state(layer)
            clash = set(tensors) & set(mt)
            if clash:
                raise RuntimeError(f"layer {layer}: method state reuses names {sorted(clash)[:3]}")
            state = json.dumps({"energies": meta, "method": mm})
            save_file({**tensors, **mt}, str(self.dir / f"layer-{layer}.safetensors"), {"state": state})
            self._layers.append(layer)
        old_hidden, self._hidden = self._hidden, None
        if layer + 1 < self.num_layers:  # the last layer's outputs are never needed again
            self._hidden = f"hidden-{layer}.safetensors"
            save_file({f"h.{i}": h.contiguous() for i, h in enumerate(hidden)}, str(self.dir / self._hidden))
        record = {
            "version": PROGRESS_VERSION,
            "fingerprint": self.fingerprint,
            "next_layer": layer + 1,
            "layers": self._layers,
            "hidden": self._hidden,
            "writer": self.writer.state(),
        }
        tmp = self.dir / f"{PROGRESS_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.dir / PROGRESS_FILE)
        if old_hidden is not None:
            (self.dir / old_hidden).unlink(missing_ok=True)
        self.writer.drop_stale()


def compress_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    calibration: Calibration,
    method: LayerMethod,
    *,
    energy: EnergySpec,
    options: RunOptions,
) -> Path:
    """Run ``method`` over the model layer by layer and publish a validated checkpoint at ``out_dir``.

    Every check that needs no calibration (output directory, device, the method's
    settings) runs first, so bad input fails in a second.
    """
    out = Path(out_dir).resolve()
    check_run_setup(out, overwrite=options.overwrite, batch_size=options.batch_size)
    check_scores_out(options.scores_out, out)
    dev = resolve_device(options.device)
    with SourceCheckpoint(model_dir) as source:
        return _compress(source, out, calibration, method, energy, options, dev)


def _compress(
    source: SourceCheckpoint,
    out: Path,
    calibration: Calibration,
    method: LayerMethod,
    energy: EnergySpec,
    options: RunOptions,
    dev: torch.device,
) -> Path:
    method.check(source)
    t0 = time.perf_counter()
    with thread_limit(options.threads) as threads:
        run = open_run(source.path, calibration, options, device=dev, source=source)
        t_calib = time.perf_counter()
        fingerprint = run_fingerprint(run, method, energy, threads)
        resumable = resumable_temp_dirs(out)[:1] if options.resume else []
        if resumable:  # refuse before the writer adopts (and could remove) the directory
            RunProgress.check(resumable[0], fingerprint)
        elif options.resume:
            log.warning("--resume: no interrupted run of %s to resume; starting from the first layer", out)
        with CheckpointWriter(out, overwrite=options.overwrite, resume=options.resume) as writer:
            callback = method.layer_callback(writer.add)
            progress = RunProgress(writer, fingerprint, method, energy, source.arch.num_layers)
            start, hidden = progress.load() if writer.resumed_from is not None else (0, None)
            if start:
                log.info("resuming at layer %d of %d", start, source.arch.num_layers)
            energies = progress.energies
            energies.update(
                run.streamer.run(
                    run.ids,
                    energy=energy,
                    on_moe_layer=callback,
                    keep_moe_inputs=method.keep_moe_inputs,
                    on_rerun=method.on_rerun,
                    progress=options.progress,
                    start_layer=start,
                    start_hidden=hidden,
                    on_layer_end=progress.record,
                )
            )
            del hidden
            t_stream = time.perf_counter()
            settings = {**method.settings(), **run.base_settings(energy)}
            if options.scores_out is not None:
                save_energies(options.scores_out, energies, {"model": str(source.path), **settings})
            timings = {"calibration_load": t_calib - t0, method.stream_phase: t_stream - t_calib}
            done = method.finish(
                writer, run, energies, settings, run.compression_calibration(energy), timings
            )
            path = writer.commit(
                source_dir=source.path,
                config=source.config,
                quant_config=done.quant_config,
                report=done.report,
                extra_files=done.extra_files,
            )
    log.info("%s wrote %s in %.1fs", done.log_line or "camera-vllm", path, time.perf_counter() - t0)
    result = validate(path, check_values=False)
    if not result.ok:
        raise RuntimeError(f"the written checkpoint does not validate:\n{result}")
    return path
