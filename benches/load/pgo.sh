#!/usr/bin/env bash
# `make release-pgo`: a profile-guided release build of keyrouter.
#
# 1. builds keyrouter instrumented (-Cprofile-generate);
# 2. runs it in front of the load benchmark's mock provider and sends it
#    a mix of traffic with wrk: OpenAI chat completions (JSON and SSE),
#    Anthropic messages and embeddings, through 100 registered keys;
# 3. merges the profile and builds keyrouter again with it (-Cprofile-use).
#
# The compiler then lays out and inlines the request path (hyper's parsers,
# the sanitizer, key choice) for how it actually runs. Paths the mix does
# not reach (provider errors, the management API) are compiled as cold,
# not wrongly: they stay correct, only less tuned.
#
# Needs wrk and llvm-profdata from the Rust toolchain
# (`rustup component add llvm-tools`). Prints the optimized binary's path
# on its last line. Builds go to $CARGO_TARGET_DIR/pgo-generate and
# $CARGO_TARGET_DIR/pgo, apart from the plain builds (their flags differ).
set -euo pipefail
cd "$(dirname "$0")/../.."
. benches/load/common.sh

TARGET_DIR=$(realpath -m "${CARGO_TARGET_DIR:-target}")
PROFDATA=$(llvm_profdata)
[ -x "$PROFDATA" ] || { echo "llvm-profdata is missing: rustup component add llvm-tools" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk is not installed (Debian: apt-get install wrk)" >&2; exit 1; }
UP_PORT=19010 KR_PORT=19012 KR_ADMIN=19013 KR_OPS=19014
ensure_ports_free $UP_PORT $KR_PORT $KR_ADMIN $KR_OPS

PROFILE_DIR="$TARGET_DIR/pgo-profile"
rm -rf "$PROFILE_DIR"
mkdir -p "$PROFILE_DIR"
echo "building keyrouter instrumented..." >&2
CARGO_TARGET_DIR="$TARGET_DIR/pgo-generate" RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$PROFILE_DIR/build" \
  cargo build --release --bin keyrouter >&2
cargo build --release --features load-bench --bin keyrouter-mock-upstream >&2
GEN="$TARGET_DIR/pgo-generate/release/keyrouter"

WORK=$(mktemp -d)
PIDS=()
trap cleanup EXIT

"$TARGET_DIR/release/keyrouter-mock-upstream" "127.0.0.1:$UP_PORT" &
PIDS+=($!)
wait_http "http://127.0.0.1:$UP_PORT/v1/models"
keyrouter_config $UP_PORT $KR_PORT $KR_ADMIN $KR_OPS "$WORK/keyrouter.db" > "$WORK/keyrouter.toml"
ADMIN_KEY=$(new_admin_key)
# Only the serving process writes the profile used (the build scripts of
# the instrumented build wrote theirs elsewhere).
LLVM_PROFILE_FILE="$PROFILE_DIR/run/keyrouter-%p-%m.profraw" \
  KEYROUTER_FERNET_KEYS="$("$GEN" gen-fernet-key)" KEYROUTER_ADMIN_API_KEY="$ADMIN_KEY" \
  "$GEN" serve --config "$WORK/keyrouter.toml" 2>"$WORK/keyrouter.log" &
KR_PID=$!
PIDS+=($KR_PID)
wait_http "http://127.0.0.1:$KR_OPS/readyz"
for provider in openai anthropic; do
  for i in $(seq 1 50); do
    curl -fs -o /dev/null -X POST "http://127.0.0.1:$KR_ADMIN/admin/v1/keys" \
      -H "X-API-Key: $ADMIN_KEY" -H "content-type: application/json" \
      -d "{\"key_material\":\"sk-pgo-$provider-$(printf %04d "$i")-0123456789abcdef\",\"provider_id\":\"$provider\"}"
  done
done
sleep 2.5   # one pool refresh

# One wrk script per kind of request: method, headers and body.
request() {
  cat > "$WORK/$1.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer client-side-key-is-dropped"
wrk.body = '$2'
EOF
}
request chat '{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello in one short sentence, please."}],"temperature":0.2}'
request chat_stream '{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Say hello."}]}'
request messages '{"model":"claude-sonnet-4-5","max_tokens":256,"messages":[{"role":"user","content":"Say hello."}]}'
request messages_stream '{"model":"claude-sonnet-4-5","max_tokens":256,"stream":true,"messages":[{"role":"user","content":"Say hello."}]}'
request embeddings '{"model":"text-embedding-3-small","input":"hello"}'
echo "training..." >&2
train() { wrk -t1 -c"$3" -d"$2" -s "$WORK/$1.lua" "http://127.0.0.1:$KR_PORT$4" >/dev/null; }
train chat 6s 64 /openai/v1/chat/completions
train chat_stream 3s 16 /openai/v1/chat/completions
train messages 2s 32 /anthropic/v1/messages
train messages_stream 2s 16 /anthropic/v1/messages
train embeddings 1s 16 /openai/v1/embeddings
# A graceful stop writes the profile.
kill -TERM "$KR_PID"
wait "$KR_PID" || true

"$PROFDATA" merge -o "$PROFILE_DIR/merged.profdata" "$PROFILE_DIR"/run/*.profraw
# Named by its content: cargo rebuilds when the flags change, and a new
# profile under the same name would leave the previous build in place.
PROFILE="$PROFILE_DIR/keyrouter-$(sha256sum "$PROFILE_DIR/merged.profdata" | cut -c1-16).profdata"
mv "$PROFILE_DIR/merged.profdata" "$PROFILE"
echo "building keyrouter with the profile..." >&2
CARGO_TARGET_DIR="$TARGET_DIR/pgo" RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PROFILE" \
  cargo build --release --bin keyrouter >&2
echo "$TARGET_DIR/pgo/release/keyrouter"
