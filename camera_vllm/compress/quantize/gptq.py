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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from camera_kernels.packing import num_groups
from camera_vllm.format.quant_params import check_group_size

from .rtn import (
    DEFAULT_CLIP_RATIOS,
    QuantizedMatrix,
    _codes,
    check_bits,
    check_finite_scales,
    fit_grid,
    levels_of,
)

__all__ = [
    "GPTQBatchResult",
    "HessianAccumulator",
    "PreparedHessian",
    "PreparedHessians",
    "gptq_quantize",
    "gptq_quantize_batch",
    "prepare_hessian",
    "prepare_hessians",
    "stack_prepared",
]


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


@dataclass(frozen=True)
class PreparedHessians:
    """:class:`PreparedHessian` of a batch of ``E`` matrices padded to one ``K`` (leading dim ``E``).

    :param hinv_chol: fp32 ``[E, K, K]``; rows past an element's real size are identity
        (decoupled from the real ones and from each other).
    :param perm: long ``[E, K]`` visiting order (padding rows last), or None.
    :param dead: bool ``[E, K]`` (padding rows are not dead).
    :param damp_used: fp64 ``[E]`` relative damping per element.
    :param shift: fp64 ``[E]``, the absolute damping ``damp_used * mean(diag H)``: the damped
        Hessian is ``H + shift * I`` with dead inputs' diagonal set to 1.
    :param rows: long ``[E]`` real K of each element, or None when none is padded.
    """

    hinv_chol: Tensor
    perm: Tensor | None
    dead: Tensor
    damp_used: Tensor
    shift: Tensor
    rows: Tensor | None = None

    @property
    def k(self) -> int:
        return int(self.hinv_chol.shape[-1])

    @property
    def batch(self) -> int:
        return int(self.hinv_chol.shape[0])

    def row_valid(self) -> Tensor | None:
        """bool ``[E, K]`` of real rows (None: all real)."""
        if self.rows is None:
            return None
        ar = torch.arange(self.k, device=self.rows.device)
        return ar.unsqueeze(0) < self.rows.unsqueeze(1)


def prepare_hessians(
    hessians: Tensor,
    damp: float = 0.01,
    act_order: bool = False,
    rows: Tensor | None = None,
    *,
    factor_dtype: torch.dtype = torch.float64,
) -> PreparedHessians:
    """:func:`prepare_hessian` of a batch ``[E, K, K]`` at once (no per-element host sync).

    ``U`` comes from one Cholesky and one triangular inverse of the damped Hessian.

    :param rows: long ``[E]``: element ``e`` is the leading ``rows[e] x rows[e]`` block (the
        rest is padding, ignored); None: all ``K``.
    :param factor_dtype: dtype of the factorisation (damping and reordering run in fp64).
        fp64 by default: on Qwen3-30B-A3B expert shapes with heavy-tailed activations an
        fp32 factorisation moved the GPTQ objective ``tr(E^T H E)`` by up to 0.5 %.
    """
    if hessians.dim() != 3 or hessians.shape[1] != hessians.shape[2]:
        raise ValueError(f"Hessians must be [E, K, K], got shape {tuple(hessians.shape)}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if factor_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"factor_dtype must be float32 or float64, got {factor_dtype}")
    h = hessians.to(torch.float64).clone()
    e, k = h.shape[0], h.shape[1]
    dev = h.device
    pad = None
    if rows is not None:
        rows = rows.to(device=dev, dtype=torch.long)
        pad = torch.arange(k, device=dev).unsqueeze(0) >= rows.unsqueeze(1)  # [E, K]
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag <= 0
    if pad is not None:
        dead = dead & ~pad
        dec = dead | pad
    else:
        dec = dead
    # Decouple dead inputs (and padding): their row/column carries no information, only
    # rounding noise.  torch.where instead of masked writes: no host sync on the mask.
    keep = (~dec).to(torch.float64)
    h = h * keep.unsqueeze(2) * keep.unsqueeze(1)
    diag = torch.diagonal(h, dim1=1, dim2=2)
    diag.copy_(torch.where(dec, torch.ones_like(diag), diag))
    perm = None
    if act_order:
        key = diag if pad is None else torch.where(pad, torch.full_like(diag, -math.inf), diag)
        perm = torch.argsort(key, dim=1, descending=True, stable=True)
        h = h.gather(1, perm.unsqueeze(2).expand(e, k, k)).gather(2, perm.unsqueeze(1).expand(e, k, k))
    d = torch.diagonal(h, dim1=1, dim2=2)
    if pad is None:
        mean_diag = d.mean(dim=1) if k else torch.ones(e, dtype=h.dtype, device=dev)
    else:
        real = rows.clamp(min=1).to(torch.float64)
        # Stored-order diagonal: ``pad`` is in stored order (the mean does not depend on it).
        sd = torch.diagonal(hessians, dim1=1, dim2=2).to(torch.float64)
        sd = torch.where(dead, torch.ones_like(sd), sd) * (~pad).to(sd.dtype)
        mean_diag = torch.where(rows > 0, sd.sum(dim=1) / real, torch.ones_like(real))
    eye = torch.eye(k, dtype=h.dtype, device=dev)
    rel = torch.full((e,), float(damp), dtype=torch.float64, device=dev)
    if pad is not None:
        # Padding rows get exactly 1 on the diagonal of the damped Hessian (identity block).
        padf = pad.to(torch.float64)
        if act_order:
            padf = padf.gather(1, perm)
    for _ in range(4):
        shift = rel * mean_diag
        add = shift.view(e, 1, 1) * eye
        if pad is not None:
            add = add * (1 - padf).unsqueeze(2)
        # Cholesky of the flipped matrix: J H J = L L^T  =>  H^-1 = U^T U with U = J L^-1 J.
        chol, info = torch.linalg.cholesky_ex((h + add).flip(1, 2).to(factor_dtype))
        bad = info != 0
        if not bool(bad.any()):  # one sync per try for the whole batch
            break
        rel = torch.where(bad, rel.clamp(min=1e-4) * 10.0, rel)
    else:
        raise ValueError(
            f"Hessian is not positive definite even with relative damping {float(rel.max()) / 10:g}"
        )
    u = _lower_tri_inverse(chol).flip(1, 2)
    return PreparedHessians(u.to(torch.float32), perm, dead, rel, rel * mean_diag, rows)


def _lower_tri_inverse(lower: Tensor, block: int = 128) -> Tensor:
    """``L^-1`` of lower-triangular ``L [E, K, K]``, one column block at a time.

    Column block ``j`` of ``L^-1`` is zero above the block, so it only needs the trailing
    triangle ``L[j:, j:]``: ~K^3/3 flops instead of the K^3 of one solve against ``I``.
    """
    k = lower.shape[-1]
    out = torch.zeros_like(lower)
    eye = torch.eye(k, dtype=lower.dtype, device=lower.device)
    for j in range(0, k, block):
        je = min(j + block, k)
        rhs = eye[j:, j:je].expand(lower.shape[0], k - j, je - j)
        out[:, j:, j:je] = torch.linalg.solve_triangular(lower[:, j:, j:], rhs, upper=False)
    return out


def prepare_hessian(hessian: Tensor, damp: float = 0.01, act_order: bool = False) -> PreparedHessian:
    """Damp, (optionally) reorder and invert a Hessian ``[K, K]`` in fp64.

    ``damp`` is relative to the mean diagonal (``H += damp * mean(diag H) * I``).  If the
    Cholesky factorisation still fails (numerically indefinite sums), the damping is
    multiplied by 10, up to three times, before giving up.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"Hessian must be square [K, K], got shape {tuple(hessian.shape)}")
    b = prepare_hessians(hessian.unsqueeze(0), damp, act_order)
    return PreparedHessian(
        b.hinv_chol[0], None if b.perm is None else b.perm[0], b.dead[0].clone(), float(b.damp_used[0])
    )


def _as_batch(prep: PreparedHessian) -> PreparedHessians:
    return PreparedHessians(
        prep.hinv_chol.unsqueeze(0),
        None if prep.perm is None else prep.perm.unsqueeze(0),
        prep.dead.unsqueeze(0),
        torch.tensor([prep.damp_used], dtype=torch.float64),
        torch.tensor([float("nan")], dtype=torch.float64),  # unknown: no calibration error
    )


def stack_prepared(preps: Sequence[PreparedHessian | PreparedHessians]) -> PreparedHessians:
    """One batch of already prepared Hessians of equal K (e.g. given by the caller)."""
    bs = [p if isinstance(p, PreparedHessians) else _as_batch(p) for p in preps]
    perms = [b.perm for b in bs]
    if any(p is None for p in perms) and not all(p is None for p in perms):
        raise ValueError("cannot batch Hessians prepared with and without act_order")
    dev = bs[0].hinv_chol.device
    return PreparedHessians(
        torch.cat([b.hinv_chol.to(dev) for b in bs]),
        None if perms[0] is None else torch.cat([p.to(dev) for p in perms]),  # type: ignore[union-attr]
        torch.cat([b.dead.to(dev) for b in bs]),
        torch.cat([b.damp_used.to(dev) for b in bs]),
        torch.cat([b.shift.to(dev) for b in bs]),
    )


@dataclass(frozen=True)
class GPTQBatchResult:
    """Codes and grids of a batch of GPTQ-quantized matrices ``[E, K, N]`` (stored row order).

    :param q: int32 ``[E, K, N]``.
    :param scales: fp32 ``[E, ceil(K / G), N]`` holding fp16 values (``zeros`` likewise).
    :param calib_error: fp64 ``[E, N]`` per column ``e^T H e`` of the weight error ``e``
        with the *undamped* Hessian, from the sweep's own statistics (``||U^-T E||^2`` minus
        the damping), NaN where the damping is unknown.
    """

    q: Tensor
    scales: Tensor
    zeros: Tensor
    calib_error: Tensor


def _check_block_size(block_size: object) -> None:
    # Rows per lazy-update block: any positive int works (rounded to whole groups later).
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size (rows per GPTQ lazy block) must be a positive int, got {block_size!r}")


def gptq_quantize_batch(
    wt: Tensor,
    prep: PreparedHessians,
    bits: int | Tensor,
    group_size: int,
    block_size: int = 128,
    *,
    static_groups: bool = False,
    clip_search: bool = False,
    clip_ratios: Sequence[float] = DEFAULT_CLIP_RATIOS,
    static_grid: tuple[Tensor, Tensor] | None = None,
    want_error: bool = True,
) -> GPTQBatchResult:
    """GPTQ of ``E`` matrices ``wt [E, K, N]`` at once, each with its own Hessian.

    The sweep is :func:`gptq_quantize`'s (lazy blocks, error fed back row by row inside a
    block, one batched matmul per block for the rest), on all ``E`` matrices per step.

    :param bits: an int, or an int tensor broadcasting against ``[E, 1, N]`` (e.g. one
        bit-width per column: several slabs of one expert in one matrix, or per element).
    :param prep: :func:`prepare_hessians` of the batch; padding rows (``prep.rows``) must
        hold zeros in ``wt`` and come back as codes to ignore.
    :param static_grid: fp32 ``(scales, zeros)`` ``[E, ceil(K/G), N]`` to use as the static
        grid (skips its fit; e.g. the RTN grid the caller already has).
    :param want_error: compute ``calib_error`` (else it is all zeros).
    """
    if wt.dim() != 3:
        raise ValueError(f"gptq_quantize_batch expects [E, K, N] weights, got shape {tuple(wt.shape)}")
    check_group_size(group_size)
    _check_block_size(block_size)
    e, k, n = wt.shape
    if prep.k != k or prep.batch != e:
        raise ValueError(
            f"Hessians are {prep.batch} x {prep.k}x{prep.k} but the weights are {tuple(wt.shape)}"
        )
    if isinstance(bits, Tensor):
        levels: float | Tensor = levels_of(bits.to(wt.device)).expand(e, 1, n)
    else:
        check_bits(bits)
        levels = levels_of(bits)
    lv_row = levels[:, 0] if isinstance(levels, Tensor) else levels  # [E, N] per row
    device = wt.device
    u = prep.hinv_chol.to(device)
    w0 = wt.to(torch.float32)
    w = w0.clone()
    ng = num_groups(k, group_size)
    clip = clip_ratios if clip_search else None
    valid = prep.row_valid()
    valid = None if valid is None else valid.to(device)

    static = prep.perm is not None or static_groups or static_grid is not None
    if static:
        if static_grid is not None:
            scales, zeros = (t.to(device=device, dtype=torch.float32) for t in static_grid)
        else:
            scales, zeros = _fit_all_groups(w, levels, group_size, valid, clip)
        if prep.perm is not None:
            perm = prep.perm.to(device)
            w = w.gather(1, perm.unsqueeze(2).expand(e, k, n))
        else:
            perm = torch.arange(k, device=device).expand(e, k)
        group_of = perm // group_size  # [E, K], visiting order
        block = block_size
    else:
        scales = torch.empty(e, ng, n, dtype=torch.float32, device=device)
        zeros = torch.empty(e, ng, n, dtype=torch.float32, device=device)
        # Whole groups per block: a group's grid must see every update from earlier rows.
        block = max(1, block_size // group_size) * group_size

    q = torch.empty(e, k, n, dtype=torch.float32, device=device)
    err_sq = torch.zeros(e, n, dtype=torch.float64, device=device)
    vis_valid = valid if (valid is None or prep.perm is None) else valid.gather(1, prep.perm.to(device))
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = u[:, i1:i2, i1:i2]
        d1 = torch.diagonal(u1, dim1=1, dim2=2).unsqueeze(2)  # [E, B, 1]
        if static:
            idx = group_of[:, i1:i2].unsqueeze(2).expand(e, i2 - i1, n)
            s_blk, z_blk = scales.gather(1, idx), zeros.gather(1, idx)
        for i in range(i2 - i1):
            row = i1 + i
            if static:
                cur_s, cur_z = s_blk[:, i], z_blk[:, i]
            elif row % group_size == 0:
                g = row // group_size
                gv = None if valid is None else valid[:, row : row + group_size].unsqueeze(2)
                cur_s, cur_z = fit_grid(
                    w1[:, i : i + group_size], lv_row, valid=gv, clip_ratios=clip, masked_range=True
                )
                scales[:, g], zeros[:, g] = cur_s, cur_z
            wr = w1[:, i]
            qr = _codes(wr, cur_s, cur_z, lv_row)
            err = (wr - (qr - cur_z) * cur_s) / d1[:, i]
            if i + 1 < i2 - i1:
                w1[:, i + 1 :].baddbmm_(u1[:, i, i + 1 :].unsqueeze(2), err.unsqueeze(1), alpha=-1.0)
            err1[:, i] = err
            q[:, row] = qr
        if vis_valid is not None:
            err1m = err1 * vis_valid[:, i1:i2].unsqueeze(2)
        else:
            err1m = err1
        if want_error:  # fp32 within a block, fp64 across blocks
            err_sq += err1m.square().sum(dim=1).to(torch.float64)
        if i2 < k:
            w[:, i2:].baddbmm_(u[:, i1:i2, i2:].transpose(1, 2), err1, alpha=-1.0)

    if static and prep.perm is not None:
        inv = torch.argsort(prep.perm.to(device), dim=1)
        q = q.gather(1, inv.unsqueeze(2).expand(e, k, n))
    check_finite_scales(scales)
    calib = _undamped_error(w0, q, scales, zeros, group_size, err_sq, prep, valid) if want_error else err_sq
    return GPTQBatchResult(q.to(torch.int32), scales, zeros, calib)


def _fit_all_groups(
    w: Tensor, levels: float | Tensor, group_size: int, valid: Tensor | None, clip: Sequence[float] | None
) -> tuple[Tensor, Tensor]:
    """Grids of every group of ``w [E, K, N]`` (stored order) in one batched fit."""
    e, k, n = w.shape
    pad = (-k) % group_size
    v = torch.ones(e, k, dtype=torch.bool, device=w.device) if valid is None else valid
    if pad:
        w = torch.cat([w, w.new_zeros(e, pad, n)], dim=1)
        v = torch.cat([v, v.new_zeros(e, pad)], dim=1)
    wg = w.reshape(e, -1, group_size, n)
    vg = v.reshape(e, -1, group_size, 1)
    # levels [E, 1, N] broadcasts against the per-group ranges [E, groups, N].
    return fit_grid(wg, levels, valid=vg, clip_ratios=clip, masked_range=True)


def _undamped_error(
    w0: Tensor,
    q: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    err_sq: Tensor,
    prep: PreparedHessians,
    valid: Tensor | None,
) -> Tensor:
    """Per column ``e^T H e`` from the sweep: ``||U^-T e||^2 = e^T H_damped e`` (the sweep's
    errors are exactly ``U^-T e``), less the damping ``shift * ||e||^2`` and the 1 put on
    dead inputs' diagonal."""
    g = torch.arange(q.shape[1], device=q.device) // group_size
    deq = (q - zeros[:, g]) * scales[:, g]
    e2 = (w0 - deq).square()
    if valid is not None:
        e2 = e2 * valid.unsqueeze(2)
    total = e2.sum(dim=1).to(torch.float64)
    dead = (e2 * prep.dead.to(device=e2.device, dtype=e2.dtype).unsqueeze(2)).sum(dim=1).to(torch.float64)
    shift = prep.shift.to(device=q.device).unsqueeze(1)
    return err_sq - shift * total - dead


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

    One matrix of :func:`gptq_quantize_batch`; batch matrices that share shapes there.
    """
    check_bits(bits)
    if wt.dim() != 2:
        raise ValueError(f"gptq_quantize expects a 2-D [K, N] tensor, got shape {tuple(wt.shape)}")
    check_group_size(group_size)
    _check_block_size(block_size)
    k = wt.shape[0]
    if isinstance(hessian, PreparedHessian):
        prep = _as_batch(hessian)
    else:
        if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
            raise ValueError(f"Hessian must be square [K, K], got shape {tuple(hessian.shape)}")
        prep = prepare_hessians(hessian.to(wt.device).unsqueeze(0), damp, act_order)
    if prep.k != k:
        raise ValueError(f"Hessian is {prep.k}x{prep.k} but the matrix has K={k} input rows")
    r = gptq_quantize_batch(
        wt.unsqueeze(0),
        prep,
        bits,
        group_size,
        block_size,
        static_groups=static_groups,
        clip_search=clip_search,
        clip_ratios=clip_ratios,
        want_error=False,
    )
    return QuantizedMatrix(
        r.q[0].contiguous(), r.scales[0].to(torch.float16), r.zeros[0].to(torch.float16), bits, group_size
    )
