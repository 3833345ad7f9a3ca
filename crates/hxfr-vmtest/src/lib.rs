//! The harness behind `make vm-test`: boots Debian's cloud kernel with a
//! busybox initramfs under QEMU, wired to the host through real virtual
//! devices (virtio-serial, user networking, ivshmem, vhost-user vsock), runs
//! one command in the guest, and hands back what the guest printed.
//!
//! The image (kernel, initramfs, the static `hxfr-vmguest`, a GStreamer
//! initramfs, `vhost-device-vsock`) comes from `scripts/vm/build.sh`, under
//! `target/vm` (or `$HXFR_VM_DIR`).
//!
//! QEMU runs under TCG by default; `HXFR_VM_ACCEL=kvm` asks for KVM.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;

/// What `scripts/vm/build.sh` made.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    /// busybox, the virtio modules and `hxfr-vmguest`.
    pub guest: PathBuf,
    /// The same plus GStreamer and `libgstvsockenc.so` (plugins in /gst).
    pub gst: PathBuf,
    /// Debian's generic kernel (with DRM) and an initramfs with its virtio-gpu modules.
    pub generic_kernel: PathBuf,
    pub gpu: PathBuf,
    /// GStreamer and vsockenc on the generic kernel, with `dmabuf_frames`
    /// (vsockenc fed DMA-BUFs of dumb buffers).
    pub gst_gpu: PathBuf,
    pub vhost_vsock: PathBuf,
}

impl Image {
    /// Finds the image; panics with what to run when it is missing.
    pub fn locate() -> Image {
        let dir = std::env::var_os("HXFR_VM_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/vm"));
        let img = Image {
            kernel: dir.join("vmlinuz"),
            guest: dir.join("guest.cpio.gz"),
            gst: dir.join("gst.cpio.gz"),
            generic_kernel: dir.join("vmlinuz-generic"),
            gpu: dir.join("gpu.cpio.gz"),
            gst_gpu: dir.join("gst-gpu.cpio.gz"),
            vhost_vsock: dir.join("bin/vhost-device-vsock"),
            dir,
        };
        for f in [&img.kernel, &img.guest, &img.gst, &img.generic_kernel, &img.gpu, &img.gst_gpu, &img.vhost_vsock] {
            assert!(
                f.exists(),
                "{} is missing: build the VM image with `bash scripts/vm/build.sh` (make vm-test does)",
                f.display()
            );
        }
        img
    }
}

/// A QEMU command line being put together.
pub struct Qemu {
    kernel: PathBuf,
    initrd: PathBuf,
    args: Vec<String>,
    ports: Vec<String>,
    serial_bus: bool,
    shared_memory: bool,
    /// QEMU's `-display`.
    display: String,
    /// Extra environment for QEMU.
    env: Vec<(String, String)>,
}

const MEMORY_MIB: u32 = 512;

impl Qemu {
    pub fn new(image: &Image, initrd: &Path) -> Qemu {
        Qemu {
            kernel: image.kernel.clone(),
            initrd: initrd.to_owned(),
            args: Vec::new(),
            ports: Vec::new(),
            serial_bus: false,
            shared_memory: false,
            display: "none".into(),
            env: Vec::new(),
        }
    }

    fn arg(&mut self, a: &str, v: String) {
        self.args.push(a.into());
        self.args.push(v);
    }

    fn port(&mut self, name: &str, chardev: String) {
        if !self.serial_bus {
            self.arg("-device", "virtio-serial-pci".into());
            self.serial_bus = true;
        }
        let id = format!("port{}", self.ports.len());
        self.arg("-chardev", format!("{chardev},id={id}"));
        self.arg("-device", format!("virtserialport,chardev={id},name={name}"));
        self.ports.push(name.into());
    }

    /// A virtio-serial port whose host end is a UNIX socket QEMU listens on
    /// (`hxfr host --connect unix:PATH` connects to it).
    pub fn port_socket(mut self, name: &str, socket: &Path) -> Qemu {
        self.port(name, format!("socket,path={},server=on,wait=off", socket.display()));
        self
    }

    /// A virtio-serial port whose host end is a file (the guest's results).
    pub fn port_file(mut self, name: &str, file: &Path) -> Qemu {
        self.port(name, format!("file,path={}", file.display()));
        self
    }

    /// QEMU user networking: the guest is 10.0.2.15 and reaches the host's
    /// loopback at 10.0.2.2.
    pub fn user_net(mut self) -> Qemu {
        self.arg("-netdev", "user,id=net0".into());
        self.arg("-device", "virtio-net-pci,netdev=net0".into());
        self
    }

    /// Boots this kernel instead of the cloud one.
    pub fn kernel(mut self, kernel: &Path) -> Qemu {
        self.kernel = kernel.to_owned();
        self
    }

    /// Any other QEMU arguments.
    pub fn extra(mut self, args: &[&str]) -> Qemu {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// An ivshmem-plain device whose BAR 2 is `file` (which must exist, sized).
    pub fn ivshmem(mut self, file: &Path) -> Qemu {
        let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        self.arg("-object", format!("memory-backend-file,id=hxshm,share=on,mem-path={},size={size}", file.display()));
        self.arg("-device", "ivshmem-plain,memdev=hxshm".into());
        self
    }

    /// A vhost-user vsock device served by vhost-device-vsock on `socket`.
    pub fn vhost_vsock(mut self, socket: &Path) -> Qemu {
        self.shared_memory = true;
        self.arg("-chardev", format!("socket,id=vhvsock,path={}", socket.display()));
        self.arg("-device", "vhost-user-vsock-pci,chardev=vhvsock".into());
        self
    }

    /// A virtio-gpu device served by a vhost-user-gpu backend (`hxfr host
    /// --vhost-user-gpu`) listening on `socket`. 2D only: the backend
    /// offers neither VIRGL nor BLOB, so the guest's dumb buffers are plain
    /// resources with backing pages in guest RAM, which the backend maps.
    pub fn vhost_user_gpu(self, socket: &Path) -> Qemu {
        self.vhost_user_gpu_heads(socket, 1)
    }

    /// The same with `heads` outputs (QEMU's `max_outputs`): heads past the
    /// first are plugged in through QEMU's D-Bus display ([`Qemu::dbus_display`]).
    pub fn vhost_user_gpu_heads(mut self, socket: &Path, heads: u32) -> Qemu {
        self.shared_memory = true;
        self.arg("-chardev", format!("socket,id=vhgpu,path={}", socket.display()));
        self.arg("-device", format!("vhost-user-gpu-pci,chardev=vhgpu,max_outputs={heads}"));
        self
    }

    /// QEMU's D-Bus display (`org.qemu.Display1`) on the bus at `address`.
    pub fn dbus_display(mut self, address: &str) -> Qemu {
        self.display = "dbus,gl=off".into();
        self.env.push(("DBUS_SESSION_BUS_ADDRESS".into(), address.into()));
        self
    }

    /// The arguments after `qemu-system-x86_64`, for a guest running `cmd`.
    pub fn command_line(&self, cmd: &str) -> Vec<String> {
        let accel = std::env::var("HXFR_VM_ACCEL").unwrap_or_else(|_| "tcg".into());
        let cmd64 = base64::engine::general_purpose::STANDARD.encode(cmd);
        let append = format!("console=ttyS0 quiet panic=-1 hxfr.ports={} hxfr.cmd={cmd64}", self.ports.join(","));
        let mut a: Vec<String> = [
            "-accel",
            &accel,
            "-m",
            &format!("{MEMORY_MIB}M"),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            &self.display,
            "-serial",
            "stdio",
            "-no-reboot",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.shared_memory {
            // vhost-user backends map guest memory: it must be shareable.
            a.extend(["-object".into(), format!("memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on")]);
            a.extend(["-machine".into(), "memory-backend=mem".into()]);
        }
        a.extend(["-kernel".into(), self.kernel.display().to_string()]);
        a.extend(["-initrd".into(), self.initrd.display().to_string()]);
        a.extend(["-append".into(), append]);
        a.extend(self.args.iter().cloned());
        a
    }

    /// Boots the guest, which runs `cmd` (busybox sh) and powers off.
    pub fn run(self, cmd: &str) -> Vm {
        let child = Command::new("qemu-system-x86_64")
            .args(self.command_line(cmd))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-system-x86_64 (Debian package qemu-system-x86)");
        Vm::watch(child)
    }
}

type Lines = Arc<(Mutex<(Vec<String>, usize)>, Condvar)>;

/// A running guest and everything its console said.
pub struct Vm {
    child: Child,
    lines: Lines,
}

impl Vm {
    fn watch(mut child: Child) -> Vm {
        let lines: Lines = Arc::new((Mutex::new((Vec::new(), 0)), Condvar::new()));
        fn pump(r: impl Read + Send + 'static, lines: Lines, prefix: &'static str) {
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines() {
                    let Ok(l) = l else { break };
                    let l = format!("{prefix}{}", l.trim_end_matches('\r'));
                    let (m, cv) = &*lines;
                    m.lock().unwrap().0.push(l);
                    cv.notify_all();
                }
                let (m, cv) = &*lines;
                m.lock().unwrap().1 += 1; // one more stream closed
                cv.notify_all();
            });
        }
        pump(child.stdout.take().unwrap(), lines.clone(), "");
        pump(child.stderr.take().unwrap(), lines.clone(), "qemu: ");
        Vm { child, lines }
    }

    /// Waits for a console line satisfying `pred`; None at the timeout or
    /// when QEMU has gone.
    pub fn wait_line(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.lines;
        let mut g = m.lock().unwrap();
        loop {
            if let Some(l) = g.0.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || g.1 == 2 {
                return None;
            }
            g = cv.wait_timeout(g, left).unwrap().0;
        }
    }

    pub fn console(&self) -> String {
        self.lines.0.lock().unwrap().0.join("\n")
    }

    /// Waits for the guest command to end and QEMU to exit (killing it at the
    /// timeout) and returns the guest command's exit status.
    pub fn finish(mut self, timeout: Duration) -> Outcome {
        let line = self.wait_line(|l| l.starts_with("HXFR-VM-EXIT "), timeout);
        let status = line.and_then(|l| l.strip_prefix("HXFR-VM-EXIT ")?.trim().parse().ok());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let console = self.console();
        Outcome { status, result: GuestResult::parse(&console), console }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Only our own QEMU, by its pid (Child::kill).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a guest run ended.
#[derive(Debug)]
pub struct Outcome {
    /// The exit status of the guest command (None: it never ended).
    pub status: Option<i32>,
    /// The last `HXFR-VMGUEST-RESULT` line, parsed.
    pub result: Option<GuestResult>,
    pub console: String,
}

/// What `hxfr-vmguest` reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestResult {
    pub frames: u64,
    pub answered: u64,
    pub errors: u64,
    pub order_errors: u64,
    pub reconnects: u64,
    pub keyframes: u64,
    pub bytes: u64,
}

impl GuestResult {
    pub fn parse(console: &str) -> Option<GuestResult> {
        let line = console.lines().rev().find_map(|l| l.strip_prefix("HXFR-VMGUEST-RESULT "))?;
        let mut r = GuestResult::default();
        for kv in line.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            let v: u64 = v.parse().ok()?;
            match k {
                "frames" => r.frames = v,
                "answered" => r.answered = v,
                "errors" => r.errors = v,
                "order_errors" => r.order_errors = v,
                "reconnects" => r.reconnects = v,
                "keyframes" => r.keyframes = v,
                "bytes" => r.bytes = v,
                _ => {}
            }
        }
        Some(r)
    }
}

/// The records `hxfr-vmguest --out` wrote: `(pts, access unit)`.
pub fn read_records(path: &Path) -> Vec<(u32, Bytes)> {
    let data = std::fs::read(path).unwrap_or_default();
    let mut out = Vec::new();
    let mut i = 0;
    while i + 8 <= data.len() {
        let pts = u32::from_le_bytes(data[i..i + 4].try_into().unwrap());
        let len = u32::from_le_bytes(data[i + 4..i + 8].try_into().unwrap()) as usize;
        if i + 8 + len > data.len() {
            break;
        }
        out.push((pts, Bytes::copy_from_slice(&data[i + 8..i + 8 + len])));
        i += 8 + len;
    }
    out
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process the test started (vhost-device-vsock), ended by its pid on drop.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `path` exists (a socket a daemon creates), up to `timeout`.
pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    wait_until(timeout, || path.exists())
}

/// Cuts an Annex-B byte stream (what `h264parse ! filesink` writes) into
/// access units: a new one starts at an AUD, SPS, PPS or SEI after a slice,
/// or at a slice whose `first_mb_in_slice` is 0 (x264 may cut a picture
/// into several slices).
pub fn split_access_units(stream: &[u8]) -> Vec<Bytes> {
    // (offset of the start code, NAL type, first slice of a picture)
    let nals: Vec<(usize, u8, bool)> = hxfr_proto::annexb::nal_units(stream)
        .iter()
        .filter(|n| n.data.len() >= 2)
        // first_mb_in_slice is ue(v): 0 is the single bit 1.
        .map(|n| (n.start_code_at, n.nal_type(), n.data[1] & 0x80 != 0))
        .collect();
    let mut aus = Vec::new();
    let mut au_start: Option<usize> = None;
    let mut in_picture = false;
    for &(at, ty, first_mb_zero) in &nals {
        let slice = matches!(ty, 1 | 5);
        let begins = au_start.is_none() || (in_picture && (matches!(ty, 6..=9) || (slice && first_mb_zero)));
        if begins {
            if let Some(s) = au_start {
                aus.push(Bytes::copy_from_slice(&stream[s..at]));
            }
            au_start = Some(at);
            in_picture = false;
        }
        in_picture |= slice;
    }
    if let Some(s) = au_start {
        aus.push(Bytes::copy_from_slice(&stream[s..]));
    }
    aus
}

/// A UNIX-socket relay that counts the bytes going each way: put between a
/// guest's transport and the host to measure what crosses the socket.
/// Connections accepted on `listen` are forwarded to `target` (a connection
/// that cannot reach it is closed, and its peer retries).
pub struct CountingRelay {
    /// Bytes from the side that connected to `listen` towards `target`.
    pub forward: Arc<AtomicU64>,
    /// Bytes back.
    pub back: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    listen: PathBuf,
}

impl CountingRelay {
    pub fn start(listen: &Path, target: &Path) -> CountingRelay {
        let l = UnixListener::bind(listen).unwrap_or_else(|e| panic!("relay on {}: {e}", listen.display()));
        l.set_nonblocking(true).unwrap();
        let (forward, back, stop) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (f, b, s, target) = (forward.clone(), back.clone(), stop.clone(), target.to_owned());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = UnixStream::connect(&target) else { continue };
                        let pipe = |mut from: UnixStream, mut to: UnixStream, n: Arc<AtomicU64>| {
                            std::thread::spawn(move || {
                                let mut buf = vec![0u8; 1 << 16];
                                loop {
                                    match from.read(&mut buf) {
                                        Ok(0) | Err(_) => break,
                                        Ok(k) => {
                                            n.fetch_add(k as u64, Ordering::Relaxed);
                                            if to.write_all(&buf[..k]).is_err() {
                                                break;
                                            }
                                        }
                                    }
                                }
                                let _ = to.shutdown(std::net::Shutdown::Write);
                            });
                        };
                        pipe(client.try_clone().unwrap(), server.try_clone().unwrap(), f.clone());
                        pipe(server, client, b.clone());
                    }
                    // Polls so that dropping the relay ends this thread.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => break,
                }
            }
        });
        CountingRelay { forward, back, stop, listen: listen.to_owned() }
    }
}

impl Drop for CountingRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.listen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_multi_slice_pictures_into_access_units() {
        let nal = |ty: u8, b: u8| [&[0u8, 0, 0, 1, ty, b, 0xaa][..]].concat();
        // SPS PPS IDR(slice 0) IDR(slice 1) | P(slice 0) P(slice 1) | AUD P(slice 0)
        let stream = [
            nal(7, 0x42),
            nal(8, 0xce),
            nal(5, 0x88),
            nal(5, 0x40),
            nal(1, 0x9a),
            nal(1, 0x50),
            nal(9, 0xf0),
            nal(1, 0x9a),
        ]
        .concat();
        let aus = split_access_units(&stream);
        assert_eq!(aus.len(), 3);
        assert_eq!(aus[0].len(), 4 * 7);
        assert_eq!(aus[1].len(), 2 * 7);
        assert_eq!(aus[2].len(), 2 * 7);
    }
}
