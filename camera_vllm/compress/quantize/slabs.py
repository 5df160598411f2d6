"""Turn one expert's HF weights and its allocation into the checkpoint's slab tensors.

For an expert with ``gate, up [I, H]`` and ``down [H, I]`` and an
:class:`~.allocate.ExpertAllocation` (slabs of micro-experts, widest bit-width first),
slab ``s`` with micro-experts ``idx`` at ``b`` bits stores (names from
:func:`camera_vllm.format.names.slab_suffix`, shapes from
:func:`camera_vllm.format.layout.slab_tensors`):

* gate/up: ``W^T = gate[idx].T [H, n]``, quantized along H (K = hidden);
* down: ``W^T = down[:, idx].T [n, H]``, quantized along the slab's micro-experts
  (K = n), so a quantization group never straddles two slabs.

The result is keyed ``{0: gate, 1: up, 2: down}``, each ``{suffix: tensor}``; empty slabs
store nothing.  Tensors stay on the weights' device.

GPTQ needs two Hessians per expert (:class:`ExpertHessians`): the expert-input one
``[H, H]`` shared by every gate/up slab, and the intermediate-activation one ``[I, I]``
in the *original* micro-expert order, whose ``[idx][:, idx]`` sub-block is the Hessian of
down slab ``idx``.  For sequential GPTQ, quantize gate/up first
(:func:`build_gate_up_slabs`), recompute the activations with the quantized gate/up,
then call :func:`build_down_slabs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from camera_kernels.packing import dequantize
from camera_vllm.format.names import QWEIGHT, SCALES, ZEROS, slab_suffix

from .allocate import ExpertAllocation
from .gptq import PreparedHessian, gptq_quantize, prepare_hessian
from .rtn import QuantizedMatrix, quantize_rtn

__all__ = [
    "ExpertHessians",
    "SlabQuantOptions",
    "build_down_slabs",
    "build_expert_slabs",
    "build_gate_up_slabs",
    "dequantize_expert_slabs",
    "permute_expert",
]

Method = Literal["rtn", "gptq"]


@dataclass(frozen=True)
class SlabQuantOptions:
    """How slabs are quantized (everything but the method and the group size).

    :param clip_search: per-group clipping search (on by default here, unlike the bare
        :func:`.rtn.quantize_rtn`): plain min-max 1-bit RTN loses ~3.5x the weight energy
        on Gaussian weights, clipped ~0.38x, and dynamic-group GPTQ without it can diverge
        at 1-2 bits.  It also lowers 3-4-bit error by ~10-25%.
    :param rtn_guard: with GPTQ, also quantize by RTN and keep whichever has the lower
        calibration error ``tr(E^T H E)`` (a safety net for ill-conditioned Hessians).
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    clip_search: bool = True
    rtn_guard: bool = True


@dataclass(frozen=True)
class ExpertHessians:
    """Calibration Hessians (``2 X^T X``, router-weighted for routed experts) of one expert.

    :param gate_up: ``[H, H]`` of the expert's input (or a :class:`.gptq.PreparedHessian`).
    :param down: ``[I, I]`` of the intermediate activations ``SiLU(gate x) * (up x)``, indexed
        by original micro-expert.
    """

    gate_up: Tensor | PreparedHessian | None = None
    down: Tensor | None = None


def _suffixes(bits: int) -> tuple[str, str, str]:
    return slab_suffix(QWEIGHT, bits), slab_suffix(SCALES, bits), slab_suffix(ZEROS, bits)


def _store(out: dict[str, Tensor], qm: QuantizedMatrix) -> None:
    qw, sc, zr = _suffixes(qm.bits)
    out[qw] = qm.packed()
    out[sc] = qm.scales
    out[zr] = qm.zeros


def _calib_error(wt: Tensor, deq: Tensor, hessian: Tensor) -> float:
    """``tr(E^T H E)``: the calibration output error of the weight error ``E``."""
    e = wt.to(torch.float32) - deq
    return float((e * (hessian.to(device=e.device, dtype=torch.float32) @ e)).sum(dtype=torch.float64))


def _quantize(
    wt: Tensor,
    bits: int,
    group_size: int,
    method: Method,
    hessian: Tensor | None,
    prepared: PreparedHessian | None,
    opts: SlabQuantOptions,
) -> QuantizedMatrix:
    """One K-major matrix by RTN or GPTQ (GPTQ falls back to RTN when that is better)."""
    rtn = None
    if method == "rtn" or (opts.rtn_guard and hessian is not None):
        rtn = quantize_rtn(wt, bits, group_size, clip_search=opts.clip_search)
    if method == "rtn":
        return rtn
    prep = prepared if prepared is not None else prepare_hessian(hessian, opts.damp, opts.act_order)
    gq = gptq_quantize(
        wt,
        prep,
        bits,
        group_size,
        block_size=opts.block_size,
        static_groups=opts.static_groups,
        clip_search=opts.clip_search,
    )
    if rtn is not None and hessian is not None:
        if _calib_error(wt, rtn.dequantize(), hessian) < _calib_error(wt, gq.dequantize(), hessian):
            return rtn
    return gq


def _check(method: str, allocation: ExpertAllocation) -> None:
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    if len(allocation.bits) != len(allocation.slabs):
        raise ValueError(f"allocation has {len(allocation.slabs)} slab sizes for bits {allocation.bits}")


def build_gate_up_slabs(
    gate: Tensor,
    up: Tensor,
    allocation: ExpertAllocation,
    group_size: int,
    method: Method = "rtn",
    hessian: Tensor | PreparedHessian | None = None,
    options: SlabQuantOptions = SlabQuantOptions(),
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Slab tensors of gate and up (``[I, H]`` HF layout).  ``hessian``: ``[H, H]`` (GPTQ only)."""
    _check(method, allocation)
    if gate.shape != up.shape or gate.dim() != 2 or gate.shape[0] != allocation.original_width:
        raise ValueError(
            f"gate/up must both be [I={allocation.original_width}, H], "
            f"got {tuple(gate.shape)} and {tuple(up.shape)}"
        )
    raw, prepared = None, None
    if method == "gptq":
        if hessian is None:
            raise ValueError("method 'gptq' needs the expert-input Hessian for gate/up")
        if isinstance(hessian, PreparedHessian):
            prepared = hessian
        else:
            raw = hessian
            # One factorisation serves every gate/up slab of the expert.
            prepared = prepare_hessian(hessian.to(gate.device), options.damp, options.act_order)
    g_out: dict[str, Tensor] = {}
    u_out: dict[str, Tensor] = {}
    for bits, start, end in allocation.slab_ranges():
        n = end - start
        if n == 0:
            continue
        idx = allocation.perm[start:end].to(gate.device)
        # gate and up share K and the Hessian: quantize them as one [H, 2n] matrix (columns
        # are independent in RTN and GPTQ alike), halving the GPTQ sweeps.
        wt = torch.cat([gate[idx].T, up[idx].T], dim=1)
        qm = _quantize(wt, bits, group_size, method, raw, prepared, options)
        _store(g_out, QuantizedMatrix(qm.q[:, :n], qm.scales[:, :n], qm.zeros[:, :n], bits, group_size))
        _store(u_out, QuantizedMatrix(qm.q[:, n:], qm.scales[:, n:], qm.zeros[:, n:], bits, group_size))
    for d in (g_out, u_out):
        for k in d:
            d[k] = d[k].contiguous()
    return g_out, u_out


def build_down_slabs(
    down: Tensor,
    allocation: ExpertAllocation,
    group_size: int,
    method: Method = "rtn",
    hessian: Tensor | None = None,
    options: SlabQuantOptions = SlabQuantOptions(),
) -> dict[str, Tensor]:
    """Slab tensors of down (``[H, I]`` HF layout).  ``hessian``: ``[I, I]``, original order (GPTQ only)."""
    _check(method, allocation)
    width = allocation.original_width
    if down.dim() != 2 or down.shape[1] != width:
        raise ValueError(f"down must be [H, I={width}], got {tuple(down.shape)}")
    if method == "gptq":
        if hessian is None:
            raise ValueError("method 'gptq' needs the intermediate-activation Hessian for down")
        if tuple(hessian.shape) != (width, width):
            raise ValueError(
                f"down Hessian must be [{width}, {width}] (original order), got {tuple(hessian.shape)}"
            )
        hessian = hessian.to(down.device)
    out: dict[str, Tensor] = {}
    for bits, start, end in allocation.slab_ranges():
        if end == start:
            continue
        idx = allocation.perm[start:end].to(down.device)
        wt = down[:, idx].T  # [n, H]: K is the slab's micro-experts
        # The slab's Hessian is the sub-block of its own channels (their mutual correlations);
        # channels of other slabs are quantized separately, so their coupling is not used.
        sub = hessian[idx][:, idx] if method == "gptq" else None
        _store(out, _quantize(wt, bits, group_size, method, sub, None, options))
    return {k: v.contiguous() for k, v in out.items()}


def build_expert_slabs(
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    allocation: ExpertAllocation,
    group_size: int,
    method: Method = "rtn",
    hessians: ExpertHessians | None = None,
    options: SlabQuantOptions = SlabQuantOptions(),
) -> dict[int, dict[str, Tensor]]:
    """All slab tensors of one expert, ``{0: gate, 1: up, 2: down}`` of ``{suffix: tensor}``.

    Shapes and dtypes are exactly :func:`camera_vllm.format.layout.expert_tensors`.
    """
    h = hessians or ExpertHessians()
    g, u = build_gate_up_slabs(gate, up, allocation, group_size, method, h.gate_up, options)
    d = build_down_slabs(down, allocation, group_size, method, h.down, options)
    return {0: g, 1: u, 2: d}


def dequantize_expert_slabs(
    tensors: dict[int, dict[str, Tensor]],
    slabs: list[int] | tuple[int, ...],
    bits: list[int] | tuple[int, ...],
    hidden: int,
    group_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 ``gate [n, H]``, ``up [n, H]``, ``down [H, n]`` of a stored expert, in slab (permuted) order."""
    if len(slabs) != len(bits):
        raise ValueError(f"{len(slabs)} slab sizes for bits {list(bits)}")
    mats: list[list[Tensor]] = [[], [], []]
    device = None
    for n, b in zip(slabs, bits):
        if n == 0:
            continue
        qw, sc, zr = _suffixes(b)
        for proj in (0, 1, 2):
            t = tensors[proj]
            k = hidden if proj < 2 else n
            wt = dequantize(t[qw], t[sc], t[zr], b, k, group_size)
            device = wt.device
            mats[proj].append(wt.T)  # gate/up: [n, H]; down: [H, n]
    if not mats[0]:
        z = torch.zeros(0, hidden, dtype=torch.float32, device=device)
        return z, z.clone(), z.T.clone()
    return torch.cat(mats[0]), torch.cat(mats[1]), torch.cat(mats[2], dim=1)


def permute_expert(gate: Tensor, up: Tensor, down: Tensor, perm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Keep micro-experts ``perm`` in that order: ``gate[perm], up[perm], down[:, perm]`` (exact)."""
    perm = perm.to(gate.device)
    return gate[perm], up[perm], down[:, perm]
