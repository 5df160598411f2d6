"""camera-vllm: CAMERA-compressed Mixture-of-Experts checkpoints, served by vLLM.

Importing this package is cheap and registers nothing; vLLM calls :func:`register`
through the ``vllm.general_plugins`` entry point in every process it starts.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["register", "__version__"]


def register() -> None:
    """vLLM plugin entry point: register the ``camera`` quantization method (idempotent)."""
    from .vllm_plugin.plugin import register as _register

    _register()
