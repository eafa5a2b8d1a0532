#!/bin/sh
# zigbee-hub's validation, run by the updater in the release folder before the switch.
set -eu
fail() { echo "zigbee-hub: $*" >&2; exit 1; }
for f in compose.yaml mosquitto.conf; do [ -f "$f" ] || fail "$f is missing"; done
grep -q '^listener 1883' mosquitto.conf || fail "mosquitto.conf must listen on 1883"
# The broker is anonymous: it must never be published beyond the device.
grep -q '"127.0.0.1:1883:1883"' compose.yaml || fail "MQTT must be published on 127.0.0.1 only"
