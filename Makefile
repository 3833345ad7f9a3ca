# hxfr: the two commands are `make demo` and `make test`; both install what is missing.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: demo test deps build lint fuzz bench

deps:
	@bash scripts/install-deps.sh

build: deps
	$(CARGO) build --release -p hxfr

demo: build
	./target/release/hxfr demo

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# cargo-nextest prints one summary line for the whole workspace.
test: lint
	@command -v cargo-nextest >/dev/null || $(CARGO) install cargo-nextest --locked
	$(CARGO) nextest run --workspace --locked --no-fail-fast

# Fuzz the decoder (needs a nightly toolchain and cargo-fuzz): FUZZ_SECONDS=300 make fuzz
FUZZ_SECONDS ?= 60
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && $(CARGO) +nightly fuzz run decode -- -max_total_time=$(FUZZ_SECONDS)

# The full performance matrix (about 10 minutes): tables on stdout and in
# target/bench/, with JSON and an SVG plot. docs/benchmarks.md holds a committed run.
bench: build
	mkdir -p target/bench
	./target/release/hxfr bench --json target/bench/benchmarks.json --plot target/bench/benchmarks.svg | tee target/bench/benchmarks.md
