#!/usr/bin/env bash
# Fleet simulation bench (issue 7 item 7; docs/channels.md "Fleet simulation"): runs the
# fleet test of updater/src/daemon/fleet.rs in release mode and prints its figures: for each
# rollout step the devices updated against the nominal share, the requests served (and how
# many were 304 Not Modified), the bytes sent, and the wall time to converge.
# Environment: METRICA_FLEET_DEVICES (default 500).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/sbin:/sbin
cargo test --quiet --release -p updater --lib daemon::fleet -- --nocapture 2>&1 | grep '^fleet:'
