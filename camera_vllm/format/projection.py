"""The three projections of an expert, under one name each.

A micro-expert ``j`` is (row ``j`` of gate, row ``j`` of up, column ``j`` of down).  The
same three matrices are called 0/1/2 (tensor builders), ``gate_proj``/``up_proj``/
``down_proj`` (most Hugging Face checkpoints), ``w1``/``w3``/``w2`` (Mixtral) and
``w13``/``w2`` (vLLM's fused MoE parameters).  :class:`Projection` is the one vocabulary;
it is an ``IntEnum`` so it indexes ``(gate, up, down)`` tuples and the ``proj`` arguments
of :mod:`camera_vllm.format.names` directly.  Pure Python: no torch.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["PROJECTIONS", "Projection"]


class Projection(IntEnum):
    """gate (0), up (1) or down (2)."""

    GATE = 0
    UP = 1
    DOWN = 2

    @property
    def hf_name(self) -> str:
        """``gate_proj`` / ``up_proj`` / ``down_proj``: the Hugging Face module name."""
        return ("gate_proj", "up_proj", "down_proj")[self]

    @property
    def mixtral_name(self) -> str:
        """``w1`` / ``w3`` / ``w2``: Mixtral's module name."""
        return ("w1", "w3", "w2")[self]

    @property
    def fused_name(self) -> str:
        """``w13`` (gate and up, stacked) or ``w2``: vLLM's fused-MoE parameter."""
        return "w2" if self is Projection.DOWN else "w13"

    @property
    def reads_hidden(self) -> bool:
        """True when the input dimension is the hidden size (gate, up); down reads the expert width."""
        return self is not Projection.DOWN


#: ``(GATE, UP, DOWN)``, in tensor order.
PROJECTIONS: tuple[Projection, ...] = tuple(Projection)
