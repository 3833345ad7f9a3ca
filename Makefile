# hxfr: the two commands are `make demo` and `make test`; both install what is missing.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: demo test check deps build lint check-macos fuzz bench vm-image vm-test

deps:
	@bash scripts/install-deps.sh

build: deps
	$(CARGO) build --release -p hxfr

demo: build
	./target/release/hxfr demo

# hxfr-vmtest/vm turns on the VM tests (they need `make vm-image`).
FEATURES = --features hxfr-vmtest/vm

# The fast loop: formatting, lints and unit tests. Needs no root and no QEMU
# (only the system libraries `make deps` installed once).
check:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets $(FEATURES) --locked -- -D warnings
	$(CARGO) test --workspace --lib --bins --locked

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets $(FEATURES) --locked -- -D warnings

# The macOS host, type-checked here (no Apple SDK or linker needed): hxfr-host
# and hxfr-encode with their defaults (VideoToolbox on, no Linux-only -sys
# crate), hxfr-encode with videotoolbox named, and `hxfr host` alone.
MACOS_TARGET = aarch64-apple-darwin
MACOS = --target $(MACOS_TARGET) --locked
check-macos:
	@rustup target list --installed | grep -qx $(MACOS_TARGET) || rustup target add $(MACOS_TARGET)
	$(CARGO) check $(MACOS) -p hxfr-host -p hxfr-encode
	$(CARGO) check $(MACOS) -p hxfr-encode --no-default-features --features videotoolbox
	$(CARGO) check $(MACOS) -p hxfr --no-default-features --features videotoolbox
	$(CARGO) clippy $(MACOS) -p hxfr-host -p hxfr-encode -- -D warnings
	$(CARGO) clippy $(MACOS) -p hxfr --no-default-features --features videotoolbox -- -D warnings

# What the VM tests boot, cached under target/vm: Debian's cloud kernel, a
# busybox initramfs with the static hxfr-vmguest, one with GStreamer and
# vsockenc, and vhost-device-vsock (about 2 minutes cold, seconds warm).
vm-image: deps
	bash scripts/vm/build.sh

# Guest and host across QEMU's virtual devices (about 30 s once built).
vm-test: vm-image
	@command -v cargo-nextest >/dev/null || $(CARGO) install cargo-nextest --locked
	$(CARGO) nextest run -p hxfr-vmtest $(FEATURES) --locked --no-fail-fast

# Everything, the VM tests included; cargo-nextest prints one summary line.
test: lint check-macos vm-image
	@command -v cargo-nextest >/dev/null || $(CARGO) install cargo-nextest --locked
	$(CARGO) nextest run --workspace $(FEATURES) --locked --no-fail-fast

# Fuzz a target with cargo-fuzz (installed if missing): the wire decoder by
# default, or the virtio-gpu device: FUZZ_TARGET=virtio_gpu FUZZ_SECONDS=600 make fuzz
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain take them.
FUZZ_TARGET ?= decode
FUZZ_SECONDS ?= 60
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $(FUZZ_TARGET) -- -max_total_time=$(FUZZ_SECONDS)

# The full performance matrix (about 10 minutes): tables on stdout and in
# target/bench/, with JSON and an SVG plot. docs/benchmarks.md holds a committed run.
bench: build
	mkdir -p target/bench
	./target/release/hxfr bench --json target/bench/benchmarks.json --plot target/bench/benchmarks.svg | tee target/bench/benchmarks.md
