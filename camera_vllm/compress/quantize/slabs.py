"""Turn one expert's HF weights and its allocation into the checkpoint's slab tensors.

For an expert with ``gate, up [I, H]`` and ``down [H, I]`` and an
:class:`~.allocate.ExpertAllocation` (slabs of micro-experts, widest bit-width first),
slab ``s`` with micro-experts ``idx`` at ``b`` bits stores (names from
:func:`camera_vllm.format.names.slab_suffix`, shapes from
:func:`camera_vllm.format.layout.slab_tensors`):

* gate/up: ``W^T = gate[idx].T [H, n]``, quantized along H (K = hidden);
* down: ``W^T = down[:, idx].T [n, H]``, quantized along the slab's micro-experts
  (K = n), so a quantization group never straddles two slabs.

The result is keyed by :class:`~camera_vllm.format.projection.Projection` (gate, up, down),
each ``{suffix: tensor}``; empty slabs store nothing.  Tensors stay on the weights' device.

GPTQ needs two Hessians per expert (:class:`ExpertHessians`): the expert-input one
``[H, H]`` shared by every gate/up slab, and the intermediate-activation one ``[I, I]``
in the *original* micro-expert order, whose ``[idx][:, idx]`` sub-block is the Hessian of
down slab ``idx``.  For sequential GPTQ, quantize gate/up first
(:func:`build_gate_up_slabs`), recompute the activations with the quantized gate/up,
then call :func:`build_down_slabs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from camera_kernels.packing import PACK_BLOCK, dequantize, num_groups, pack
from camera_vllm.format.names import QWEIGHT, SCALES, ZEROS, slab_suffix
from camera_vllm.format.projection import PROJECTIONS, Projection

from .allocate import ExpertAllocation
from .gptq import (
    PreparedHessian,
    PreparedHessians,
    _fit_all_groups,
    gptq_quantize_batch,
    prepare_hessians,
    stack_prepared,
)
from .rtn import DEFAULT_CLIP_RATIOS, QuantizedMatrix, _codes, check_finite_scales, levels_of, quantize_rtn

__all__ = [
    "ExpertHessians",
    "SlabQuantOptions",
    "build_down_slabs",
    "build_expert_slabs",
    "build_gate_up_slabs",
    "build_layer_down_slabs",
    "build_layer_gate_up_slabs",
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
        calibration error ``tr(E^T H E)`` (a safety net for ill-conditioned Hessians).  The
        GPTQ side comes from the sweep's own statistics; only RTN's needs a product with H.
    :param batch_bytes: rough bound on the working memory of one GPTQ batch (Hessian
        factorisations and weight copies); the experts of a layer are quantized in batches
        that fit it.  None: 512 MiB on a GPU (fewer, larger launches), one matrix per batch
        on a CPU (measured: batching there only evicts the caches, 4 experts per batch were
        ~30 % slower than one at a time).
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    clip_search: bool = True
    rtn_guard: bool = True
    batch_bytes: int | None = None


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
    _store_all([(out, qm)])


def _store_all(entries: list[tuple[dict[str, Tensor], QuantizedMatrix]]) -> None:
    """Store many matrices, packing all those of one bit-width in a single :func:`pack` call.

    Codes are packed along K column by column, so packing the column-concatenation (each
    matrix zero-padded to the longest K) and cutting out each one's ``ceil(K / 32) * bits``
    rows and its columns is exactly packing each alone -- with one range check (a host
    sync) per bit-width instead of per slab.
    """
    by_bits: dict[int, list[int]] = {}
    for i, (out, qm) in enumerate(entries):
        qw, sc, zr = _suffixes(qm.bits)
        out[qw] = qm.q  # placeholder: keeps the suffix order of the layout
        out[sc] = qm.scales
        out[zr] = qm.zeros
        by_bits.setdefault(qm.bits, []).append(i)
    for bits, idx in by_bits.items():
        qs = [entries[i][1].q for i in idx]
        k_max = max(int(q.shape[0]) for q in qs)
        cols = [
            q if q.shape[0] == k_max else torch.cat([q, q.new_zeros(k_max - q.shape[0], q.shape[1])])
            for q in qs
        ]
        packed = pack(torch.cat(cols, dim=1), bits)
        qw = _suffixes(bits)[0]
        start = 0
        for i, q in zip(idx, qs):
            rows = -(-int(q.shape[0]) // PACK_BLOCK) * bits
            entries[i][0][qw] = packed[:rows, start : start + q.shape[1]]
            start += int(q.shape[1])


def _check(method: str, allocation: ExpertAllocation) -> None:
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    if len(allocation.bits) != len(allocation.slabs):
        raise ValueError(f"allocation has {len(allocation.slabs)} slab sizes for bits {allocation.bits}")


def _check_gate_up(gate: Tensor, up: Tensor, allocation: ExpertAllocation) -> None:
    if gate.shape != up.shape or gate.dim() != 2 or gate.shape[0] != allocation.original_width:
        raise ValueError(
            f"gate/up must both be [I={allocation.original_width}, H], "
            f"got {tuple(gate.shape)} and {tuple(up.shape)}"
        )


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
    return build_layer_gate_up_slabs([gate], [up], [allocation], group_size, method, [hessian], options)[0]


def build_layer_gate_up_slabs(
    gates: Sequence[Tensor],
    ups: Sequence[Tensor],
    allocations: Sequence[ExpertAllocation],
    group_size: int,
    method: Method = "rtn",
    hessians: Sequence[Tensor | PreparedHessian | None] | None = None,
    options: SlabQuantOptions = SlabQuantOptions(),
) -> list[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """:func:`build_gate_up_slabs` of several experts (e.g. a layer's), GPTQ batched over them.

    With GPTQ every expert's gate/up is one matrix ``[H, 2 * kept]`` (slab by slab: the
    slab's gate columns, then its up columns), each column on its slab's bit-width, and the
    experts are swept together in batches of ``options.batch_bytes``.  Columns are
    independent in GPTQ, so this is the per-slab result; the RTN guard still chooses per slab.
    """
    if not (len(gates) == len(ups) == len(allocations)):
        raise ValueError(f"{len(gates)} gates, {len(ups)} ups and {len(allocations)} allocations")
    hs = list(hessians) if hessians is not None else [None] * len(gates)
    if len(hs) != len(gates):
        raise ValueError(f"{len(hs)} Hessians for {len(gates)} experts")
    for gate, up, alloc in zip(gates, ups, allocations):
        _check(method, alloc)
        _check_gate_up(gate, up, alloc)
    out: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = [({}, {}) for _ in gates]
    if method == "rtn":
        for i, (gate, up, alloc) in enumerate(zip(gates, ups, allocations)):
            for bits, start, end in alloc.slab_ranges():
                n = end - start
                if n == 0:
                    continue
                idx = alloc.perm[start:end].to(gate.device)
                wt = torch.cat([gate[idx].T, up[idx].T], dim=1)
                qm = quantize_rtn(wt, bits, group_size, clip_search=options.clip_search)
                _store_all(_gate_up_entries(out[i], qm, n))
        return _contiguous_pairs(out)
    for h in hs:
        if h is None:
            raise ValueError("method 'gptq' needs the expert-input Hessian for gate/up")
    todo = [i for i, a in enumerate(allocations) if a.width > 0]
    todo.sort(key=lambda i: allocations[i].width)  # similar widths share a batch: less padding
    hidden = gates[0].shape[1] if gates else 0
    per = _element_bytes(hidden, 2 * max((allocations[i].width for i in todo), default=0))
    for chunk in _chunks(todo, per, options.batch_bytes, gates[0].device if gates else torch.device("cpu")):
        _gate_up_batch(chunk, gates, ups, allocations, hs, group_size, options, out)
    return _contiguous_pairs(out)


def _contiguous_pairs(out):
    return [tuple({k: v.contiguous() for k, v in d.items()} for d in pair) for pair in out]


def _gate_up_entries(
    pair: tuple[dict[str, Tensor], dict[str, Tensor]], qm: QuantizedMatrix, n: int
) -> list[tuple[dict[str, Tensor], QuantizedMatrix]]:
    b, g = qm.bits, qm.group_size
    return [
        (pair[0], QuantizedMatrix(qm.q[:, :n], qm.scales[:, :n], qm.zeros[:, :n], b, g)),
        (pair[1], QuantizedMatrix(qm.q[:, n:], qm.scales[:, n:], qm.zeros[:, n:], b, g)),
    ]


def _element_bytes(k: int, n: int) -> int:
    # fp64 Hessian and its factorisation temporaries, fp32 U, and ~8 weight-sized buffers.
    return 6 * k * k * 8 + k * k * 4 + 8 * k * n * 4


def _chunks(items: list[int], per: int, budget: int | None, device: torch.device) -> list[list[int]]:
    if budget is None:
        budget = 0 if device.type == "cpu" else 512 << 20
    size = max(1, budget // max(per, 1))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _gate_up_batch(
    chunk: list[int],
    gates: Sequence[Tensor],
    ups: Sequence[Tensor],
    allocations: Sequence[ExpertAllocation],
    hs: list,
    group_size: int,
    opts: SlabQuantOptions,
    out: list,
) -> None:
    dev = gates[chunk[0]].device
    hidden = gates[chunk[0]].shape[1]
    e = len(chunk)
    n_max = 2 * max(allocations[i].width for i in chunk)
    wt = torch.zeros(e, hidden, n_max, dtype=torch.float32, device=dev)
    bits = torch.ones(e, 1, n_max, dtype=torch.long, device=dev)  # padding columns: any width
    n_slabs = max(len(allocations[i].bits) for i in chunk)
    slab_of = torch.full((e, n_max), n_slabs, dtype=torch.long, device=dev)
    layout: list[list[tuple[int, int, int, int]]] = []  # per element: (slab, bits, offset, n)
    for j, i in enumerate(chunk):
        alloc, off, lay = allocations[i], 0, []
        for s_i, (b, start, end) in enumerate(alloc.slab_ranges()):
            n = end - start
            if n == 0:
                continue
            idx = alloc.perm[start:end].to(dev)
            wt[j, :, off : off + n] = gates[i][idx].T.to(torch.float32)
            wt[j, :, off + n : off + 2 * n] = ups[i][idx].T.to(torch.float32)
            bits[j, 0, off : off + 2 * n].fill_(b)  # fill_: no host tensor made
            slab_of[j, off : off + 2 * n].fill_(s_i)
            lay.append((s_i, b, off, n))
            off += 2 * n
        layout.append(lay)
    raws = [hs[i] for i in chunk]
    guard = opts.rtn_guard and all(not isinstance(h, PreparedHessian) for h in raws)
    if all(isinstance(h, PreparedHessian) for h in raws):
        prep = stack_prepared(raws)  # type: ignore[arg-type]
    elif any(isinstance(h, PreparedHessian) for h in raws):
        raise ValueError("give either raw or prepared Hessians for one batch, not both")
    else:
        h_raw = torch.stack([h.to(device=dev, dtype=torch.float64) for h in raws])  # type: ignore[union-attr]
        prep = prepare_hessians(h_raw, opts.damp, opts.act_order)
    res = _guarded_gptq(wt, prep, bits, group_size, opts, h_raw if guard else None, slab_of, n_slabs, None)
    q, sc, zr = res
    entries: list[tuple[dict[str, Tensor], QuantizedMatrix]] = []
    for j, i in enumerate(chunk):
        for _, b, off, n in layout[j]:
            qm = QuantizedMatrix(
                q[j, :, off : off + 2 * n],
                sc[j, :, off : off + 2 * n].to(torch.float16),
                zr[j, :, off : off + 2 * n].to(torch.float16),
                b,
                group_size,
            )
            entries += _gate_up_entries(out[i], qm, n)
    _store_all(entries)


def _guarded_gptq(
    wt: Tensor,
    prep: PreparedHessians,
    bits: Tensor,
    group_size: int,
    opts: SlabQuantOptions,
    h_raw: Tensor | None,
    slab_of: Tensor,
    n_slabs: int,
    valid: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ of a batch, each slab falling back to RTN where RTN's calibration error is lower.

    ``slab_of [E, N]``: the slab of every column (``n_slabs`` for padding).  The GPTQ error is
    the sweep's statistic; RTN's is ``sum(E * (H @ E))`` in one batched product.
    """
    clip = DEFAULT_CLIP_RATIOS if opts.clip_search else None
    levels = levels_of(bits).expand(wt.shape[0], 1, wt.shape[2])
    rtn_grid = None
    if h_raw is not None:
        rtn_grid = _fit_all_groups(wt, levels, group_size, valid, clip)
    static = prep.perm is not None or opts.static_groups
    g = gptq_quantize_batch(
        wt,
        prep,
        bits,
        group_size,
        opts.block_size,
        static_groups=opts.static_groups,
        clip_search=opts.clip_search,
        static_grid=rtn_grid if static else None,  # the static grid is the RTN grid
    )
    if h_raw is None:
        return g.q, g.scales, g.zeros
    rs, rz = rtn_grid  # type: ignore[misc]
    check_finite_scales(rs)
    grp = torch.arange(wt.shape[1], device=wt.device) // group_size
    rq = _codes(wt, rs[:, grp], rz[:, grp], levels)
    err = wt - (rq - rz[:, grp]) * rs[:, grp]
    if valid is not None:
        err = err * valid.unsqueeze(2)
    hf = h_raw.to(torch.float32)
    rtn_err = (err * torch.bmm(hf, err)).sum(dim=1, dtype=torch.float64)  # [E, N]
    gptq_err = g.calib_error
    # Per slab sums; padding columns go to the extra slot.
    e_n = (wt.shape[0], n_slabs + 1)
    r_sum = torch.zeros(e_n, dtype=torch.float64, device=wt.device).scatter_add_(1, slab_of, rtn_err)
    g_sum = torch.zeros(e_n, dtype=torch.float64, device=wt.device).scatter_add_(1, slab_of, gptq_err)
    use_rtn = (r_sum < g_sum).gather(1, slab_of).unsqueeze(1)  # [E, 1, N]
    q = torch.where(use_rtn, rq.to(torch.int32), g.q)
    return q, torch.where(use_rtn, rs, g.scales), torch.where(use_rtn, rz, g.zeros)


def build_down_slabs(
    down: Tensor,
    allocation: ExpertAllocation,
    group_size: int,
    method: Method = "rtn",
    hessian: Tensor | None = None,
    options: SlabQuantOptions = SlabQuantOptions(),
) -> dict[str, Tensor]:
    """Slab tensors of down (``[H, I]`` HF layout).  ``hessian``: ``[I, I]``, original order (GPTQ only)."""
    return build_layer_down_slabs([down], [allocation], group_size, method, [hessian], options)[0]


def build_layer_down_slabs(
    downs: Sequence[Tensor],
    allocations: Sequence[ExpertAllocation],
    group_size: int,
    method: Method = "rtn",
    hessians: Sequence[Tensor | None] | None = None,
    options: SlabQuantOptions = SlabQuantOptions(),
) -> list[dict[str, Tensor]]:
    """:func:`build_down_slabs` of several experts, GPTQ batched over all their slabs.

    Every (expert, slab) is one GPTQ problem with K = the slab's micro-experts; problems of
    different K share a batch padded to the widest (padding rows are decoupled identity
    rows of the Hessian and are dropped).
    """
    if len(downs) != len(allocations):
        raise ValueError(f"{len(downs)} downs and {len(allocations)} allocations")
    hs = list(hessians) if hessians is not None else [None] * len(downs)
    if len(hs) != len(downs):
        raise ValueError(f"{len(hs)} Hessians for {len(downs)} experts")
    items: list[tuple[int, int, int, Tensor]] = []  # (expert, slab, bits, idx)
    for i, (down, alloc) in enumerate(zip(downs, allocations)):
        _check(method, alloc)
        width = alloc.original_width
        if down.dim() != 2 or down.shape[1] != width:
            raise ValueError(f"down must be [H, I={width}], got {tuple(down.shape)}")
        if method == "gptq":
            if hs[i] is None:
                raise ValueError("method 'gptq' needs the intermediate-activation Hessian for down")
            if tuple(hs[i].shape) != (width, width):  # type: ignore[union-attr]
                raise ValueError(
                    f"down Hessian must be [{width}, {width}] (original order), got {tuple(hs[i].shape)}"  # type: ignore[union-attr]
                )
        for s_i, (bits, start, end) in enumerate(alloc.slab_ranges()):
            if end > start:
                items.append((i, s_i, bits, alloc.perm[start:end].to(down.device)))
    results: dict[tuple[int, int], QuantizedMatrix] = {}
    if method == "rtn":
        for i, s_i, bits, idx in items:
            results[(i, s_i)] = quantize_rtn(
                downs[i][:, idx].T, bits, group_size, clip_search=options.clip_search
            )
    else:
        order = sorted(range(len(items)), key=lambda t: int(items[t][3].numel()))
        hidden = downs[0].shape[0]
        per = _element_bytes(max((int(it[3].numel()) for it in items), default=0), hidden)
        for chunk in _chunks(order, per, options.batch_bytes, downs[0].device):
            _down_batch([items[t] for t in chunk], downs, hs, group_size, options, results)
    out: list[dict[str, Tensor]] = [{} for _ in downs]
    _store_all([(out[i], results[(i, s_i)]) for i, s_i, _, _ in items])  # slab order per expert
    return [{k: v.contiguous() for k, v in d.items()} for d in out]


def _down_batch(
    items: list[tuple[int, int, int, Tensor]],
    downs: Sequence[Tensor],
    hs: list,
    group_size: int,
    opts: SlabQuantOptions,
    results: dict[tuple[int, int], QuantizedMatrix],
) -> None:
    dev = downs[items[0][0]].device
    hidden = downs[items[0][0]].shape[0]
    p = len(items)
    sizes = [int(it[3].numel()) for it in items]
    k_max = max(sizes)
    wt = torch.zeros(p, k_max, hidden, dtype=torch.float32, device=dev)
    hp = torch.zeros(p, k_max, k_max, dtype=torch.float64, device=dev)
    bits = torch.tensor([it[2] for it in items], dtype=torch.long, device=dev).view(p, 1, 1)
    for j, (i, _, _, idx) in enumerate(items):
        n = sizes[j]
        wt[j, :n] = downs[i][:, idx].T.to(torch.float32)
        # The slab's Hessian is the sub-block of its own channels (their mutual correlations);
        # channels of other slabs are quantized separately, so their coupling is not used.
        hp[j, :n, :n] = hs[i].to(device=dev, dtype=torch.float64)[idx][:, idx]
    rows = torch.tensor(sizes, dtype=torch.long, device=dev)
    prep = prepare_hessians(hp, opts.damp, opts.act_order, rows=rows if min(sizes) < k_max else None)
    valid = prep.row_valid()
    slab_of = torch.zeros(p, hidden, dtype=torch.long, device=dev)  # one slab per element
    q, sc, zr = _guarded_gptq(
        wt,
        prep,
        bits.expand(p, 1, hidden),
        group_size,
        opts,
        hp if opts.rtn_guard else None,
        slab_of,
        1,
        valid,
    )
    for j, (i, s_i, b, _) in enumerate(items):
        n = sizes[j]
        ng = num_groups(n, group_size)
        results[(i, s_i)] = QuantizedMatrix(
            q[j, :n], sc[j, :ng].to(torch.float16), zr[j, :ng].to(torch.float16), b, group_size
        )


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
    """All slab tensors of one expert, ``{Projection: {suffix: tensor}}``.

    Shapes and dtypes are exactly :func:`camera_vllm.format.layout.expert_tensors`.
    """
    h = hessians or ExpertHessians()
    g, u = build_gate_up_slabs(gate, up, allocation, group_size, method, h.gate_up, options)
    d = build_down_slabs(down, allocation, group_size, method, h.down, options)
    return {Projection.GATE: g, Projection.UP: u, Projection.DOWN: d}


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
        for proj in PROJECTIONS:
            t = tensors[proj]
            k = hidden if proj.reads_hidden else n
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
