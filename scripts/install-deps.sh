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
  # make vm-test: busybox for the guest's userland, cpio for its initramfs
  # (QEMU itself comes from bookworm-backports, below), and a private D-Bus
  # bus for QEMU's D-Bus display (scanout hot-plug)
  busybox-static cpio dbus-daemon
  # the desktop: a headless GNOME compositor, its PipeWire, a Wayland terminal
  # for `make demo` and the input tests; an X terminal and clipboard tools for
  # the X11 ones
  mutter pipewire wireplumber foot dbus-x11 xterm xclip wl-clipboard
)

# QEMU 10 from bookworm-backports: bookworm's 7.2 refuses vhost-user-gpu-pci
# without KVM ("requires kvm"), and the VM tests run under TCG. Its libraries
# come from plain bookworm. The D-Bus display module (scanout hot-plug through
# org.qemu.Display1) is in qemu-system-modules-opengl.
QEMU_MIN=10
QEMU_PKGS=(qemu-system-x86 qemu-system-data qemu-system-modules-opengl seabios ipxe-qemu)
BACKPORTS=/etc/apt/sources.list.d/hxfr-bookworm-backports.sources

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

qemu_ok() {
  local v
  v=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p')
  [ -n "$v" ] && [ "$v" -ge "$QEMU_MIN" ] || return 1
  for p in "${QEMU_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || return 1
  done
}

need_qemu=0
qemu_ok || need_qemu=1

if [ ${#missing[@]} -eq 0 ] && [ $need_qemu -eq 0 ]; then
  echo "install-deps: all $((${#PKGS[@]} + ${#QEMU_PKGS[@]})) system packages present ($(qemu-system-x86_64 --version | head -1))"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root to install: ${missing[*]} ${QEMU_PKGS[*]}" >&2; exit 1; }
  SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
if [ $need_qemu -eq 1 ] && [ ! -e "$BACKPORTS" ]; then
  echo "install-deps: adding bookworm-backports as an apt source (for QEMU $QEMU_MIN)"
  printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
    'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' | $SUDO tee "$BACKPORTS" >/dev/null
fi
$SUDO apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${#missing[@]} package(s): ${missing[*]}"
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ $need_qemu -eq 1 ]; then
  echo "install-deps: installing QEMU from bookworm-backports: ${QEMU_PKGS[*]}"
  $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports "${QEMU_PKGS[@]}" >/dev/null
  qemu_ok || { echo "install-deps: QEMU $QEMU_MIN or newer did not install: $(qemu-system-x86_64 --version | head -1)" >&2; exit 1; }
fi
echo "install-deps: done ($(qemu-system-x86_64 --version | head -1))"
