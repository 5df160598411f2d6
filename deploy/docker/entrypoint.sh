#!/usr/bin/env bash
# camera-vllm container entrypoint: sensible defaults, then `exec vllm serve`.
#
#   entrypoint.sh [MODEL] [vllm serve options...]
#
# MODEL      a checkpoint directory (default: $CAMERA_MODEL, else /models). A first argument
#            that does not start with '-' is taken as MODEL; everything else is passed to
#            `vllm serve` after the defaults below, so it overrides them.
# Environment (all optional):
#   CAMERA_MODEL              model directory when no MODEL argument is given (default /models)
#   CAMERA_HOST, CAMERA_PORT  bind address (default 0.0.0.0:8000)
#   CAMERA_SERVED_MODEL_NAME  name clients send as "model" (default: the model directory's name)
#   VLLM_API_KEY              API key; else read from VLLM_API_KEY_FILE, else from
#                             /run/secrets/vllm_api_key if that file exists
#   CAMERA_ALLOW_NO_API_KEY=1 start without an API key (refused otherwise)
#   VLLM_PLUGINS              default "camera_vllm,camera_stats" (the quantization plugin and
#                             the /camera/stats endpoint); if you set it, keep both names
#   CAMERA_ENTRYPOINT_DRY_RUN=1  print the command instead of running it
# The API key is exported as VLLM_API_KEY, never put on the command line (where any
# process could read it from /proc).
set -euo pipefail

die() { echo "camera-vllm entrypoint: $*" >&2; exit 2; }

model="${CAMERA_MODEL:-/models}"
if [[ $# -gt 0 && -n "$1" && "$1" != -* ]]; then
    model="$1"
    shift
fi

# A local checkpoint must look like one; anything else (e.g. a hub id) goes to vLLM as is.
if [[ "$model" == /* || "$model" == ./* || "$model" == ../* || -e "$model" ]]; then
    if [[ ! -f "$model/config.json" ]]; then
        listing=$(find "$model" -mindepth 1 -maxdepth 1 -printf '%f ' 2>/dev/null | head -c 400 || true)
        die "no config.json in model directory '$model' (contents: ${listing:-<missing or empty>}). Mount a CAMERA checkpoint at /models or pass its path as the first argument."
    fi
    # The engine opens the weights minutes later, as this (non-root) user: check them now.
    shopt -s nullglob
    weights=("$model"/*.safetensors)
    shopt -u nullglob
    if [[ ${#weights[@]} -eq 0 ]]; then
        die "no *.safetensors weights in model directory '$model'"
    fi
    unreadable=()
    for f in "${weights[@]}"; do
        [[ -r "$f" ]] || unreadable+=("${f##*/}")
    done
    if [[ ${#unreadable[@]} -gt 0 ]]; then
        die "uid $(id -u) cannot read ${unreadable[*]} in '$model': the files must be world-readable (chmod a+r; camera-vllm writes them 0644)"
    fi
    # Served from local files: never reach for a model hub.
    export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
fi

# API key: environment, then a secret file.
if [[ -z "${VLLM_API_KEY:-}" ]]; then
    key_file="${VLLM_API_KEY_FILE:-}"
    if [[ -z "$key_file" && -f /run/secrets/vllm_api_key ]]; then
        key_file=/run/secrets/vllm_api_key
    fi
    if [[ -n "$key_file" ]]; then
        [[ -r "$key_file" ]] || die "API key file '$key_file' is not readable"
        # First line, surrounding whitespace (e.g. the trailing newline of a secret) removed.
        IFS= read -r VLLM_API_KEY < "$key_file" || true
        VLLM_API_KEY="${VLLM_API_KEY#"${VLLM_API_KEY%%[![:space:]]*}"}"
        VLLM_API_KEY="${VLLM_API_KEY%"${VLLM_API_KEY##*[![:space:]]}"}"
        [[ -n "$VLLM_API_KEY" ]] || die "API key file '$key_file' is empty"
        export VLLM_API_KEY
    fi
fi
if [[ -z "${VLLM_API_KEY:-}" && "${CAMERA_ALLOW_NO_API_KEY:-0}" != 1 ]]; then
    die "no API key: set VLLM_API_KEY or VLLM_API_KEY_FILE, mount /run/secrets/vllm_api_key, or set CAMERA_ALLOW_NO_API_KEY=1 to serve without one"
fi

export VLLM_PLUGINS="${VLLM_PLUGINS:-camera_vllm,camera_stats}"
# No usage reports from a production server.
export VLLM_NO_USAGE_STATS="${VLLM_NO_USAGE_STATS:-1}"
export DO_NOT_TRACK="${DO_NOT_TRACK:-1}"

served_name="${CAMERA_SERVED_MODEL_NAME:-$(basename -- "${model%/}")}"
cmd=(vllm serve "$model"
     --host "${CAMERA_HOST:-0.0.0.0}"
     --port "${CAMERA_PORT:-8000}"
     --served-model-name "$served_name"
     "$@")

if [[ "${CAMERA_ENTRYPOINT_DRY_RUN:-0}" == 1 ]]; then
    printf '%s\n' "${cmd[@]}"
    echo "VLLM_PLUGINS=$VLLM_PLUGINS"
    echo "API_KEY_SET=$([[ -n "${VLLM_API_KEY:-}" ]] && echo 1 || echo 0)"
    exit 0
fi
echo "camera-vllm entrypoint: ${cmd[*]}" >&2
exec "${cmd[@]}"
