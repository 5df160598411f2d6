"""GPTQ (Frantar et al., 2022) for K-major matrices on the group-wise asymmetric grid of :mod:`.rtn`.

Notation: ``wt = W^T [K, N]`` (K inputs, N outputs), calibration inputs ``X [T, K]`` of
that matrix, and the layer-output error ``||X W^T - X Wq^T||_F^2``, whose Hessian with
respect to any output column is ``H = 2 X^T X [K, K]`` (the same for every column, which
is why all N columns are quantized together).

GPTQ quantizes the K input rows of ``wt`` one after the other.  After row ``k`` is
rounded to ``q_k``, the optimal (OBS) update of the rows not yet quantized is

    wt[j] -= (wt[k] - q_k) / U[k, k] * U[k, j]          for j > k,

where ``U`` is the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``); ``U``'s rows are
exactly the rows of the inverse Hessians of the shrinking remaining problems.  Updates are
applied lazily: inside a block of rows immediately, to the rows after the block in one
matrix product when the block is done.

Grid: group ``g`` (rows ``[g*G, (g+1)*G)``) gets its fp16 (scale, zero) from
:func:`.rtn.fit_group_grid` when the sweep reaches its first row, computed on the rows as
updated so far (blocks are whole groups, so those rows carry every earlier update).
With ``act_order`` rows are visited by decreasing ``H[k, k]``; since the checkpoint has no
per-row group index, groups stay contiguous in the stored order, so their grids are then
fitted once up front on the original weights ("static groups").

Dead inputs (``H[k, k] == 0``: channel never active in calibration) keep their weights and
are quantized by plain RTN: ``H[k, k]`` is set to 1, which decouples the row.  The
reference GPTQ zeroes such weights, which is harmless for dense layers but would erase an
MoE expert (or a micro-expert) that calibration simply did not route tokens to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from camera_kernels.packing import num_groups

from .rtn import DEFAULT_CLIP_RATIOS, QuantizedMatrix, check_bits, fit_group_grid, quantize_to_grid

__all__ = ["HessianAccumulator", "PreparedHessian", "gptq_quantize", "prepare_hessian"]


class HessianAccumulator:
    """Running ``sum_t w_t x_t x_t^T`` over calibration rows of one matrix's input (``[K, K]``).

    Each batch's product runs in fp32 (or the accumulator dtype if that is fp32); the
    running sum is kept in ``dtype`` (fp64 by default) so that hundreds of thousands of
    tokens do not lose the small contributions of late batches.

    :param k: input dim of the matrix.
    """

    def __init__(
        self, k: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
    ):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulator dtype must be float32 or float64, got {dtype}")
        self.k = k
        self.sum = torch.zeros(k, k, dtype=dtype, device=device)
        self.count = 0  # rows added (tokens), whatever their weights
        self.weight_sum = 0.0

    def add(self, x: Tensor, weights: Tensor | None = None) -> None:
        """Add rows ``x [..., K]``; ``weights [...]`` (>= 0) scale each row's ``x x^T``.

        For a routed expert, pass the squared router weight ``g_t**2`` (the expert's output
        is scaled by ``g_t``, so its error is too); ``None`` means weight 1.
        """
        if x.shape[-1] != self.k:
            raise ValueError(f"expected inputs with last dim {self.k}, got shape {tuple(x.shape)}")
        x = x.reshape(-1, self.k).to(device=self.sum.device, dtype=torch.float32)
        if weights is not None:
            w = weights.reshape(-1).to(device=x.device, dtype=torch.float32)
            if w.shape[0] != x.shape[0]:
                raise ValueError(f"{w.shape[0]} weights for {x.shape[0]} rows")
            if bool((w < 0).any()):
                raise ValueError("row weights must be non-negative")
            self.weight_sum += float(w.sum())
            x = x * w.sqrt().unsqueeze(1)
        else:
            self.weight_sum += float(x.shape[0])
        self.count += int(x.shape[0])
        if x.shape[0]:
            self.sum += (x.T @ x).to(self.sum.dtype)

    def merge(self, other: HessianAccumulator) -> None:
        """Add another accumulator's rows (e.g. from another device or data shard)."""
        if other.k != self.k:
            raise ValueError(f"cannot merge a K={other.k} accumulator into K={self.k}")
        self.sum += other.sum.to(device=self.sum.device, dtype=self.sum.dtype)
        self.count += other.count
        self.weight_sum += other.weight_sum

    def hessian(self) -> Tensor:
        """``2 X^T X / rows`` (all zeros if nothing was added).  GPTQ is invariant to the scale."""
        return self.sum * (2.0 / max(self.count, 1))


@dataclass(frozen=True)
class PreparedHessian:
    """What GPTQ needs from a Hessian, reusable for every matrix that shares it.

    :param hinv_chol: fp32 ``U`` with ``H_damped^-1 = U^T U`` (upper), in visiting order.
    :param perm: visiting order of the K rows (``act_order``), or None for the natural order.
    :param dead: bool ``[K]``, inputs with zero calibration energy (stored order).
    :param damp_used: relative damping that made ``H`` positive definite.
    """

    hinv_chol: Tensor
    perm: Tensor | None
    dead: Tensor
    damp_used: float

    @property
    def k(self) -> int:
        return int(self.hinv_chol.shape[0])


def prepare_hessian(hessian: Tensor, damp: float = 0.01, act_order: bool = False) -> PreparedHessian:
    """Damp, (optionally) reorder and invert a Hessian ``[K, K]`` in fp64.

    ``damp`` is relative to the mean diagonal (``H += damp * mean(diag H) * I``).  If the
    Cholesky factorisation still fails (numerically indefinite sums), the damping is
    multiplied by 10, up to three times, before giving up.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"Hessian must be square [K, K], got shape {tuple(hessian.shape)}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    h = hessian.to(torch.float64).clone()
    k = h.shape[0]
    diag = torch.diagonal(h)
    dead = diag <= 0
    if bool(dead.any()):
        # Decouple dead inputs: their row/column carries no information, only rounding noise.
        h[dead, :] = 0
        h[:, dead] = 0
        diag[dead] = 1.0
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    mean_diag = float(torch.diagonal(h).mean()) if k else 1.0
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    rel = damp if damp > 0 else 0.0
    for _ in range(4):
        chol, info = torch.linalg.cholesky_ex(h + (rel * mean_diag) * eye)
        if int(info) == 0:
            break
        rel = max(rel, 1e-4) * 10.0
    else:
        raise ValueError(f"Hessian is not positive definite even with relative damping {rel / 10:g}")
    hinv = torch.cholesky_inverse(chol)
    u = torch.linalg.cholesky(hinv, upper=True)
    return PreparedHessian(u.to(torch.float32), perm, dead.clone(), rel)


def gptq_quantize(
    wt: Tensor,
    hessian: Tensor | PreparedHessian,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    *,
    static_groups: bool = False,
    clip_search: bool = False,
    clip_ratios: Sequence[float] = DEFAULT_CLIP_RATIOS,
) -> QuantizedMatrix:
    """GPTQ-quantize ``wt = W^T [K, N]`` given the Hessian ``2 X^T X [K, K]`` of its inputs.

    :param hessian: raw ``[K, K]`` or a :class:`PreparedHessian` (then ``damp`` and
        ``act_order`` are those it was prepared with).  For slabs: gate/up slabs use the
        expert-input Hessian (K = hidden) whatever their columns; a down slab uses the
        sub-block ``H[idx][:, idx]`` of the intermediate-activation Hessian for its
        micro-experts ``idx``.
    :param block_size: rows per lazy-update block (rounded to whole groups when groups are
        fitted during the sweep).
    :param clip_search: per-group clipping search when fitting each group's grid.
    :return: the same :class:`QuantizedMatrix` layout as :func:`.rtn.quantize_rtn`.
    """
    check_bits(bits)
    if wt.dim() != 2:
        raise ValueError(f"gptq_quantize expects a 2-D [K, N] tensor, got shape {tuple(wt.shape)}")
    if group_size <= 0 or block_size <= 0:
        raise ValueError(f"group_size and block_size must be positive, got {group_size}, {block_size}")
    k, n = wt.shape
    prep = (
        hessian
        if isinstance(hessian, PreparedHessian)
        else prepare_hessian(hessian.to(wt.device), damp, act_order)
    )
    if prep.k != k:
        raise ValueError(f"Hessian is {prep.k}x{prep.k} but the matrix has K={k} input rows")
    device = wt.device
    u = prep.hinv_chol.to(device)
    w = wt.to(torch.float32).clone()
    ng = num_groups(k, group_size)
    scales = torch.empty(ng, n, dtype=torch.float32, device=device)
    zeros = torch.empty(ng, n, dtype=torch.float32, device=device)
    clip = clip_ratios if clip_search else None

    static = prep.perm is not None or static_groups
    if static:
        perm = prep.perm.to(device) if prep.perm is not None else torch.arange(k, device=device)
        for g in range(ng):
            s, z = fit_group_grid(
                w[g * group_size : (g + 1) * group_size].unsqueeze(0), bits, clip_ratios=clip
            )
            scales[g], zeros[g] = s[0], z[0]
        w = w[perm]
        group_of = (perm // group_size).tolist()
        block = block_size
    else:
        group_of = None
        # Whole groups per block: a group's grid must see every update from earlier rows.
        block = max(1, block_size // group_size) * group_size

    q = torch.empty(k, n, dtype=torch.int32, device=device)
    cur_s = cur_z = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            if static:
                g = group_of[row]
                cur_s, cur_z = scales[g], zeros[g]
            elif row % group_size == 0:
                g = row // group_size
                s, z = fit_group_grid(w1[i : i + group_size].unsqueeze(0), bits, clip_ratios=clip)
                scales[g], zeros[g] = s[0], z[0]
                cur_s, cur_z = scales[g], zeros[g]
            wr = w1[i]
            qr = quantize_to_grid(wr, cur_s, cur_z, bits)
            err = (wr - (qr.to(torch.float32) - cur_z) * cur_s) / u1[i, i]
            if i + 1 < i2 - i1:
                w1[i + 1 :].addr_(u1[i, i + 1 :], err, alpha=-1.0)
            err1[i] = err
            q[row] = qr
        if i2 < k:
            w[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1.0)

    if static:
        q = q[torch.argsort(perm)]
    return QuantizedMatrix(
        q.contiguous(), scales.to(torch.float16), zeros.to(torch.float16), bits, group_size
    )
