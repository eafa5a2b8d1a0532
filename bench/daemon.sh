#!/usr/bin/env bash
# Daemon resource benchmark (issue 7 item 8; docs/daemon.md "Resources").
#
# Runs the release `updater run` against a loopback static server (Python's http.server:
# Last-Modified / If-Modified-Since, so an unchanged channel is a 304) serving a signed
# channel that offers the version the device already runs (the idle case), and prints:
#   - idle RSS (VmRSS and peak VmHWM, also after /metrics and /status were served): target <= 10 MiB
#   - CPU at the default interval (300 s) over a measured window:             target < 1 %
#   - network per poll and per day at the default interval, measured over a window with a
#     short interval and extrapolated:                                       target < 1 MB/day
# with ratios against the baseline measured in the same run: a poll that fetches the whole
# document and signature (what every poll would cost without conditional GETs).
# It also checks `updater check-now` (a poll at once) and that SIGTERM stops the daemon with
# exit status 0.
#
# Environment: BENCH_WINDOW (seconds of each measured period, default 60),
# BENCH_SHORT_INTERVAL (poll interval of the network window, default 1),
# BENCH_DIR (work folder, default a new one in /var/tmp, removed unless BENCH_KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
WINDOW=${BENCH_WINDOW:-60}
SHORT=${BENCH_SHORT_INTERVAL:-1}
W=${BENCH_DIR:-$(mktemp -d /var/tmp/metrica-daemon-bench.XXXXXX)}
mkdir -p "$W"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ "${BENCH_KEEP:-0}" = 1 ] || rm -rf "$W"
}
trap cleanup EXIT

cargo build --quiet --release -p updater --bin updater --example daemon_fixture
BIN=${CARGO_TARGET_DIR:-target}/release/updater
"${CARGO_TARGET_DIR:-target}"/release/examples/daemon_fixture "$W" >/dev/null

# The loopback server: one line per request in $W/requests.log: "<path> <status> <in> <out>".
cat > "$W/server.py" <<'PY'
import http.server, sys, functools
root, port_file, log = sys.argv[1], sys.argv[2], sys.argv[3]
class Counting:
    def __init__(self, inner): self.inner, self.n = inner, 0
    def write(self, b): self.n += len(b); return self.inner.write(b)
    def __getattr__(self, k): return getattr(self.inner, k)
class H(http.server.SimpleHTTPRequestHandler):
    def setup(self):
        super().setup(); self.wfile = Counting(self.wfile)
    def log_message(self, *a): pass
    def handle_one_request(self):
        super().handle_one_request()
        if getattr(self, "raw_requestline", b"") and hasattr(self, "headers"):
            n_in = len(self.raw_requestline) + len(str(self.headers))
            with open(log, "a") as f:
                f.write(f"{self.path} {getattr(self, '_status', 0)} {n_in} {self.wfile.n}\n")
            self.wfile.n = 0
    def send_response(self, code, message=None):
        self._status = code; super().send_response(code, message)
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(H, directory=root))
open(port_file, "w").write(str(srv.server_address[1]))
srv.serve_forever()
PY
python3 "$W/server.py" "$W/www" "$W/port" "$W/requests.log" & pids+=($!)
for _ in $(seq 50); do [ -s "$W/port" ] && break; sleep 0.1; done
MIRROR="http://127.0.0.1:$(cat "$W/port")"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }
HZ=$(getconf CLK_TCK)
start_daemon() { # interval listen log
  "$BIN" --disk "$W/disk.img" --data-dir "$W/data" --keyring "$W/keyring" --sysroot "$W/root" \
    --log-file "$W/$3" --no-reboot run --mirror "$MIRROR" --interval "$1" --listen "$2" \
    --min-free-mib 1 &
  DAEMON=$!; pids+=($DAEMON)
  for _ in $(seq 100); do
    grep -q '"event":"decision"' "$W/$3" 2>/dev/null && return 0; sleep 0.1
  done
  echo "the daemon did not decide within 10 s:" >&2; cat "$W/$3" >&2; exit 1
}
get() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1]).read()' "$1"; }

# 1. Network: a short interval for WINDOW seconds. The first poll fetches the document and its
#    signature (the baseline); every later one is a conditional GET answered 304.
PORT=$(free_port)
start_daemon "$SHORT" "127.0.0.1:$PORT" net.jsonl
t0=$(ticks "$DAEMON"); sleep "$WINDOW"; t1=$(ticks "$DAEMON")
kill -TERM "$DAEMON"; wait "$DAEMON"
read -r polls full_bytes steady_bytes steady_reqs codes < <(python3 - "$W/requests.log" <<'PY'
import sys, collections
rows = [l.split() for l in open(sys.argv[1])]
full = sum(int(r[2]) + int(r[3]) for r in rows[:2])
steady = rows[2:]
codes = collections.Counter(r[1] for r in steady)
print(len(rows) - 1, full, sum(int(r[2]) + int(r[3]) for r in steady), len(steady),
      ",".join(f"{k}x{v}" for k, v in sorted(codes.items())))
PY
)
per_poll=$(( steady_bytes / (steady_reqs > 0 ? steady_reqs : 1) ))
per_day=$(( per_poll * 86400 / 300 ))
full_day=$(( full_bytes * 86400 / 300 ))
cpu_poll=$(python3 -c "print(($t1-$t0)/$HZ/max($steady_reqs,1))")

# 2. Idle at the default interval: RSS and CPU over WINDOW seconds, with /metrics, /status
#    and /health served and one check-now.
PORT=$(free_port)
start_daemon 300 "127.0.0.1:$PORT" idle.jsonl
sleep 1
rss_idle=$(kib "$DAEMON" VmRSS)
t0=$(ticks "$DAEMON"); s0=$(date +%s.%N)
sleep "$WINDOW"
t1=$(ticks "$DAEMON"); s1=$(date +%s.%N)
for p in metrics status health; do get "http://127.0.0.1:$PORT/$p" || true; done
"$BIN" check-now --listen "127.0.0.1:$PORT" >/dev/null
for _ in $(seq 50); do grep -q '"event":"check_now"' "$W/idle.jsonl" && break; sleep 0.1; done
sleep 1
rss_after=$(kib "$DAEMON" VmRSS); hwm=$(kib "$DAEMON" VmHWM)
kill -TERM "$DAEMON"; rc=0; wait "$DAEMON" || rc=$?
stopped=$(grep -c '"event":"stopped"' "$W/idle.jsonl" || true)
cpu_idle=$(python3 -c "print(100*($t1-$t0)/$HZ/($s1-$s0))")

python3 - <<PY
kib = lambda k: k / 1024
print(f"daemon benchmark ({$WINDOW} s windows, release build)")
print(f"  idle RSS:           {kib($rss_idle):.2f} MiB (after /metrics, /status, /health and a check-now: {kib($rss_after):.2f} MiB; peak {kib($hwm):.2f} MiB); target 10 MiB: ratio {kib($hwm)/10:.2f}")
print(f"  idle CPU:           {$cpu_idle:.3f} % at the default interval (300 s; resolution {100/$HZ/$WINDOW:.3f} %); target 1 %: ratio {$cpu_idle/1:.3f}")
print(f"  CPU per poll:       {$cpu_poll*1000:.2f} ms -> {100*$cpu_poll/300:.4f} % at one poll per 300 s")
print(f"  network:            {$polls} polls in {$WINDOW} s at --interval $SHORT; responses after the first: $codes")
print(f"    per poll:         {$per_poll} bytes (conditional GET, request + response)")
print(f"    baseline poll:    {$full_bytes} bytes (document + signature, unconditional)")
print(f"    per day at 300 s: {$per_day} bytes = {$per_day/1e6:.3f} MB (baseline {$full_day/1e6:.3f} MB/day): ratio {$per_day/max($full_day,1):.3f}; target 1 MB: ratio {$per_day/1e6:.3f}")
print(f"  SIGTERM:            exit status $rc, 'stopped' logged {$stopped} time(s)")
PY
[ "$rc" = 0 ] && [ "$stopped" = 1 ]
