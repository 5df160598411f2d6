"""Compression memory does not grow with depth: what is alive between layers is the same at 2 and 4 layers.

A structural check, cheap enough for the unit suite (peak RSS is measured by
``bench/compressor_scale.py``): at every layer boundary of a real CAMERA-P / CAMERA-Q run
(``RunProgress.record``, the streamer's ``on_layer_end``) the floating-point tensors of at
least one expert matrix's size that are alive are counted with a gc scan.  Only the hidden
states entering the next layer may be alive: no weights of a finished layer (original,
pruned or dequantized), whatever the depth; and no shard file of the source stays open.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from camera_vllm.checkpoint.source import SourceCheckpoint
from camera_vllm.compress import run as run_module
from camera_vllm.compress.calibrate import CalibSpec
from camera_vllm.compress.pipeline import run_camera_p
from camera_vllm.compress.quantize.pipeline import QuantSpec, run_camera_q
from camera_vllm.compress.run import RunOptions
from camera_vllm.testing.tiny_models import _CORPUS, build_tiny_moe

OPTIONS = RunOptions(calib=CalibSpec(num_seqs=4, seq_len=32, seed=1), device="cpu", progress=False)


def _deepen(src: Path, out: Path, layers: int) -> Path:
    """A copy of the 2-layer tiny model with ``layers`` layers (layer i has the weights of layer i % 2)."""
    out.mkdir()
    for item in src.iterdir():
        if item.suffix != ".safetensors" and item.is_file():
            (out / item.name).write_bytes(item.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    old = cfg["num_hidden_layers"]
    cfg["num_hidden_layers"] = layers
    if cfg.get("layer_types"):
        cfg["layer_types"] = [cfg["layer_types"][i % old] for i in range(layers)]
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(src / "model.safetensors"))
    deep = {}
    for name, t in tensors.items():
        if not name.startswith("model.layers."):
            deep[name] = t
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        for new in range(int(layer), layers, old):
            deep[f"model.layers.{new}.{rest}"] = t.clone()
    save_file(deep, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("depth")
    src = build_tiny_moe("qwen2_moe", root / "src", seed=3)
    return {2: src, 4: _deepen(src, root / "deep", 4)}


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text(_CORPUS * 4)
    return f


def _large_float_tensors(min_numel: int) -> int:
    gc.collect()
    return sum(
        1
        for o in gc.get_objects()
        # type(), not isinstance: the latter asks deprecated proxies for __class__ and warns.
        if issubclass(type(o), torch.Tensor) and o.is_floating_point() and o.numel() >= min_numel
    )


def _boundaries(monkeypatch, model: Path, compress) -> tuple[list[tuple[int, int, int]], list[str]]:
    """Run ``compress(model, out)``; per layer boundary (layer, large tensors alive, hidden tensors)."""
    arch = SourceCheckpoint(model).arch
    expert_numel = arch.intermediate_size * arch.hidden_size
    seen: list[tuple[int, int, int]] = []
    opened: list[str] = []
    record = run_module.RunProgress.record
    sources: list[SourceCheckpoint] = []
    streamer_run = run_module.LayerStreamer.run

    def spy_run(self, *args, **kwargs):
        sources.append(self.source)
        return streamer_run(self, *args, **kwargs)

    def spy(self, layer, hidden, energies):
        record(self, layer, hidden, energies)
        opened.extend(sources[-1].open_files)
        seen.append((layer, _large_float_tensors(expert_numel), len(hidden)))

    monkeypatch.setattr(run_module.RunProgress, "record", spy)
    monkeypatch.setattr(run_module.LayerStreamer, "run", spy_run)
    compress(model)
    assert sources[-1].open_files == [], "the source's shard files must be closed when the run ends"
    return seen, opened


@pytest.mark.parametrize("method", ["prune", "rtn"])
def test_live_tensors_do_not_grow_with_depth(method, models, calib, tmp_path, monkeypatch) -> None:
    def compress(model: Path) -> None:
        out = tmp_path / f"{model.name}-{method}"
        if method == "prune":
            run_camera_p(model, out, 0.4, [calib], options=OPTIONS)
        else:
            spec = QuantSpec(bits=(4, 2), fractions=(0.5, 0.5), group_size=32, method="rtn")
            run_camera_q(model, out, [calib], spec, options=OPTIONS)

    counts = {}
    for depth, model in models.items():
        seen, opened = _boundaries(monkeypatch, model, compress)
        assert [s[0] for s in seen] == list(range(depth))
        assert opened == [], f"shard files open between layers: {opened}"
        # Alive at every boundary: the hidden states entering the next layer, nothing else of that size.
        assert all(alive == hidden for _, alive, hidden in seen), seen
        counts[depth] = {alive for _, alive, _ in seen}
        monkeypatch.undo()
    assert counts[2] == counts[4]
