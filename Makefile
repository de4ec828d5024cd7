# `make demo` and `make test` do all set-up on a fresh Debian machine (root).
CARGO ?= cargo
APT_PACKAGES := build-essential pkg-config protobuf-compiler openssl curl util-linux python3-pip clang libbpf-dev
# Real servers and clients the integration tests start (loopback only).
TEST_APT_PACKAGES := redis-server redis-tools postgresql postgresql-client iproute2 tshark gdb nginx podman runc systemd
# The mesh benchmark compares against iperf3 and stunnel4 on the same namespace
# topology; the credential file benchmark against bindfs (the FUSE floor); the
# injection benchmark uses nginx and Redis.
BENCH_APT_PACKAGES := iperf3 stunnel4 bindfs nginx redis-server
PY_SPIFFE := spiffe==0.3.2
# AWS for the exchange tests: moto's server, and boto3 as the unmodified client.
PY_AWS := moto[server]==5.2.1 boto3
# The OAuth2 server of the exchange tests (node's oidc-provider), pinned by
# its package-lock.json.
PEERS := crates/cli/tests/peers

.PHONY: demo test bench deps test-deps build build-release fuzz fuzz-check clean

# Installs only the packages in $(1) that are missing; apt-get update runs
# only when something is.
define apt_install
	@missing=""; \
	for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
endef

deps:
	$(call apt_install,$(APT_PACKAGES))
	@command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3; }
	@command -v $(CARGO) >/dev/null || { echo "error: cargo not found (Rust 1.95 via rustup is required)"; exit 1; }

test-deps: deps
	$(call apt_install,$(TEST_APT_PACKAGES))
	@python3 -c "import spiffe" 2>/dev/null || python3 -m pip install -q "$(PY_SPIFFE)"
	@python3 -c "import moto.server, flask, boto3" 2>/dev/null || python3 -m pip install -q $(foreach p,$(PY_AWS),"$(p)")
	@command -v node >/dev/null && command -v npm >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; }
	@[ -d $(PEERS)/node_modules/oidc-provider ] || npm ci --prefix $(PEERS) --no-audit --no-fund --loglevel=error

build: deps
	$(CARGO) build --locked -p tether

build-release: deps
	$(CARGO) build --locked --release -p tether

demo: build
	$(call apt_install,redis-server redis-tools)
	./scripts/demo.sh

test: test-deps
	$(CARGO) test --locked --workspace -- --test-threads=2

bench: build-release test-deps
	$(call apt_install,$(BENCH_APT_PACKAGES))
	./scripts/bench.sh

clean:
	$(CARGO) clean
	rm -rf /var/tmp/tether-demo

# Compiles every fuzz target on stable (running them needs cargo-fuzz).
fuzz-check:
	cd fuzz && CARGO_TARGET_DIR=$(CURDIR)/target $(CARGO) check --bins

# Runs every fuzz target for FUZZ_SECONDS (default 60) each with cargo-fuzz,
# starting from the committed seeds. cargo-fuzz needs the nightly toolchain
# for its sanitizer build; only this target uses it, never the product.
FUZZ_SECONDS ?= 60
fuzz: deps
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	@set -e; for t in $$(sed -n 's/^name = "\(.*\)"/\1/p' fuzz/Cargo.toml | grep -v '^tether-fuzz$$'); do \
	  mkdir -p fuzz/corpus/$$t; \
	  echo "== $$t ($(FUZZ_SECONDS) s)"; \
	  (cd fuzz && CARGO_TARGET_DIR=$(CURDIR)/target/fuzz $(CARGO) +nightly fuzz run $$t corpus/$$t seeds/$$t -- -max_total_time=$(FUZZ_SECONDS)); \
	done
