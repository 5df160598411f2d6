"""Ragged (per-expert width) MoE layout and its pure-torch forward: the CPU serving path of CAMERA-P.

No vLLM import here, so the compute can be unit-tested on its own.

Layout of one layer with local experts ``0..E-1`` of widths ``n_e`` (kept micro-experts;
0 allowed) and hidden size ``H``, with ``off_e = n_0 + ... + n_{e-1}`` and ``R = sum n_e``:

==========  =============  ===============================================================
tensor      shape          expert ``e``'s part
==========  =============  ===============================================================
``w13``     ``[2R, H]``    rows ``[2 off_e, 2 off_e + n_e)`` = gate, next ``n_e`` rows = up
``w2t``     ``[R, H]``     rows ``[off_e, off_e + n_e)`` = ``W_down[:, :]^T`` (down, K-major)
``offsets`` ``[E + 1]``    int64 prefix sums ``off_e`` (``offsets[E] == R``)
==========  =============  ===============================================================

Every expert's block is contiguous in both tensors, so its two GEMMs run on plain views
without copies; nothing is padded (a width-0 expert costs no memory).  The row order
``[gate_e; up_e]`` per expert and the K-major down matrix mirror the CAMERA-Q slab
layout in :mod:`camera_kernels.slab_weights`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RaggedLayout:
    """Widths and row offsets of the local experts of one layer; holds no tensors."""

    widths: tuple[int, ...]

    def __post_init__(self) -> None:
        if any(w < 0 for w in self.widths):
            raise ValueError(f"expert widths must be non-negative, got {self.widths}")

    @classmethod
    def for_local_experts(cls, global_widths: Sequence[int], local_to_global: Sequence[int]) -> RaggedLayout:
        """Layout of the experts held by this rank, in local-id order."""
        return cls(tuple(int(global_widths[g]) for g in local_to_global))

    @property
    def num_experts(self) -> int:
        return len(self.widths)

    @property
    def total(self) -> int:
        """``R``: kept micro-experts over all local experts."""
        return sum(self.widths)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [0], 0
        for w in self.widths:
            acc += w
            out.append(acc)
        return tuple(out)

    def offsets_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.tensor(self.offsets, dtype=torch.int64, device=device)

    def gate_rows(self, e: int) -> slice:
        """Rows of ``w13`` holding expert ``e``'s gate projection."""
        off = self.offsets[e]
        return slice(2 * off, 2 * off + self.widths[e])

    def up_rows(self, e: int) -> slice:
        off = self.offsets[e]
        return slice(2 * off + self.widths[e], 2 * off + 2 * self.widths[e])

    def down_rows(self, e: int) -> slice:
        """Rows of ``w2t`` holding expert ``e``'s (transposed) down projection."""
        off = self.offsets[e]
        return slice(off, off + self.widths[e])


def _expert_slots(
    topk_ids: torch.Tensor, expert_map: torch.Tensor | None, num_local: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(local expert, its flat (token, k) slots)`` for every local expert that got tokens.

    One stable sort groups the slots by expert; slots routed to other ranks' experts
    (``expert_map`` gives -1) sort first and are skipped.
    """
    ids = topk_ids.reshape(-1).to(torch.int64)
    if expert_map is not None:
        ids = expert_map.to(torch.int64)[ids]
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids[ids >= 0], minlength=num_local).tolist()
    pos = ids.numel() - sum(counts)
    for e, count in enumerate(counts):
        if count:
            yield e, order[pos : pos + count]
            pos += count


def ragged_moe_forward(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2t: torch.Tensor,
    offsets: torch.Tensor,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t] = sum_k topk_weights[t, k] * Expert_{topk_ids[t, k]}(x[t])`` with SwiGLU experts.

    :param x: ``[T, H]`` activations.
    :param topk_weights: ``[T, K]`` router weights (already renormalised/scaled by the router).
    :param topk_ids: ``[T, K]`` global expert ids.
    :param w13: ``[2R, H]``, ``w2t``: ``[R, H]``, ``offsets``: ``[E + 1]`` (see module docstring).
    :param expert_map: optional ``[E_global]`` global -> local id map, ``-1`` for experts
        held by another rank (their contribution is left to that rank).
    :returns: ``[T, H]`` in ``x.dtype``; accumulated in fp32.

    Tokens are grouped by expert with one sort, then each hit expert runs two GEMMs on a
    contiguous gather of its tokens: a Python loop over experts, never over tokens.
    """
    num_tokens, hidden = x.shape
    out = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return out.to(x.dtype)
    top_k = topk_ids.shape[1]
    # Host copies: this runs eagerly inside a custom op (CPU), where a sync is cheap.
    off = offsets.tolist()
    flat_weights = topk_weights.reshape(-1)
    for e, slots in _expert_slots(topk_ids, expert_map, offsets.numel() - 1):
        lo, hi = off[e], off[e + 1]
        width = hi - lo
        if width == 0:  # every micro-expert of this expert was pruned: it contributes 0
            continue
        tokens = slots // top_k
        gate_up = F.linear(x[tokens], w13[2 * lo : 2 * hi])  # [count, 2 * width]
        act = F.silu(gate_up[:, :width]) * gate_up[:, width:]
        y = torch.matmul(act, w2t[lo:hi])  # [count, H]
        out.index_add_(0, tokens, y.to(torch.float32) * flat_weights[slots].to(torch.float32).unsqueeze(1))
    return out.to(x.dtype)


# -- CPU fast path: vLLM's compiled CPU MoE kernel on the aligned part of every expert ---------------

#: ``cpu_fused_moe`` takes expert widths that are multiples of this (its output tile).
CPU_KERNEL_ALIGN = 32

_PACK_ATTR = "_camera_cpu_pack"


@dataclass(frozen=True)
class CpuPack:
    """How one layer's ragged weights were repacked in place for vLLM's CPU MoE kernel.

    Expert ``e`` of width ``n_e`` is split into a head of ``a_e = n_e - n_e % 32``
    micro-experts, run by ``torch.ops._C.cpu_fused_moe`` from its prepacked (VNNI) form,
    and a tail of ``r_e = n_e % 32`` micro-experts, run by plain torch matmuls (SwiGLU
    is per channel, so the split is exact).  Within the expert's own rows, nothing
    moves to another expert and no byte is added:

    * ``w13`` rows ``[2 off_e, 2 off_e + 2 n_e)``: the prepacked ``[2 a_e, H]`` head
      (gate rows then up rows), then the tail's ``r_e`` gate rows and ``r_e`` up rows;
    * ``w2t`` rows ``[off_e, off_e + n_e)``: the prepacked ``W_down[:, :a_e]`` (``[H, a_e]``,
      stored in the first ``a_e`` rows), then the tail's ``r_e`` rows as before.
    """

    isa: str
    widths: tuple[int, ...]
    offsets: tuple[int, ...]

    def head(self, e: int) -> int:
        return self.widths[e] - self.widths[e] % CPU_KERNEL_ALIGN


def cpu_kernel_isa(dtype: torch.dtype) -> str | None:
    """The ``cpu_fused_moe`` ISA for ``dtype`` here, or None when the kernel cannot serve it.

    The kernel is vLLM's (``torch.ops._C``), present once vLLM's CPU extension is loaded;
    bf16 only: fp32 layers keep the pure-torch path (the exactness oracle's dtype).
    """
    if dtype != torch.bfloat16:
        return None
    try:
        torch.ops._C.cpu_fused_moe  # noqa: B018 - raises when vLLM's CPU extension is not loaded
        torch.ops._C.prepack_moe_weight  # noqa: B018
    except (AttributeError, RuntimeError):
        return None
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return "amx" if amx is not None and amx() else "vec"


def cpu_pack_of(w13: torch.Tensor) -> CpuPack | None:
    """The :class:`CpuPack` of a layer whose ``w13`` was packed by :func:`pack_for_cpu_`, else None."""
    return getattr(w13, _PACK_ATTR, None)


def _prepack(weight: torch.Tensor, isa: str) -> torch.Tensor:
    out = torch.empty_like(weight)
    torch.ops._C.prepack_moe_weight(weight, out, isa)
    return out


@torch.no_grad()
def pack_for_cpu_(w13: torch.Tensor, w2t: torch.Tensor, offsets: torch.Tensor, isa: str) -> CpuPack:
    """Repack a layer's ragged ``w13``/``w2t`` in place into the :class:`CpuPack` layout.

    Works one expert at a time (transient memory: one expert); the tensors keep their
    shapes, storage and byte count.  Afterwards only :func:`ragged_moe_forward_cpu`
    may read them; the pack is recorded on ``w13`` (see :func:`cpu_pack_of`), so a
    second call is refused instead of packing twice.
    """
    if cpu_pack_of(w13) is not None:
        raise ValueError("pack_for_cpu_: these weights are already packed")
    if w13.dim() != 2 or w2t.dim() != 2 or w13.shape[0] != 2 * w2t.shape[0] or w13.shape[1] != w2t.shape[1]:
        raise ValueError(f"pack_for_cpu_: w13 {tuple(w13.shape)} and w2t {tuple(w2t.shape)} are not a ragged layer")
    if not (w13.is_contiguous() and w2t.is_contiguous()):
        raise ValueError("pack_for_cpu_: w13 and w2t must be contiguous")
    off = tuple(int(v) for v in offsets.tolist())
    widths = tuple(off[e + 1] - off[e] for e in range(len(off) - 1))
    pack = CpuPack(isa, widths, off)
    hidden = w13.shape[1]
    for e, n in enumerate(widths):
        a = pack.head(e)
        if a == 0:
            continue  # all tail (or empty): plain layout, untouched
        lo = off[e]
        block13 = w13[2 * lo : 2 * lo + 2 * n]  # [gate n; up n]
        gate, up = block13[:n], block13[n:]
        head13 = _prepack(torch.cat([gate[:a], up[:a]]).unsqueeze(0), isa)  # [1, 2a, H]
        tail13 = torch.cat([gate[a:], up[a:]])  # [2r, H]
        block13[: 2 * a].copy_(head13.view(2 * a, hidden))
        block13[2 * a :].copy_(tail13)
        block2 = w2t[lo : lo + n]
        head2 = _prepack(block2[:a].t().contiguous().unsqueeze(0), isa)  # W_down[:, :a]: [1, H, a]
        block2[:a].copy_(head2.view(a, hidden))  # same a*H elements, read back as [1, H, a]
    setattr(w13, _PACK_ATTR, pack)
    return pack


def ragged_moe_forward_cpu(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2t: torch.Tensor,
    pack: CpuPack,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`ragged_moe_forward` on weights packed by :func:`pack_for_cpu_` (same arguments).

    Per hit expert: one ``cpu_fused_moe`` call on the prepacked head (router weight
    applied inside the kernel), plus two small matmuls for a tail of fewer than 32
    micro-experts; partial outputs are accumulated in fp32.
    """
    num_tokens, hidden = x.shape
    out = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return out.to(x.dtype)
    top_k = topk_ids.shape[1]
    flat_weights = topk_weights.reshape(-1).to(torch.float32)
    xc = x.contiguous()
    zero_ids: torch.Tensor | None = None
    for e, slots in _expert_slots(topk_ids, expert_map, len(pack.widths)):
        count = slots.numel()
        n = pack.widths[e]
        if n == 0:
            continue
        lo = pack.offsets[e]
        a = pack.head(e)
        r = n - a
        tokens = slots // top_k
        xe = xc.index_select(0, tokens)
        we = flat_weights.index_select(0, slots).unsqueeze(1)  # [count, 1] fp32
        if a:
            if zero_ids is None or zero_ids.shape[0] < count:
                zero_ids = torch.zeros((num_tokens * top_k, 1), dtype=torch.int32, device=x.device)
            ye = torch.empty_like(xe)
            torch.ops._C.cpu_fused_moe(
                ye, xe,
                w13[2 * lo : 2 * lo + 2 * a].view(1, 2 * a, hidden),
                w2t[lo : lo + a].view(1, hidden, a),
                None, None, we, zero_ids[:count], False, "silu", pack.isa,
            )
            out.index_add_(0, tokens, ye.to(torch.float32))
        if r:
            gate_up = F.linear(xe, w13[2 * lo + 2 * a : 2 * lo + 2 * n])  # [count, 2r]
            act = F.silu(gate_up[:, :r]) * gate_up[:, r:]
            y = torch.matmul(act, w2t[lo + a : lo + n])
            out.index_add_(0, tokens, y.to(torch.float32) * we)
    return out.to(x.dtype)
