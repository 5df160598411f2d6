"""CAMERA-Q end to end: calibrate -> stream layers (score, allocate bits, quantize, re-run) -> write.

For every MoE layer, on the outputs of the already-quantized earlier layers
(:class:`~camera_vllm.compress.calibrate.LayerStreamer` with ``keep_moe_inputs=True``):

1. CAMERA energies of every micro-expert (the streamer computes them);
2. :func:`~.allocate.allocate_layer` splits the micro-experts into bit groups by energy
   (explicit ``bits``/``fractions``, or an ``avg_bits`` budget that counts packed weights,
   scales and zeros); ``prune_ratio`` removes the lowest energies first (0 bits);
3. each routed expert, and the shared expert (a member of the layer ranking like any
   other), is quantized slab by slab (:mod:`.slabs`): gate/up along the hidden dim,
   down along the micro-expert axis, so no group straddles two slabs;
4. the layer is re-run with the *dequantized* slabs, so the next layer is scored and
   calibrated on what the quantized model really computes.

GPTQ Hessians (``method="gptq"``, the paper's choice and the default):

* gate/up of expert ``e``: ``sum_t g_t^2 x_t x_t^T`` over the tokens routed to ``e``.
  The expert's contribution to the block output is ``g_t * f_e(x_t)``, so an error in
  ``f_e`` reaches the output scaled by ``g_t``: weighting by ``g_t^2`` makes GPTQ's
  objective the block-output error (``router_weighted=False`` gives every routed token
  weight 1, as plain per-expert GPTQ does).  Shared experts use their own weight
  (1, or Qwen2-MoE's sigmoid shared gate).
* down of expert ``e``: the same, over the intermediate activations
  ``SiLU(gate x) * (up x)`` computed with the *already quantized* gate/up
  (``sequential=True``, GPTQ's sequential mode: down then compensates what gate/up
  lost, rather than fitting activations the model will never produce).  Each down slab
  uses the sub-block of that ``[I, I]`` Hessian for its micro-experts.
* with :class:`.slabs.SlabQuantOptions` ``rtn_guard`` (default on) every matrix keeps
  RTN instead of GPTQ when RTN has the lower calibration error.

The bit budget is met per layer (every layer's stored bits per weight <= ``avg_bits``),
because a layer must be quantized before the next one is calibrated; the model average
is therefore also <= ``avg_bits``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ...format import names
from ...format.names import QUANT_BITS
from ...format.schema import CameraQuantConfig, LayerSpec
from ...format.validate import validate
from ..calibrate import CalibSpec, LayerStreamer, MoELayerContext, load_calibration
from ..pipeline import _calib_settings, check_run_setup, resolve_device
from ..report import build_quant_report, keeps_from_allocations, render_quant_plots
from ..score import (
    EnergySpec,
    LayerEnergies,
    LayerWeights,
    Routing,
    expert_activation,
    group_by_expert,
    moe_forward,
    save_energies,
)
from ..source import SourceCheckpoint
from ..writer import CheckpointWriter
from .allocate import ExpertAllocation, LayerAllocation, allocate_layer, bits_per_weight, drop_unused_bits
from .gptq import HessianAccumulator
from .slabs import (
    SlabQuantOptions,
    build_down_slabs,
    build_expert_slabs,
    build_gate_up_slabs,
    dequantize_expert_slabs,
)

log = logging.getLogger(__name__)

QuantMethod = Literal["rtn", "gptq"]
QuantScope = Literal["layer", "expert"]
TensorSink = Callable[[str, Tensor], None]

DEFAULT_GROUP_SIZE = 128
DEFAULT_METHOD: QuantMethod = "gptq"
# Rows per Hessian / error product: bounds temporary memory on long calibration runs.
_CHUNK_ROWS = 16384


@dataclass(frozen=True)
class QuantSpec:
    """What CAMERA-Q does to every MoE layer (validated on construction).

    Give exactly one of ``avg_bits`` (budget; ``bits`` are then the candidate widths,
    default :data:`.allocate.DEFAULT_CANDIDATE_BITS`) or ``fractions`` (with ``bits``:
    the share of the kept micro-experts at each width, highest energy -> most bits).
    """

    avg_bits: float | None = None
    bits: tuple[int, ...] | None = None
    fractions: tuple[float, ...] | None = None
    group_size: int = DEFAULT_GROUP_SIZE
    method: QuantMethod = DEFAULT_METHOD
    scope: QuantScope = "layer"
    prune_ratio: float = 0.0
    allow_prune: bool = False
    router_weighted: bool = True
    sequential: bool = True
    options: SlabQuantOptions = field(default_factory=SlabQuantOptions)

    def __post_init__(self) -> None:
        if (self.avg_bits is None) == (self.fractions is None):
            raise ValueError("give exactly one of avg_bits or bits+fractions")
        if self.avg_bits is not None and not (self.avg_bits > 0 and math.isfinite(self.avg_bits)):
            raise ValueError(f"avg_bits must be a positive number, got {self.avg_bits}")
        if self.fractions is not None and (self.bits is None or len(self.bits) != len(self.fractions)):
            raise ValueError(
                f"fractions need bits of the same length, got bits {self.bits} and fractions {self.fractions}"
            )
        if self.bits is not None:
            bad = [b for b in self.bits if b not in QUANT_BITS]
            if bad or not self.bits or len(set(self.bits)) != len(self.bits):
                raise ValueError(
                    f"bits must be distinct values from {list(QUANT_BITS)}, got {list(self.bits)}"
                )
        if self.group_size <= 0 or self.group_size % 32:
            raise ValueError(
                f"group_size must be a positive multiple of 32 (the format's), got {self.group_size}"
            )
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"method must be 'rtn' or 'gptq', got {self.method!r}")
        if self.scope not in ("layer", "expert"):
            raise ValueError(f"scope must be 'layer' or 'expert', got {self.scope!r}")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}")

    def allocate(self, energies: LayerEnergies | Sequence[Tensor], hidden: int, shared: Tensor | None = None):
        """:func:`.allocate.allocate_layer` with these settings."""
        if isinstance(energies, LayerEnergies):
            energies, shared = energies.expert_scores, energies.shared_score
        return allocate_layer(
            energies,
            hidden,
            self.group_size,
            shared_energies=shared,
            bits=None if self.bits is None else list(self.bits),
            fractions=None if self.fractions is None else list(self.fractions),
            avg_bits=self.avg_bits,
            prune_ratio=self.prune_ratio,
            scope=self.scope,
            allow_prune=self.allow_prune,
        )

    def settings(self) -> dict[str, Any]:
        """JSON-able view (report and checkpoint provenance)."""
        d = asdict(self)
        d["bits"] = None if self.bits is None else list(self.bits)
        d["fractions"] = None if self.fractions is None else list(self.fractions)
        return d


@dataclass
class LayerQuantResult:
    """One quantized MoE layer: allocation, tensors written and the dequantized weights fed on."""

    layer: int
    allocation: LayerAllocation
    tensors: dict[str, Tensor]  # checkpoint name -> tensor (empty when streamed to a sink)
    weights: LayerWeights | None  # dequantized, slab-permuted: what the next layer was calibrated on
    expert_bytes: int  # bytes of every expert tensor stored for this layer
    output_rel_error: float  # ||Y_q - Y||^2 / ||Y||^2 of the MoE block on the calibration inputs
    seconds: float


# -- one expert ------------------------------------------------------------------------------------
def _hessian(x: Tensor, row_weights: Tensor | None, k: int, device: torch.device) -> Tensor:
    acc = HessianAccumulator(k, device=device)
    for i in range(0, x.shape[0], _CHUNK_ROWS):
        w = None if row_weights is None else row_weights[i : i + _CHUNK_ROWS]
        acc.add(x[i : i + _CHUNK_ROWS].to(device), w)
    return acc.hessian()


def _dequant_gate_up(
    g_t: dict[str, Tensor], u_t: dict[str, Tensor], ea: ExpertAllocation, hidden: int, group_size: int
) -> tuple[Tensor, Tensor]:
    """Dequantized gate/up ``[n, H]`` in slab order (down slabs not needed)."""
    from camera_kernels.packing import dequantize

    gs, us = [], []
    for b, n in zip(ea.bits, ea.slabs):
        if n == 0:
            continue
        sfx = [names.slab_suffix(k, b) for k in names.QUANT_SUFFIXES]
        gs.append(dequantize(*(g_t[s] for s in sfx), b, hidden, group_size).T)
        us.append(dequantize(*(u_t[s] for s in sfx), b, hidden, group_size).T)
    return torch.cat(gs), torch.cat(us)


def quantize_expert(
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    allocation: ExpertAllocation,
    x: Tensor,
    row_weights: Tensor | None,
    spec: QuantSpec,
) -> tuple[dict[int, dict[str, Tensor]], tuple[Tensor, Tensor, Tensor]]:
    """Slab tensors of one expert and its dequantized ``(gate [n, H], up [n, H], down [H, n])``.

    :param gate: ``[I, H]``, ``up`` ``[I, H]``, ``down`` ``[H, I]`` in the original order.
    :param x: ``[T_e, H]`` calibration inputs of this expert (any device; moved in chunks).
    :param row_weights: ``[T_e]`` per-token weights of its Hessians (``g_t^2``), or None.
    """
    hidden, group = gate.shape[1], spec.group_size
    if allocation.width == 0:
        tensors: dict[int, dict[str, Tensor]] = {0: {}, 1: {}, 2: {}}
    elif spec.method == "rtn":
        tensors = build_expert_slabs(gate, up, down, allocation, group, "rtn", options=spec.options)
    else:
        dev = gate.device
        h_in = _hessian(x, row_weights, hidden, dev)
        g_t, u_t = build_gate_up_slabs(gate, up, allocation, group, "gptq", h_in, spec.options)
        perm = allocation.perm.to(dev)
        if spec.sequential:
            gq, uq = _dequant_gate_up(g_t, u_t, allocation, hidden, group)
        else:
            gq, uq = gate[perm], up[perm]
        acc = HessianAccumulator(allocation.width, device=dev)
        for i in range(0, x.shape[0], _CHUNK_ROWS):
            w = None if row_weights is None else row_weights[i : i + _CHUNK_ROWS]
            acc.add(expert_activation(x[i : i + _CHUNK_ROWS].to(dev), gq, uq), w)
        # build_down_slabs indexes the [I, I] Hessian by original micro-expert; pruned ones stay 0.
        width = allocation.original_width
        h_down = torch.zeros(width, width, dtype=acc.sum.dtype, device=dev)
        h_down[perm.unsqueeze(1), perm.unsqueeze(0)] = acc.hessian()
        d_t = build_down_slabs(down, allocation, group, "gptq", h_down, spec.options)
        tensors = {0: g_t, 1: u_t, 2: d_t}
    deq = dequantize_expert_slabs(tensors, list(allocation.slabs), list(allocation.bits), hidden, group)
    return tensors, tuple(t.to(gate.device) for t in deq)  # type: ignore[return-value]


# -- one layer -------------------------------------------------------------------------------------
def _block_error(x: Tensor, routing: Routing, ref: LayerWeights, new: LayerWeights) -> float:
    """Relative squared error of the MoE block output, chunked over tokens."""
    dev = ref.gates[0].device if ref.gates else torch.device("cpu")
    num = den = 0.0
    for i in range(0, x.shape[0], _CHUNK_ROWS):
        sl = slice(i, i + _CHUNK_ROWS)
        r = Routing(
            routing.topk_ids[sl].to(dev),
            routing.topk_weights[sl].to(dev),
            None if routing.shared_weight is None else routing.shared_weight[sl].to(dev),
        )
        xc = x[sl].to(dev)
        y = moe_forward(xc, ref, r)
        yq = moe_forward(xc, new, r)
        num += float((yq - y).double().square().sum())
        den += float(y.double().square().sum())
    return num / den if den > 0 else 0.0


def quantize_layer(
    ctx: MoELayerContext, spec: QuantSpec, allocation: LayerAllocation | None = None
) -> LayerQuantResult:
    """Allocate bits to one MoE layer by energy and quantize all its experts.

    Needs the streamer's kept inputs (``keep_moe_inputs=True``).  ``allocation`` overrides
    the energy-based one (e.g. to compare methods on the same split).
    """
    t0 = time.perf_counter()
    if ctx.moe_input is None or ctx.routing is None:
        raise RuntimeError("CAMERA-Q needs the MoE inputs: run the streamer with keep_moe_inputs=True")
    arch, w = ctx.arch, ctx.weights
    hidden = arch.hidden_size
    alloc = allocation if allocation is not None else spec.allocate(ctx.energies, hidden)
    x_all, routing = ctx.moe_input, ctx.routing
    a, layer = arch.architecture, ctx.layer

    tensors: dict[str, Tensor] = {}
    nbytes = 0

    def store(tset: dict[int, dict[str, Tensor]], name_of: Callable[[int, str], str]) -> None:
        nonlocal nbytes
        for proj in (0, 1, 2):
            for suffix, t in tset[proj].items():
                tensors[name_of(proj, suffix)] = t
                nbytes += t.numel() * t.element_size()

    gates, ups, downs = [], [], []
    for e, (tok, slot) in enumerate(group_by_expert(routing.topk_ids, len(w.gates))):
        g = routing.topk_weights[tok, slot].float()
        row_w = g.square() if spec.router_weighted else None
        t, (gq, uq, dq) = quantize_expert(
            w.gates[e], w.ups[e], w.downs[e], alloc.experts[e], x_all[tok], row_w, spec
        )
        store(t, lambda p, s, e=e: names.expert_tensor(a, layer, e, p, s))
        gates.append(gq)
        ups.append(uq)
        downs.append(dq)
    shared = None
    if w.shared is not None:
        if alloc.shared is None or routing.shared_weight is None:
            raise RuntimeError(f"layer {layer}: shared expert without a shared allocation or routing weight")
        sw = routing.shared_weight.float()
        row_w = sw.square() if spec.router_weighted else None
        t, shared = quantize_expert(*w.shared, alloc.shared, x_all, row_w, spec)
        store(t, lambda p, s: names.shared_tensor(a, layer, p, s))
    new = LayerWeights(gates, ups, downs, shared)  # type: ignore[arg-type]
    err = _block_error(x_all, routing, w, new)
    return LayerQuantResult(layer, alloc, tensors, new, nbytes, err, time.perf_counter() - t0)


class CameraQQuantizer:
    """``on_moe_layer`` callback of CAMERA-Q (use with ``keep_moe_inputs=True``).

    Records every layer's :class:`LayerQuantResult` in :attr:`results` and returns the
    dequantized weights so the streamer re-runs the layer with them.  With ``sink`` each
    tensor is handed over as soon as its layer is done (e.g. ``CheckpointWriter.add``) and
    not kept; otherwise the results hold them.  The dequantized weights are kept only with
    ``keep_weights`` (an fp32 copy of every expert is large on a real model).
    """

    def __init__(self, spec: QuantSpec, sink: TensorSink | None = None, *, keep_weights: bool = False):
        self.spec = spec
        self.sink = sink
        self.keep_weights = keep_weights
        self.results: dict[int, LayerQuantResult] = {}

    def __call__(self, ctx: MoELayerContext) -> LayerWeights:
        res = quantize_layer(ctx, self.spec)
        fed = res.weights
        if self.sink is not None:
            for name in sorted(res.tensors):  # sorted: the same shard order on every run
                self.sink(name, res.tensors[name])
            res.tensors = {}
        if not self.keep_weights:
            res.weights = None
        log.debug(
            "layer %d: %.3f bits/weight, block rel. error %.3g, %.2fs",
            ctx.layer,
            res.allocation.info.get("bits_per_weight", float("nan")),
            res.output_rel_error,
            res.seconds,
        )
        self.results[ctx.layer] = res
        return fed  # type: ignore[return-value]

    @property
    def allocations(self) -> dict[int, LayerAllocation]:
        return {layer: r.allocation for layer, r in sorted(self.results.items())}


# -- checkpoint ------------------------------------------------------------------------------------
def final_allocations(
    results: dict[int, LayerQuantResult] | dict[int, LayerAllocation],
) -> dict[int, LayerAllocation]:
    """Allocations of every layer with bit-widths unused in the whole model removed."""
    layers = sorted(results)
    allocs = [r.allocation if isinstance(r, LayerQuantResult) else r for r in (results[k] for k in layers)]
    return dict(zip(layers, drop_unused_bits(allocs)))


def quant_config(
    source: SourceCheckpoint,
    allocations: dict[int, LayerAllocation],
    group_size: int,
    compression: dict[str, Any],
) -> CameraQuantConfig:
    """The ``quantization_config`` of a CAMERA-Q checkpoint (``allocations`` already trimmed)."""
    arch = source.arch
    bits = {a.bits for a in allocations.values()}
    if len(bits) != 1:
        raise ValueError(f"layers disagree on the bit-width list: {sorted(bits)}")
    return CameraQuantConfig(
        scheme="mixed",
        bits=list(bits.pop()),
        group_size=group_size,
        architecture=arch.architecture,
        num_experts=arch.num_experts,
        original_intermediate_size=arch.intermediate_size,
        original_shared_intermediate_size=arch.shared_intermediate_size,
        layers={
            layer: LayerSpec(expert_slabs=a.expert_slabs, shared_slabs=a.shared_slabs)
            for layer, a in sorted(allocations.items())
        },
        compression=compression,
    )


def _replaced_names(source: SourceCheckpoint) -> set[str]:
    out: set[str] = set()
    for layer in source.arch.moe_layers:
        out |= source.expert_tensor_names(layer) | source.shared_tensor_names(layer)
    return out


def copy_unquantized(writer: CheckpointWriter, source: SourceCheckpoint) -> None:
    """Add every source tensor that is not a routed/shared expert matrix of an MoE layer, unchanged."""
    replaced = _replaced_names(source)
    for name in sorted(source.weight_map):
        if name not in replaced:
            writer.add(name, source.get(name))


def write_quantized_checkpoint(
    source: SourceCheckpoint,
    out_dir: str | Path,
    results: dict[int, LayerQuantResult],
    group_size: int,
    *,
    compression: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write in-memory results (a :class:`CameraQQuantizer` without sink) as a checkpoint."""
    missing = set(source.arch.moe_layers) - set(results)
    if missing:
        raise ValueError(f"no quantized weights for MoE layers {sorted(missing)}")
    qcfg = quant_config(source, final_allocations(results), group_size, compression or {})
    with CheckpointWriter(out_dir, overwrite=overwrite) as writer:
        for layer in sorted(results):
            for name in sorted(results[layer].tensors):
                writer.add(name, results[layer].tensors[name])
        copy_unquantized(writer, source)
        return writer.commit(
            source_dir=source.path,
            config=source.config,
            quant_config=qcfg,
            report=report,
            extra_files=extra_files,
        )


#: Share of kept micro-experts at 1 bit above which the settings get a warning before calibration.
ONE_BIT_WARNING_SHARE = 0.75


def _dry_allocation(source: SourceCheckpoint, spec: QuantSpec) -> None:
    """Fail before calibrating when the settings cannot work (e.g. an unreachable avg_bits)."""
    arch = source.arch
    widths = [arch.intermediate_size] * arch.num_experts
    fake = [torch.arange(w, 0, -1, dtype=torch.float64) for w in widths]
    shared = None
    if arch.has_shared_expert:
        shared = torch.arange(arch.shared_intermediate_size, 0, -1, dtype=torch.float64)  # type: ignore[arg-type]
    allocation = spec.allocate(fake, arch.hidden_size, shared)
    # A budget that the scale/zero overhead of small groups nearly eats up leaves almost every
    # micro-expert at 1 bit: legal, but rarely what was meant.  Say so before hours of work.
    if 1 in allocation.bits:
        i = allocation.bits.index(1)
        slabs = allocation.expert_slabs + ([list(allocation.shared.slabs)] if allocation.shared else [])
        kept = sum(sum(s) for s in slabs)
        ones = sum(s[i] for s in slabs)
        if kept and ones / kept > ONE_BIT_WARNING_SHARE:
            log.warning(
                "camera-vllm quantize: these settings put %.0f %% of the kept micro-experts at 1 bit "
                "(group size %d costs %.2f bits per weight in fp16 scales and zeros); a larger "
                "--group-size or --avg-bits keeps more of them at 2+ bits",
                100 * ones / kept,
                spec.group_size,
                32 / spec.group_size,
            )


def run_camera_q(
    model_dir: str | Path,
    out_dir: str | Path,
    calib_files: Sequence[str | Path],
    *,
    avg_bits: float | None = None,
    bits: Sequence[int] | None = None,
    fractions: Sequence[float] | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    method: QuantMethod = DEFAULT_METHOD,
    scope: QuantScope = "layer",
    prune_ratio: float = 0.0,
    allow_prune: bool = False,
    router_weighted: bool = True,
    sequential: bool = True,
    options: SlabQuantOptions | None = None,
    calib: CalibSpec | None = None,
    energy: EnergySpec | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 4,
    overwrite: bool = False,
    scores_out: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """CAMERA-Q: mixed-precision micro-experts (optionally with pruning); write a servable checkpoint.

    :param avg_bits: budget mode: stored bits per original expert weight (packed codes,
        fp16 scales and zeros all counted; pruned micro-experts count 0), met in every
        layer.  ``bits`` then lists the candidate widths (default 4, 3, 2, 1).
    :param bits, fractions: explicit mode: e.g. ``bits=(4, 2, 1), fractions=(0.25, 0.5, 0.25)``
        of the kept micro-experts, highest energies at the most bits.
    :param group_size: quantization group along each matrix's input dim (multiple of 32).
    :param method: ``"gptq"`` (default; the paper's) or ``"rtn"``.
    :param scope: ``"layer"`` ranks routed and shared micro-experts of a layer together
        (default, as CAMERA-P); ``"expert"`` gives every expert the same split.
    :param prune_ratio: share of micro-experts (in the scope) removed first (0 bits).
    :param allow_prune: budget mode: let the optimiser also prune where that is cheapest.
    :param router_weighted: weight GPTQ Hessians by the squared router weight (module doc).
    :param sequential: down's Hessian from the activations of the quantized gate/up.
    :param options: GPTQ/RTN details (damping, clipping search, RTN guard ...).
    :param scores_out: optionally save the energies (never inside ``out_dir``).
    :returns: ``out_dir`` resolved; the checkpoint has ``camera_report.json`` and three PNGs
        and has passed :func:`~camera_vllm.format.validate.validate` (headers and shapes).
    """
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
        options=options or SlabQuantOptions(),
    )
    calib, energy = calib or CalibSpec(), energy or EnergySpec()
    out = Path(out_dir).resolve()
    check_run_setup(out, overwrite=overwrite, batch_size=batch_size)
    if scores_out is not None and out in Path(scores_out).resolve().parents:
        raise ValueError(f"scores_out {scores_out} must not be inside the checkpoint directory {out}")
    dev = resolve_device(device)
    source = SourceCheckpoint(model_dir)
    _dry_allocation(source, spec)

    t0 = time.perf_counter()
    ids = load_calibration(model_dir, calib_files, calib)
    t_calib = time.perf_counter()
    with CheckpointWriter(out, overwrite=overwrite) as writer:
        quantizer = CameraQQuantizer(spec, sink=writer.add)
        streamer = LayerStreamer(source, device=dev, batch_size=batch_size)
        energies = streamer.run(
            ids, energy=energy, on_moe_layer=quantizer, keep_moe_inputs=True, progress=progress
        )
        t_stream = time.perf_counter()
        copy_unquantized(writer, source)

        allocations = final_allocations(quantizer.results)
        calib_info = _calib_settings(calib_files, calib, ids)
        settings: dict[str, Any] = {
            **spec.settings(),
            **asdict(energy),
            "device": str(dev),
            "batch_size": batch_size,
            "calibration": calib_info,
        }
        expert_bytes = sum(r.expert_bytes for r in quantizer.results.values())
        achieved = bits_per_weight(list(allocations.values()), source.arch.hidden_size, group_size)
        compression = {
            **settings,
            "method": "camera-q",  # settings' "method" (gptq/rtn) moves to "quant_algorithm"
            "quant_algorithm": spec.method,
            "calibration": {**calib_info, "files": [Path(f).name for f in calib_files]},
            "avg_bits_achieved": achieved,
        }
        qcfg = quant_config(source, allocations, group_size, compression)
        if scores_out is not None:
            save_energies(scores_out, energies, {"model": str(source.path), **settings})
        keeps = keeps_from_allocations(allocations)
        plots = render_quant_plots(source.arch, energies, keeps, allocations, group_size)
        timings = {
            "calibration_load": t_calib - t0,
            "score_and_quantize": t_stream - t_calib,
            "plots": time.perf_counter() - t_stream,
        }
        report = build_quant_report(
            source,
            allocations,
            energies,
            settings,
            timings,
            group_size=group_size,
            expert_bytes=expert_bytes,
            output_rel_errors={k: r.output_rel_error for k, r in quantizer.results.items()},
            calibration_tokens=int(ids.numel()),
            plots=sorted(plots),
        )
        path = writer.commit(
            source_dir=source.path, config=source.config, quant_config=qcfg, report=report, extra_files=plots
        )
    log.info("CAMERA-Q wrote %s (%.3f bits/weight) in %.1fs", path, achieved, time.perf_counter() - t0)
    result = validate(path, check_values=False)
    if not result.ok:
        raise RuntimeError(f"the written checkpoint does not validate:\n{result}")
    return path
