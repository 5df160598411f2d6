"""``--load-format camera`` and ``camera-vllm convert`` serve zero-masked models exactly.

This holds for all five architectures.

Every tiny model is masked the way the CAMERA reference code prunes, in transformers'
own fp32 weights: in each MoE layer one routed expert loses every channel, others lose
ragged sets of channels (gate row, up row and down column zeroed), the shared experts
(Qwen2-MoE, DeepSeek-V2) lose some channels, and two decoy channels are zero in only
part of their vectors (a gate row alone; an up row and a down column): they are not
all-zero and must be kept.  The masks differ from layer to layer.

The masked model is saved in the layouts transformers 5 produces, spread over the
architectures so that each reaches vLLM once:

=============  ===============================================  ==============================
arch           ``--load-format camera`` reads                   ``camera-vllm convert`` reads
=============  ===============================================  ==============================
qwen3_moe      per-expert, one file; **torch.compile** mode      the per-expert directory
qwen2_moe      per-expert, sharded (index + several files)       ``torch.save(state_dict)`` .pt
mixtral        fused (``save_original_format=False``: ``mlp``)   the fused directory
olmoe          fused, transposed ([E, H, 2I], [E, I, H])         the fused directory
deepseek_v2    per-expert, one file                              ``torch.save(state_dict)`` .pt
=============  ===============================================  ==============================

Without an engine, the loader's compaction of *every* layout of every architecture is
checked tensor for tensor against the converter's output.

One subprocess runs all engines one after another (see ``vllm_driver.py``):
the torch.compile one spawned as ``vllm serve`` runs it, the others in-process.  Greedy
tokens must equal transformers on the masked model (fp32), and the resident
routed-expert bytes (shared experts: the bytes loaded) must fall in proportion to the
micro-experts kept.  DeepSeek-V2 is the exception for the oracle: on
this CPU build stock vLLM's DeepSeek-V2 differs from transformers even unmasked (see
``test_vllm_greedy.py``), so there the oracle is stock vLLM serving the masked model
itself, which is exactly the zero-padded dense equivalent, one sequence at a time.

``--quantization camera`` together with ``--load-format camera`` is refused while vLLM
builds its config, before any engine starts.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from integration_helpers import MAX_TOKENS, PROMPTS, run_engines, vllm_env
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from camera_vllm.arch import MoEArch, moe_arch_from_config
from camera_vllm.checkpoint.source import SourceCheckpoint
from camera_vllm.checkpoint.zero_mask import detect_keeps
from camera_vllm.compress.convert import convert_zero_masked
from camera_vllm.format import names
from camera_vllm.testing.tiny_models import ARCHITECTURES, build_tiny_moe

STOCK_VLLM_ORACLE = {"deepseek_v2"}
COMPILED = "qwen3_moe"
# arch -> (layout the loader serves, layout the converter reads)
PLAN = {
    "qwen3_moe": ("per_expert", "per_expert"),
    "qwen2_moe": ("sharded", "pt"),
    "mixtral": ("fused", "fused"),
    "olmoe": ("transposed", "fused"),
    "deepseek_v2": ("per_expert", "pt"),
}
LAYOUTS = ("per_expert", "sharded", "fused", "transposed")


def channel_masks(arch: MoEArch, j: int) -> dict[int, list[int]]:
    """Expert -> channels zeroed entirely in the ``j``-th MoE layer (rotated per layer)."""
    n, i = arch.num_experts, arch.intermediate_size
    return {
        (3 + j) % n: list(range(i)),  # the whole expert
        (0 + j) % n: list(range(5 * i // 8)),
        (1 + j) % n: list(range(i // 8, i // 4)),
        (5 + j) % n: list(range(i // 2, i)),
        (6 + j) % n: [1, 7, 9],
    }


def mask_model(model: torch.nn.Module) -> tuple[dict[int, list[int]], dict[int, int]]:
    """Zero-mask ``model`` (transformers, fused in memory) in place.

    Returns (expected widths, shared widths).
    """
    arch = moe_arch_from_config(model.config.to_dict())
    inter, widths, shared_widths = arch.intermediate_size, {}, {}
    with torch.no_grad():
        for j, layer in enumerate(arch.moe_layers):
            mlp = model.model.layers[layer].mlp
            gate_up, down = mlp.experts.gate_up_proj, mlp.experts.down_proj  # [E, 2I, H], [E, H, I]
            w = [inter] * arch.num_experts
            for e, chans in channel_masks(arch, j).items():
                gate_up[e, chans] = 0
                gate_up[e, [inter + c for c in chans]] = 0
                down[e][:, chans] = 0
                w[e] = inter - len(chans)
            gate_up[(2 + j) % arch.num_experts, 5] = 0  # decoy: gate row only
            up_decoy = (4 + j) % arch.num_experts  # decoy: up row and down column
            gate_up[up_decoy, inter + 3] = 0
            down[up_decoy][:, 3] = 0
            widths[layer] = w
            if arch.has_shared_expert:
                shared = getattr(mlp, names.shared_expert_module(arch.architecture))
                cut = list(range(j, arch.shared_intermediate_size // 4 + j))
                shared.gate_proj.weight[cut] = 0
                shared.up_proj.weight[cut] = 0
                shared.down_proj.weight[:, cut] = 0
                shared.gate_proj.weight[arch.shared_intermediate_size - 1] = 0  # decoy: gate row only
                shared_widths[layer] = arch.shared_intermediate_size - len(cut)
    return widths, shared_widths


def _with_side_files(original: Path, out: Path) -> Path:
    for f in original.iterdir():
        if (
            f.is_file()
            and not f.name.endswith((".safetensors", ".index.json"))
            and not (out / f.name).exists()
        ):
            shutil.copy(f, out / f.name)
    return out


def _transposed(fused_dir: Path, out: Path) -> Path:
    shutil.copytree(fused_dir, out)
    tensors = load_file(out / "model.safetensors")
    for k in list(tensors):
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[k] = tensors[k].transpose(1, 2).contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def transformers_greedy(model: torch.nn.Module, model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            gen = model.generate(ids, do_sample=False, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS)
            out.append(gen[0, ids.shape[1] :].tolist())
    return out


def build_masked(arch: str, root: Path) -> dict[str, Any]:
    """Every layout of the masked tiny ``arch`` model, its expected widths and transformers' greedy tokens."""
    from transformers import AutoModelForCausalLM

    original = build_tiny_moe(arch, root / "orig", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    original_tokens = transformers_greedy(model, original)
    widths, shared_widths = mask_model(model)
    d = {"arch": arch, "original": original, "widths": widths, "shared_widths": shared_widths}
    for key, kwargs in (
        ("per_expert", {}),
        ("sharded", {"max_shard_size": "150KB"}),
        ("fused", {"save_original_format": False}),
    ):
        model.save_pretrained(root / key, **kwargs)
        d[key] = _with_side_files(original, root / key)
    d["transposed"] = _transposed(d["fused"], root / "transposed")
    d["pt"] = root / "prune_model_dict.pt"
    torch.save(model.state_dict(), d["pt"])
    # transformers reads back what it wrote: the oracle is the masked model as saved.
    reread = AutoModelForCausalLM.from_pretrained(d["per_expert"], dtype=torch.float32).eval()
    d["hf_tokens"] = transformers_greedy(reread, d["per_expert"])
    d["original_tokens"] = original_tokens
    loader_layout, convert_layout = PLAN[arch]
    d["served"] = d[loader_layout]
    if convert_layout == "pt":
        d["converted"] = convert_zero_masked(original, root / "converted", state_dict_path=d["pt"])
    else:
        d["converted"] = convert_zero_masked(d[convert_layout], root / "converted")
    return d


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("camera-load-format")
    return {arch: build_masked(arch, root / arch) for arch in ARCHITECTURES}


def _manifest(masked: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    runs = []
    for arch, d in masked.items():
        seqs = 1 if arch in STOCK_VLLM_ORACLE else 4
        common = {"max_num_seqs": seqs, "quantization": None}
        loader = {
            "id": f"{arch}/loader",
            "model": str(d["served"]),
            "load_format": "camera",
            "eager": arch != COMPILED,
        }
        if arch == COMPILED:  # runs as `vllm serve` runs it: spawned engine core and worker (first)
            runs.insert(0, {**loader, **common, "spawn": True})
        else:
            runs.append({**loader, **common})
        runs.append(
            {
                "id": f"{arch}/convert",
                "model": str(d["converted"]),
                "load_format": "auto",
                "eager": True,
                **common,
            }
        )
        if arch == COMPILED:  # a CAMERA checkpoint under --load-format camera is loaded as it is
            runs.append(
                {
                    "id": f"{arch}/convert-camera",
                    "model": str(d["converted"]),
                    "load_format": "camera",
                    "eager": True,
                    **common,
                }
            )
        if (
            arch in STOCK_VLLM_ORACLE or arch == "qwen2_moe"
        ):  # oracle / memory baseline: stock vLLM, masked model
            runs.append(
                {
                    "id": f"{arch}/stock",
                    "model": str(d["per_expert"]),
                    "load_format": "auto",
                    "eager": True,
                    **common,
                }
            )
    runs.append(
        {
            "id": "both-flags",
            "model": str(masked["qwen3_moe"]["per_expert"]),
            "load_format": "camera",
            "quantization": "camera",
            "eager": True,
            "max_num_seqs": 4,
        }
    )
    return runs


def _engine(entry: dict[str, Any]) -> dict[str, Any]:
    """A :func:`_manifest` entry as ``vllm_driver.py`` runs it: in-process unless spawned, errors
    recorded, with the worker's pid, routed-expert memory and the loader's own summary."""
    return {
        "id": entry["id"],
        "model": entry["model"],
        "in_process": not entry.get("spawn"),
        "engine": {
            "load_format": entry["load_format"],
            "quantization": entry.get("quantization"),
            "enforce_eager": entry["eager"],
            "max_num_seqs": entry["max_num_seqs"],
        },
        "probes": {"engine_pid": "pid", "memory": "moe_memory"},
        "loader_stats": True,
        "capture_errors": True,
    }


@pytest.fixture(scope="module")
def runs(
    masked: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory, vllm_cache_root: Path
) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("camera-load-format-runs")
    entries = [_engine(e) for e in _manifest(masked)]
    env = vllm_env("deepseek_v2")  # VLLM_MLA_DISABLE=1 for the DeepSeek engines; no effect on the others
    # The session's cache: model-class inspections (a ~30 s subprocess per architecture) are
    # shared with the other vLLM tests; the compiled engine still compiles.
    env["VLLM_CACHE_ROOT"] = str(vllm_cache_root)
    env["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    start = time.perf_counter()
    out = run_engines(entries, root, "runs", env, 1200, "vLLM subprocess")
    print(f"vLLM subprocess: {time.perf_counter() - start:.1f} s for {len(entries)} engines")
    return {"driver_pid": out["driver_pid"], **out["runs"]}


# -- no engine ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_masking_changes_the_model(arch: str, masked: dict) -> None:
    """Guards the serving tests against vacuity."""
    assert masked[arch]["hf_tokens"] != masked[arch]["original_tokens"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_detect_keeps_sees_the_mask_in_every_layout(arch: str, masked: dict) -> None:
    d = masked[arch]
    assert len(list(d["sharded"].glob("*.safetensors"))) > 1 and (d["sharded"] / names.INDEX_FILE).is_file()
    for layout in LAYOUTS:
        keeps = detect_keeps(SourceCheckpoint(d[layout]))
        assert {layer: k.widths for layer, k in keeps.items()} == d["widths"], layout
        if d["shared_widths"]:
            assert {layer: int(k.shared.numel()) for layer, k in keeps.items()} == d["shared_widths"], layout


def _stored_tensors(model_dir: Path):
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                yield name, fh.get_tensor(name)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loader_compaction_equals_the_converter_in_every_layout(arch: str, masked: dict) -> None:
    """What ``--load-format camera`` feeds vLLM's model equals ``camera-vllm convert``'s checkpoint.

    Tensor for tensor.
    """
    from vllm.config import LoadConfig

    from camera_vllm.vllm_plugin.loader import CameraZeroMaskLoader

    d = masked[arch]
    want = load_file(d["converted"] / "model.safetensors")
    want_layers = json.loads((d["converted"] / "config.json").read_text())["quantization_config"]["layers"]
    for layout in LAYOUTS:
        loader = CameraZeroMaskLoader(LoadConfig(load_format="camera"))
        qcfg = loader.plan(d[layout])
        got = dict(loader._compact(_stored_tensors(d[layout])))
        assert set(got) == set(want), f"{layout}: names differ: {sorted(set(got) ^ set(want))[:6]}"
        for name, t in want.items():
            torch.testing.assert_close(got[name], t, rtol=0, atol=0, msg=f"{layout}: {name}")
        assert qcfg.to_json_dict()["layers"] == want_layers, layout
        assert loader.stats["fused_layers"] == (
            [] if layout in ("per_expert", "sharded") else list(d["widths"])
        )


def test_another_quantization_with_load_format_camera_is_refused(masked: dict) -> None:
    """E.g. an online ``--quantization fp8``: the loader names both flags and says what to do."""
    from types import SimpleNamespace

    from vllm.config import LoadConfig

    from camera_vllm.vllm_plugin.loader import CameraZeroMaskLoader

    model_dir = str(masked["qwen3_moe"]["per_expert"])
    model_config = SimpleNamespace(hf_config=SimpleNamespace(), quantization="fp8", model=model_dir)
    vllm_config = SimpleNamespace(quant_config=object())
    with pytest.raises(
        ValueError,
        match=r"--load-format camera cannot be combined with --quantization fp8.*drop --quantization",
    ):
        CameraZeroMaskLoader(LoadConfig(load_format="camera")).load_model(vllm_config, model_config)


# -- vLLM -------------------------------------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.parametrize("kind", ["loader", "convert"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_equals_the_masked_model(arch: str, kind: str, masked: dict, runs: dict) -> None:
    d, got = masked[arch], runs[f"{arch}/{kind}"]
    assert "error" not in got, got.get("traceback")
    spawned = arch == COMPILED and kind == "loader"
    assert (got["engine_pid"] != runs["driver_pid"]) == spawned, "engine ran in the wrong process"
    # The loader installs the CAMERA config in the worker; a spawned worker's API process keeps its own.
    assert got["memory"]["quantization"] == "camera"
    assert got["quantization"] == (None if spawned else "camera")
    assert (got["compilation_mode"] == "0") == (arch != COMPILED or kind == "convert"), got[
        "compilation_mode"
    ]
    if arch in STOCK_VLLM_ORACLE:
        stock = runs[f"{arch}/stock"]
        assert stock["quantization"] is None and stock["memory"]["methods"] == ["UnquantizedFusedMoEMethod"]
        want, oracle = stock["tokens"], "stock vLLM on the masked model"
    else:
        want, oracle = d["hf_tokens"], "transformers on the masked model"
    for prompt, g, w in zip(PROMPTS, got["tokens"], want):
        assert g == w, f"{arch} {kind}: vLLM diverges from {oracle} on {prompt!r}:\n vllm   {g}\n oracle {w}"


@pytest.mark.vllm
def test_a_camera_checkpoint_under_load_format_camera_loads_as_it_is(masked: dict, runs: dict) -> None:
    got = runs[f"{COMPILED}/convert-camera"]
    assert "error" not in got, got.get("traceback")
    assert got["quantization"] == "camera" and got["loader_stats"] is None  # no zero scan
    assert got["tokens"] == masked[COMPILED]["hf_tokens"]


@pytest.mark.vllm
def test_stock_vllm_on_the_masked_model_agrees(masked: dict, runs: dict) -> None:
    assert runs["qwen2_moe/stock"]["tokens"] == masked["qwen2_moe"]["hf_tokens"]


@pytest.mark.vllm
@pytest.mark.parametrize("kind", ["loader", "convert"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_resident_expert_bytes_drop_with_the_mask(arch: str, kind: str, masked: dict, runs: dict) -> None:
    d, got = masked[arch], runs[f"{arch}/{kind}"]
    arch_info = SourceCheckpoint(d["original"]).arch
    hidden, fp32 = arch_info.hidden_size, 4
    dense = len(d["widths"]) * arch_info.num_experts * 3 * arch_info.intermediate_size * hidden * fp32
    kept = sum(sum(w) for w in d["widths"].values())
    total = len(d["widths"]) * arch_info.num_experts * arch_info.intermediate_size
    assert got["memory"]["methods"] == ["CameraPruneMoEMethod"]
    ratio = got["memory"]["routed_bytes"] / dense
    assert abs(ratio - kept / total) < 0.02, (ratio, kept / total, got["memory"])
    if kind == "loader":
        stats = got["loader_stats"]
        assert stats["widths"] == {str(k): v for k, v in d["widths"].items()}
        assert stats["empty_experts"] == len(d["widths"])  # one per MoE layer
        assert (stats["routed_channels_kept"], stats["routed_channels_total"]) == (kept, total)
        assert stats["fused_layers"] == (
            [] if PLAN[arch][0] in ("per_expert", "sharded") else list(d["widths"])
        )
        # Shared experts, weighed as loaded (vLLM's CPU linear layers then repack them as oneDNN
        # handles, which are no longer parameters).
        shared_dense = len(d["widths"]) * 3 * (arch_info.shared_intermediate_size or 0) * hidden * fp32
        shared_kept = sum(d["shared_widths"].values())
        assert stats["shared_loaded_bytes"] == shared_kept * 3 * hidden * fp32
        if d["shared_widths"]:
            assert stats["shared_loaded_bytes"] < shared_dense


@pytest.mark.vllm
def test_the_dense_byte_count_is_what_stock_vllm_holds(masked: dict, runs: dict) -> None:
    """The denominator above: stock vLLM's resident routed-expert bytes for the same (masked, dense) model."""
    arch_info = SourceCheckpoint(masked["qwen2_moe"]["original"]).arch
    layers = len(masked["qwen2_moe"]["widths"])
    mem = runs["qwen2_moe/stock"]["memory"]
    assert (
        mem["routed_bytes"]
        == layers * arch_info.num_experts * 3 * arch_info.intermediate_size * arch_info.hidden_size * 4
    )


@pytest.mark.vllm
def test_quantization_camera_with_load_format_camera_is_refused(runs: dict) -> None:
    """``--quantization camera`` with ``--load-format camera`` is refused up front.

    A zero-masked directory has no quantization_config for ``--quantization camera`` to read.
    """
    got = runs["both-flags"]
    assert "error" in got, "vLLM accepted --quantization camera together with --load-format camera"
    assert "--quantization camera" in got["error"] and "quantization_config" in got["error"], got["error"]
    assert "--load-format camera" in got["error"], got["error"]  # says how to serve such a directory
    assert "create_engine_config" in got["frames"], got["frames"]  # refused while vLLM builds its config
    assert "load_model" not in got["frames"]  # before any engine or model loader ran
