"""The transformers reference (``camera_vllm.reference``) checked independently of vLLM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from integration_helpers import prune_checkpoint, quant_config, write_zero_padded

from camera_kernels.packing import pack
from camera_vllm import reference
from camera_vllm.arch import moe_arch_from_config
from camera_vllm.compress.writer import CheckpointWriter
from camera_vllm.format import names
from camera_vllm.format.schema import CameraFormatError, CameraQuantConfig, LayerSpec
from camera_vllm.testing.tiny_models import ARCHITECTURES

IDS = torch.randint(5, 300, (2, 11), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_unpruned_reference_equals_transformers(arch: str, checkpoints, ckpt_root: Path) -> None:
    """Ratio 0 keeps everything: CameraExperts must reproduce transformers' own experts."""
    from transformers import AutoModelForCausalLM

    original, _ = checkpoints(arch)
    full = prune_checkpoint(original, ckpt_root / f"{arch}-p0", 0.0, zero_expert=None, shared_forced=0)
    qc = quant_config(full)
    assert all(
        sum(s) == qc["original_intermediate_size"]
        for spec in qc["layers"].values()
        for s in spec["expert_slabs"]
    )
    ours = reference.load(full)
    assert any(isinstance(m, reference.CameraExperts) for m in ours.modules())
    theirs = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    a, b = _logits(ours), _logits(theirs)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pruned_reference_equals_zero_padded_transformers(arch: str, checkpoints, tmp_path: Path) -> None:
    """A CAMERA-P checkpoint means the original model with the pruned micro-experts zeroed."""
    from transformers import AutoModelForCausalLM

    _, pruned = checkpoints(arch)
    padded = write_zero_padded(pruned, tmp_path / "padded")
    theirs = AutoModelForCausalLM.from_pretrained(padded, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(reference.load(pruned)), _logits(theirs), rtol=1e-5, atol=1e-5)


def test_pruned_reference_has_ragged_experts(checkpoints) -> None:
    _, pruned = checkpoints("qwen2_moe")
    model = reference.load(pruned)
    qc = quant_config(pruned)
    for layer, spec in qc["layers"].items():
        block = model.model.layers[int(layer)].mlp
        assert [e.width for e in block.experts] == [sum(s) for s in spec["expert_slabs"]]
        assert block.shared_expert.gate_proj.weight.shape == (sum(spec["shared_slabs"]), 64)
        assert block.shared_expert.down_proj.weight.shape == (64, sum(spec["shared_slabs"]))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_reference_rejects_width_mismatch(checkpoints, tmp_path: Path) -> None:
    _, pruned = checkpoints("qwen3_moe")
    bad = _copy(pruned, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["layers"]["1"]["expert_slabs"][0][0] -= 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CameraFormatError, match=r"model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight: shape"
    ):
        reference.load(bad)


def test_reference_rejects_stored_tensor_of_width0_expert(checkpoints, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _, pruned = checkpoints("qwen3_moe")
    bad = _copy(pruned, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.mlp.experts.3.gate_proj.weight"] = torch.zeros(2, 64)
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CameraFormatError, match="not described by quantization_config"):
        reference.load(bad)


# -- scheme "mixed" ----------------------------------------------------------------------------

BITS = [8, 4]
GROUP = 32


def _rtn(w_t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric RTN of ``W^T [K, N]`` per group of ``GROUP`` rows: (codes, scales, zeros, dequantized)."""
    k = w_t.shape[0]
    codes, scales, zeros, deq = [], [], [], []
    for start in range(0, k, GROUP):
        blk = w_t[start : start + GROUP]
        lo, hi = blk.min(0).values, blk.max(0).values
        s = ((hi - lo) / (2**bits - 1)).clamp_min(1e-6).to(torch.float16)
        z = torch.round(-lo / s.float()).clamp(0, 2**bits - 1).to(torch.float16)
        q = torch.round(blk / s.float() + z.float()).clamp(0, 2**bits - 1)
        codes.append(q)
        scales.append(s)
        zeros.append(z)
        deq.append((q - z.float()) * s.float())  # the formula the format documents
    return torch.cat(codes).to(torch.int32), torch.stack(scales), torch.stack(zeros), torch.cat(deq)


def _split(width: int) -> list[int]:
    first = width // 3
    return [first, width - first]  # e.g. 13 -> [4, 9]; 0 -> [0, 0]


def _write_mixed(pruned: Path, out_mixed: Path, out_dense: Path) -> None:
    """Quantize ``pruned`` into a 'mixed' checkpoint, plus a 'prune' checkpoint of its dequantized weights.

    The expected model never goes through camera_kernels' dequantization: the dense
    weights come from the RTN arithmetic above, so the test checks slab naming, order,
    orientation and bit layout of the reference's 'mixed' loader.
    """
    from safetensors import safe_open

    cfg = json.loads((pruned / "config.json").read_text())
    camera = CameraQuantConfig.from_json_dict(cfg.pop("quantization_config"))
    arch = moe_arch_from_config(cfg)
    a = arch.architecture
    f = safe_open(pruned / "model.safetensors", "pt")
    layers = {}
    with CheckpointWriter(out_mixed) as mixed, CheckpointWriter(out_dense) as dense:
        handled = set()
        for layer, spec in camera.layers.items():
            groups = [
                (names.expert_prefix(a, layer, e), names.proj_names(a), w)
                for e, w in enumerate(spec.expert_widths)
            ]
            if spec.shared_width is not None:
                groups.append(
                    (names.shared_prefix(a, layer), ("gate_proj", "up_proj", "down_proj"), spec.shared_width)
                )
            for prefix, proj_names, width in groups:
                slabs = _split(width)
                for proj, pname in enumerate(proj_names):
                    if width == 0:
                        continue
                    name = f"{prefix}.{pname}.weight"
                    handled.add(name)
                    w = f.get_tensor(name)
                    w_t = w.t()  # gate/up: W^T [H, n]; down: W^T [n, H]
                    deq_parts, start = [], 0
                    for n, b in zip(slabs, BITS):
                        if n == 0:
                            continue
                        part = w_t[:, start : start + n] if proj < 2 else w_t[start : start + n]
                        start += n
                        q, s, z, dq = _rtn(part, b)
                        for kind, t in ((names.QWEIGHT, pack(q, b)), (names.SCALES, s), (names.ZEROS, z)):
                            mixed.add(f"{prefix}.{pname}.{names.slab_suffix(kind, b)}", t)
                        deq_parts.append(dq)
                    dq_t = torch.cat(deq_parts, dim=1 if proj < 2 else 0)
                    dense.add(name, dq_t.t().contiguous())
            layers[layer] = LayerSpec(
                expert_slabs=[_split(w) for w in spec.expert_widths],
                shared_slabs=None if spec.shared_width is None else _split(spec.shared_width),
            )
        for name in sorted(set(f.keys()) - handled):
            mixed.add(name, f.get_tensor(name))
            dense.add(name, f.get_tensor(name))
        mixed_cfg = camera.model_copy(
            update={"scheme": "mixed", "bits": BITS, "group_size": GROUP, "layers": layers}
        )
        mixed.commit(
            source_dir=pruned,
            config=cfg,
            quant_config=CameraQuantConfig.model_validate(mixed_cfg.model_dump()),
        )
        dense.commit(source_dir=pruned, config=cfg, quant_config=camera)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_mixed_reference_equals_dense_dequantized(arch: str, checkpoints, tmp_path: Path) -> None:
    _, pruned = checkpoints(arch)
    _write_mixed(pruned, tmp_path / "mixed", tmp_path / "dense")
    qc = quant_config(tmp_path / "mixed")
    assert qc["scheme"] == "mixed" and any(s[0] > 0 and s[1] > 0 for s in qc["layers"]["1"]["expert_slabs"])
    mixed, dense = reference.load(tmp_path / "mixed"), reference.load(tmp_path / "dense")
    torch.testing.assert_close(_logits(mixed), _logits(dense), rtol=1e-5, atol=1e-5)
    # ... and the quantization is not a no-op (RTN at 4 bits moves the logits).
    assert not torch.allclose(_logits(mixed), _logits(reference.load(pruned)), atol=1e-4)
