#!/usr/bin/env bash
# Builds what `make vm-test` boots, under target/vm (cached; rerun is cheap):
#   vmlinuz            Debian's cloud kernel (apt-get download + dpkg -x, nothing installed)
#   guest.cpio.gz      busybox-static, the kernel's virtio/vsock modules, hxfr-vmguest (static)
#   gst.cpio.gz        the same plus GStreamer 1.22 from this machine's Debian packages
#                      (gst-launch-1.0, the plugins a test pipeline needs, their
#                      libraries) and our libgstvsockenc.so
#   bin/vhost-device-vsock   rust-vmm's vhost-user vsock backend (cargo install)
# Needs the Debian packages from scripts/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
VM=target/vm
CARGO=${CARGO:-cargo}
mkdir -p "$VM/cache"
log() { echo "vm-image: $*" >&2; }

# The kernel: whatever linux-image-cloud-amd64 points at today.
kpkg() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[^ ]*\)/\1/p' | head -1; }
KPKG=$(kpkg)
[ -n "$KPKG" ] || { apt-get update -qq && KPKG=$(kpkg); }
[ -n "$KPKG" ] || { log "cannot resolve linux-image-cloud-amd64 in Debian's package lists"; exit 1; }
if [ ! -e "$VM/kernel/.$KPKG" ]; then
    log "fetching $KPKG"
    rm -rf "$VM/kernel" "$VM"/cache/linux-image-*.deb
    fetch() { (cd "$VM/cache" && apt-get download "$KPKG" 2>&1 | grep -v '^W: Download is performed unsandboxed'); }
    # A stale package list names a kernel the archive no longer has.
    fetch || { apt-get update -qq && fetch; }
    dpkg -x "$VM"/cache/"$KPKG"_*.deb "$VM/kernel"
    touch "$VM/kernel/.$KPKG"
fi
KVER=${KPKG#linux-image-}
cp "$VM/kernel/boot/vmlinuz-$KVER" "$VM/vmlinuz"

# The guest program, static (glibc; nothing else to fetch).
log "building hxfr-vmguest (static)"
RUSTFLAGS="-C target-feature=+crt-static" $CARGO build --release --locked -q -p hxfr-vmguest \
    --target x86_64-unknown-linux-gnu --target-dir "$VM/cargo"
GUEST_BIN="$VM/cargo/x86_64-unknown-linux-gnu/release/hxfr-vmguest"

if [ ! -x "$VM/bin/vhost-device-vsock" ]; then
    log "building vhost-device-vsock (crates.io)"
    $CARGO install -q vhost-device-vsock --version 0.3.0 --locked --root "$VM"
fi

# Modules in load order (dependencies first).
MODS="drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko
drivers/virtio/virtio_pci_modern_dev.ko drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci.ko
drivers/char/virtio_console.ko
net/core/failover.ko drivers/net/net_failover.ko drivers/net/virtio_net.ko
net/vmw_vsock/vsock.ko net/vmw_vsock/vmw_vsock_virtio_transport_common.ko net/vmw_vsock/vmw_vsock_virtio_transport.ko
drivers/uio/uio.ko drivers/uio/uio_pci_generic.ko"

base_root() {
    local root=$1
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,lib/modules}
    cp /bin/busybox "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    for m in $MODS; do
        install -D -m 644 "$VM/kernel/lib/modules/$KVER/kernel/$m" "$root/lib/modules/$m"
    done
    echo $MODS > "$root/etc/hxfr-modules"
    install -m 755 scripts/vm/init "$root/init"
    install -m 755 "$GUEST_BIN" "$root/bin/hxfr-vmguest"
}

pack() { (cd "$1" && find . | cpio -o -H newc --quiet | gzip -1) > "$2.tmp" && mv "$2.tmp" "$2"; }

log "packing guest.cpio.gz"
base_root "$VM/root"
pack "$VM/root" "$VM/guest.cpio.gz"

# The GStreamer guest: this machine's own GStreamer (Debian's 1.22 packages)
# and exactly the libraries it loads, copied with their paths. Lighter and
# faster than a debootstrap root, and the same bits the element is tested with.
log "building libgstvsockenc.so"
$CARGO build --release --locked -q -p gst-vsockenc
GST_LIBDIR=$(pkg-config --variable=pluginsdir gstreamer-1.0)
PLUGINS="coreelements videotestsrc videoconvertscale videoparsersbad"
GROOT="$VM/gstroot"
base_root "$GROOT"
mkdir -p "$GROOT/gst"
files=(/usr/bin/gst-launch-1.0 /usr/bin/gst-inspect-1.0 target/release/libgstvsockenc.so)
for p in $PLUGINS; do files+=("$GST_LIBDIR/libgst$p.so"); done
copy_with_libs() {
    local f=$1 dest=$2
    install -D -m 755 "$f" "$dest"
    ldd "$f" | awk '/=> \// { print $3 } /^\s*\/lib/ { print $1 }' | while read -r lib; do
        [ -e "$GROOT$lib" ] || install -D -m 755 "$lib" "$GROOT$lib"
    done
}
for f in "${files[@]}"; do
    case $f in
        *.so) copy_with_libs "$f" "$GROOT/gst/${f##*/}" ;;
        *) copy_with_libs "$f" "$GROOT$f" ;;
    esac
done
# The dynamic loader at the path binaries name.
install -D -m 755 /lib64/ld-linux-x86-64.so.2 "$GROOT/lib64/ld-linux-x86-64.so.2"
log "packing gst.cpio.gz"
pack "$GROOT" "$VM/gst.cpio.gz"
ls -la "$VM"/vmlinuz "$VM"/*.cpio.gz >&2
