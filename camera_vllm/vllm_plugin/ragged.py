"""Ragged (per-expert width) MoE layout and its pure-torch forward: the exact serving path of CAMERA-P.

The forward runs inside the ``camera_vllm.moe_ragged`` op (:mod:`.ops`) for layers that neither
vLLM's CPU kernel (:mod:`.ragged_cpu`) nor the slab kernels serve (e.g. fp32 on CPU).  No vLLM
import here, so the compute can be unit-tested on its own.

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
