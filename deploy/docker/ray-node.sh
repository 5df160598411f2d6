#!/usr/bin/env bash
# One node of a multi-node camera-vllm deployment on Ray (vLLM's multi-node path):
#   ray-node.sh head [vllm serve options...]   start the Ray head, wait until the cluster
#                                              has CAMERA_RAY_EXPECTED_GPUS GPUs, then run the
#                                              entrypoint with --distributed-executor-backend ray
#   ray-node.sh worker                         join the head at CAMERA_RAY_HEAD and block
# Environment: CAMERA_RAY_HEAD (worker), CAMERA_RAY_EXPECTED_GPUS (head), RAY_PORT (6379),
# CAMERA_RAY_WAIT_SECONDS (900). See deploy/k8s/multinode.md.
set -euo pipefail

role="${1:-}"
[[ $# -gt 0 ]] && shift
port="${RAY_PORT:-6379}"

case "$role" in
    head)
        expected="${CAMERA_RAY_EXPECTED_GPUS:?set CAMERA_RAY_EXPECTED_GPUS to the GPUs of all nodes together}"
        ray start --head --port="$port" --disable-usage-stats
        deadline=$((SECONDS + ${CAMERA_RAY_WAIT_SECONDS:-900}))
        until python3 - "$expected" <<'PY'
import sys
import ray
ray.init(address="auto", logging_level="ERROR")
have = ray.cluster_resources().get("GPU", 0)
print(f"ray cluster: {have:g}/{sys.argv[1]} GPUs", file=sys.stderr)
sys.exit(0 if have >= float(sys.argv[1]) else 1)
PY
        do
            if (( SECONDS >= deadline )); then
                echo "ray-node: timed out waiting for $expected GPUs to join" >&2
                exit 1
            fi
            sleep 10
        done
        exec /usr/local/bin/camera-vllm-entrypoint "$@" --distributed-executor-backend ray
        ;;
    worker)
        head="${CAMERA_RAY_HEAD:?set CAMERA_RAY_HEAD to the address of the Ray head}"
        exec ray start --address="$head:$port" --block --disable-usage-stats
        ;;
    *)
        echo "usage: ray-node.sh head [vllm serve options...] | ray-node.sh worker" >&2
        exit 2
        ;;
esac
