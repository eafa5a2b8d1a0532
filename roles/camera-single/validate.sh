#!/bin/sh
# camera-single's validation, run by the updater in the release folder before the switch.
# Its environment has METRICA_ROLE and METRICA_ROLE_VERSION. Required devices are checked by
# the updater itself (role.toml [devices]), not here.
set -eu
fail() { echo "camera-single: $*" >&2; exit 1; }
[ -f compose.yaml ] || fail "compose.yaml is missing"
[ -f mediamtx.yml ] || fail "mediamtx.yml is missing"
grep -q '^api: yes' mediamtx.yml || fail "mediamtx.yml must enable the API (the health check reads it)"
