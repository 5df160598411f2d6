"""camera-vllm: CAMERA-compressed Mixture-of-Experts checkpoints, served by vLLM.

Importing this package is cheap and registers nothing (no torch, no vLLM); vLLM calls
:func:`register` through the ``vllm.general_plugins`` entry point in every process it
starts.  The compressor's Python API, :func:`prune`, :func:`quantize` and :func:`analyze`
(:mod:`camera_vllm.api`), loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AnalysisResult", "CompressionResult", "__version__", "analyze", "prune", "quantize", "register"]

_API = ("AnalysisResult", "CompressionResult", "analyze", "prune", "quantize")

if TYPE_CHECKING:
    from .api import AnalysisResult, CompressionResult, analyze, prune, quantize


def register() -> None:
    """vLLM plugin entry point: register the ``camera`` quantization method (idempotent)."""
    from .vllm_plugin.plugin import register as _register

    _register()


def __getattr__(name: str) -> Any:
    # The API module is itself import-light; loading it lazily keeps `import camera_vllm` minimal.
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
