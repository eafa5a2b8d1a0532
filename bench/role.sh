#!/usr/bin/env bash
# Role apply benchmark on the real Docker engine (issue 15 item 7; docs/roles.md "Measured").
#
# One small role (the busybox test image of tests/fixtures/make-role-images.sh: an HTTP server
# with a Docker health check and a named volume), probed over HTTP every 100 ms, and printed:
#   - time from `updater role apply` to the new release serving, and to committed
#     (after its probation);
#   - downtime of the service during a successful switch v1 -> v2 by `updater role apply`,
#     against the baseline measured in the same run: the same switch done by a plain
#     `docker compose up -d --wait` (ratio printed);
#   - time to roll back a release whose container exits, and the downtime it causes;
#   - the updater's peak RSS while applying (target: at most 24 MiB), its own VmHWM.
#
# Needs Docker with Compose v2 (.ci/compose-v2), busybox-static and python3.
# Environment: BENCH_PROFILE (release or debug, default release), BENCH_BIN (an updater
# binary to use instead of building one), BENCH_PORT (default 18571),
# BENCH_DIR (work folder, default a new one in /var/tmp, removed unless BENCH_KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${BENCH_PROFILE:-release}
PORT=${BENCH_PORT:-18571}
W=${BENCH_DIR:-$(mktemp -d /var/tmp/metrica-role-bench.XXXXXX)}
ROLE=bench-role
PLAIN=metrica-bench-plain
mkdir -p "$W"
probe_pid=""
cleanup() {
  [ -z "$probe_pid" ] || kill "$probe_pid" 2>/dev/null || true
  docker compose --project-name "metrica-$ROLE" down --volumes --remove-orphans >/dev/null 2>&1 || true
  docker compose --project-name "$PLAIN" down --volumes --remove-orphans >/dev/null 2>&1 || true
  [ "${BENCH_KEEP:-0}" = 1 ] || rm -rf "$W"
}
trap cleanup EXIT

for tool in docker python3; do
  command -v "$tool" >/dev/null || { echo "role.sh: $tool is missing" >&2; exit 1; }
done
docker compose version --short | grep -q '^v\?2\.' || {
  echo "role.sh: needs Compose v2 (run .ci/compose-v2)" >&2
  exit 1
}
if [ -n "${BENCH_BIN:-}" ]; then
  BIN=$BENCH_BIN
elif [ "$PROFILE" = release ]; then
  cargo build --quiet --release -p updater --bin updater
  BIN=${CARGO_TARGET_DIR:-target}/release/updater
else
  cargo build --quiet -p updater --bin updater
  BIN=${CARGO_TARGET_DIR:-target}/debug/updater
fi
bash tests/fixtures/make-role-images.sh "$W/images" >/dev/null
ARCHIVE=$W/images/roletest-images.tar

# release VERSION MODE [DIR]: a release folder of the role (or of the plain project).
release() {
  local version=$1 mode=$2 dir=${3:-$W/release-$1}
  mkdir -p "$dir/images"
  cat > "$dir/role.toml" <<EOF
[role]
name = "$ROLE"
version = "$version"
os = ">=0.0.0"
update_interval = "1h"
[apply]
wait_timeout = "30s"
health_timeout = "10s"
probation = "2s"
[[health.http]]
url = "http://127.0.0.1:$PORT/ready"
[[health.container]]
service = "web"
EOF
  cat > "$dir/compose.yaml" <<EOF
services:
  web:
    image: metrica.invalid/roletest:$mode
    pull_policy: never
    restart: unless-stopped
    environment:
      ROLE_VERSION: "$version"
    ports: ["127.0.0.1:$PORT:8080"]
    volumes: ["data:/data"]
    healthcheck:
      test: ["CMD", "test", "-f", "/tmp/healthy"]
      interval: 1s
      timeout: 1s
      retries: 2
      start_period: 1s
volumes:
  data:
EOF
  ln -sf "$ARCHIVE" "$dir/images/roletest.tar"
}

# The probe: GET / every 100 ms; one line per try: "<unix time> <ok 0|1> <body>".
cat > "$W/probe.py" <<'PY'
import sys, time, urllib.request
port, out = sys.argv[1], sys.argv[2]
with open(out, "w", buffering=1) as f:
    while True:
        t = time.time()
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=0.5).read().decode().strip()
            f.write(f"{t:.3f} 1 {body.replace(' ', '_')}\n")
        except Exception:
            f.write(f"{t:.3f} 0 -\n")
        time.sleep(max(0.0, 0.1 - (time.time() - t)))
PY
# downtime LOG FROM TO: the longest span without a good answer between two unix times, and
# when the first answer naming version TO came (seconds after FROM).
cat > "$W/downtime.py" <<'PY'
import sys
log, start, want = sys.argv[1], float(sys.argv[2]), sys.argv[3]
rows = [l.split() for l in open(log)]
rows = [(float(t), ok == "1", body) for t, ok, body in rows if float(t) >= start]
longest, failing_since, first_new = 0.0, None, None
for t, ok, body in rows:
    if not ok and failing_since is None:
        failing_since = t
    if ok and failing_since is not None:
        longest, failing_since = max(longest, t - failing_since), None
    if ok and first_new is None and body == "version_" + want:
        first_new = t - start
if failing_since is not None:
    longest = max(longest, rows[-1][0] - failing_since)
print(f"{longest:.2f} {'never' if first_new is None else f'{first_new:.2f}'}")
PY

# peak.py OUT CMD...: runs CMD and writes its own peak RSS (VmHWM, read from /proc every
# 10 ms until it exits) in MiB to OUT. (The rusage of /usr/bin/time would count the docker
# CLI children too: those are Go programs bigger than the updater.)
cat > "$W/peak.py" <<'PY'
import subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
p = subprocess.Popen(cmd)
peak = 0
while p.poll() is None:
    try:
        for line in open(f"/proc/{p.pid}/status"):
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]))
    except OSError:
        pass
    time.sleep(0.01)
open(out, "w").write(f"{peak / 1024:.1f}")
sys.exit(p.returncode)
PY

probe() { python3 "$W/probe.py" "$PORT" "$1" & probe_pid=$!; sleep 0.5; }
stop_probe() { kill "$probe_pid"; wait "$probe_pid" 2>/dev/null || true; probe_pid=""; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "${2:-$(now)}"; }

echo "role.sh: $($BIN --version) ($BIN), $(docker compose version)"

# Baseline: the same image switched v1 -> v2 with a plain `docker compose up -d --wait`.
docker load --quiet --input "$ARCHIVE" >/dev/null
release 1.0.0 ok "$W/plain-1"
release 2.0.0 ok "$W/plain-2"
compose_plain() { docker compose --project-name "$PLAIN" --project-directory "$1" --file "$1/compose.yaml" up -d --wait --wait-timeout 30 >/dev/null 2>&1; }
compose_plain "$W/plain-1"
probe "$W/plain.log"
t0=$(now)
compose_plain "$W/plain-2"
t1=$(now)
sleep 1
stop_probe
read -r plain_down plain_new < <(python3 "$W/downtime.py" "$W/plain.log" "$t0" 2.0.0)
docker compose --project-name "$PLAIN" down --volumes >/dev/null 2>&1
echo "plain compose up v1 -> v2: $(since "$t0" "$t1") s, downtime ${plain_down} s"

# The updater: first release, then the switch v1 -> v2 under the probe, then a failing v3.
apply() { python3 "$W/peak.py" "$W/rss-$2.txt" "$BIN" --data-dir "$W/data" --log-file "$W/updater.log" role apply --os-version 1.0.0 --min-free-mib 1 "$1" >/dev/null || true; }
rss() { cat "$W/rss-$1.txt"; }
release 1.0.0 ok
release 2.0.0 ok
release 3.0.0 exit
t0=$(now)
apply "$W/release-1.0.0" v1
echo "first apply to committed (probation 2 s): $(since "$t0") s"
probe "$W/apply.log"
t0=$(now)
apply "$W/release-2.0.0" v2
t1=$(now)
sleep 1
stop_probe
read -r upd_down upd_new < <(python3 "$W/downtime.py" "$W/apply.log" "$t0" 2.0.0)
echo "updater apply v1 -> v2: new release serving after ${upd_new} s, committed after $(since "$t0" "$t1") s"
echo "downtime during the switch: updater ${upd_down} s, plain compose ${plain_down} s, ratio $(python3 -c "p=$plain_down; u=$upd_down; print(f'{u/p:.2f}' if p > 0 else ('1.00' if u == 0 else 'inf'))")"
probe "$W/rollback.log"
t0=$(now)
apply "$W/release-3.0.0" v3
t1=$(now)
sleep 1
stop_probe
read -r rb_down _ < <(python3 "$W/downtime.py" "$W/rollback.log" "$t0" 2.0.0)
curl -s "127.0.0.1:$PORT/" | grep -q "version 2.0.0" || { echo "role.sh: v2 does not serve after the rollback" >&2; exit 1; }
echo "failed update (container exits) rolled back in $(since "$t0" "$t1") s, downtime ${rb_down} s"
echo "updater peak RSS while applying: first $(rss v1) MiB, update $(rss v2) MiB, rollback $(rss v3) MiB (target <= 24 MiB)"
