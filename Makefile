# keyrouter developer commands. `make run` and `make test` are all a fresh
# machine needs; `.ci/run` runs `make test`.

CARGO ?= cargo
SHELL := /bin/bash

.PHONY: run test build release release-pgo lint fmt check-config bench bench-load

# Starts keyrouter on the embedded defaults (config/keyrouter.toml: SQLite,
# local rate limits), with development secrets from .env (created when missing).
run: .env
	set -a && . ./.env && set +a && $(CARGO) run -- serve

# Fresh development secrets: a Fernet key (32 random bytes, url-safe base64)
# and an admin API key. Never commit .env (it is git-ignored).
.env:
	@umask 077 && { \
	  echo "# Development secrets created by 'make run'. Keep out of version control."; \
	  echo "KEYROUTER_FERNET_KEYS=$$(head -c 32 /dev/urandom | base64 | tr '+/' '-_')"; \
	  echo "KEYROUTER_ADMIN_API_KEY=$$(head -c 48 /dev/urandom | base64 | tr -d '+/=\n' | head -c 48)"; \
	} > .env
	@echo "created .env with development secrets"

# The whole test suite.
test:
	$(CARGO) test --all-targets

build:
	$(CARGO) build

release:
	$(CARGO) build --release

# The release build tuned with a profile of its own request path
# (benches/load/pgo.sh: needs wrk and `rustup component add llvm-tools`).
release-pgo:
	benches/load/pgo.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# keyrouter vs direct vs nginx under load (wrk; nginx optional). Not a test:
# it prints figures, it does not fail on them.
bench-load:
	benches/load/run.sh

# Criterion micro-benchmarks of the hot functions.
bench:
	$(CARGO) bench --bench hot_paths

check-config: .env
	set -a && . ./.env && set +a && $(CARGO) run -q -- check-config
