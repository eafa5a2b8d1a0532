#!/bin/sh
# audio-player's validation, run by the updater in the release folder before the switch.
set -eu
fail() { echo "audio-player: $*" >&2; exit 1; }
for f in compose.yaml shairport-sync.conf; do [ -f "$f" ] || fail "$f is missing"; done
grep -q 'output_backend = "alsa"' shairport-sync.conf || fail "shairport-sync.conf must play to ALSA"
