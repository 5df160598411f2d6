"""A linear layer over packed slabs: ``y = sum_s x[:, k0_s : k0_s + K_s] @ W_s`` (shared experts).

A slab-quantized shared expert is two vLLM linear layers with the activation between
them, so it cannot use the fused MoE kernels whole.  Each projection is a GEMM over
K-major slabs (layout in :mod:`.packing`): slab ``s`` holds ``W_s [K_s, N]`` packed
along K at ``bits[s]`` (16: dense), and consumes input columns
``[k0_s, k0_s + K_s)`` with ``k0_s = K_0 + ... + K_{s-1}``.  That is the down kernel of
the slab MoE with one expert, ``top_k = 1`` and router weight 1, so the Triton path runs
``_w2_gemv_kernel`` / ``_w2_sorted_kernel`` on the packed codes (one launch, no
dequantized copy, no host sync); elsewhere the torch reference dequantizes one slab at a
time.

A shared expert's ``down_proj`` is one such layer (its slabs split K); its ``gate_up_proj``
is one single-slab layer per bit-width (K = H, N = 2 n_b, gate columns then up), whose
outputs are concatenated gates first (what vLLM's ``SiluAndMul`` expects).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .packing import SUPPORTED_BITS, packed_rows, scale_rows
from .slab_weights import QWEIGHT_DTYPE, SCALE_DTYPE

__all__ = ["SlabLinearWeights", "slab_linear", "slab_linear_meta", "slab_linear_reference"]


def slab_linear_meta(in_sizes: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """The int32 ``[3, len(in_sizes)]`` metadata the kernels index: ``K_s``, packed-row and group offsets (0).

    Build it once (at load): creating it per call would copy host data to the device.
    """
    sizes = [int(k) for k in in_sizes]
    return torch.tensor([sizes, [0] * len(sizes), [0] * len(sizes)], dtype=torch.int32, device=device)


@dataclass(frozen=True, eq=False)
class SlabLinearWeights:
    """Packed slabs of one linear layer and their metadata (all on one device).

    :param bits: bit-width of each slab (distinct not required; 16 = dense).
    :param in_sizes: ``K_s`` of each slab (> 0); the input has ``sum(in_sizes)`` columns.
    :param out_features: ``N``.
    :param group_size: quantization group along K (a multiple of 32 dividing into tiles).
    :param qweight: per slab ``[packed_rows(K_s, b), N]`` int32.
    :param scales: per slab ``[ceil(K_s / G), N]`` fp16 (``[0, N]`` for a dense slab).
    :param zeros: as ``scales``.
    :param meta: :func:`slab_linear_meta` of ``in_sizes``.
    :param dense_dtype: what dense slabs hold (bf16 or fp16).
    """

    bits: tuple[int, ...]
    in_sizes: tuple[int, ...]
    out_features: int
    group_size: int
    qweight: tuple[torch.Tensor, ...]
    scales: tuple[torch.Tensor, ...]
    zeros: tuple[torch.Tensor, ...]
    meta: torch.Tensor
    dense_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        n, g = self.out_features, self.group_size
        if not self.bits or len(self.bits) != len(self.in_sizes):
            raise ValueError(f"slab linear: {len(self.bits)} bit-widths for {len(self.in_sizes)} slabs")
        if g <= 0 or g % 32:
            raise ValueError(f"slab linear: group_size must be a positive multiple of 32, got {g}")
        for name in ("qweight", "scales", "zeros"):
            if len(getattr(self, name)) != len(self.bits):
                raise ValueError(f"slab linear: {name} needs one tensor per slab ({len(self.bits)})")
        for s, (b, k) in enumerate(zip(self.bits, self.in_sizes)):
            if b not in SUPPORTED_BITS or k <= 0:
                raise ValueError(f"slab linear: slab {s} has bits {b} and K {k}")
            for name, shape, dtype in (
                ("qweight", (packed_rows(k, b), n), QWEIGHT_DTYPE),
                ("scales", (scale_rows(k, b, g), n), SCALE_DTYPE),
                ("zeros", (scale_rows(k, b, g), n), SCALE_DTYPE),
            ):
                t = getattr(self, name)[s]
                if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
                    raise ValueError(
                        f"slab linear: {name}[{s}] ({b}-bit, K={k}) must be contiguous {shape} {dtype}, "
                        f"got {tuple(t.shape)} {t.dtype}"
                    )
                if t.device != self.meta.device:
                    raise ValueError(f"slab linear: {name}[{s}] is on {t.device}, meta on {self.meta.device}")
        if tuple(self.meta.shape) != (3, len(self.bits)) or self.meta.dtype != torch.int32:
            raise ValueError(
                f"slab linear: meta must be int32 [3, {len(self.bits)}], got {tuple(self.meta.shape)}"
            )

    @property
    def in_features(self) -> int:
        return sum(self.in_sizes)


def slab_linear_reference(x: torch.Tensor, w: SlabLinearWeights) -> torch.Tensor:
    """``[T, N]`` in ``x.dtype``, fp32 math, one transiently dequantized slab at a time."""
    from .reference import dequantize_fast

    _check(x, w)
    x32 = x.to(torch.float32)
    out = torch.zeros(x.shape[0], w.out_features, dtype=torch.float32, device=x.device)
    start = 0
    for b, k, q, s, z in zip(w.bits, w.in_sizes, w.qweight, w.scales, w.zeros):
        weight = dequantize_fast(q, s, z, b, k, w.group_size, w.dense_dtype)  # [K_s, N]
        out.addmm_(x32[:, start : start + k], weight)
        del weight
        start += k
    return out.to(x.dtype)


def slab_linear(x: torch.Tensor, w: SlabLinearWeights, backend: str = "auto") -> torch.Tensor:
    """``y = x @ W`` over the slabs of ``w``: ``x [T, sum K_s]`` -> ``[T, N]`` in ``x.dtype``.

    ``backend`` as in :func:`.dispatch.choose_backend`: Triton on CUDA (and under the
    interpreter when forced), the torch reference otherwise (the compiled CPU kernel
    has no linear entry).
    """
    from .dispatch import choose_backend

    name, _ = choose_backend(x, "reference" if backend == "cpu" else backend)
    if name == "triton":
        from .launch import slab_linear_triton

        return slab_linear_triton(x, w)
    return slab_linear_reference(x, w)


def _check(x: torch.Tensor, w: SlabLinearWeights) -> None:
    if x.dim() != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"slab linear: x must be [T, {w.in_features}], got {tuple(x.shape)}")
    if x.device != w.meta.device:
        raise ValueError(f"slab linear: x is on {x.device}, weights on {w.meta.device}")
