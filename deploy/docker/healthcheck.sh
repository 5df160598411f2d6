#!/usr/bin/env bash
# Container health check: GET /health on the local vLLM server; exit 0 only on HTTP 200.
# Uses bash's /dev/tcp, so it needs neither curl nor Python.
#   healthcheck.sh [PORT]   (default: $CAMERA_PORT, else 8000)
set -euo pipefail
port="${1:-${CAMERA_PORT:-8000}}"
exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&3
status=""
IFS=' ' read -r -t "${CAMERA_HEALTHCHECK_TIMEOUT:-8}" _ status _ <&3 || true
exec 3<&-
[[ "$status" == 200 ]]
