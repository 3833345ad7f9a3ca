#!/usr/bin/env bash
# Builds what `make vm-test` boots, under target/vm (cached; rerun is cheap):
#   vmlinuz            Debian's cloud kernel (apt-get download + dpkg -x, nothing installed)
#   guest.cpio.gz      busybox-static, the kernel's virtio/vsock modules, hxfr-vmguest (static)
#   vmlinuz-generic, gpu.cpio.gz   Debian's generic kernel (the cloud one has no DRM)
#                      with its virtio-gpu, virtio-serial and vsock modules,
#                      busybox and hxfr-vmguest
#   gst.cpio.gz        the same plus GStreamer 1.22 from this machine's Debian packages
#                      (gst-launch-1.0, the plugins a test pipeline needs, their
#                      libraries) and our libgstvsockenc.so
#   gst-gpu.cpio.gz    the same on the generic kernel's virtio-gpu modules, with
#                      the dmabuf_frames example (vsockenc fed DMA-BUFs)
#   bin/vhost-device-vsock   rust-vmm's vhost-user vsock backend (cargo install)
# Needs the Debian packages from scripts/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
VM=target/vm
CARGO=${CARGO:-cargo}
mkdir -p "$VM/cache"
log() { echo "vm-image: $*" >&2; }

# A kernel: whatever the meta package ($1) points at today, unpacked into $2.
# Prints its version.
kernel() {
    local meta=$1 dir=$2 pkg
    kpkg() { apt-cache depends "$meta" 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[^ ]*\)/\1/p' | head -1; }
    pkg=$(kpkg)
    [ -n "$pkg" ] || { apt-get update -qq && pkg=$(kpkg); }
    [ -n "$pkg" ] || { log "cannot resolve $meta in Debian's package lists"; exit 1; }
    if [ ! -e "$dir/.$pkg" ]; then
        log "fetching $pkg"
        rm -rf "$dir" "$VM"/cache/"$pkg"_*.deb
        fetch() { (cd "$VM/cache" && apt-get download "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed') >&2; }
        # A stale package list names a kernel the archive no longer has.
        fetch || { apt-get update -qq && fetch; }
        dpkg -x "$VM"/cache/"$pkg"_*.deb "$dir"
        touch "$dir/.$pkg"
    fi
    echo "${pkg#linux-image-}"
}
# The cloud kernel boots fastest; it has no DRM, so the virtio-gpu test
# boots Debian's generic kernel.
KVER=$(kernel linux-image-cloud-amd64 "$VM/kernel")
cp "$VM/kernel/boot/vmlinuz-$KVER" "$VM/vmlinuz"
GVER=$(kernel linux-image-amd64 "$VM/kernel-generic")
cp "$VM/kernel-generic/boot/vmlinuz-$GVER" "$VM/vmlinuz-generic"

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

# base_root DIR KERNEL_DIR KERNEL_VERSION MODULES
base_root() {
    local root=$1 kdir=$2 kver=$3 mods=$4
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,lib/modules}
    cp /bin/busybox "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    for m in $mods; do
        install -D -m 644 "$kdir/lib/modules/$kver/kernel/$m" "$root/lib/modules/$m"
    done
    echo $mods > "$root/etc/hxfr-modules"
    install -m 755 scripts/vm/init "$root/init"
    install -m 755 "$GUEST_BIN" "$root/bin/hxfr-vmguest"
}

pack() { (cd "$1" && find . | cpio -o -H newc --quiet | gzip -1) > "$2.tmp" && mv "$2.tmp" "$2"; }

log "packing guest.cpio.gz"
base_root "$VM/root" "$VM/kernel" "$KVER" "$MODS"
pack "$VM/root" "$VM/guest.cpio.gz"

log "packing gpu.cpio.gz"
GPU_MODS="drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko
drivers/virtio/virtio_pci_modern_dev.ko drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci.ko
drivers/char/virtio_console.ko drivers/virtio/virtio_dma_buf.ko
net/vmw_vsock/vsock.ko net/vmw_vsock/vmw_vsock_virtio_transport_common.ko net/vmw_vsock/vmw_vsock_virtio_transport.ko
drivers/gpu/drm/drm.ko drivers/gpu/drm/drm_kms_helper.ko drivers/gpu/drm/drm_shmem_helper.ko
drivers/gpu/drm/virtio/virtio-gpu.ko"
base_root "$VM/gpuroot" "$VM/kernel-generic" "$GVER" "$GPU_MODS"
pack "$VM/gpuroot" "$VM/gpu.cpio.gz"

# The GStreamer guest: this machine's own GStreamer (Debian's 1.22 packages)
# and exactly the libraries it loads, copied with their paths. Lighter and
# faster than a debootstrap root, and the same bits the element is tested with.
log "building libgstvsockenc.so and the DMA-BUF frame source"
$CARGO build --release --locked -q -p gst-vsockenc --lib --example dmabuf_frames
GST_LIBDIR=$(pkg-config --variable=pluginsdir gstreamer-1.0)
PLUGINS="coreelements videotestsrc videoconvertscale videoparsersbad app"
files=(/usr/bin/gst-launch-1.0 /usr/bin/gst-inspect-1.0 target/release/libgstvsockenc.so)
for p in $PLUGINS; do files+=("$GST_LIBDIR/libgst$p.so"); done
# copy_with_libs ROOT FILE DEST: FILE and the libraries it loads, at their paths.
copy_with_libs() {
    local root=$1 f=$2 dest=$3
    install -D -m 755 "$f" "$dest"
    ldd "$f" | awk '/=> \// { print $3 } /^\s*\/lib/ { print $1 }' | while read -r lib; do
        [ -e "$root$lib" ] || install -D -m 755 "$lib" "$root$lib"
    done
}
# add_gstreamer ROOT [EXTRA_BINARY...]: GStreamer, vsockenc and the binaries into ROOT.
add_gstreamer() {
    local root=$1
    shift
    mkdir -p "$root/gst"
    for f in "${files[@]}" "$@"; do
        case $f in
            *.so) copy_with_libs "$root" "$f" "$root/gst/${f##*/}" ;;
            /usr/*) copy_with_libs "$root" "$f" "$root$f" ;;
            *) copy_with_libs "$root" "$f" "$root/bin/${f##*/}" ;;
        esac
    done
    # The dynamic loader at the path binaries name.
    install -D -m 755 /lib64/ld-linux-x86-64.so.2 "$root/lib64/ld-linux-x86-64.so.2"
}
GROOT="$VM/gstroot"
base_root "$GROOT" "$VM/kernel" "$KVER" "$MODS"
add_gstreamer "$GROOT"
log "packing gst.cpio.gz"
pack "$GROOT" "$VM/gst.cpio.gz"

# The GStreamer guest on the generic kernel with virtio-gpu: vsockenc fed
# DMA-BUFs of dumb buffers (resource mode), by the dmabuf_frames example.
log "packing gst-gpu.cpio.gz"
base_root "$VM/gstgpuroot" "$VM/kernel-generic" "$GVER" "$GPU_MODS"
add_gstreamer "$VM/gstgpuroot" target/release/examples/dmabuf_frames
pack "$VM/gstgpuroot" "$VM/gst-gpu.cpio.gz"
ls -la "$VM"/vmlinuz* "$VM"/*.cpio.gz >&2
