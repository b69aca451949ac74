# Shell functions shared by the load benchmark (run.sh) and the
# profile-guided build (pgo.sh), which both run keyrouter in front of the
# mock provider. Sourced, not run.

wait_http() {
  for _ in $(seq 1 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "no answer from $1" >&2
  exit 1
}

# Where the toolchain's llvm-profdata is (`rustup component add
# llvm-tools` installs it).
llvm_profdata() {
  echo "$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | awk '/^host:/ {print $2}')/bin/llvm-profdata"
}

# Stops the script when something already listens on one of the ports.
ensure_ports_free() {
  for port in "$@"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "port $port is in use: stop what listens there first" >&2
      exit 1
    fi
  done
}

# keyrouter's configuration: OpenAI (the default provider) and Anthropic
# on the mock at port $1; proxy, admin and ops listeners on $2, $3, $4;
# the SQLite store at $5.
keyrouter_config() {
  cat <<EOF
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
ops_listen = "127.0.0.1:$4"
shutdown_drain = "1s"
[[providers]]
id = "openai"
kind = "openai"
base_url = "http://127.0.0.1:$1"
route_prefix = "/openai"
default = true
[[providers]]
id = "anthropic"
kind = "anthropic"
base_url = "http://127.0.0.1:$1"
route_prefix = "/anthropic"
[store]
path = "$5"
[log]
level = "warn"
EOF
}

# A fresh admin API key for one run.
new_admin_key() {
  echo "bench-admin-key-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
}

# Stops every process in the caller's PIDS and removes its WORK directory;
# the scripts run it on exit (`trap cleanup EXIT`).
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
