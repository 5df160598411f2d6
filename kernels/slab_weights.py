"""Runtime layout of one mixed-precision CAMERA MoE layer (the kernel/plugin contract).

A layer has ``E`` experts, hidden size ``H``, group size ``G`` (a multiple of 32) and
bit-widths ``B`` (distinct, descending, a subset of {16, 8, 4, 3, 2, 1}).  Expert ``e``
holds ``n[e][i]`` micro-experts at ``B[i]`` bits (may be 0; a whole expert may have
width 0).  Inside an expert the intermediate activation is the concatenation of its
slabs in ``B`` order.

All experts' slabs of one bit-width are concatenated into one tensor per bit index
``i`` (``b = B[i]``), so a layer is ``len(B)`` uniform-bit GEMM problems with ragged
per-expert sizes.  With ``R_i = sum_e n[e][i]`` and

* ``col_off[e][i]        = sum_{e' < e} n[e'][i]``
* ``down_row_off[e][i]   = sum_{e' < e} packed_rows(n[e'][i], b)``
* ``down_group_off[e][i] = sum_{e' < e} ceil(n[e'][i] / G)`` (0 for a dense slab)

Bit-width 16 is the *dense* slab: raw weights of ``layout.dense_dtype`` (bf16 or
fp16) packed two per word, with no scales or zeros (their tensors have 0 rows).  A
CAMERA-P layer is a layout with the one bit-width 16, so pruned and quantized layers
run on the same kernels.

the tensors are (bit layout: :mod:`.packing`, matrices stored ``W^T`` and packed
along K; below ``n = n[e][i]`` and ``c = col_off[e][i]``):

==================  ================================  =======  ==============================================
tensor              shape                             dtype    expert ``e``'s part
==================  ================================  =======  ==============================================
w13_qweight[i]      ``[packed_rows(H, b), 2 * R_i]``  int32    gate ``2c + [0, n)``, up ``2c + n + [0, n)``
w13_scales[i]       ``[ceil(H / G), 2 * R_i]``        float16  same columns
w13_zeros[i]        ``[ceil(H / G), 2 * R_i]``        float16  same columns
w2_qweight[i]       ``[sum_e packed_rows(n, b), H]``  int32    ``packed_rows(n, b)`` rows at ``down_row_off``
w2_scales[i]        ``[sum_e ceil(n / G), H]``        float16  ``ceil(n / G)`` rows at ``down_group_off``
w2_zeros[i]         ``[sum_e ceil(n / G), H]``        float16  same rows as ``w2_scales``
slab_sizes          ``[E, len(B)]``                   int32    ``n[e][i]``
col_offsets         ``[E, len(B)]``                   int32    ``col_off[e][i]``
down_row_offsets    ``[E, len(B)]``                   int32    ``down_row_off[e][i]``
down_group_offsets  ``[E, len(B)]``                   int32    ``down_group_off[e][i]``
==================  ================================  =======  ==============================================

Each expert's down block is ``W_down[:, slab]^T`` (``K = n`` packed along dim 0 and
padded to 32), so its groups start at the slab's first micro-expert and the last one
may be shorter than ``G``: a group never straddles two slabs or two experts.

Dequantization is ``w = (q - zero) * scale`` in fp32 (dense: the stored value).  The expert MLP is
``y = W_down (SiLU(W_gate x) * (W_up x))`` and the layer output is
``out[t] = sum_k topk_weights[t, k] * Expert_{topk_ids[t, k]}(x[t])``.

A vLLM plugin typically allocates the concatenated tensors from a :class:`SlabLayout`
(``layout.w13_qweight_shape(i)`` ...), copies each checkpoint tensor into
``layout.gate_cols(e, i)`` / ``up_cols`` / ``down_rows`` / ``down_groups`` and then calls
:meth:`SlabMoEWeights.from_layout`; or it hands the per-expert tensors over as they are
to :meth:`SlabMoEWeights.from_expert_tensors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .packing import (
    DENSE_BITS,
    SUPPORTED_BITS,
    check_dense_dtype,
    pack_dense,
    packed_rows,
    scale_rows,
)

SCALE_DTYPE = torch.float16
QWEIGHT_DTYPE = torch.int32
#: Group size of a layout that is one dense slab: it has no groups, and 256 lets the
#: launcher use any K tile up to 256 (a K tile must divide the group size).
DENSE_GROUP_SIZE = 256


@dataclass(frozen=True)
class SlabLayout:
    """Shapes and offsets of a slab MoE layer; holds no tensors.

    :param hidden_size: ``H``.
    :param group_size: ``G``, a positive multiple of 32.
    :param bits: ``B``, distinct bit-widths in descending order.
    :param sizes: ``n[e][i]``, one tuple of ``len(bits)`` non-negative ints per expert.
    :param dense_dtype: what a 16-bit (dense) slab holds: bf16 or fp16.
    """

    hidden_size: int
    group_size: int
    bits: tuple[int, ...]
    sizes: tuple[tuple[int, ...], ...]
    dense_dtype: torch.dtype = torch.bfloat16
    # Derived offsets, filled in __post_init__ (prefix sums over experts).
    _col_off: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)
    _row_off: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)
    _grp_off: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)
    _totals: tuple[tuple[int, int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        bits = tuple(int(b) for b in self.bits)
        sizes = tuple(tuple(int(n) for n in row) for row in self.sizes)
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "sizes", sizes)
        if self.hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {self.hidden_size}")
        if self.group_size <= 0 or self.group_size % 32:
            raise ValueError(f"group_size must be a positive multiple of 32, got {self.group_size}")
        if not bits:
            raise ValueError("bits must not be empty")
        if any(b not in SUPPORTED_BITS for b in bits):
            raise ValueError(f"bits {bits} must be a subset of {SUPPORTED_BITS}")
        check_dense_dtype(self.dense_dtype)
        if list(bits) != sorted(set(bits), reverse=True):
            raise ValueError(f"bits {bits} must be distinct and in descending order")
        if not sizes:
            raise ValueError("a layer needs at least one expert")
        for e, row in enumerate(sizes):
            if len(row) != len(bits):
                raise ValueError(f"expert {e} has {len(row)} slab sizes for {len(bits)} bit-widths")
            if any(n < 0 for n in row):
                raise ValueError(f"expert {e} has a negative slab size: {row}")
        col, rows, grps, totals = [], [], [], []
        for i, b in enumerate(bits):
            c = r = g = 0
            col_i, row_i, grp_i = [], [], []
            for row in sizes:
                col_i.append(c)
                row_i.append(r)
                grp_i.append(g)
                c += row[i]
                r += packed_rows(row[i], b)
                g += scale_rows(row[i], b, self.group_size)
            col.append(col_i)
            rows.append(row_i)
            grps.append(grp_i)
            totals.append((c, r, g))

        # Stored [E][nb] like ``sizes``.
        def transpose(per_bit):
            return tuple(tuple(col_e) for col_e in zip(*per_bit))

        object.__setattr__(self, "_col_off", transpose(col))
        object.__setattr__(self, "_row_off", transpose(rows))
        object.__setattr__(self, "_grp_off", transpose(grps))
        object.__setattr__(self, "_totals", tuple(totals))

    # ---- sizes ---------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return len(self.sizes)

    @property
    def num_bits(self) -> int:
        return len(self.bits)

    def expert_width(self, e: int) -> int:
        """Intermediate size of expert ``e`` (all slabs)."""
        return sum(self.sizes[e])

    def slab_total(self, i: int) -> int:
        """``R_i``: micro-experts at bit index ``i`` over all experts."""
        return self._totals[i][0]

    @property
    def is_dense(self) -> bool:
        """Whether every slab is 16-bit (a CAMERA-P or unquantized layer)."""
        return self.bits == (DENSE_BITS,)

    def max_slab(self, i: int) -> int:
        """Largest ``n[e][i]`` over experts (the kernel grid's column extent)."""
        return max(row[i] for row in self.sizes)

    # ---- offsets ---------------------------------------------------------------------
    def col_offset(self, e: int, i: int) -> int:
        return self._col_off[e][i]

    def down_row_offset(self, e: int, i: int) -> int:
        return self._row_off[e][i]

    def down_group_offset(self, e: int, i: int) -> int:
        return self._grp_off[e][i]

    def gate_cols(self, e: int, i: int) -> slice:
        """Columns of ``w13_*[i]`` that hold expert ``e``'s gate slab."""
        c, n = 2 * self._col_off[e][i], self.sizes[e][i]
        return slice(c, c + n)

    def up_cols(self, e: int, i: int) -> slice:
        """Columns of ``w13_*[i]`` that hold expert ``e``'s up slab."""
        c, n = 2 * self._col_off[e][i], self.sizes[e][i]
        return slice(c + n, c + 2 * n)

    def down_rows(self, e: int, i: int) -> slice:
        """Rows of ``w2_qweight[i]`` that hold expert ``e``'s packed down slab."""
        r = self._row_off[e][i]
        return slice(r, r + packed_rows(self.sizes[e][i], self.bits[i]))

    def down_groups(self, e: int, i: int) -> slice:
        """Rows of ``w2_scales[i]`` / ``w2_zeros[i]`` that hold expert ``e``'s groups."""
        g = self._grp_off[e][i]
        return slice(g, g + scale_rows(self.sizes[e][i], self.bits[i], self.group_size))

    # ---- tensor shapes ----------------------------------------------------------------
    def w13_qweight_shape(self, i: int) -> tuple[int, int]:
        return (packed_rows(self.hidden_size, self.bits[i]), 2 * self.slab_total(i))

    def w13_scales_shape(self, i: int) -> tuple[int, int]:
        return (scale_rows(self.hidden_size, self.bits[i], self.group_size), 2 * self.slab_total(i))

    def w2_qweight_shape(self, i: int) -> tuple[int, int]:
        return (self._totals[i][1], self.hidden_size)

    def w2_scales_shape(self, i: int) -> tuple[int, int]:
        return (self._totals[i][2], self.hidden_size)

    def metadata(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The int32 ``[E, len(B)]`` tensors the kernels index by expert and bit index."""

        def t(rows: tuple[tuple[int, ...], ...]) -> torch.Tensor:
            return torch.tensor(rows, dtype=torch.int32, device=device).reshape(
                self.num_experts, self.num_bits
            )

        return {
            "slab_sizes": t(self.sizes),
            "col_offsets": t(self._col_off),
            "down_row_offsets": t(self._row_off),
            "down_group_offsets": t(self._grp_off),
        }

    def nbytes(self) -> int:
        """Bytes of packed weights, scales and zeros (metadata excluded)."""
        total = 0
        for i in range(self.num_bits):
            for shape, elem in (
                (self.w13_qweight_shape(i), 4),
                (self.w13_scales_shape(i), 4),  # scales + zeros, 2 bytes each
                (self.w2_qweight_shape(i), 4),
                (self.w2_scales_shape(i), 4),
            ):
                total += shape[0] * shape[1] * elem
        return total

    def avg_bits(self) -> float:
        """Stored bits per weight, scale/zero overhead and K padding included."""
        weights = 3 * self.hidden_size * sum(sum(row) for row in self.sizes)
        return 8.0 * self.nbytes() / weights if weights else 0.0


class SlabTensors(NamedTuple):
    """Checkpoint tensors of one slab (one expert, one bit-width ``b``, ``n`` micro-experts).

    Shapes as in ``camera_vllm.format.layout`` (``H`` hidden size, ``G`` group size):
    gate/up ``qweight [packed_rows(H, b), n]`` int32, ``scales``/``zeros
    [ceil(H/G), n]`` float16; down ``qweight [packed_rows(n, b), H]`` int32,
    ``scales``/``zeros [ceil(n/G), H]`` float16.
    """

    gate_qweight: torch.Tensor
    gate_scales: torch.Tensor
    gate_zeros: torch.Tensor
    up_qweight: torch.Tensor
    up_scales: torch.Tensor
    up_zeros: torch.Tensor
    down_qweight: torch.Tensor
    down_scales: torch.Tensor
    down_zeros: torch.Tensor


def check_moe_inputs(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, hidden_size: int
) -> None:
    """Raise ``ValueError`` unless ``x`` is ``[T, hidden_size]`` and both routing tensors are ``[T, K]``.

    The shape contract every slab MoE backend (reference, CPU kernel, Triton) shares.
    """
    if x.dim() != 2 or x.shape[1] != hidden_size:
        raise ValueError(f"x must be [T, {hidden_size}], got {tuple(x.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
            f"must both be [T, K], T={x.shape[0]}"
        )


@dataclass(frozen=True, eq=False)
class SlabMoEWeights:
    """All tensors of one slab MoE layer, on one device (see the module docstring for shapes).

    Per bit index ``i`` (tuples of ``len(layout.bits)`` tensors):
    ``w13_qweight[i] [packed_rows(H, b), 2 R_i]`` int32, ``w13_scales[i]`` and
    ``w13_zeros[i] [ceil(H/G), 2 R_i]`` float16, ``w2_qweight[i] [sum_e
    packed_rows(n[e][i], b), H]`` int32, ``w2_scales[i]`` and ``w2_zeros[i] [sum_e
    ceil(n[e][i]/G), H]`` float16.  Metadata ``slab_sizes``, ``col_offsets``,
    ``down_row_offsets``, ``down_group_offsets``: int32 ``[E, len(B)]``.  Host-side
    facts the launcher needs as Python ints (``max_slab``) come from ``layout``.
    """

    layout: SlabLayout
    w13_qweight: tuple[torch.Tensor, ...]
    w13_scales: tuple[torch.Tensor, ...]
    w13_zeros: tuple[torch.Tensor, ...]
    w2_qweight: tuple[torch.Tensor, ...]
    w2_scales: tuple[torch.Tensor, ...]
    w2_zeros: tuple[torch.Tensor, ...]
    slab_sizes: torch.Tensor
    col_offsets: torch.Tensor
    down_row_offsets: torch.Tensor
    down_group_offsets: torch.Tensor

    def __post_init__(self) -> None:
        lay = self.layout
        nb = lay.num_bits
        device = self.slab_sizes.device
        expected = {
            "w13_qweight": (lay.w13_qweight_shape, QWEIGHT_DTYPE),
            "w13_scales": (lay.w13_scales_shape, SCALE_DTYPE),
            "w13_zeros": (lay.w13_scales_shape, SCALE_DTYPE),
            "w2_qweight": (lay.w2_qweight_shape, QWEIGHT_DTYPE),
            "w2_scales": (lay.w2_scales_shape, SCALE_DTYPE),
            "w2_zeros": (lay.w2_scales_shape, SCALE_DTYPE),
        }
        for name, (shape_of, dtype) in expected.items():
            tensors = tuple(getattr(self, name))
            object.__setattr__(self, name, tensors)
            if len(tensors) != nb:
                raise ValueError(f"{name}: expected {nb} tensors (one per bit-width), got {len(tensors)}")
            for i, t in enumerate(tensors):
                if tuple(t.shape) != shape_of(i) or t.dtype != dtype:
                    raise ValueError(
                        f"{name}[{i}] (bits {lay.bits[i]}): expected {shape_of(i)} {dtype}, "
                        f"got {tuple(t.shape)} {t.dtype}"
                    )
                if t.device != device:
                    raise ValueError(f"{name}[{i}] is on {t.device}, metadata on {device}")
                if not t.is_contiguous():
                    raise ValueError(f"{name}[{i}] must be contiguous (the kernels assume row-major strides)")
        for name in ("slab_sizes", "col_offsets", "down_row_offsets", "down_group_offsets"):
            t = getattr(self, name)
            if tuple(t.shape) != (lay.num_experts, nb) or t.dtype != torch.int32 or not t.is_contiguous():
                raise ValueError(
                    f"{name}: expected contiguous int32 {(lay.num_experts, nb)}, "
                    f"got {tuple(t.shape)} {t.dtype}"
                )

    # ---- convenience ------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.layout.num_experts

    @property
    def hidden_size(self) -> int:
        return self.layout.hidden_size

    @property
    def group_size(self) -> int:
        return self.layout.group_size

    @property
    def bits(self) -> tuple[int, ...]:
        return self.layout.bits

    @property
    def device(self) -> torch.device:
        return self.slab_sizes.device

    def to(self, device: torch.device | str) -> SlabMoEWeights:
        """A copy of every tensor on ``device``."""
        return SlabMoEWeights.from_layout(
            self.layout,
            *([t.to(device) for t in getattr(self, name)] for name in _TENSOR_FIELDS),
            device=device,
        )

    # ---- constructors -----------------------------------------------------------------
    @classmethod
    def from_layout(
        cls,
        layout: SlabLayout,
        w13_qweight: Sequence[torch.Tensor],
        w13_scales: Sequence[torch.Tensor],
        w13_zeros: Sequence[torch.Tensor],
        w2_qweight: Sequence[torch.Tensor],
        w2_scales: Sequence[torch.Tensor],
        w2_zeros: Sequence[torch.Tensor],
        device: torch.device | str | None = None,
    ) -> SlabMoEWeights:
        """Wrap already concatenated per-bit tensors, building the int32 metadata on ``device``.

        ``device`` defaults to the device of ``w13_qweight[0]``.  Tensors are checked
        against ``layout`` (shape, dtype, device, contiguity) and not copied.
        """
        if device is None:
            device = w13_qweight[0].device
        meta = layout.metadata(device)
        return cls(
            layout,
            tuple(w13_qweight),
            tuple(w13_scales),
            tuple(w13_zeros),
            tuple(w2_qweight),
            tuple(w2_scales),
            tuple(w2_zeros),
            **meta,
        )

    @classmethod
    def from_expert_tensors(
        cls,
        experts: Sequence[Sequence[SlabTensors | None]],
        bits: Sequence[int],
        hidden_size: int,
        group_size: int,
        device: torch.device | str | None = None,
        dense_dtype: torch.dtype = torch.bfloat16,
    ) -> SlabMoEWeights:
        """Assemble a layer from per-expert, per-bit checkpoint tensors.

        :param experts: ``experts[e][i]`` is the :class:`SlabTensors` of expert ``e`` at
            ``bits[i]``, or ``None`` for an empty slab (checkpoints do not store them).
            Slab sizes are read from ``gate_qweight.shape[1]``; every other shape is
            checked against it.  ``experts[e]`` may be empty for a width-0 expert.
        :param bits: bit-widths, descending.
        :param device: where the layer lives; defaults to the first tensor's device
            (CPU for a layer with no slabs at all).
        :param dense_dtype: what 16-bit slabs hold (their scales and zeros have 0 rows).
        """
        bits = tuple(int(b) for b in bits)
        nb = len(bits)
        # A width-0 expert may come as an empty sequence: normalise to one None per bit.
        experts = [list(slabs) if len(slabs) else [None] * nb for slabs in experts]
        sizes = []
        for e, slabs in enumerate(experts):
            if len(slabs) != nb:
                raise ValueError(f"expert {e}: {len(slabs)} slabs for {nb} bit-widths")
            sizes.append(tuple(0 if s is None else int(s.gate_qweight.shape[1]) for s in slabs))
        layout = SlabLayout(hidden_size, group_size, bits, tuple(sizes), dense_dtype)
        if device is None:
            first = next((s.gate_qweight for row in experts for s in row if s is not None), None)
            device = first.device if first is not None else torch.device("cpu")
        w13_q, w13_s, w13_z, w2_q, w2_s, w2_z = [], [], [], [], [], []
        for i, b in enumerate(bits):
            parts: list[list[torch.Tensor]] = [[], [], [], [], [], []]
            for e, slabs in enumerate(experts):
                n, s = layout.sizes[e][i], slabs[i]
                if s is None:  # n == 0: the slab's size was read from this very tensor
                    continue
                gh, gn = scale_rows(hidden_size, b, group_size), scale_rows(n, b, group_size)
                want = {
                    "gate_qweight": ((packed_rows(hidden_size, b), n), QWEIGHT_DTYPE),
                    "gate_scales": ((gh, n), SCALE_DTYPE),
                    "gate_zeros": ((gh, n), SCALE_DTYPE),
                    "up_qweight": ((packed_rows(hidden_size, b), n), QWEIGHT_DTYPE),
                    "up_scales": ((gh, n), SCALE_DTYPE),
                    "up_zeros": ((gh, n), SCALE_DTYPE),
                    "down_qweight": ((packed_rows(n, b), hidden_size), QWEIGHT_DTYPE),
                    "down_scales": ((gn, hidden_size), SCALE_DTYPE),
                    "down_zeros": ((gn, hidden_size), SCALE_DTYPE),
                }
                for name, (shape, dtype) in want.items():
                    t = getattr(s, name)
                    if tuple(t.shape) != shape or t.dtype != dtype:
                        raise ValueError(
                            f"expert {e}, {b}-bit slab ({n} micro-experts): {name} should be "
                            f"{shape} {dtype}, got {tuple(t.shape)} {t.dtype}"
                        )
                parts[0].append(torch.cat([s.gate_qweight, s.up_qweight], dim=1))
                parts[1].append(torch.cat([s.gate_scales, s.up_scales], dim=1))
                parts[2].append(torch.cat([s.gate_zeros, s.up_zeros], dim=1))
                parts[3].append(s.down_qweight)
                parts[4].append(s.down_scales)
                parts[5].append(s.down_zeros)
            shapes = (
                layout.w13_qweight_shape(i),
                layout.w13_scales_shape(i),
                layout.w13_scales_shape(i),
                layout.w2_qweight_shape(i),
                layout.w2_scales_shape(i),
                layout.w2_scales_shape(i),
            )
            dtypes = (QWEIGHT_DTYPE, SCALE_DTYPE, SCALE_DTYPE, QWEIGHT_DTYPE, SCALE_DTYPE, SCALE_DTYPE)
            for out, chunks, shape, dtype, dim in zip(
                (w13_q, w13_s, w13_z, w2_q, w2_s, w2_z), parts, shapes, dtypes, (1, 1, 1, 0, 0, 0)
            ):
                if chunks:
                    out.append(torch.cat([c.to(device) for c in chunks], dim=dim).contiguous())
                else:
                    out.append(torch.empty(shape, dtype=dtype, device=device))
        return cls.from_layout(layout, w13_q, w13_s, w13_z, w2_q, w2_s, w2_z, device=device)

    @classmethod
    def from_ragged_dense(
        cls,
        w13: torch.Tensor,
        w2t: torch.Tensor,
        widths: Sequence[int],
        dense_dtype: torch.dtype,
    ) -> SlabMoEWeights:
        """A dense (16-bit) slab layer from ragged unquantized experts: CAMERA-P on the slab kernels.

        :param w13: ``[2R, H]``: expert ``e``'s gate rows ``[2 off_e, 2 off_e + n_e)``, then its
            up rows (``off_e = n_0 + ... + n_{e-1}``, ``R = sum n_e``), as vLLM loads them.
        :param w2t: ``[R, H]``: rows ``[off_e, off_e + n_e)`` are ``W_down^T`` of expert ``e``.
        :param widths: ``n_e`` per expert (0 allowed).
        :param dense_dtype: bf16 or fp16; the weights are converted to it (exactly, when
            they are already of that type).

        The result lives on the inputs' device and is built expert by expert, so the peak
        extra memory is one packed copy of the layer plus one expert.
        """
        widths = tuple(int(n) for n in widths)
        total, hidden = sum(widths), int(w13.shape[1])
        if tuple(w13.shape) != (2 * total, hidden) or tuple(w2t.shape) != (total, hidden):
            raise ValueError(
                f"ragged experts of widths summing to {total}: w13 must be [{2 * total}, H] and w2t "
                f"[{total}, H], got {tuple(w13.shape)} and {tuple(w2t.shape)}"
            )
        layout = SlabLayout(hidden, DENSE_GROUP_SIZE, (DENSE_BITS,), tuple((n,) for n in widths), dense_dtype)
        device = w13.device
        w13_q = torch.empty(layout.w13_qweight_shape(0), dtype=QWEIGHT_DTYPE, device=device)
        w2_q = torch.empty(layout.w2_qweight_shape(0), dtype=QWEIGHT_DTYPE, device=device)
        off = 0
        for e, n in enumerate(widths):
            if n == 0:
                continue
            w13_q[:, 2 * off : 2 * off + 2 * n] = pack_dense(
                w13[2 * off : 2 * off + 2 * n].to(dense_dtype).t()
            )
            w2_q[layout.down_rows(e, 0)] = pack_dense(w2t[off : off + n].to(dense_dtype))
            off += n
        empty13 = torch.empty(layout.w13_scales_shape(0), dtype=SCALE_DTYPE, device=device)
        empty2 = torch.empty(layout.w2_scales_shape(0), dtype=SCALE_DTYPE, device=device)
        return cls.from_layout(
            layout, [w13_q], [empty13], [empty13.clone()], [w2_q], [empty2], [empty2.clone()], device=device
        )


_TENSOR_FIELDS = ("w13_qweight", "w13_scales", "w13_zeros", "w2_qweight", "w2_scales", "w2_zeros")
