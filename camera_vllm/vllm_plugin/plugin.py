"""vLLM plugin entry point: register the ``camera`` quantization method.

vLLM calls :func:`register` (through ``camera_vllm:register``) in every process it
starts: API server, engine core and each worker, possibly several times per process.
"""

from __future__ import annotations

import logging

from ..format.names import QUANT_METHOD

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Register :class:`~camera_vllm.vllm_plugin.config.CameraConfig` as ``camera`` (idempotent, cheap).

    The expert custom op is not registered here: the MoE method registers it when the
    first CAMERA layer is built, so processes that never build a model pay nothing.
    """
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import (
        _CUSTOMIZED_METHOD_TO_QUANT_CONFIG,
        register_quantization_config,
    )

    from .config import CameraConfig

    existing = _CUSTOMIZED_METHOD_TO_QUANT_CONFIG.get(QUANT_METHOD)
    if existing is not None and existing is not CameraConfig:
        # Another package claimed the name: do not silently replace it.
        raise RuntimeError(
            f"quantization method {QUANT_METHOD!r} is already registered by {existing.__module__}."
            f"{existing.__qualname__}; camera-vllm cannot register its own"
        )
    if existing is None:
        register_quantization_config(QUANT_METHOD)(CameraConfig)
        logger.debug("camera-vllm: registered quantization method %r", QUANT_METHOD)
    from .loader import register_loader

    register_loader()  # --load-format camera: zero-masked checkpoints served compactly
    route_logs_to_vllm()
    _registered = True


#: Loggers of this project whose records a served model should show.
PROJECT_LOGGERS = ("camera_vllm", "camera_kernels")


class _ToVllmLogger(logging.Handler):
    """Hands each record to the ``vllm`` logger as it is configured at that moment."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger("vllm")
        if target.isEnabledFor(record.levelno):
            target.handle(record)


def route_logs_to_vllm() -> None:
    """Send the project's log records through vLLM's logger (its handlers, format and level).

    vLLM configures only the ``vllm`` logger, and may do so after the plugin loads (and
    again in each process); records of other packages reach the root logger, which has no
    handler in a vLLM process, so the load summary and the CPU kernel's build messages
    would vanish.  Records are forwarded when they are emitted, so the configuration in
    force then applies.  A logger the user configured is left alone.
    """
    for name in PROJECT_LOGGERS:
        target = logging.getLogger(name)
        if target.handlers:
            continue
        target.addHandler(_ToVllmLogger())
        target.setLevel(logging.DEBUG)  # the vllm logger's level decides
        target.propagate = False
