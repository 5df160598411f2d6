"""CAMERA-Q end to end: calibrate -> stream layers (score, allocate bits, quantize, re-run) -> write.

For every MoE layer, on the outputs of the already-quantized earlier layers
(:class:`~camera_vllm.compress.calibrate.LayerStreamer` with ``keep_moe_inputs=True``):

1. CAMERA energies of every micro-expert (the streamer computes them);
2. :func:`~.allocate.allocate_layer` splits the micro-experts into bit groups by energy
   (explicit ``bits``/``fractions``, or an ``avg_bits`` budget that counts packed weights,
   scales and zeros); ``prune_ratio`` removes the lowest energies first (0 bits);
3. each routed expert, and the shared expert (a member of the layer ranking like any
   other), is quantized slab by slab (:mod:`.slabs`): gate/up along the hidden dim,
   down along the micro-expert axis, so no group straddles two slabs.  Routed experts go
   :data:`EXPERT_GROUP` at a time through the layer-batched slab builders (on a GPU their
   GPTQ sweeps share launches; on a CPU the bytes are those of one expert at a time);
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

from ...checkpoint.source import SourceCheckpoint
from ...format import names
from ...format.projection import PROJECTIONS, Projection
from ...format.quant_params import check_bits, check_group_size
from ...format.schema import CameraQuantConfig, LayerSpec
from ..calibrate import MoELayerCallback, MoELayerContext
from ..report import build_quant_report, keeps_from_allocations, render_quant_plots
from ..run import CalibratedRun, Calibration, Finished, RunOptions, compress_checkpoint
from ..score import (
    EnergySpec,
    LayerEnergies,
    LayerWeights,
    Routing,
    expert_activation,
    group_by_expert,
    moe_forward,
)
from ..writer import CheckpointWriter
from .allocate import ExpertAllocation, LayerAllocation, allocate_layer, bits_per_weight, drop_unused_bits
from .gptq import HessianAccumulator
from .slabs import (
    SlabQuantOptions,
    build_expert_slabs,
    build_layer_down_slabs,
    build_layer_gate_up_slabs,
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
#: Routed experts quantized together (their Hessians held at once: 128 fp64 [2048, 2048]
#: input Hessians alone would be 4 GiB; 8 are 256 MiB).
EXPERT_GROUP = 8


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
            try:
                check_bits(self.bits)
            except ValueError as err:
                raise ValueError(f"bits: {err}") from None
        check_group_size(self.group_size)
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
    # ||Y_q - Y||^2 / ||Y||^2 of the MoE block on the calibration inputs; None until measured
    # (by quantize_layer with block_error=True, or the streamer's re-run).
    output_rel_error: float | None
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


ExpertWeights = tuple[Tensor, Tensor, Tensor]
ExpertSlabs = dict[int, dict[str, Tensor]]


def _down_hessian(
    gate: Tensor,
    up: Tensor,
    allocation: ExpertAllocation,
    gate_up_slabs: tuple[dict[str, Tensor], dict[str, Tensor]],
    x: Tensor,
    row_weights: Tensor | None,
    spec: QuantSpec,
) -> Tensor:
    """``[I, I]`` Hessian of the down projection's inputs, indexed by original micro-expert."""
    hidden, group, dev = gate.shape[1], spec.group_size, gate.device
    perm = allocation.perm.to(dev)
    if spec.sequential:
        gq, uq = _dequant_gate_up(*gate_up_slabs, allocation, hidden, group)
    else:
        gq, uq = gate[perm], up[perm]
    acc = HessianAccumulator(allocation.width, device=dev)
    for i in range(0, x.shape[0], _CHUNK_ROWS):
        w = None if row_weights is None else row_weights[i : i + _CHUNK_ROWS]
        acc.add(expert_activation(x[i : i + _CHUNK_ROWS].to(dev), gq, uq), w)
    # build_layer_down_slabs indexes the [I, I] Hessian by original micro-expert; pruned ones stay 0.
    width = allocation.original_width
    h_down = torch.zeros(width, width, dtype=acc.sum.dtype, device=dev)
    h_down[perm.unsqueeze(1), perm.unsqueeze(0)] = acc.hessian()
    return h_down


def _gptq_experts(
    experts: Sequence[ExpertWeights],
    allocations: Sequence[ExpertAllocation],
    inputs: Sequence[tuple[Tensor, Tensor | None]],
    spec: QuantSpec,
) -> list[ExpertSlabs]:
    """GPTQ slabs of experts of non-zero width, through the layer-batched slab builders.

    Gate/up of all of them first (their input Hessians), then, sequentially, the down
    Hessians on the quantized gate/up, then all downs.  On a CPU the builders still sweep
    one matrix at a time (``SlabQuantOptions.batch_bytes``), so the bytes are those of one
    expert at a time.
    """
    hidden, group = experts[0][0].shape[1], spec.group_size
    gates, ups, downs = zip(*experts)
    h_in = [_hessian(x, w, hidden, gate.device) for (x, w), gate in zip(inputs, gates)]
    gate_up = build_layer_gate_up_slabs(gates, ups, allocations, group, "gptq", h_in, spec.options)
    del h_in
    h_down = [
        _down_hessian(gate, up, alloc, gu, x, w, spec)
        for gate, up, alloc, gu, (x, w) in zip(gates, ups, allocations, gate_up, inputs)
    ]
    down_slabs = build_layer_down_slabs(downs, allocations, group, "gptq", h_down, spec.options)
    return [
        {Projection.GATE: g_t, Projection.UP: u_t, Projection.DOWN: d_t}
        for (g_t, u_t), d_t in zip(gate_up, down_slabs)
    ]


def quantize_experts(
    experts: Sequence[ExpertWeights],
    allocations: Sequence[ExpertAllocation],
    inputs: Sequence[tuple[Tensor, Tensor | None]],
    spec: QuantSpec,
) -> list[tuple[ExpertSlabs, ExpertWeights]]:
    """:func:`quantize_expert` of several experts at once (GPTQ batched over them).

    Every expert's Hessians are held at the same time, so callers bound the group
    (:func:`quantize_layer` passes :data:`EXPERT_GROUP` routed experts).

    :param experts: ``(gate [I, H], up [I, H], down [H, I])`` per expert, original order.
    :param inputs: ``(x [T_e, H], row_weights [T_e] or None)`` per expert.
    """
    if not (len(experts) == len(allocations) == len(inputs)):
        raise ValueError(f"{len(experts)} experts, {len(allocations)} allocations and {len(inputs)} inputs")
    group = spec.group_size
    tensors: list[ExpertSlabs] = [{p: {} for p in PROJECTIONS} for _ in experts]
    live = [i for i, a in enumerate(allocations) if a.width > 0]
    if spec.method == "rtn":
        for i in live:
            tensors[i] = build_expert_slabs(*experts[i], allocations[i], group, "rtn", options=spec.options)
    elif live:
        done = _gptq_experts(
            [experts[i] for i in live], [allocations[i] for i in live], [inputs[i] for i in live], spec
        )
        for i, t in zip(live, done):
            tensors[i] = t
    out = []
    for (gate, _, _), alloc, t in zip(experts, allocations, tensors):
        deq = dequantize_expert_slabs(t, list(alloc.slabs), list(alloc.bits), gate.shape[1], group)
        out.append((t, tuple(m.to(gate.device) for m in deq)))
    return out  # type: ignore[return-value]


def quantize_expert(
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    allocation: ExpertAllocation,
    x: Tensor,
    row_weights: Tensor | None,
    spec: QuantSpec,
) -> tuple[ExpertSlabs, ExpertWeights]:
    """Slab tensors of one expert and its dequantized ``(gate [n, H], up [n, H], down [H, n])``.

    :param gate: ``[I, H]``, ``up`` ``[I, H]``, ``down`` ``[H, I]`` in the original order.
    :param x: ``[T_e, H]`` calibration inputs of this expert (any device; moved in chunks).
    :param row_weights: ``[T_e]`` per-token weights of its Hessians (``g_t^2``), or None.
    """
    return quantize_experts([(gate, up, down)], [allocation], [(x, row_weights)], spec)[0]


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
    ctx: MoELayerContext,
    spec: QuantSpec,
    allocation: LayerAllocation | None = None,
    *,
    block_error: bool = True,
    release_source: bool = False,
) -> LayerQuantResult:
    """Allocate bits to one MoE layer by energy and quantize all its experts.

    Needs the streamer's kept inputs (``keep_moe_inputs=True``).  ``allocation`` overrides
    the energy-based one (e.g. to compare methods on the same split).  ``block_error``
    measures the MoE block's output error here, with two extra MoE forwards; off, it is
    left None for the caller (:class:`CameraQQuantizer` takes it from the streamer's re-run,
    which computes the same number at no extra cost).  ``release_source`` drops each routed
    expert's weights from ``ctx.weights`` as soon as it is quantized, so a layer's original
    and dequantized experts (two fp32 copies, ~2.4 GB each on a Qwen3-30B-A3B layer) are never
    alive together; it needs ``block_error=False`` (the comparison needs the originals).
    """
    if release_source and block_error:
        raise ValueError("quantize_layer: release_source=True drops the weights block_error compares with")
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
        for proj in PROJECTIONS:
            for suffix, t in tset[proj].items():
                tensors[name_of(proj, suffix)] = t
                nbytes += t.numel() * t.element_size()

    gates, ups, downs = [], [], []
    routed = group_by_expert(routing.topk_ids, len(w.gates))
    for first in range(0, len(routed), EXPERT_GROUP):
        ids = range(first, min(first + EXPERT_GROUP, len(routed)))
        inputs = []
        for e in ids:
            tok, slot = routed[e]
            g = routing.topk_weights[tok, slot].float()
            inputs.append((x_all[tok], g.square() if spec.router_weighted else None))
        done = quantize_experts(
            [(w.gates[e], w.ups[e], w.downs[e]) for e in ids], [alloc.experts[e] for e in ids], inputs, spec
        )
        for e, (t, (gq, uq, dq)) in zip(ids, done):
            store(t, lambda p, s, e=e: names.expert_tensor(a, layer, e, p, s))
            gates.append(gq)
            ups.append(uq)
            downs.append(dq)
            if release_source:  # the streamer's block holds the same lists: free the originals now
                w.gates[e] = w.ups[e] = w.downs[e] = gq.new_empty(0)
        del inputs, done
    shared = None
    if w.shared is not None:
        if alloc.shared is None or routing.shared_weight is None:
            raise RuntimeError(f"layer {layer}: shared expert without a shared allocation or routing weight")
        sw = routing.shared_weight.float()
        row_w = sw.square() if spec.router_weighted else None
        t, shared = quantize_expert(*w.shared, alloc.shared, x_all, row_w, spec)
        store(t, lambda p, s: names.shared_tensor(a, layer, p, s))
    new = LayerWeights(gates, ups, downs, shared)  # type: ignore[arg-type]
    err = _block_error(x_all, routing, w, new) if block_error else None
    return LayerQuantResult(layer, alloc, tensors, new, nbytes, err, time.perf_counter() - t0)


class CameraQQuantizer:
    """``on_moe_layer`` callback of CAMERA-Q (use with ``keep_moe_inputs=True``).

    Records every layer's :class:`LayerQuantResult` in :attr:`results` and returns the
    dequantized weights so the streamer re-runs the layer with them.  With ``sink`` each
    tensor is handed over as soon as its layer is done (e.g. ``CheckpointWriter.add``) and
    not kept; otherwise the results hold them.  The dequantized weights are kept only with
    ``keep_weights`` (an fp32 copy of every expert is large on a real model).  Pass
    :meth:`record_output_error` as the streamer's ``on_rerun`` to have each result's
    ``output_rel_error`` filled from the re-run (no extra forwards).
    """

    def __init__(self, spec: QuantSpec, sink: TensorSink | None = None, *, keep_weights: bool = False):
        self.spec = spec
        self.sink = sink
        self.keep_weights = keep_weights
        self.results: dict[int, LayerQuantResult] = {}

    def __call__(self, ctx: MoELayerContext) -> LayerWeights:
        res = quantize_layer(ctx, self.spec, block_error=False, release_source=True)
        fed = res.weights
        if self.sink is not None:
            for name in sorted(res.tensors):  # sorted: the same shard order on every run
                self.sink(name, res.tensors[name])
            res.tensors = {}
        if not self.keep_weights:
            res.weights = None
        self.results[ctx.layer] = res
        return fed  # type: ignore[return-value]

    def record_output_error(self, layer: int, rel_error: float) -> None:
        """The streamer's ``on_rerun``: the layer's block output error, measured by the re-run."""
        res = self.results[layer]
        res.output_rel_error = rel_error
        log.debug(
            "layer %d: %.3f bits/weight, block rel. error %.3g, %.2fs",
            layer,
            res.allocation.info.get("bits_per_weight", float("nan")),
            rel_error,
            res.seconds,
        )

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


class QuantizeMethod:
    """CAMERA-Q as a :class:`~camera_vllm.compress.run.LayerMethod`: quantize each layer as it streams."""

    stream_phase = "score_and_quantize"
    keep_moe_inputs = True

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.quantizer: CameraQQuantizer | None = None

    def check(self, source: SourceCheckpoint) -> None:
        _dry_allocation(source, self.spec)

    def settings(self) -> dict[str, Any]:
        return self.spec.settings()

    def layer_callback(self, add: TensorSink) -> MoELayerCallback:
        self.quantizer = CameraQQuantizer(self.spec, sink=add)
        return self.quantizer

    def on_rerun(self, layer: int, rel_error: float) -> None:
        assert self.quantizer is not None
        self.quantizer.record_output_error(layer, rel_error)

    def layer_state(self, layer: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Allocation, stored bytes and block error of finished ``layer`` (its tensors are in the writer)."""
        assert self.quantizer is not None
        res = self.quantizer.results[layer]
        tensors: dict[str, Tensor] = {}

        def expert(key: str, ea: ExpertAllocation) -> dict[str, Any]:
            tensors[f"alloc.{key}.perm"] = ea.perm.clone()
            tensors[f"alloc.{key}.pruned"] = ea.pruned.clone()
            return {"bits": list(ea.bits), "slabs": list(ea.slabs), "original_width": ea.original_width}

        a = res.allocation
        meta = {
            "bits": list(a.bits),
            "experts": [expert(f"e{i}", ea) for i, ea in enumerate(a.experts)],
            "shared": None if a.shared is None else expert("shared", a.shared),
            "info": a.info,
            "expert_bytes": res.expert_bytes,
            "output_rel_error": res.output_rel_error,
            "seconds": res.seconds,
        }
        return tensors, meta

    def restore_layer(self, layer: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        assert self.quantizer is not None

        def expert(key: str, m: dict[str, Any]) -> ExpertAllocation:
            return ExpertAllocation(
                tuple(m["bits"]),
                tuple(m["slabs"]),
                tensors[f"alloc.{key}.perm"],
                tensors[f"alloc.{key}.pruned"],
                int(m["original_width"]),
            )

        alloc = LayerAllocation(
            tuple(meta["bits"]),
            tuple(expert(f"e{i}", m) for i, m in enumerate(meta["experts"])),
            None if meta["shared"] is None else expert("shared", meta["shared"]),
            meta["info"],
        )
        self.quantizer.results[layer] = LayerQuantResult(
            layer, alloc, {}, None, int(meta["expert_bytes"]), meta["output_rel_error"], meta["seconds"]
        )

    def finish(
        self,
        writer: CheckpointWriter,
        run: CalibratedRun,
        energies: dict[int, LayerEnergies],
        settings: dict[str, Any],
        compression_calibration: dict[str, Any],
        timings: dict[str, float],
    ) -> Finished:
        assert self.quantizer is not None
        source, spec, results = run.source, self.spec, self.quantizer.results
        t0 = time.perf_counter()
        copy_unquantized(writer, source)
        allocations = final_allocations(results)
        expert_bytes = sum(r.expert_bytes for r in results.values())
        achieved = bits_per_weight(list(allocations.values()), source.arch.hidden_size, spec.group_size)
        compression = {
            **settings,
            "method": "camera-q",  # settings' "method" (gptq/rtn) moves to "quant_algorithm"
            "quant_algorithm": spec.method,
            "calibration": compression_calibration,
            "avg_bits_achieved": achieved,
        }
        qcfg = quant_config(source, allocations, spec.group_size, compression)
        keeps = keeps_from_allocations(allocations)
        plots = render_quant_plots(source.arch, energies, keeps, allocations, spec.group_size)
        timings["plots"] = time.perf_counter() - t0
        report = build_quant_report(
            source,
            allocations,
            energies,
            settings,
            timings,
            group_size=spec.group_size,
            expert_bytes=expert_bytes,
            output_rel_errors={k: r.output_rel_error for k, r in results.items()},  # type: ignore[misc]
            calibration_tokens=int(run.ids.numel()),
            plots=sorted(plots),
        )
        return Finished(qcfg, report, plots, f"CAMERA-Q ({achieved:.3f} bits/weight)")


def run_camera_q(
    model_dir: str | Path,
    out_dir: str | Path,
    calibration: Calibration,
    spec: QuantSpec,
    *,
    energy: EnergySpec | None = None,
    options: RunOptions | None = None,
) -> Path:
    """CAMERA-Q: mixed-precision micro-experts (optionally with pruning); write a servable checkpoint.

    :param calibration: text or JSON-lines files, or :class:`~..calibrate.CalibrationData`.
    :param spec: what to do to every MoE layer: the bit budget (``avg_bits``) or the
        explicit split (``bits`` + ``fractions``), group size, GPTQ or RTN, scope, pruning
        (see :class:`QuantSpec`).
    :param energy: the CAMERA energy (alpha, normalisation).
    :param options: device, threads, calibration windows, output handling
        (``options.scores_out`` saves the energies too, never inside ``out_dir``).
    :returns: ``out_dir`` resolved; the checkpoint has ``camera_report.json`` and three PNGs
        and has passed :func:`~camera_vllm.format.validate.validate` (headers and shapes).
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    return compress_checkpoint(
        model_dir,
        out_dir,
        calibration,
        QuantizeMethod(spec),
        energy=energy or EnergySpec(),
        options=options or RunOptions(),
    )
