#!/bin/sh
# camera-dual's validation, run by the updater in the release folder before the switch.
set -eu
fail() { echo "camera-dual: $*" >&2; exit 1; }
for f in compose.yaml mediamtx.yml go2rtc.yaml; do [ -f "$f" ] || fail "$f is missing"; done
grep -q '^api: yes' mediamtx.yml || fail "mediamtx.yml must enable the API (the health check reads it)"
# go2rtc's RTSP port must not collide with MediaMTX's (both use the host network).
! grep -q 'listen: ":8554"' go2rtc.yaml || fail "go2rtc must not listen on 8554 (MediaMTX does)"
