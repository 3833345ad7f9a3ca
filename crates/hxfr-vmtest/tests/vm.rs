//! Guest and host across real virtual devices: QEMU boots a busybox guest
//! whose `hxfr-vmguest` (built from hxfr-guest, the crate vsockenc uses) or
//! `gst-launch-1.0 … vsockenc …` sends frames to an hxfr host on this machine
//! through virtio-serial, user networking, ivshmem and vhost-user vsock.
//! Every answer comes back into the guest, which writes it to a second
//! virtio-serial port backed by a file; the test decodes that file and
//! compares the pictures with what the guest sent.
//!
//! Needs the image from `scripts/vm/build.sh`; `make vm-test` runs both.
#![cfg(feature = "vm")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use hxfr_host::{HostConfig, HostHandle, ListenAddr};
use hxfr_testkit::{Content, Output, decode_h264, pattern_bgrx, pattern_nv12, psnr};
use hxfr_vmtest::{CountingRelay, Daemon, Image, Qemu, read_records, split_access_units, wait_for_path};

const W: u32 = 320;
const H: u32 = 240;
/// Helix's port name for frames.
const PORT: &str = "com.helix.frame-export";
/// Where the guest writes the answers it got (a file on the host).
const OUT: &str = "org.hxfr.out";
/// Longest a guest may take, boot to power-off, under TCG.
const VM_TIMEOUT: Duration = Duration::from_secs(150);
const MIN_PSNR: f64 = 30.0;

fn host(listen: Vec<ListenAddr>, connect: Vec<PathBuf>, shm: Option<PathBuf>) -> HostHandle {
    let cfg = HostConfig { encoder: hxfr_encode::EncoderKind::X264, shm_path: shm, ..HostConfig::default() };
    hxfr_host::spawn(cfg, listen.clone(), connect)
        .unwrap_or_else(|e| panic!("host on {listen:?}: {e} (is another hxfr host running?)"))
}

fn vmguest(host: &str, frames: u32, extra: &str) -> String {
    format!("hxfr-vmguest --host {host} --frames {frames} --size {W}x{H} --out /dev/virtio-ports/{OUT} {extra}")
}

fn serial_addr() -> String {
    format!("serial:/dev/virtio-ports/{PORT}")
}

/// Frames the host encoded, over all its sessions, and the bytes it sent.
fn host_totals(h: &HostHandle) -> (u64, u64) {
    h.stats().iter().fold((0, 0), |(f, b), s| (f + s.info.frames, b + s.info.bytes_out))
}

/// The guest's records: one per frame, in order, and each decodes to the
/// picture the guest sent.
fn check_answers(out: &Path, frames: u32, format: Output) -> Vec<Bytes> {
    let records = read_records(out);
    let pts: Vec<u32> = records.iter().map(|r| r.0).collect();
    assert_eq!(pts, (0..frames).collect::<Vec<_>>(), "answers in the guest, in order");
    let aus: Vec<Bytes> = records.into_iter().map(|r| r.1).collect();
    let pictures = decode_h264(&aus, format).expect("decodes");
    assert_eq!(pictures.len(), frames as usize, "one picture per access unit");
    for (i, pic) in pictures.iter().enumerate() {
        let (src, stride) = match format {
            Output::Bgrx => (pattern_bgrx(Content::Motion, W, H, W as usize * 4, i as u32), W as usize * 4),
            Output::Nv12 => (pattern_nv12(W, H, W as usize, i as u32), W as usize),
        };
        let db = psnr(format, &src, stride, pic);
        assert!(db > MIN_PSNR, "frame {i}: PSNR {db:.1} dB");
    }
    aus
}

#[track_caller]
fn assert_guest_ok(o: &hxfr_vmtest::Outcome, frames: u32) -> hxfr_vmtest::GuestResult {
    let r = o.result.clone().unwrap_or_else(|| panic!("no result from the guest:\n{}", o.console));
    assert_eq!(o.status, Some(0), "guest command failed:\n{}", o.console);
    assert_eq!((r.frames, r.answered, r.errors, r.order_errors), (frames as u64, frames as u64, 0, 0), "{}", o.console);
    r
}

/// Path 1: virtio-serial, the host connected to the port's chardev socket.
#[test]
fn virtio_serial_carries_frames_and_answers() {
    let img = Image::locate();
    let dir = tempfile::tempdir().unwrap();
    let (sock, out) = (dir.path().join("frame.sock"), dir.path().join("out.bin"));
    let vm =
        Qemu::new(&img, &img.guest).port_socket(PORT, &sock).port_file(OUT, &out).run(&vmguest(&serial_addr(), 30, ""));
    let host = host(vec![], vec![sock], None);
    let o = vm.finish(VM_TIMEOUT);
    let r = assert_guest_ok(&o, 30);
    check_answers(&out, 30, Output::Bgrx);
    assert_eq!(host_totals(&host), (30, r.bytes), "the host's stats agree with the guest");
}

/// Path 2: TCP through QEMU user networking, to 10.0.2.2:15937 as Helix's
/// test plan has it: QEMU turns it into a connection to this machine's
/// 127.0.0.1:15937, where the host listens.
#[test]
fn user_networking_reaches_the_host_at_10_0_2_2() {
    let img = Image::locate();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.bin");
    let host = host(vec![ListenAddr::default()], vec![], None);
    let vm = Qemu::new(&img, &img.guest).user_net().port_file(OUT, &out).run(&vmguest("tcp:10.0.2.2:15937", 30, ""));
    let o = vm.finish(VM_TIMEOUT);
    let r = assert_guest_ok(&o, 30);
    check_answers(&out, 30, Output::Bgrx);
    assert_eq!(host_totals(&host), (30, r.bytes));
    // QEMU's slirp made the connection, from this machine's loopback.
    assert!(host.stats().iter().all(|s| s.info.peer.starts_with("tcp:127.0.0.1:")), "{:?}", host.stats());
}

/// Path 3: shared memory. The guest writes NV12 frames into ivshmem's BAR 2
/// and names them over virtio-serial; the host reads the same backing file.
#[test]
fn ivshmem_frames_are_encoded_from_the_shared_file() {
    let img = Image::locate();
    let dir = tempfile::tempdir().unwrap();
    let (sock, out, shm) = (dir.path().join("frame.sock"), dir.path().join("out.bin"), dir.path().join("shm"));
    std::fs::File::create(&shm).unwrap().set_len(16 << 20).unwrap();
    let vm = Qemu::new(&img, &img.guest).port_socket(PORT, &sock).port_file(OUT, &out).ivshmem(&shm).run(&vmguest(
        &serial_addr(),
        30,
        "--shm auto --format nv12",
    ));
    let host = host(vec![], vec![sock], Some(shm));
    let o = vm.finish(VM_TIMEOUT);
    let r = assert_guest_ok(&o, 30);
    assert!(o.console.contains("shared memory 16777216 bytes"), "{}", o.console);
    check_answers(&out, 30, Output::Nv12);
    assert_eq!(host_totals(&host), (30, r.bytes));
    let frame_bytes = (W * H * 3 / 2) as u64;
    assert!(host.stats().iter().all(|s| s.info.bytes_in == 30 * frame_bytes), "{:?}", host.stats());
}

/// Path 4: vsock. vhost-device-vsock serves the guest's virtio-vsock device
/// and turns connections to CID 2 port 5000 into connections to
/// `<uds-path>_5000` on this machine, where the host listens.
#[test]
fn vsock_through_vhost_device_vsock() {
    let img = Image::locate();
    let dir = tempfile::tempdir().unwrap();
    let (vhost, uds, out) = (dir.path().join("vhost.sock"), dir.path().join("vsock.sock"), dir.path().join("out.bin"));
    let _backend = vhost_device_vsock(&img, &vhost, &uds);
    let host = host(vec![ListenAddr::Unix(dir.path().join("vsock.sock_5000"))], vec![], None);
    let vm = Qemu::new(&img, &img.guest).vhost_vsock(&vhost).port_file(OUT, &out).run(&vmguest("vsock:2:5000", 30, ""));
    let o = vm.finish(VM_TIMEOUT);
    let r = assert_guest_ok(&o, 30);
    check_answers(&out, 30, Output::Bgrx);
    assert_eq!(host_totals(&host), (30, r.bytes));
}

/// rust-vmm's vhost-user vsock backend for a guest with CID 3: QEMU connects
/// to `vhost`, guest connections to CID 2 port P come out at `<uds>_P`.
fn vhost_device_vsock(img: &Image, vhost: &Path, uds: &Path) -> Daemon {
    let d = Daemon(
        Command::new(&img.vhost_vsock)
            .arg("--guest-cid=3")
            .arg(format!("--socket={}", vhost.display()))
            .arg(format!("--uds-path={}", uds.display()))
            .spawn()
            .expect("vhost-device-vsock"),
    );
    assert!(wait_for_path(vhost, Duration::from_secs(10)), "vhost-device-vsock made no socket");
    d
}

/// A guest program that dies half-way through sending a frame leaves the
/// host holding half a message on the port. The next program on the same
/// port must get through: the host drops the cut-off message and the
/// HELLO handshake skips the answers meant for the dead one.
#[test]
fn virtio_serial_recovers_from_a_guest_dying_mid_frame() {
    let img = Image::locate();
    let dir = tempfile::tempdir().unwrap();
    let (sock, out) = (dir.path().join("frame.sock"), dir.path().join("out.bin"));
    let cmd = format!(
        "hxfr-vmguest --host {s} --frames 8 --size {W}x{H} --die-mid-frame 4; echo first run ended: $?; {}",
        vmguest(&serial_addr(), 20, ""),
        s = serial_addr()
    );
    let vm = Qemu::new(&img, &img.guest).port_socket(PORT, &sock).port_file(OUT, &out).run(&cmd);
    let host = host(vec![], vec![sock], None);
    let o = vm.finish(VM_TIMEOUT);
    assert!(o.console.contains("dying half-way through frame 4"), "{}", o.console);
    assert!(o.console.contains("first run ended: 3"), "{}", o.console);
    assert_guest_ok(&o, 20);
    check_answers(&out, 20, Output::Bgrx);
    let (frames, _) = host_totals(&host);
    assert!((24..=26).contains(&frames), "4 frames of the first run (perhaps 5) and 20 of the second: {frames}");
}

/// The host goes away mid-stream and a new one takes its place on the same
/// chardev. The guest's writes wait while the port has no host; frames lost
/// in the switch show as a gap in the answers, and the guest then says HELLO
/// again and resends every frame it had no answer for. Nothing is lost or
/// doubled.
#[test]
fn virtio_serial_recovers_from_a_host_restart() {
    let img = Image::locate();
    let dir = tempfile::tempdir().unwrap();
    let (sock, out) = (dir.path().join("frame.sock"), dir.path().join("out.bin"));
    let vm = Qemu::new(&img, &img.guest).port_socket(PORT, &sock).port_file(OUT, &out).run(&vmguest(
        &serial_addr(),
        60,
        "--pace-ms 40 --reply-timeout 5",
    ));
    let first = host(vec![], vec![sock.clone()], None);
    let seen = vm.wait_line(|l| l.contains("20 of 60 frames answered"), VM_TIMEOUT);
    assert!(seen.is_some(), "{}", vm.console());
    first.stop();
    std::thread::sleep(Duration::from_secs(1));
    let second = host(vec![], vec![sock], None);
    let o = vm.finish(VM_TIMEOUT);
    let r = assert_guest_ok(&o, 60);
    check_answers(&out, 60, Output::Bgrx);
    // Whether frames were lost in the switch (the guest then starts over:
    // "reconnects") depends on where the guest was; either way the new host
    // encoded the rest, from a keyframe of its own.
    let (frames, _) = host_totals(&second);
    assert!((20..=40).contains(&frames), "the new host encoded what was left: {frames}\n{}", o.console);
    assert!(r.keyframes >= 2, "{}", o.console);
}

/// The real element in a GStreamer guest: `videotestsrc ! vsockenc ! h264parse ! filesink`.
fn gst_pipeline(host: &str, frames: u32) -> String {
    format!(
        "export GST_PLUGIN_SYSTEM_PATH=/gst GST_REGISTRY=/tmp/gst-registry.bin GST_REGISTRY_FORK=no; \
         gst-launch-1.0 -q videotestsrc num-buffers={frames} pattern=red ! \
         video/x-raw,format=BGRx,width={W},height={H},framerate=30/1 ! vsockenc host={host} ! h264parse ! \
         filesink location=/dev/virtio-ports/{OUT}"
    )
}

/// What came out of `h264parse ! filesink`: `frames` pictures, all red.
fn check_red_stream(out: &Path, frames: u32) {
    let stream = std::fs::read(out).unwrap();
    let aus = split_access_units(&stream);
    assert_eq!(aus.len(), frames as usize, "access units in the guest's file");
    let pictures = decode_h264(&aus, Output::Bgrx).expect("decodes");
    assert_eq!(pictures.len(), frames as usize);
    let red: Vec<u8> = [0u8, 0, 255, 0].repeat((W * H) as usize);
    for (i, pic) in pictures.iter().enumerate() {
        let db = psnr(Output::Bgrx, &red, W as usize * 4, pic);
        assert!(db > MIN_PSNR, "picture {i}: PSNR {db:.1} dB against videotestsrc's red");
    }
}

/// The pipeline ran to EOS, its file holds `frames` red pictures, and the
/// host encoded as many.
fn finish_gst(vm: hxfr_vmtest::Vm, host: &HostHandle, out: &Path, frames: u32) -> hxfr_vmtest::Outcome {
    let o = vm.finish(VM_TIMEOUT);
    assert_eq!(o.status, Some(0), "{}", o.console);
    check_red_stream(out, frames);
    assert_eq!(host_totals(host).0, frames as u64);
    o
}

#[test]
fn gstreamer_guest_vsockenc_over_virtio_serial() {
    let img = Image::locate();
    let dir = tempfile::tempdir().unwrap();
    let (sock, out) = (dir.path().join("frame.sock"), dir.path().join("out.bin"));
    let vm =
        Qemu::new(&img, &img.gst).port_socket(PORT, &sock).port_file(OUT, &out).run(&gst_pipeline(&serial_addr(), 30));
    let host = host(vec![], vec![sock], None);
    finish_gst(vm, &host, &out, 30);
}

#[test]
fn gstreamer_guest_vsockenc_over_user_networking() {
    let img = Image::locate();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.bin");
    // A port of our own: the other user-networking test holds 15937.
    let host = host(vec!["tcp:127.0.0.1:0".parse().unwrap()], vec![], None);
    let ListenAddr::Tcp(a) = host.addrs[0] else { unreachable!() };
    let vm = Qemu::new(&img, &img.gst)
        .user_net()
        .port_file(OUT, &out)
        .run(&gst_pipeline(&format!("tcp:10.0.2.2:{}", a.port()), 30));
    finish_gst(vm, &host, &out, 30);
}

#[test]
fn gstreamer_guest_vsockenc_over_vsock() {
    let img = Image::locate();
    let dir = tempfile::tempdir().unwrap();
    let (vhost, uds, out) = (dir.path().join("vhost.sock"), dir.path().join("vsock.sock"), dir.path().join("out.bin"));
    let _backend = vhost_device_vsock(&img, &vhost, &uds);
    let host = host(vec![ListenAddr::Unix(dir.path().join("vsock.sock_5000"))], vec![], None);
    let vm = Qemu::new(&img, &img.gst).vhost_vsock(&vhost).port_file(OUT, &out).run(&gst_pipeline("vsock:2:5000", 30));
    finish_gst(vm, &host, &out, 30);
}

#[test]
fn gstreamer_guest_vsockenc_through_ivshmem() {
    let img = Image::locate();
    let dir = tempfile::tempdir().unwrap();
    let (sock, out, shm) = (dir.path().join("frame.sock"), dir.path().join("out.bin"), dir.path().join("shm"));
    std::fs::File::create(&shm).unwrap().set_len(16 << 20).unwrap();
    // The element says which transfer it chose.
    let pipeline = format!(
        "export GST_DEBUG=vsockenc:4 GST_DEBUG_NO_COLOR=1; {}",
        gst_pipeline(&format!("{} mode=shm", serial_addr()), 30)
    );
    let vm = Qemu::new(&img, &img.gst).port_socket(PORT, &sock).port_file(OUT, &out).ivshmem(&shm).run(&pipeline);
    let host = host(vec![], vec![sock], Some(shm));
    let o = finish_gst(vm, &host, &out, 30);
    assert!(o.console.contains("transfer shm"), "{}", o.console);
    let frame_bytes = (W * H * 4) as u64;
    assert!(host.stats().iter().all(|s| s.info.bytes_in == 30 * frame_bytes), "{:?}", host.stats());
}

/// The guest half of zero copy: a dumb buffer on a real virtio-gpu device,
/// exported as a DMA-BUF, and the resource id vsockenc's resource mode finds
/// for it (render node by vendor, PRIME_FD_TO_HANDLE, VIRTGPU_RESOURCE_INFO)
/// is the id QEMU created the resource under.
#[test]
fn virtio_gpu_resource_id_matches_qemu() {
    let img = Image::locate();
    let vm = Qemu::new(&img, &img.gpu)
        .kernel(&img.generic_kernel)
        .extra(&["-device", "virtio-gpu-pci", "-trace", "virtio_gpu_cmd_res_create_2d"])
        .run("hxfr-vmguest --gpu-resource 96x64");
    let o = vm.finish(VM_TIMEOUT);
    assert_eq!(o.status, Some(0), "{}", o.console);
    let guest_id: u32 = o
        .console
        .lines()
        .find_map(|l| l.strip_prefix("HXFR-GPU-RESOURCE id="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no resource id from the guest:\n{}", o.console));
    // QEMU's trace: "virtio_gpu_cmd_res_create_2d res 0x2, fmt 0x2, w 96, h 64"
    let qemu_id = o
        .console
        .lines()
        .filter(|l| l.contains("virtio_gpu_cmd_res_create_2d") && l.contains("w 96, h 64"))
        .find_map(|l| {
            let hex = l.split("res 0x").nth(1)?.split(',').next()?;
            u32::from_str_radix(hex, 16).ok()
        })
        .unwrap_or_else(|| panic!("QEMU traced no 96x64 resource:\n{}", o.console));
    assert_eq!(guest_id, qemu_id, "{}", o.console);
}

/// A guest on Debian's generic kernel (it has DRM) whose virtio-gpu is the
/// host's device on `gpu`.
fn gpu_vm(img: &Image, initrd: &Path, gpu: &Path) -> Qemu {
    Qemu::new(img, initrd).kernel(&img.generic_kernel).vhost_user_gpu(gpu)
}

/// The resource path's bar: what the guest drew, encoded from its own pages.
const RESOURCE_PSNR: f64 = 40.0;
/// Frames by id, and three refusals on the way.
const RESOURCE_GUEST: &str = "--resource --resource-faults";

/// The host as the VM's GPU: `hxfr_host::gpu` serves QEMU's
/// vhost-user-gpu-pci, and a host whose connections resolve ids there.
fn gpu_host(gpu_sock: &Path, listen: Vec<ListenAddr>, connect: Vec<PathBuf>) -> HostHandle {
    gpu_host_and_device(gpu_sock, listen, connect).0
}

fn gpu_host_and_device(
    gpu_sock: &Path,
    listen: Vec<ListenAddr>,
    connect: Vec<PathBuf>,
) -> (HostHandle, hxfr_host::gpu::GpuDevice) {
    gpu_host_with_display(gpu_sock, listen, connect, Default::default())
}

/// `display`: QEMU's D-Bus display, for ENABLE_SCANOUT.
fn gpu_host_with_display(
    gpu_sock: &Path,
    listen: Vec<ListenAddr>,
    connect: Vec<PathBuf>,
    display: hxfr_host::qemu_display::QemuDisplay,
) -> (HostHandle, hxfr_host::gpu::GpuDevice) {
    // RUST_LOG=debug shows the device's side of a failure.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dev = hxfr_host::gpu::spawn_device("vm", gpu_sock, hxfr_host::gpu::Config::default()).unwrap();
    let gpu: std::sync::Arc<dyn hxfr_host::ResourceResolver> =
        std::sync::Arc::new(hxfr_host::gpu::GpuResolver::new(dev.resources()));
    let resolver = std::sync::Arc::new(hxfr_host::VmResolvers(hxfr_host::Vms::new(vec![("vm".into(), gpu)])));
    let scanouts: std::sync::Arc<dyn hxfr_host::ScanoutSource> = hxfr_host::gpu::GpuScanouts::attach(&dev, display);
    let cfg = HostConfig {
        encoder: hxfr_encode::EncoderKind::X264,
        resolver: Some(resolver),
        scanouts: Some(scanouts),
        ..HostConfig::default()
    };
    (hxfr_host::spawn(cfg, listen, connect).expect("host"), dev)
}

/// Each access unit decodes to the picture the guest drew for it: compared
/// in YUV with the colorimetry the stream's VUI names (GStreamer's converter,
/// not the host's), so the bar measures the path and the encoder.
fn check_drawn_pictures(aus: &[Bytes]) {
    let pictures = decode_h264(aus, Output::Nv12).expect("decodes");
    assert_eq!(pictures.len(), aus.len(), "one picture per access unit");
    let mut worst = f64::MAX;
    for (i, pic) in pictures.iter().enumerate() {
        let drawn = pattern_bgrx(Content::Motion, W, H, W as usize * 4, i as u32);
        let drawn = hxfr_testkit::bgrx_to_nv12(&drawn, W, H, W as usize * 4, &pic.colorimetry).unwrap();
        let db = psnr(Output::Nv12, &drawn, W as usize, pic);
        assert!(db >= RESOURCE_PSNR, "picture {i}: PSNR {db:.1} dB against what the guest drew ({})", pic.colorimetry);
        worst = worst.min(db);
    }
    println!("{} pictures, PSNR ≥ {worst:.1} dB (colorimetry {})", pictures.len(), pictures[0].colorimetry);
}

/// The host as the VM's GPU, its guests on virtio-serial (through a relay
/// that counts the bytes).
struct SerialGpu {
    _dir: tempfile::TempDir,
    gpu: PathBuf,
    sock: PathBuf,
    out: PathBuf,
    relay: CountingRelay,
    host: HostHandle,
}

impl SerialGpu {
    fn start() -> SerialGpu {
        let dir = tempfile::tempdir().unwrap();
        let (gpu, sock, out) = (dir.path().join("gpu.sock"), dir.path().join("frame.sock"), dir.path().join("out.bin"));
        let counted = dir.path().join("counted.sock");
        let relay = CountingRelay::start(&counted, &sock);
        let host = gpu_host(&gpu, vec![], vec![counted]);
        SerialGpu { _dir: dir, gpu, sock, out, relay, host }
    }
}

/// The guest sent `frames` frames by id and three the host had to refuse;
/// `sent` is what crossed the socket from the guest to the host.
#[track_caller]
fn assert_resource_run(o: &hxfr_vmtest::Outcome, host: &HostHandle, sent: u64, out: &Path, frames: u32) {
    let r = o.result.clone().unwrap_or_else(|| panic!("no result from the guest:\n{}", o.console));
    assert_eq!(o.status, Some(0), "guest command failed:\n{}", o.console);
    assert_eq!((r.frames, r.answered, r.errors, r.order_errors), (frames as u64, frames as u64, 3, 0), "{}", o.console);
    for refusal in ["an id that does not exist: ERROR -2", "the wrong size: ERROR -1", "a freed buffer: ERROR -2"] {
        assert!(o.console.contains(refusal), "{refusal:?} missing:\n{}", o.console);
    }
    let records = read_records(out);
    let pts: Vec<u32> = records.iter().map(|r| r.0).collect();
    assert_eq!(pts, (0..frames).collect::<Vec<_>>(), "answers in the guest, in order");
    check_drawn_pictures(&records.into_iter().map(|r| r.1).collect::<Vec<_>>());
    assert_eq!(host_totals(host).0, frames as u64, "{:?}", host.stats());
    // Requests by id carry no pixels: a header each (HELLO and the config included).
    let requests = frames as u64 + 3;
    assert!(sent < 1024 * requests, "{sent} bytes on the socket for {requests} frame requests");
    println!("guest → host: {sent} bytes for {requests} frame requests ({} per request)", sent / requests);
}

/// Zero copy over virtio-serial: the guest draws into a dumb buffer and
/// sends its resource id; the host, being the VM's GPU, reads the buffer's
/// backing pages. Three bad ids on the way are refused and the stream goes on.
#[test]
fn resource_ids_resolve_through_the_hosts_vhost_user_gpu_over_virtio_serial() {
    let img = Image::locate();
    let t = SerialGpu::start();
    let (gpu, sock, out, relay, host) = (&t.gpu, &t.sock, &t.out, &t.relay, &t.host);
    let vm = gpu_vm(&img, &img.gpu, gpu).port_socket(PORT, sock).port_file(OUT, out).run(&vmguest(
        &serial_addr(),
        30,
        RESOURCE_GUEST,
    ));
    let o = vm.finish(VM_TIMEOUT);
    // The host connected to the relay: what goes back is the guest's.
    assert_resource_run(&o, host, relay.back.load(Relaxed), out, 30);
}

/// The same over vsock (vhost-device-vsock beside the GPU device: two
/// vhost-user backends sharing the guest's memory).
#[test]
fn resource_ids_resolve_through_the_hosts_vhost_user_gpu_over_vsock() {
    let img = Image::locate();
    let dir = tempfile::tempdir().unwrap();
    let (gpu, vhost, uds, out) = (
        dir.path().join("gpu.sock"),
        dir.path().join("vhost.sock"),
        dir.path().join("vsock.sock"),
        dir.path().join("out.bin"),
    );
    let _backend = vhost_device_vsock(&img, &vhost, &uds);
    // vhost-device-vsock turns the guest's connection to port 5000 into one to
    // vsock.sock_5000: the relay there counts it on its way to the host.
    let host_sock = dir.path().join("host.sock");
    let relay = CountingRelay::start(&dir.path().join("vsock.sock_5000"), &host_sock);
    let host = gpu_host(&gpu, vec![ListenAddr::Unix(host_sock)], vec![]);
    let vm = gpu_vm(&img, &img.gpu, &gpu).vhost_vsock(&vhost).port_file(OUT, &out).run(&vmguest(
        "vsock:2:5000",
        30,
        RESOURCE_GUEST,
    ));
    let o = vm.finish(VM_TIMEOUT);
    // vhost-device-vsock connected to the relay on the guest's behalf.
    assert_resource_run(&o, &host, relay.forward.load(Relaxed), &out, 30);
}

/// The real element: vsockenc in a GStreamer guest, fed DMA-BUFs of dumb
/// buffers, picks resource mode by itself (`mode=auto`), and what comes back
/// is what the guest drew.
#[test]
fn gstreamer_guest_vsockenc_auto_picks_resource_mode_on_the_hosts_gpu() {
    let img = Image::locate();
    let t = SerialGpu::start();
    let (gpu, sock, out, relay, host) = (&t.gpu, &t.sock, &t.out, &t.relay, &t.host);
    let cmd = format!(
        "export GST_PLUGIN_SYSTEM_PATH=/gst GST_REGISTRY=/tmp/gst-registry.bin GST_REGISTRY_FORK=no \
         GST_DEBUG=vsockenc:4 GST_DEBUG_NO_COLOR=1; dmabuf_frames {} 30 {W}x{H} auto /dev/virtio-ports/{OUT}",
        serial_addr()
    );
    let vm = gpu_vm(&img, &img.gst_gpu, gpu).port_socket(PORT, sock).port_file(OUT, out).run(&cmd);
    let o = vm.finish(VM_TIMEOUT);
    assert_eq!(o.status, Some(0), "{}", o.console);
    assert!(o.console.contains("transfer resource"), "{}", o.console);
    assert!(o.console.contains("frames-answered=(guint64)30"), "{}", o.console);
    let aus = split_access_units(&std::fs::read(out).unwrap());
    assert_eq!(aus.len(), 30, "access units in the guest's file");
    check_drawn_pictures(&aus);
    assert_eq!(host_totals(host).0, 30);
    let sent = relay.back.load(Relaxed);
    assert!(sent < 30 * 1024, "{sent} bytes on the socket for 30 frames");
    println!("guest → host: {sent} bytes for 30 frames");
}

/// Lifecycle: the device outlives its VMs. When a VM powers off the device
/// forgets its resources (an old id resolves to nothing, nothing reads the
/// old guest's memory), and a new QEMU on the same socket is served: its
/// guest's frames resolve from its own pages.
#[test]
fn a_new_qemu_on_the_same_device_starts_from_an_empty_device() {
    let img = Image::locate();
    let dir = tempfile::tempdir().unwrap();
    let (gpu, sock, out) = (dir.path().join("gpu.sock"), dir.path().join("frame.sock"), dir.path().join("out.bin"));
    let (host, device) = gpu_host_and_device(&gpu, vec![], vec![sock.clone()]);
    for boot in 0..2 {
        let _ = std::fs::remove_file(&out);
        let vm = gpu_vm(&img, &img.gpu, &gpu).port_socket(PORT, &sock).port_file(OUT, &out).run(&vmguest(
            &serial_addr(),
            10,
            "--resource",
        ));
        let o = vm.finish(VM_TIMEOUT);
        let r = assert_guest_ok(&o, 10);
        assert_eq!(r.answered, 10, "boot {boot}:\n{}", o.console);
        let records = read_records(&out);
        assert_eq!(records.len(), 10, "boot {boot}");
        check_drawn_pictures(&records.into_iter().map(|r| r.1).collect::<Vec<_>>());
        let id: u32 = o
            .console
            .lines()
            .find_map(|l| l.split("resource ").nth(1)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no resource id in the console:\n{}", o.console));
        // QEMU is gone: so is everything its guest created.
        let gone = hxfr_vmtest::wait_until(Duration::from_secs(10), || device.snapshot(id).is_err());
        assert!(gone, "boot {boot}: resource {id} still resolves after the VM powered off");
    }
    assert_eq!(host_totals(&host).0, 20);
}

/// A subscriber's frames (access unit, keyframe) until two seconds after
/// the guest's last flip (`hxfr-vmguest --flips N --pace-ms 300 --hold-ms`
/// ≥ 3000). The guest prints `HXFR-FLIP N-1` once that flip is done, then
/// sleeps its pace and holds still: that flip's frame comes within the
/// first second, and nothing may come in the next two (before the guest
/// exits and its console takes the display back).
fn frames_until_still(
    sub: &mut hxfr_testkit::subscriber::Subscriber,
    vm: &hxfr_vmtest::Vm,
    flips: u32,
) -> Vec<(Bytes, bool)> {
    let last = format!("HXFR-FLIP {}", flips - 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut aus = Vec::new();
    let mut last_flip_at: Option<std::time::Instant> = None;
    loop {
        if last_flip_at.is_none() && vm.console().contains(&last) {
            last_flip_at = Some(std::time::Instant::now());
        }
        if last_flip_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(3)) {
            return aus;
        }
        assert!(std::time::Instant::now() < deadline, "{} frames in 90 s:\n{}", aus.len(), vm.console());
        // Short reads, so the console is looked at while frames are quiet.
        let Some(r) = sub.frame(Duration::from_millis(200)).unwrap_or_else(|e| panic!("{e}\n{}", vm.console())) else {
            continue;
        };
        if let Some(t) = last_flip_at {
            assert!(t.elapsed() < Duration::from_secs(1), "a frame while the guest held still:\n{}", vm.console());
        }
        aus.push((r.to_annex_b(), r.is_keyframe));
    }
}

/// Scanout push (the guest does no per-frame work): the guest sets a 640x480
/// mode and page-flips a drawn pattern 20 times, then holds still. A
/// subscriber that keeps Helix's rules gets only one-entry FRAME_RESPONSEs;
/// they decode to every picture the guest flipped to (PSNR ≥ 40 dB in YUV),
/// in order, the first an IDR, and nothing comes while the guest is still;
/// a second subscriber that stops reading slows nobody.
#[test]
fn scanout_push_a_helix_subscriber_gets_every_flip_and_nothing_while_still() {
    const FLIPS: u32 = 20;
    let (w, h) = (640u32, 480u32);
    let img = Image::locate();
    let dir = tempfile::tempdir().unwrap();
    let (gpu, listen) = (dir.path().join("gpu.sock"), dir.path().join("host.sock"));
    let (host, _device) = gpu_host_and_device(&gpu, vec![ListenAddr::Unix(listen.clone())], vec![]);
    let vm = gpu_vm(&img, &img.gpu, &gpu)
        .run(&format!("hxfr-vmguest --flips {FLIPS} --size {w}x{h} --pace-ms 300 --hold-ms 4000"));
    // Scanout 0 exists once the guest's console has set it (early in boot).
    let config = hxfr_testkit::subscriber::helix_config(w, h, 4_000_000);
    let mut sub = None;
    let found = hxfr_vmtest::wait_until(Duration::from_secs(60), || {
        let s = hxfr_testkit::subscriber::Subscriber::subscribe(&listen, 0, config);
        sub = s.expect("subscribing");
        sub.is_some()
    });
    assert!(found, "scanout 0 never appeared:\n{}", vm.console());
    let mut sub = sub.unwrap();
    // A second subscriber that never reads: it must not slow the first.
    let _stalled = hxfr_testkit::subscriber::Subscriber::subscribe(&listen, 0, config).unwrap().expect("scanout 0");
    let aus = frames_until_still(&mut sub, &vm, FLIPS);
    assert!(!aus.is_empty() && aus[0].1, "the first frame a subscriber gets is an IDR");
    let aus: Vec<Bytes> = aus.into_iter().map(|(au, _)| au).collect();
    let o = vm.finish(VM_TIMEOUT);
    assert!(o.console.contains(&format!("HXFR-FLIPS done flips={FLIPS} {w}x{h}")), "{}", o.console);
    // The pictures at the guest's mode, matched to the patterns it drew.
    let pictures = decode_h264(&aus, Output::Nv12).expect("decodes");
    let ours: Vec<_> = pictures.iter().filter(|p| (p.width, p.height) == (w, h)).collect();
    assert!(!ours.is_empty(), "no {w}x{h} picture among {}", pictures.len());
    let drawn: Vec<Vec<u8>> = (0..FLIPS)
        .map(|i| {
            let px = pattern_bgrx(Content::Motion, w, h, w as usize * 4, i);
            hxfr_testkit::bgrx_to_nv12(&px, w, h, w as usize * 4, &ours[0].colorimetry).unwrap()
        })
        .collect();
    let mut seen = Vec::new();
    for pic in &ours {
        let (i, db) = (0..FLIPS as usize)
            .map(|i| (i, psnr(Output::Nv12, &drawn[i], w as usize, pic)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        assert!(db >= RESOURCE_PSNR, "a pushed picture matches no drawn one (best: flip {i} at {db:.1} dB)");
        assert!(seen.last().is_none_or(|&l| l <= i), "pictures out of order: {seen:?} then {i}");
        seen.push(i);
    }
    seen.dedup();
    assert_eq!(seen, (0..FLIPS as usize).collect::<Vec<_>>(), "every flip's picture, in order");
    // A flip is one picture (SET_SCANOUT and its flush are not two), and
    // flips 300 ms apart are not coalesced.
    assert_eq!(ours.len(), FLIPS as usize, "one frame per flip");
    println!("{} frames pushed, {} at {w}x{h}, every one of {FLIPS} flips seen", aus.len(), ours.len());
    drop(host);
}

/// A private D-Bus bus (QEMU's display registers on it), stopped on drop.
fn dbus_bus(dir: &Path) -> (Daemon, String) {
    let addr = format!("unix:path={}", dir.join("bus").display());
    let d = Daemon(
        Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile", &format!("--address={addr}")])
            // (It warns that it may not raise its fd limit: harmless here.)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dbus-daemon (Debian package dbus)"),
    );
    assert!(wait_for_path(&dir.join("bus"), Duration::from_secs(10)), "dbus-daemon made no socket");
    (d, addr)
}

/// ENABLE_SCANOUT on a connection of the host's; the answer.
fn enable_scanout(host: &Path, scanout_id: u32, width: u32, height: u32) -> (bool, String) {
    use hxfr_proto::io::{read_packet, write_packet};
    let mut s = std::os::unix::net::UnixStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let m = hxfr_proto::Message::EnableScanout { scanout_id, width, height };
    write_packet(&mut s, &hxfr_proto::Packet::new(scanout_id as u16, m), &mut bytes::BytesMut::new()).unwrap();
    let p = read_packet(&mut s, &mut hxfr_proto::FrameDecoder::default(), &mut bytes::BytesMut::new()).unwrap();
    match p.message {
        hxfr_proto::Message::ScanoutResp { scanout_id: id, success, connector } if id == scanout_id => {
            (success, connector)
        }
        other => panic!("ENABLE_SCANOUT answered with {other:?}"),
    }
}

/// DISABLE_SCANOUT on a connection of the host's (it has no answer).
fn disable_scanout(host: &Path, scanout_id: u32) {
    use hxfr_proto::io::write_packet;
    let mut s = std::os::unix::net::UnixStream::connect(host).unwrap();
    let m = hxfr_proto::Message::DisableScanout { scanout_id };
    write_packet(&mut s, &hxfr_proto::Packet::new(scanout_id as u16, m), &mut bytes::BytesMut::new()).unwrap();
}

/// ENABLE_SCANOUT plugs a second display into the guest through QEMU's
/// D-Bus display: the guest sees connector 2 connected at the asked size,
/// draws on it, and scanouts 0 (the guest's console) and 1 stream
/// independently to two subscribers. DISABLE_SCANOUT unplugs it again: the
/// guest sees the connector disconnected, and its subscriber's stream ends
/// without a word (Helix's subscriber takes nothing but frames): the host
/// closes a connection whose every subscription has ended.
#[test]
fn enable_scanout_plugs_a_second_display_that_streams_on_its_own() {
    const FLIPS: u32 = 10;
    let (w, h) = (640u32, 480u32);
    let img = Image::locate();
    let dir = tempfile::tempdir().unwrap();
    let (_bus, addr) = dbus_bus(dir.path());
    let (gpu, listen) = (dir.path().join("gpu.sock"), dir.path().join("host.sock"));
    let display = hxfr_host::qemu_display::QemuDisplay { bus: Some(addr.clone()) };
    let (host, _device) = gpu_host_with_display(&gpu, vec![ListenAddr::Unix(listen.clone())], vec![], display);
    // The guest waits for its second connector, then flips on it.
    let guest = format!(
        "for i in $(seq 1 150); do grep -qx connected /sys/class/drm/card0-Virtual-2/status && break; sleep 0.2; done; \
         cat /sys/class/drm/card0-Virtual-2/status; \
         hxfr-vmguest --flips {FLIPS} --connector 1 --size {w}x{h} --pace-ms 300 --hold-ms 4000; \
         for i in $(seq 1 150); do grep -qx disconnected /sys/class/drm/card0-Virtual-2/status && echo HXFR-UNPLUGGED && break; sleep 0.2; done"
    );
    let vm = Qemu::new(&img, &img.gpu)
        .kernel(&img.generic_kernel)
        .vhost_user_gpu_heads(&gpu, 2)
        .dbus_display(&addr)
        .run(&guest);
    // QEMU's display is on the bus a moment after QEMU starts.
    let mut answer = (false, String::new());
    let plugged = hxfr_vmtest::wait_until(Duration::from_secs(30), || {
        answer = enable_scanout(&listen, 1, w, h);
        answer.0
    });
    assert!(plugged, "ENABLE_SCANOUT never succeeded:\n{}", vm.console());
    assert_eq!(answer.1, "Virtual-2", "the connector's name");
    let config = hxfr_testkit::subscriber::helix_config(w, h, 4_000_000);
    let mut second = hxfr_testkit::subscriber::Subscriber::subscribe(&listen, 1, config).unwrap().expect("scanout 1");
    let mut first = hxfr_testkit::subscriber::Subscriber::subscribe(&listen, 0, config).unwrap().expect("scanout 0");
    let aus: Vec<Bytes> = frames_until_still(&mut second, &vm, FLIPS).into_iter().map(|(au, _)| au).collect();
    // Scanout 0 shows the guest's console, on its own stream.
    let console = first.frame(Duration::from_secs(10)).unwrap().expect("a frame of scanout 0");
    disable_scanout(&listen, 1);
    let o = vm.finish(VM_TIMEOUT);
    assert!(o.console.contains(&format!("HXFR-FLIPS done flips={FLIPS} {w}x{h}")), "{}", o.console);
    assert!(o.console.contains("HXFR-UNPLUGGED"), "the guest never saw connector 2 unplugged:\n{}", o.console);
    // Its subscriber's stream has ended: the host closed the connection (it
    // subscribed to nothing else) with no frame and no other message first.
    match second.frame(Duration::from_secs(10)) {
        Err(e) if e.contains("connection closed") => {}
        other => panic!("scanout 1's subscriber after DISABLE_SCANOUT: {other:?}"),
    }
    let pictures = decode_h264(&aus, Output::Nv12).expect("decodes");
    assert!(pictures.iter().all(|p| (p.width, p.height) == (w, h)), "scanout 1 is {w}x{h}");
    // Every flip's picture arrives on scanout 1, in order (after whatever the
    // head showed before the guest drew on it).
    let drawn: Vec<Vec<u8>> = (0..FLIPS)
        .map(|i| {
            let px = pattern_bgrx(Content::Motion, w, h, w as usize * 4, i);
            hxfr_testkit::bgrx_to_nv12(&px, w, h, w as usize * 4, &pictures[0].colorimetry).unwrap()
        })
        .collect();
    let seen: Vec<usize> = pictures
        .iter()
        .filter_map(|pic| {
            (0..FLIPS as usize).find(|&i| psnr(Output::Nv12, &drawn[i], w as usize, pic) >= RESOURCE_PSNR)
        })
        .collect();
    assert_eq!(seen, (0..FLIPS as usize).collect::<Vec<_>>(), "each flip once, in order ({} frames)", pictures.len());
    let console = decode_h264(&[console.to_annex_b()], Output::Nv12).expect("decodes");
    assert_ne!((console[0].width, console[0].height), (w, h), "scanout 0 is the console, not scanout 1");
    drop(host);
}
