"""validate(): a good checkpoint passes; each kind of damage is caught and named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from camera_vllm.checkpoint.source import SourceCheckpoint
from camera_vllm.compress.prune import select_keep, write_pruned_checkpoint
from camera_vllm.format import names
from camera_vllm.format.inspect import format_summary, summarize
from camera_vllm.format.layout import expert_tensors
from camera_vllm.format.safetensors_header import read_safetensors_header
from camera_vllm.format.validate import validate
from camera_vllm.testing.tiny_models import build_tiny_moe

ARCH = "Qwen2MoeForCausalLM"
EXPERT0_GATE = names.expert_tensor(ARCH, 0, 0, 0, "weight")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    """A CAMERA-P checkpoint of a tiny Qwen2-MoE (random scores: validation does not care)."""
    root = tmp_path_factory.mktemp("val")
    src = SourceCheckpoint(build_tiny_moe("qwen2_moe", root / "src", seed=5))
    g = torch.Generator().manual_seed(0)
    keeps = {}
    for layer in src.arch.moe_layers:
        scores = [torch.rand(64, generator=g) for _ in range(8)]
        scores[5] *= 1e-6  # expert 5 loses every channel: width 0 stores nothing
        keeps[layer] = select_keep(scores, 0.4, shared_scores=torch.rand(96, generator=g))
    return write_pruned_checkpoint(src, root / "pruned", keeps)


@pytest.fixture()
def ckpt(pruned: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pruned, tmp_path / "ckpt"))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(ckpt: Path, change) -> None:
    f = ckpt / "model.safetensors"
    tensors = _tensors(f)
    change(tensors)
    save_file(tensors, str(f))


def _errors(ckpt: Path, **kw) -> str:
    report = validate(ckpt, **kw)
    assert not report.ok
    return "\n".join(report.errors)


def test_good_checkpoint_passes_and_summarizes(ckpt: Path) -> None:
    report = validate(ckpt)
    assert report.ok, str(report)
    assert report.tensors_checked > 0
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    widths = [w for [w] in qc["layers"]["0"]["expert_slabs"]]
    assert widths[5] == 0
    assert (
        report.tensors_checked
        == sum(3 for layer in qc["layers"].values() for [w] in layer["expert_slabs"] if w) + 6
    )
    s = summarize(ckpt)
    (layer,) = [info for info in s["layers"] if info["layer"] == 0]
    assert layer["expert_widths"] == widths and layer["empty_experts"] == 1
    assert layer["stored_bytes"] == 4 * 3 * 64 * (sum(widths) + layer["shared_width"])  # fp32 weights
    assert "Qwen2MoeForCausalLM" in format_summary(s)
    # inspect and /camera/stats are one computation: the server's payload is the same dict.
    from camera_vllm.format.summary import summarize_camera_config

    served = summarize_camera_config(json.loads((ckpt / "config.json").read_text()), experts=True)
    assert {k: v for k, v in s.items() if k in served} == served
    assert s["totals"]["stored_bytes"] == sum(info["stored_bytes"] for info in s["layers"])


def test_missing_tensor(ckpt: Path) -> None:
    _rewrite(ckpt, lambda t: t.pop(EXPERT0_GATE))
    assert f"tensor {EXPERT0_GATE}: missing" in _errors(ckpt)


def test_wrong_shape_and_dtype(ckpt: Path) -> None:
    def change(t):
        t[EXPERT0_GATE] = t[EXPERT0_GATE][:-1].contiguous()
        up = names.expert_tensor(ARCH, 1, 2, 1, "weight")
        t[up] = t[up].to(torch.bfloat16)

    _rewrite(ckpt, change)
    errors = _errors(ckpt)
    assert f"model.safetensors: tensor {EXPERT0_GATE} has shape" in errors and "expected" in errors
    assert f"tensor {names.expert_tensor(ARCH, 1, 2, 1, 'weight')} has dtype BF16, expected F32" in errors


def test_nan_and_inf(ckpt: Path) -> None:
    def change(t):
        t[EXPERT0_GATE][0, 0] = float("nan")
        t["model.norm.weight"][3] = float("inf")

    _rewrite(ckpt, change)
    errors = _errors(ckpt)
    assert f"model.safetensors: tensor {EXPERT0_GATE} has 1 NaN/inf value(s)" in errors
    assert "tensor model.norm.weight has 1 NaN/inf" in errors
    assert validate(ckpt, check_values=False).ok


def test_truncated_file(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    errors = _errors(ckpt)
    assert "model.safetensors: truncated safetensors file" in errors
    with pytest.raises(ValueError, match="model.safetensors: truncated"):
        read_safetensors_header(f)
    f.write_bytes(data[:5])
    assert "model.safetensors: truncated safetensors file" in _errors(ckpt)


def test_incomplete_marker(ckpt: Path) -> None:
    (ckpt / names.INCOMPLETE_MARKER).write_text("")
    assert f"{names.INCOMPLETE_MARKER}: present" in _errors(ckpt)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda qc: qc.update(format_version=2), "unknown CAMERA format_version 2"),
        (lambda qc: qc.update(quant_method="gptq"), "quant_method"),
        (lambda qc: qc.update(num_experts=4), "expert_slabs lists 8 experts, num_experts is 4"),
        (lambda qc: qc["layers"].pop("1"), "lacks MoE layers [1]"),
        (lambda qc: qc.update(original_intermediate_size=80), "original_intermediate_size 80"),
    ],
)
def test_bad_quantization_config(ckpt: Path, change, message: str) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    change(cfg["quantization_config"])
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert message in _errors(ckpt, check_values=False)


def test_missing_or_broken_config(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in _errors(ckpt)
    (ckpt / "config.json").unlink()
    assert "config.json: missing" in _errors(ckpt)
    cfg_free = ckpt.parent / "plain"
    shutil.copytree(ckpt, cfg_free)
    (cfg_free / "config.json").write_text(json.dumps({"architectures": [ARCH]}))
    assert "no quantization_config" in _errors(cfg_free)


def test_unexpected_expert_tensor(ckpt: Path) -> None:
    extra = names.expert_tensor(ARCH, 0, 5, 0, "weight")  # expert 5 has width 0

    def change(t):
        t[extra] = torch.zeros(3, 64)
        t[names.expert_tensor(ARCH, 1, 0, 0, "bias")] = torch.zeros(3)

    _rewrite(ckpt, change)
    errors = _errors(ckpt)
    assert f"unexpected expert tensor {extra}" in errors
    assert f"unexpected expert tensor {names.expert_tensor(ARCH, 1, 0, 0, 'bias')}" in errors


def test_sharded_index_consistency(ckpt: Path) -> None:
    tensors = _tensors(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    keys = sorted(tensors)
    half = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for fname, ks in half.items():
        save_file({k: tensors[k] for k in ks}, str(ckpt / fname))
        weight_map.update({k: fname for k in ks})
    index = ckpt / names.INDEX_FILE
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert validate(ckpt).ok
    moved = keys[0]
    bad = dict(weight_map)
    bad[moved] = "model-00002-of-00002.safetensors"
    bad["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps({"weight_map": bad}))
    errors = _errors(ckpt, check_values=False)
    assert f"model-00001-of-00002.safetensors: tensor {moved} is indexed under model-00002-of-00002" in errors
    assert "tensor ghost.weight listed in model.safetensors.index.json is not in the file" in errors
    index.write_text(json.dumps({"weight_map": dict(weight_map, x="model-00003-of-00003.safetensors")}))
    assert "model-00003-of-00003.safetensors: listed in model.safetensors.index.json but missing" in _errors(
        ckpt
    )
    index.unlink()
    assert "2 safetensors files but no model.safetensors.index.json" in _errors(ckpt)


def test_mixed_precision_layout(tmp_path: Path) -> None:
    """A synthetic CAMERA-Q checkpoint built from layout.expert_tensors validates; damage is named."""
    hidden, bits, gs = 64, [4, 2], 32
    slabs = [[8, 20], [0, 0], [33, 1]]
    qc = {
        "quant_method": "camera",
        "format_version": 1,
        "scheme": "mixed",
        "bits": bits,
        "group_size": gs,
        "architecture": "Qwen3MoeForCausalLM",
        "num_experts": 3,
        "original_intermediate_size": 64,
        "layers": {"0": {"expert_slabs": slabs}},
    }
    cfg = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "num_hidden_layers": 1,
        "hidden_size": hidden,
        "vocab_size": 10,
        "num_experts": 3,
        "num_experts_per_tok": 1,
        "moe_intermediate_size": 64,
        "dtype": "float32",
        "quantization_config": qc,
    }
    tensors = {}
    for e, s in enumerate(slabs):
        for proj, specs in expert_tensors(s, bits, hidden, gs).items():
            for t in specs:
                dtype = torch.int32 if t.dtype == "int32" else torch.float16
                fill = torch.ones if t.suffix.startswith(names.SCALES) else torch.zeros  # scales must be > 0
                tensors[names.expert_tensor("Qwen3MoeForCausalLM", 0, e, proj, t.suffix)] = fill(
                    t.shape, dtype=dtype
                )
    # The non-expert tensors validate() also requires: embedding, final norm, LM head, router.
    tensors["model.embed_tokens.weight"] = torch.zeros(10, hidden)
    tensors["lm_head.weight"] = torch.zeros(10, hidden)
    tensors["model.norm.weight"] = torch.ones(hidden)
    tensors["model.layers.0.mlp.gate.weight"] = torch.zeros(3, hidden)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    report = validate(tmp_path)
    assert report.ok, str(report)
    assert report.tensors_checked == 2 * 2 * 3 * 3  # experts 0 and 2: 2 slabs x 3 projections x 3 tensors
    s = summarize(tmp_path)
    assert s["layers"][0]["layer"] == 0 and s["layers"][0]["micro_experts_by_bits"] == {"4": 41, "2": 21}
    scales = names.expert_tensor("Qwen3MoeForCausalLM", 0, 2, 2, "scales_b2")
    tensors.pop(scales)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert f"tensor {scales}: missing" in _errors(tmp_path)


def _cache_snapshot(cache: Path, repo: str, files: list[Path]) -> Path:
    """A Hugging Face hub cache entry for ``repo`` holding only ``files`` (what a partial download leaves)."""
    commit = "0" * 40
    entry = cache / f"models--{repo.replace('/', '--')}"
    snap = entry / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / "main").write_text(commit)
    for f in files:
        shutil.copy(f, snap / f.name)
    return snap


def test_first_start_from_a_hub_checks_the_config_then_the_weights(
    pruned: Path, tmp_path: Path, monkeypatch
) -> None:
    """vLLM builds its config (and calls the plugin's check) after fetching config.json, before the
    weights: that state passes; a config that contradicts the model still fails; once the weights are
    there, the full check runs (a damaged tensor is refused)."""
    from camera_vllm.format.schema import CameraFormatError
    from camera_vllm.vllm_plugin.serving_guard import validate_for_serving

    cache = tmp_path / "hub"
    # huggingface_hub reads its environment at import: point its constant at the emulated cache.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    snap = _cache_snapshot(cache, "org/tiny-camera", [pruned / names.CONFIG_FILE])
    report = validate_for_serving("org/tiny-camera")
    assert report is not None and report.ok, report

    cfg = json.loads((snap / names.CONFIG_FILE).read_text())
    cfg["quantization_config"]["num_experts"] += 1
    (snap / names.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(CameraFormatError, match="num_experts"):
        validate_for_serving("org/tiny-camera")
    shutil.copy(pruned / names.CONFIG_FILE, snap / names.CONFIG_FILE)

    weights = sorted(pruned.glob("*.safetensors"))
    _cache_snapshot(cache, "org/tiny-camera", weights)
    assert validate_for_serving("org/tiny-camera").ok
    tensors = {k: v for k, v in _read_all(snap / weights[0].name).items() if k != EXPERT0_GATE}
    save_file(tensors, str(snap / weights[0].name))
    with pytest.raises(CameraFormatError, match="refusing to serve"):
        validate_for_serving("org/tiny-camera")


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_an_incomplete_hub_snapshot_is_still_checked(pruned: Path, tmp_path: Path, monkeypatch) -> None:
    """huggingface_hub calls a cached snapshot incomplete when its tree listing names files the cache
    lacks (a README image, .bin copies): the files that are there are validated, not skipped."""
    import huggingface_hub
    from huggingface_hub.errors import IncompleteSnapshotError

    from camera_vllm.format.schema import CameraFormatError
    from camera_vllm.vllm_plugin.serving_guard import validate_for_serving

    snap = tmp_path / "snapshot"
    shutil.copytree(pruned, snap)

    def incomplete(*args, **kwargs):
        raise IncompleteSnapshotError("1 file(s) are missing (README.png)", snapshot_path=str(snap))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", incomplete)
    assert validate_for_serving("org/tiny-camera").ok
    weights = next(snap.glob("*.safetensors"))
    tensors = {k: v for k, v in _read_all(weights).items() if k != EXPERT0_GATE}
    save_file(tensors, str(weights))
    with pytest.raises(CameraFormatError, match="refusing to serve"):
        validate_for_serving("org/tiny-camera")
