#!/usr/bin/env bash
# Installs the system packages hxfr needs on Debian 12, skipping what is there.
# Idempotent: safe to run before every build. Needs root (or sudo) for apt-get.
set -euo pipefail

PKGS=(
  pkg-config
  # GStreamer 1.22: headers for gstreamer-rs, plugins for tests and hardware backends
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev libgstreamer-plugins-bad1.0-dev
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
  gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-tools
  # the bridge's sources and its test pattern's clock (timeoverlay)
  gstreamer1.0-x gstreamer1.0-pipewire
  # x264 for the host's default encoder; clang for bindgen, nasm for assembly
  libx264-dev libclang-dev clang nasm
  # browser tests, virtual display, TCP<->UNIX relay used by the bench
  chromium chromium-driver xvfb socat
  # make vm-test: QEMU (with its BIOS and virtio-net option ROM), busybox for
  # the guest's userland, cpio for its initramfs
  qemu-system-x86 qemu-system-data seabios ipxe-qemu busybox-static cpio
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PKGS[@]} system packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root to install: ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi

echo "install-deps: installing ${#missing[@]} package(s): ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
