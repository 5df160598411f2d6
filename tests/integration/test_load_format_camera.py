"""``--load-format camera``: vLLM serves a zero-masked model (the CAMERA reference code's output) compactly.

The tiny Qwen2-MoE (shared expert) is masked the way the reference code prunes: in
every MoE layer some micro-experts of several routed experts have their gate row, up
row and down column zeroed, one expert is zeroed entirely, and some shared-expert
micro-experts are zeroed.  A channel with only a zero gate row is a decoy: it is not
all-zero, so it must stay.  One vLLM subprocess serves, eager and fp32:

* the masked directory (single ``model.safetensors``) with ``--load-format camera``;
* the same tensors as a sharded checkpoint (index + several files), ``--load-format camera``;
* the masked directory with a plain load (stock unquantized MoE), the memory baseline.

Greedy tokens must equal transformers on the masked model; the camera loads must keep
exactly the non-zero micro-experts, and their resident routed-expert bytes must fall
in proportion to the kept micro-experts relative to the plain load.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from integration_helpers import MAX_TOKENS, PROMPTS, vllm_env

from camera_vllm.testing.tiny_models import build_tiny_moe

ARCH = "qwen2_moe"
SCRIPT = Path(__file__).resolve().parent / "vllm_load_format_camera.py"
EMPTY_EXPERT = 3
# expert -> channels zeroed (gate row, up row, down column) in every MoE layer
MASKED_CHANNELS = {0: range(0, 40), 1: range(10, 20), 5: range(32, 64), 6: (1, 7, 9)}
SHARED_MASKED = range(0, 24)
DECOY = (2, 5)  # (expert, channel) whose gate row alone is zeroed: not all-zero, kept


def mask_checkpoint(original: Path, out: Path, *, shards: int = 1) -> tuple[Path, dict[int, list[int]]]:
    """Zero-mask ``original`` like the reference code; returns (dir, {layer: expected widths})."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(original, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = load_file(original / "model.safetensors")
    cfg = json.loads((original / "config.json").read_text())
    inter = cfg["moe_intermediate_size"]
    widths: dict[int, list[int]] = {}
    for layer in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{layer}.mlp"
        if f"{pre}.experts.0.gate_proj.weight" not in tensors:
            continue
        w = []
        for e in range(cfg["num_experts"]):
            chans = list(range(inter)) if e == EMPTY_EXPERT else list(MASKED_CHANNELS.get(e, ()))
            ep = f"{pre}.experts.{e}"
            tensors[f"{ep}.gate_proj.weight"][chans] = 0
            tensors[f"{ep}.up_proj.weight"][chans] = 0
            tensors[f"{ep}.down_proj.weight"][:, chans] = 0
            w.append(inter - len(chans))
        tensors[f"{pre}.experts.{DECOY[0]}.gate_proj.weight"][DECOY[1]] = 0
        sp = f"{pre}.shared_expert"
        tensors[f"{sp}.gate_proj.weight"][list(SHARED_MASKED)] = 0
        tensors[f"{sp}.up_proj.weight"][list(SHARED_MASKED)] = 0
        tensors[f"{sp}.down_proj.weight"][:, list(SHARED_MASKED)] = 0
        widths[layer] = w
    if shards == 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    else:
        keys = sorted(tensors)
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k].contiguous() for k in keys[i::shards]}
            save_file(part, out / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out, widths


def transformers_greedy(model_dir: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            gen = model.generate(ids, do_sample=False, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS)
            out.append(gen[0, ids.shape[1] :].tolist())
    return out


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("camera-load-format")
    original = build_tiny_moe(ARCH, root / "orig", dtype=torch.float32)
    single, widths = mask_checkpoint(original, root / "masked")
    sharded, _ = mask_checkpoint(original, root / "masked-sharded", shards=3)
    return {"root": root, "original": original, "single": single, "sharded": sharded, "widths": widths}


@pytest.fixture(scope="module")
def runs(masked: dict) -> dict[str, dict]:
    root = masked["root"]
    out, log = root / "runs.json", root / "runs.log"
    cmd = [
        sys.executable,
        str(SCRIPT),
        str(out),
        f"{masked['single']}:camera",
        f"{masked['sharded']}:camera",
        f"{masked['single']}:auto",
    ]
    env = vllm_env(ARCH)
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function (memory probe)
    start = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.run(cmd, check=False, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=900)
    results = json.loads(out.read_text()) if out.exists() else []
    if proc.returncode != 0 or len(results) != 3:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        pytest.fail(f"vLLM subprocess failed (exit {proc.returncode}); log {log}:\n{tail}")
    print(f"vLLM subprocess: {time.perf_counter() - start:.1f} s")
    return {"single": results[0], "sharded": results[1], "plain": results[2]}


def test_detect_keeps_sees_the_mask(masked: dict) -> None:
    from camera_vllm.compress.convert import detect_keeps
    from camera_vllm.compress.source import SourceCheckpoint

    for key in ("single", "sharded"):
        keeps = detect_keeps(SourceCheckpoint(masked[key]))
        assert {layer: k.widths for layer, k in keeps.items()} == masked["widths"]


@pytest.mark.vllm
@pytest.mark.parametrize("variant", ["single", "sharded"])
def test_greedy_equals_transformers_on_masked(variant: str, masked: dict, runs: dict) -> None:
    want = transformers_greedy(masked["single"])
    got = runs[variant]
    assert got["tokens"] == runs["plain"]["tokens"]  # stock vLLM on the masked model agrees too
    for prompt, g, w in zip(PROMPTS, got["tokens"], want):
        assert g == w, f"{variant}: --load-format camera diverges from transformers on {prompt!r}:\n vllm {g}\n hf   {w}"
    # guard against vacuity: masking changed the model
    assert transformers_greedy(masked["original"]) != want


@pytest.mark.vllm
@pytest.mark.parametrize("variant", ["single", "sharded"])
def test_resident_expert_bytes_drop_with_the_mask(variant: str, masked: dict, runs: dict) -> None:
    got, plain = runs[variant], runs["plain"]
    assert got["memory"]["methods"] == ["CameraPruneMoEMethod"]
    assert plain["memory"]["methods"] == ["UnquantizedFusedMoEMethod"]
    stats = got["loader_stats"]
    assert stats is not None
    assert stats["widths"] == {str(k): v for k, v in masked["widths"].items()}
    assert stats["empty_experts"] == len(masked["widths"])  # one per MoE layer
    kept, total = stats["routed_channels_kept"], stats["routed_channels_total"]
    assert kept == sum(sum(w) for w in masked["widths"].values()) and kept < total
    ratio = got["memory"]["routed_bytes"] / plain["memory"]["routed_bytes"]
    assert abs(ratio - kept / total) < 0.02, (ratio, kept / total, got["memory"], plain["memory"])
    assert stats["shared_channels_kept"] == stats["shared_channels_total"] - len(SHARED_MASKED) * len(masked["widths"])
