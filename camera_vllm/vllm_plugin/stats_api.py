"""``GET /camera/stats``: what the running vLLM server is serving, as JSON.

Mounted through vLLM 0.32's supported extension point for HTTP routes, the
``vllm.endpoint_plugins`` entry-point group (``vllm/plugins/endpoint_plugins/interface.py``):
vLLM's ``build_app`` calls :meth:`CameraStatsPlugin.attach_router` after its own
routers, and ``init_app_state`` calls :meth:`CameraStatsPlugin.init_state` with the
engine client and the CLI args once the engine is up.  Endpoint plugins are opt-in:
vLLM loads one only when its entry-point name is listed in ``VLLM_PLUGINS``, and that
variable also filters the ``vllm.general_plugins`` group, so a server that wants both
sets ``VLLM_PLUGINS=camera_vllm,camera_stats`` (``deploy/docker/entrypoint.sh`` does).

The stats come from the served checkpoint's ``config.json`` (its ``quantization_config``,
parsed by :meth:`CameraQuantConfig.from_json_dict`), found through the model path the
API server was started with, and are computed by
:func:`camera_vllm.format.summary.summarize_camera_config` (pure: no vLLM import), the same
function ``camera-vllm inspect`` prints.

Authentication: vLLM's own ``--api-key`` middleware guards only ``/v1``-style prefixes,
so this route checks the same keys itself (``--api-key`` or ``VLLM_API_KEY``) unless
``CAMERA_STATS_PUBLIC=1``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from ..format.names import CONFIG_FILE
from ..format.schema import CameraFormatError

# The summary itself is the checkpoint format's (``inspect`` prints the same numbers).
from ..format.summary import NotACameraCheckpoint, summarize_camera_config, text_config

try:  # FastAPI ships with vLLM; the pure summary below works without it.
    from fastapi import APIRouter, FastAPI, Request
    from fastapi.responses import JSONResponse
except ImportError:  # pragma: no cover
    APIRouter = FastAPI = Request = JSONResponse = None  # type: ignore[assignment,misc]

STATS_PATH = "/camera/stats"
PLUGIN_NAME = "camera_stats"  # the entry-point name to list in VLLM_PLUGINS
PUBLIC_ENV = "CAMERA_STATS_PUBLIC"


def read_config_json(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json of a local checkpoint directory."""
    path = Path(model_dir) / CONFIG_FILE
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise CameraFormatError(f"{path}: expected a JSON object")
    return data


# ------------------------------------------------------------------------------------------------
# Locating the served checkpoint (API-server process)
# ------------------------------------------------------------------------------------------------
def _served_model(engine_client: Any, args: Any) -> tuple[str | None, Any]:
    """(model path or id, vLLM ModelConfig or None) of the running server."""
    model_config = getattr(engine_client, "model_config", None) if engine_client is not None else None
    model = getattr(model_config, "model", None)
    if not model and args is not None:
        model = getattr(args, "model", None) or getattr(args, "model_tag", None)
    return (str(model) if model else None), model_config


def _served_names(model_config: Any, args: Any, model: str | None) -> list[str]:
    names = getattr(model_config, "served_model_name", None)
    if names is None and args is not None:
        names = getattr(args, "served_model_name", None)
    if names is None:
        names = model
    if isinstance(names, str):
        return [names]
    return [str(n) for n in names or []]


def _has_no_quant_block(config: dict[str, Any]) -> bool:
    return (
        config.get("quantization_config") is None and text_config(config).get("quantization_config") is None
    )


def _load_format(model_config: Any, engine_client: Any, args: Any) -> str | None:
    """The server's ``--load-format`` (from the engine's load config, else the CLI args)."""
    load_config = getattr(getattr(engine_client, "vllm_config", None), "load_config", None)
    fmt = getattr(load_config, "load_format", None)
    if fmt is None and args is not None:
        fmt = getattr(args, "load_format", None)
    return None if fmt is None else str(getattr(fmt, "value", fmt))


def expert_backends(device_type: str | None = None) -> dict[str, Any]:
    """Which code computes the experts on this platform (``device_type``: vLLM's, by default):
    ``camera_q`` is ``triton``, ``cpu`` or ``reference`` (what ``CAMERA_VLLM_BACKEND`` forces,
    else what ``auto`` picks there), ``camera_p`` names CAMERA-P's path."""
    from .backend import expert_backend

    setting = expert_backend()
    if device_type is None:
        try:
            from vllm.platforms import current_platform

            device_type = current_platform.device_type
        except Exception:  # stats must not fail on a platform probe
            device_type = None
    if setting != "auto":
        camera_q = setting
    else:
        camera_q = {"cuda": "triton", "cpu": "cpu"}.get(device_type or "", "reference")
    from .backend import prune_on_slabs

    try:
        on_slabs = prune_on_slabs(device_type or "")
    except ValueError as err:  # CAMERA_VLLM_BACKEND=cpu off CPU: the model would not load
        return {"setting": setting, "device": device_type, "camera_q": camera_q, "camera_p": str(err)}
    camera_p = (
        f"{camera_q} on a 16-bit dense slab"
        if on_slabs
        else "cpu_fused_moe on width buckets (bf16), torch (fp32)"
    )
    return {"setting": setting, "device": device_type, "camera_q": camera_q, "camera_p": camera_p}


def collect_stats(engine_client: Any, args: Any, *, experts: bool = False) -> dict[str, Any]:
    """The /camera/stats payload, or raise NotACameraCheckpoint / CameraFormatError / OSError.

    The checkpoint is found through the served model: a local directory's config.json
    when the model is a path (the deployment case, e.g. ``/models/...``); otherwise the
    config that vLLM itself loaded (``ModelConfig.hf_config``), e.g. for a hub id.
    """
    model, model_config = _served_model(engine_client, args)
    if model is None:
        raise NotACameraCheckpoint("the API server was started without a model")
    if os.path.isdir(model):
        config = read_config_json(model)
        source = str(Path(model).resolve() / CONFIG_FILE)
        if _has_no_quant_block(config) and _load_format(model_config, engine_client, args) == "camera":
            # A zero-masked model: the workers serve the CAMERA-P config derived from its zeros,
            # so derive the same one here (one read of every expert tensor, at server start).
            from ..checkpoint.zero_mask import zero_masked_quant_config
            from .loader import LOAD_FORMAT, ZERO_MASK_ORIGIN

            config["quantization_config"] = zero_masked_quant_config(model, ZERO_MASK_ORIGIN).to_json_dict()
            source += f" + zero-mask scan (--load-format {LOAD_FORMAT})"
    else:
        hf_config = getattr(model_config, "hf_config", None)
        if hf_config is None:
            raise NotACameraCheckpoint(
                f"model {model!r} is not a local directory and no loaded config is available"
            )
        config = hf_config.to_dict()
        source = "vllm ModelConfig.hf_config"
    stats = summarize_camera_config(config, experts=experts)
    stats["model"] = {
        "path": model,
        "served_model_name": _served_names(model_config, args, model),
        "config_source": source,
    }
    stats["expert_backend"] = expert_backends()
    try:
        from .. import __version__

        stats["camera_vllm_version"] = __version__
    except ImportError:  # pragma: no cover
        pass
    return stats


# ------------------------------------------------------------------------------------------------
# Authentication (mirrors vLLM's AuthenticationMiddleware: --api-key wins over VLLM_API_KEY)
# ------------------------------------------------------------------------------------------------
def _api_key_hashes(args: Any) -> list[bytes]:
    keys = getattr(args, "api_key", None) if args is not None else None
    if isinstance(keys, str):
        keys = [keys]
    tokens = [k for k in (keys or [os.environ.get("VLLM_API_KEY")]) if k]
    return [hashlib.sha256(t.encode("utf-8")).digest() for t in tokens]


def _authorized(authorization: str | None, hashes: list[bytes]) -> bool:
    if not hashes:
        return True
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    digest = hashlib.sha256(token.encode("utf-8")).digest()
    ok = False
    for h in hashes:
        ok |= secrets.compare_digest(digest, h)
    return ok


def _error(status: int, message: str, kind: str):
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(status_code=status, content=body)


# ------------------------------------------------------------------------------------------------
# vLLM endpoint plugin (entry point group ``vllm.endpoint_plugins``)
# ------------------------------------------------------------------------------------------------
class CameraStatsPlugin:
    """Endpoint plugin: adds ``GET /camera/stats`` to vLLM's OpenAI-compatible server.

    Satisfies ``vllm.plugins.endpoint_plugins.interface.EndpointPlugin`` (a Protocol, so
    nothing is imported from vLLM here).  Entry point::

        [project.entry-points."vllm.endpoint_plugins"]
        camera_stats = "camera_vllm.vllm_plugin.stats_api:CameraStatsPlugin"
    """

    name = PLUGIN_NAME
    # Eligible for every server, including the engine-less render server (config.json is
    # still readable from the args there).
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter()

        @router.get(STATS_PATH, tags=["camera"], summary="CAMERA checkpoint statistics")
        async def camera_stats(request: Request, experts: bool = False):
            return _handle(request, experts)

        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        _init_state(state, engine_client, args)


def _init_state(state: Any, engine_client: Any, args: Any) -> None:
    """Compute the stats once (the checkpoint does not change under a running server)."""
    state.camera_stats_auth = _api_key_hashes(args)
    state.camera_stats_public = os.environ.get(PUBLIC_ENV, "0") == "1"
    state.camera_stats_source = (engine_client, args)
    state.camera_stats, state.camera_stats_error = None, None
    try:
        state.camera_stats = collect_stats(engine_client, args)
        publish_metrics(state.camera_stats)
    except NotACameraCheckpoint as err:
        state.camera_stats_error = (404, str(err), "NotACameraCheckpoint")
    except (CameraFormatError, OSError, ValueError) as err:
        state.camera_stats_error = (500, f"cannot read the CAMERA checkpoint: {err}", type(err).__name__)


#: Gauges on vLLM's ``/metrics`` (the API server's prometheus_client registry), made once per process.
_GAUGES: dict[str, Any] = {}
_GAUGE_HELP = {
    "camera_expert_bytes_stored": "Bytes of the CAMERA checkpoint's MoE expert weights as served",
    "camera_expert_bytes_dense": "Bytes the same experts take in the original (dense) model",
    "camera_compression_ratio": "Dense expert bytes / stored expert bytes",
    "camera_kept_micro_experts_fraction": "Share of the original routed micro-experts kept",
    "camera_expert_bits_per_weight": "Stored bits per original expert weight (scales and zeros included)",
    "camera_model_info": "The served CAMERA checkpoint (value 1): scheme, format and expert backend labels",
}
_INFO_LABELS = ("model_name", "scheme", "format_version", "backend")


def publish_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """Set the CAMERA gauges from a /camera/stats payload; returns the numbers set (tests, logs).

    Registered in the API server process, whose prometheus registry vLLM serves on ``/metrics``.
    """
    from prometheus_client import Gauge

    totals = stats.get("totals") or {}
    values = {
        "camera_expert_bytes_stored": totals.get("stored_bytes"),
        "camera_expert_bytes_dense": totals.get("original_bytes"),
        "camera_compression_ratio": totals.get("compression_ratio"),
        "camera_kept_micro_experts_fraction": totals.get("kept_fraction"),
        "camera_expert_bits_per_weight": totals.get("bits_per_original_weight"),
    }
    for name, value in values.items():
        if value is None:
            continue
        if name not in _GAUGES:
            _GAUGES[name] = Gauge(name, _GAUGE_HELP[name], multiprocess_mode="max")
        _GAUGES[name].set(float(value))
    if "camera_model_info" not in _GAUGES:
        _GAUGES["camera_model_info"] = Gauge(
            "camera_model_info", _GAUGE_HELP["camera_model_info"], _INFO_LABELS, multiprocess_mode="max"
        )
    backend = stats.get("expert_backend") or {}
    names_ = (stats.get("model") or {}).get("served_model_name") or [""]
    _GAUGES["camera_model_info"].labels(
        model_name=str(names_[0]),
        scheme=str(stats.get("scheme")),
        format_version=str(stats.get("format_version")),
        backend=str(backend.get("camera_q" if stats.get("scheme") == "mixed" else "camera_p")),
    ).set(1)
    return {k: float(v) for k, v in values.items() if v is not None}


def _handle(request: Request, experts: bool):
    state = request.app.state
    if not hasattr(state, "camera_stats_auth"):  # init_state did not run (a custom app builder)
        _init_state(state, getattr(state, "engine_client", None), getattr(state, "args", None))
    if not state.camera_stats_public and not _authorized(
        request.headers.get("authorization"), state.camera_stats_auth
    ):
        return _error(401, "Unauthorized", "Unauthorized")
    if state.camera_stats_error is not None:
        return _error(*state.camera_stats_error)
    if experts:
        try:
            return JSONResponse(content=collect_stats(*state.camera_stats_source, experts=True))
        except (NotACameraCheckpoint, CameraFormatError, OSError, ValueError) as err:
            return _error(500, f"cannot read the CAMERA checkpoint: {err}", type(err).__name__)
    return JSONResponse(content=state.camera_stats)
