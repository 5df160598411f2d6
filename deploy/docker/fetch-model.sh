#!/usr/bin/env bash
# camera-vllm model fetch: download a hub checkpoint into the Hugging Face cache (HF_HOME)
# before the server starts, e.g. as a Kubernetes init container on a persistent cache volume.
#
#   CAMERA_MODEL=ORG/NAME [CAMERA_MODEL_REVISION=main] [HF_TOKEN=...] camera-vllm-fetch-model
#
# A local path (or nothing to fetch) is a no-op, so the step can stay in a manifest that also
# serves checkpoints from a volume.  Only what serving reads is downloaded: config, tokenizer
# and safetensors files.  A cached snapshot is checked, not downloaded again.
set -euo pipefail

die() { echo "camera-vllm fetch: $*" >&2; exit 2; }

model="${1:-${CAMERA_MODEL:-/models}}"
if [[ "$model" == /* || "$model" == ./* || "$model" == ../* || -e "$model" ]]; then
    echo "camera-vllm fetch: $model is a local path; nothing to download"
    exit 0
fi
[[ "$model" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$ ]] || die "'$model' is neither a local path nor a hub id ORG/NAME"
[[ -n "${HF_HOME:-}" ]] || die "HF_HOME is not set: the download would not land in the cache the server reads"

cmd=(hf download "$model")
if [[ -n "${CAMERA_MODEL_REVISION:-}" ]]; then
    cmd+=(--revision "$CAMERA_MODEL_REVISION")
fi
cmd+=(--include "*.json" "*.safetensors" "*.model" "*.txt" "*.tiktoken" "*.jinja")

echo "camera-vllm fetch: ${cmd[*]} (into $HF_HOME)"
if [[ "${CAMERA_ENTRYPOINT_DRY_RUN:-0}" == "1" ]]; then
    printf '%s\n' "${cmd[@]}"
    exit 0
fi
exec "${cmd[@]}"
