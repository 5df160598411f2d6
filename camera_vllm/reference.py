"""Transformers reference for CAMERA checkpoints: what a checkpoint *means*, computed plainly.

:func:`load` builds the model class named in config.json with transformers' own routing,
attention and norms, and swaps in only what CAMERA changes:

* every MoE block's ``experts`` becomes :class:`CameraExperts`, one small dense SwiGLU
  MLP per expert with that expert's own width (0 allowed);
* a pruned shared expert gets ``gate/up/down`` ``nn.Linear`` layers of the kept width.

Scheme ``prune`` loads the stored tensors as they are; scheme ``mixed`` dequantizes each
slab (:func:`camera_kernels.packing.dequantize`, shapes from :mod:`camera_vllm.format.layout`)
into the same dense modules.  Weights are read with safetensors only (no pickle).
This is an oracle for tests and evaluation, not a fast path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .arch import moe_arch_from_config
from .format import names
from .format.layout import expert_tensors
from .format.schema import CameraFormatError, CameraQuantConfig

# Checkpoint-name -> module-name rewrites transformers 5 applies when it loads these
# architectures (its conversion mapping); everything else matches one to one.
_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "MixtralForCausalLM": ((".block_sparse_moe.", ".mlp."),),
}


class CameraExpert(nn.Module):
    """One SwiGLU expert ``down(act(gate(x)) * up(x))`` of width ``width`` (0: contributes nothing)."""

    def __init__(
        self,
        width: int,
        hidden: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        proj: tuple[str, str, str],
    ):
        super().__init__()
        self.width, self.hidden, self.act_fn, self.proj = width, hidden, act_fn, proj
        if width > 0:
            gate, up, down = proj
            setattr(self, gate, nn.Linear(hidden, width, bias=False))
            setattr(self, up, nn.Linear(hidden, width, bias=False))
            setattr(self, down, nn.Linear(width, hidden, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width == 0:
            return x.new_zeros(x.shape[0], self.hidden)
        gate, up, down = (getattr(self, p) for p in self.proj)
        return down(self.act_fn(gate(x)) * up(x))


class CameraExperts(nn.ModuleList):
    """Drop-in for a transformers 5 ``*Experts`` module with per-expert widths.

    Children are named ``0..E-1`` so parameters are ``experts.N.gate_proj.weight``,
    the checkpoint's own names.
    """

    def __init__(
        self,
        widths: list[int],
        hidden: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        proj: tuple[str, str, str],
    ):
        super().__init__(CameraExpert(w, hidden, act_fn, proj) for w in widths)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, k_pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


# ---------------------------------------------------------------------------------------------
# Checkpoint reading


class _Tensors:
    """Lazy name -> tensor access over a safetensors checkpoint (single file or sharded)."""

    def __init__(self, model_dir: Path):
        index = model_dir / names.INDEX_FILE
        if index.is_file():
            self.weight_map: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
        else:
            single = model_dir / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(f"{model_dir}: no model.safetensors or {names.INDEX_FILE}")
            with safe_open(single, "pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), single.name)
        self.dir = model_dir
        self._files: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CameraFormatError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        shard = self.weight_map[name]
        if shard not in self._files:
            self._files[shard] = safe_open(self.dir / shard, "pt")
        return self._files[shard].get_tensor(name)  # type: ignore[attr-defined]


def _dequantized_matrix(
    tensors: _Tensors, prefix: str, proj: int, slabs: list[int], bits: list[int], hidden: int, group_size: int
) -> torch.Tensor:
    """Dense HF-oriented weight of one projection of a ``mixed`` expert.

    gate/up ``[n, H]``, down ``[H, n]``.
    """
    from camera_kernels.packing import dequantize

    parts = []
    for n, b in zip(slabs, bits):
        if n == 0:
            continue
        k = hidden if proj in (0, 1) else n
        qweight, scales, zeros = (
            tensors.get(f"{prefix}.{names.slab_suffix(kind, b)}") for kind in names.QUANT_SUFFIXES
        )
        parts.append(dequantize(qweight, scales, zeros, b, k, group_size, torch.float32))  # W^T [k, N]
    if proj in (0, 1):
        return torch.cat([p.t() for p in parts], dim=0)  # slabs stack along the micro-expert rows
    return torch.cat([p.t() for p in parts], dim=1)  # ... and along down's columns


def _expert_state(
    tensors: _Tensors,
    camera: CameraQuantConfig,
    ckpt_prefix: str,
    proj_names: tuple[str, str, str],
    slabs: list[int],
    hidden: int,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(module-name -> dense weight, consumed checkpoint names) of one routed or shared expert."""
    state: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    specs = expert_tensors(slabs, camera.bits, hidden, camera.group_size)
    for proj in range(3):
        ckpt = f"{ckpt_prefix}.{proj_names[proj]}"
        for spec in specs[proj]:
            name = f"{ckpt}.{spec.suffix}"
            got = tuple(tensors.get(name).shape) if name in tensors else None
            if got != spec.shape:
                what = "missing" if got is None else f"shape {got}"
                raise CameraFormatError(
                    f"{name}: {what}, expected {spec.shape} from quantization_config slabs {slabs}"
                )
            consumed.add(name)
        if not specs[proj]:
            continue
        if camera.scheme == "prune":
            weight = tensors.get(f"{ckpt}.weight")
        else:
            assert camera.group_size is not None
            weight = _dequantized_matrix(tensors, ckpt, proj, slabs, camera.bits, hidden, camera.group_size)
        state[_rename(camera.architecture, f"{ckpt}.weight")] = weight
    return state, consumed


def _rename(architecture: str, name: str) -> str:
    for old, new in _RENAMES.get(architecture, ()):
        name = name.replace(old, new)
    return name


# ---------------------------------------------------------------------------------------------
# Model surgery


def _install_camera_modules(model: nn.Module, camera: CameraQuantConfig, hidden: int) -> None:
    architecture = camera.architecture
    shared_attr = names.shared_expert_module(architecture)
    layers = model.get_decoder().layers
    for index, spec in sorted(camera.layers.items()):
        block = layers[index].mlp
        old = getattr(block, "experts", None)
        if old is None:
            raise CameraFormatError(
                f"layer {index} is described in quantization_config but has no MoE block in {architecture}"
            )
        block.experts = CameraExperts(spec.expert_widths, hidden, old.act_fn, names.proj_names(architecture))
        if spec.shared_width is not None:
            shared = getattr(block, shared_attr) if shared_attr else None
            if shared is None:
                raise CameraFormatError(
                    f"layer {index}: shared_slabs given but {architecture} has no shared expert"
                )
            width = spec.shared_width
            for attr, shape in (
                ("gate_proj", (hidden, width)),
                ("up_proj", (hidden, width)),
                ("down_proj", (width, hidden)),
            ):
                if getattr(shared, attr).bias is not None:
                    raise CameraFormatError(f"layer {index}: shared expert {attr} has a bias; not supported")
                setattr(shared, attr, nn.Linear(*shape, bias=False))


def _camera_state(
    tensors: _Tensors, camera: CameraQuantConfig, hidden: int
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Dense expert weights under module names, and every checkpoint name they came from."""
    architecture = camera.architecture
    state: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    proj = names.proj_names(architecture)
    for index, spec in sorted(camera.layers.items()):
        for e, slabs in enumerate(spec.expert_slabs):
            s, c = _expert_state(
                tensors, camera, names.expert_prefix(architecture, index, e), proj, slabs, hidden
            )
            state.update(s)
            consumed |= c
        if spec.shared_slabs is not None:
            s, c = _expert_state(
                tensors,
                camera,
                names.shared_prefix(architecture, index),
                ("gate_proj", "up_proj", "down_proj"),
                spec.shared_slabs,
                hidden,
            )
            state.update(s)
            consumed |= c
    # Tensors under a described expert that the config does not account for (e.g. a
    # stored width-0 expert or a stray slab) are errors, not silently ignored.
    expert_prefixes = tuple(f"{names.moe_prefix(architecture, i)}.experts." for i in camera.layers) + tuple(
        f"{names.shared_prefix(architecture, i)}."
        for i, sp in camera.layers.items()
        if sp.shared_slabs is not None
    )
    stray = sorted(n for n in tensors.weight_map if n.startswith(expert_prefixes) and n not in consumed)
    if stray:
        raise CameraFormatError(
            f"{len(stray)} expert tensor(s) not described by quantization_config, e.g. {stray[:4]}"
        )
    return state, consumed


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - tied)
    if unexpected or missing:
        raise CameraFormatError(
            f"checkpoint does not match {type(model).__name__}: missing {missing[:6]} "
            f"({len(missing)}), unexpected {unexpected[:6]} ({len(unexpected)})"
        )
    for name, tensor in state.items():
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise CameraFormatError(
                f"{name}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(own[name].shape)}"
            )
    model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()


def _all_names(tensors: _Tensors) -> Iterable[str]:
    return sorted(tensors.weight_map)


def load(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """A transformers ``PreTrainedModel`` computing exactly what the CAMERA checkpoint at ``model_dir`` means.

    A directory without a ``quantization_config`` is loaded with plain
    ``AutoModelForCausalLM.from_pretrained``.  Raises :class:`CameraFormatError` when
    the stored tensors and the config disagree (names, shapes, missing or extra tensors).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / names.CONFIG_FILE).read_text())
    if not raw.get("quantization_config"):
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    camera = CameraQuantConfig.from_json_dict(
        raw["quantization_config"], source=f"{model_dir}/config.json quantization_config"
    )
    arch = moe_arch_from_config(raw)
    if camera.architecture != arch.architecture:
        raise CameraFormatError(
            f"quantization_config.architecture {camera.architecture!r} != config.json's {arch.architecture!r}"
        )

    config = AutoConfig.from_pretrained(model_dir)
    # transformers does not know quant_method 'camera'; the experts are rebuilt below instead.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _install_camera_modules(model, camera, arch.hidden_size)

    tensors = _Tensors(model_dir)
    state, consumed = _camera_state(tensors, camera, arch.hidden_size)
    for name in _all_names(tensors):
        if name not in consumed:
            state[_rename(arch.architecture, name)] = tensors.get(name)
    _load_strict(model, state)
    return model.to(device).eval()
