#!/bin/sh
# ai-camera's validation, run by the updater in the release folder before the switch.
set -eu
fail() { echo "ai-camera: $*" >&2; exit 1; }
for f in compose.yaml frigate.yml mosquitto.conf; do [ -f "$f" ] || fail "$f is missing"; done
grep -q '^mqtt:' frigate.yml || fail "frigate.yml must configure MQTT (events go there)"
grep -q 'path: /db/frigate.db' frigate.yml || fail "Frigate's database must be in the /db volume"
