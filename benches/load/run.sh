#!/usr/bin/env bash
# `make bench-load`: keyrouter against a direct connection to a local mock
# upstream and against nginx as a plain reverse proxy, in one run, in
# alternation, several rounds. Prints requests/s, p50 and p99 for each, and
# keyrouter's ratios; then streaming time-to-first-byte (direct vs keyrouter)
# and keyrouter's peak RSS with KEYS registered keys. Each run also reports
# the CPU time (user + system) the serving process spent per request: the
# mock's for direct, the proxy's own (mock excluded) for nginx and keyrouter;
# and the share of the machine's CPU time the hypervisor took meanwhile
# (steal), which makes runs on a busy host slower and noisier.
#
# LAYOUT picks how the processes share the machine's cores:
#   shared (default): nothing is pinned; load generator, mock and proxy
#     share every core, nginx runs one worker and keyrouter one proxy thread
#     per core (as `nproc` counts them). The throughput targets are stated
#     for this set-up.
#   split (2+ cores): the load generator runs on CPU 0 and the servers (mock
#     upstream, nginx or keyrouter) share CPU 1; nginx runs one worker and
#     keyrouter one proxy thread. Throughput is then set by the servers' CPU
#     time per request alone, the load generator's not counting.
# keyrouter is the profile-guided release build (`benches/load/pgo.sh`,
# `make release-pgo`) when the toolchain has llvm-profdata; PGO=off
# measures the plain release build instead.
# Other knobs: ROUNDS (3), DURATION (10s), CONNS (64), KEYS (1000),
# LIMITS (unset; "on" registers every key with rpm/tpm/max_concurrent limits
# high enough never to refuse, so the limiter's cost is measured).
set -euo pipefail
cd "$(dirname "$0")/../.."
. benches/load/common.sh

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
KEYS=${KEYS:-1000}
LIMITS_JSON=""
[ "${LIMITS:-}" = "on" ] && LIMITS_JSON=',\"limits\":{\"rpm\":1000000,\"tpm\":1000000000,\"max_concurrent\":100000}'
TARGET_DIR=${CARGO_TARGET_DIR:-target}
UP_PORT=19000 NG_PORT=19001 KR_PORT=19002 KR_ADMIN=19003 KR_OPS=19004

command -v wrk >/dev/null || { echo "wrk is not installed (Debian: apt-get install wrk)" >&2; exit 1; }
command -v curl >/dev/null || { echo "curl is not installed" >&2; exit 1; }

LAYOUT=${LAYOUT:-shared}
case $LAYOUT in
  split | shared) ;;
  *) echo "LAYOUT must be split or shared" >&2; exit 1 ;;
esac
if [ "$LAYOUT" = split ] && [ "$(nproc)" -lt 2 ]; then
  echo "one core only: LAYOUT=shared"; LAYOUT=shared
fi

BIN="$TARGET_DIR/release"
# The keyrouter measured: the profile-guided release build (`make
# release-pgo`, which builds the mock too) unless PGO=off or the toolchain
# lacks llvm-profdata; else the plain one.
if [ "${PGO:-on}" != off ] && [ -x "$(llvm_profdata)" ]; then
  KR_BIN=$(benches/load/pgo.sh | tail -1)
  KR_BUILD="profile-guided release build (make release-pgo)"
else
  [ "${PGO:-on}" = off ] || echo "llvm-profdata is missing (rustup component add llvm-tools): measuring the plain release build"
  cargo build --release --features load-bench --bin keyrouter --bin keyrouter-mock-upstream
  KR_BIN="$BIN/keyrouter"
  KR_BUILD="plain release build"
fi

case $LAYOUT in
  split) LOADCPU="taskset -c 0"; SRVCPU="taskset -c 1"; WORKERS=1 ;;
  shared) LOADCPU=""; SRVCPU=""; WORKERS=$(nproc) ;;
esac
ensure_ports_free $UP_PORT $NG_PORT $KR_PORT $KR_ADMIN $KR_OPS

echo "layout: $LAYOUT ($WORKERS proxy worker(s)); keyrouter: $KR_BUILD"
WORK=$(mktemp -d)
chmod 755 "$WORK"
PIDS=()
trap cleanup EXIT

# --- mock upstream -----------------------------------------------------------
$SRVCPU "$BIN/keyrouter-mock-upstream" "127.0.0.1:$UP_PORT" &
UP_PID=$!
PIDS+=($UP_PID)
wait_http "http://127.0.0.1:$UP_PORT/v1/models"

# --- keyrouter -----------------------------------------------------------------
keyrouter_config $UP_PORT $KR_PORT $KR_ADMIN $KR_OPS "$WORK/keyrouter.db" > "$WORK/keyrouter.toml"
ADMIN_KEY=$(new_admin_key)
KEYROUTER_FERNET_KEYS="$("$KR_BIN" gen-fernet-key)" KEYROUTER_ADMIN_API_KEY="$ADMIN_KEY" \
  KEYROUTER_SERVER__WORKERS=$WORKERS $SRVCPU "$KR_BIN" serve --config "$WORK/keyrouter.toml" 2>"$WORK/keyrouter.log" &
KR_PID=$!
PIDS+=($KR_PID)
wait_http "http://127.0.0.1:$KR_OPS/readyz"

# The management API allows 100 requests a minute per client address; the
# registrations come from several loopback addresses.
echo "registering $KEYS keys${LIMITS:+ with limits}..."
for i in $(seq 1 "$KEYS"); do
  printf '%s\n' "$i"
done | xargs -P 8 -I{} sh -c '
  i={}; src="127.0.1.$(( (i / 90) + 1 ))"
  curl -fs -o /dev/null --interface "$src" -X POST "http://127.0.0.1:'"$KR_ADMIN"'/admin/v1/keys" \
    -H "X-API-Key: '"$ADMIN_KEY"'" -H "content-type: application/json" \
    -d "{\"key_material\":\"sk-bench-$(printf %06d "$i")-0123456789abcdef\",\"provider_id\":\"openai\"'"$LIMITS_JSON"'}" \
  || echo "registration $i failed" >&2'
sleep 2.5   # one pool refresh

# --- nginx -------------------------------------------------------------------
NGINX=$(command -v nginx || true)
if [ -z "$NGINX" ] && [ -x /usr/sbin/nginx ]; then NGINX=/usr/sbin/nginx; fi
if [ -n "$NGINX" ]; then
  USER_LINE=""; [ "$(id -u)" = 0 ] && USER_LINE="user root;"
  { echo "$USER_LINE"; sed -e "s#@DIR@#$WORK#g" -e "s#@NGINX_PORT@#$NG_PORT#g" -e "s#@UPSTREAM_PORT@#$UP_PORT#g" -e "s#@WORKERS@#$WORKERS#g" benches/load/nginx.conf; } > "$WORK/nginx.conf"
  $SRVCPU "$NGINX" -p "$WORK" -c "$WORK/nginx.conf" &
  NG_PID=$!
  PIDS+=($NG_PID)
  wait_http "http://127.0.0.1:$NG_PORT/v1/models"
  TARGETS="direct nginx keyrouter"
else
  echo "nginx is not installed (Debian: apt-get install nginx-light): the nginx baseline is skipped"
  TARGETS="direct keyrouter"
fi

url_of() {
  case $1 in
    direct) echo "http://127.0.0.1:$UP_PORT/v1/chat/completions" ;;
    nginx) echo "http://127.0.0.1:$NG_PORT/v1/chat/completions" ;;
    keyrouter) echo "http://127.0.0.1:$KR_PORT/openai/v1/chat/completions" ;;
  esac
}

# The processes serving a target, and their CPU time so far in clock ticks.
pids_of() {
  case $1 in
    direct) echo "$UP_PID" ;;
    nginx) pgrep -P "$NG_PID" ;;   # the workers
    keyrouter) echo "$KR_PID" ;;
  esac
}
# The machine's CPU time taken by the hypervisor, and all CPU time, in ticks.
# (user to steal; guest time is counted in user and nice already)
cpu_steal() { awk '$1=="cpu" {t=0; for (i=2; i<=9; i++) t+=$i; print $9, t}' /proc/stat; }
cpu_ticks() { for p in $(pids_of "$1"); do awk '{print $14 + $15}' "/proc/$p/stat"; done | awk '{t += $1} END {print t + 0}'; }
TICKS_PER_S=$(getconf CLK_TCK)

# wrk's latency figures in milliseconds.
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}; printf "%.3f", v}'; }

RESULTS="$WORK/results"
: > "$RESULTS"
echo "warming up..."
for t in $TARGETS; do $LOADCPU wrk -t1 -c"$CONNS" -d2s -s benches/load/chat.lua "$(url_of "$t")" >/dev/null; done
for r in $(seq 1 "$ROUNDS"); do
  for t in $TARGETS; do
    ticks=$(cpu_ticks "$t")
    read -r steal0 all0 < <(cpu_steal)
    out=$($LOADCPU wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s benches/load/chat.lua "$(url_of "$t")")
    ticks=$(( $(cpu_ticks "$t") - ticks ))
    read -r steal1 all1 < <(cpu_steal)
    steal=$(awk -v s=$((steal1 - steal0)) -v a=$((all1 - all0)) 'BEGIN {printf "%.0f", a ? 100 * s / a : 0}')
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    cpu=$(awk -v t="$ticks" -v hz="$TICKS_PER_S" -v n="$requests" 'BEGIN {printf "%.1f", n ? t / hz / n * 1e6 : 0}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(echo "$out" | awk '$1=="50%" {print $2}' | to_ms)
    p99=$(echo "$out" | awk '$1=="99%" {print $2}' | to_ms)
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
    echo "$t $rps $p50 $p99 $cpu" >> "$RESULTS"
    printf 'round %d %-9s %10.0f req/s  p50 %7.3f ms  p99 %7.3f ms  cpu %5.1f us/req  steal %3d%%%s\n' "$r" "$t" "$rps" "$p50" "$p99" "$cpu" "$steal" "${non2xx:+  NON-2XX: $non2xx}"
  done
done

echo
echo "median of $ROUNDS rounds, $CONNS connections, non-streaming chat completions:"
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
for t in $TARGETS; do
  rps=$(awk -v t="$t" '$1==t {print $2}' "$RESULTS" | median)
  p50=$(awk -v t="$t" '$1==t {print $3}' "$RESULTS" | median)
  p99=$(awk -v t="$t" '$1==t {print $4}' "$RESULTS" | median)
  cpu=$(awk -v t="$t" '$1==t {print $5}' "$RESULTS" | median)
  printf '  %-9s %10.0f req/s  p50 %7.3f ms  p99 %7.3f ms  cpu %5.1f us/req\n' "$t" "$rps" "$p50" "$p99" "$cpu"
  eval "RPS_$t=$rps P99_$t=$p99 CPU_$t=$cpu"
done
awk -v k="$RPS_keyrouter" -v d="$RPS_direct" 'BEGIN {printf "  keyrouter / direct: %.2fx requests/s\n", k/d}'
if [ -n "${RPS_nginx:-}" ]; then
  awk -v k="$RPS_keyrouter" -v n="$RPS_nginx" -v kp="$P99_keyrouter" -v np="$P99_nginx" \
    'BEGIN {printf "  keyrouter / nginx:  %.2fx requests/s, p99 %+.3f ms (target: >= 0.90x, <= +1 ms)\n", k/n, kp-np}'
  # Each round's keyrouter figure against the nginx figure measured just
  # before it: the machine's speed drifts over minutes, less within a round.
  paired=$(awk '$1=="nginx" {n=$2} $1=="keyrouter" && n {printf "%.3f\n", $2/n}' "$RESULTS")
  printf '  keyrouter / nginx, round by round: %s (median %.2fx)\n' \
    "$(echo "$paired" | paste -sd' ')" "$(echo "$paired" | median)"
  awk -v k="$CPU_keyrouter" -v n="$CPU_nginx" 'BEGIN {printf "  CPU per request:    keyrouter %.1f us, nginx %.1f us (%.2fx)\n", k, n, k/n}'
fi

# --- streaming time to first byte ---------------------------------------------
ttfb() {
  for _ in $(seq 1 200); do
    curl -s -o /dev/null -w '%{time_starttransfer}\n' -X POST "$1" \
      -H 'content-type: application/json' -H 'x-mock-pause-ms: 0' \
      -d '{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}'
  done | awk '{print $1*1000}' | median
}
echo
echo "streaming time to first byte (median of 200, new connection each):"
TD=$(ttfb "$(url_of direct)")
TK=$(ttfb "$(url_of keyrouter)")
awk -v d="$TD" -v k="$TK" 'BEGIN {printf "  direct %.3f ms, keyrouter %.3f ms, difference %+.3f ms (target: <= 0.5 ms)\n", d, k, k-d}'

echo
echo "keyrouter peak RSS with $KEYS registered keys: $(awk '/VmHWM/ {printf "%.1f MB", $2/1024}' /proc/$KR_PID/status) (target: < 50 MB)"
