#!/bin/sh
# video-player's validation, run by the updater in the release folder before the switch.
set -eu
fail() { echo "video-player: $*" >&2; exit 1; }
[ -f compose.yaml ] || fail "compose.yaml is missing"
grep -q -- '--input-ipc-server=/run/mpv/socket' compose.yaml || fail "mpv must open its IPC socket (the health check needs it)"
