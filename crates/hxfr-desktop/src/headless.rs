//! A private headless GNOME session (Mutter) for tests and `hxfr demo`: its
//! own runtime dir, session bus, PipeWire and compositor, none of them shared
//! with whatever runs on the machine, and all of them stopped when it drops.
//!
//! Order matters: PipeWire (and WirePlumber, which links its nodes) must be
//! there before Mutter, whose ScreenCast API connects to PipeWire at start.
//! Nothing here touches this process's environment: children get theirs
//! explicitly ([`HeadlessDesktop::env`]).

use std::ffi::OsString;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::DesktopError;

/// How long each part may take to come up (Mutter is ready in under a
/// second on these machines; a loaded 2-core box needs more).
const READY: Duration = Duration::from_secs(20);
/// How long a child has between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How much of a child's stderr an error quotes.
const TAIL: u64 = 2048;
/// Bus names Mutter owns once its D-Bus APIs are up.
const MUTTER_NAMES: [&str; 3] =
    ["org.gnome.Mutter.ScreenCast", "org.gnome.Mutter.RemoteDesktop", "org.gnome.Mutter.DisplayConfig"];

#[derive(Debug, Clone)]
pub struct HeadlessConfig {
    /// The virtual monitor's size in pixels.
    pub width: u32,
    pub height: u32,
    /// Programs to start in the session once the compositor is up, e.g.
    /// `[["foot"]]`.
    pub apps: Vec<Vec<String>>,
}

/// One process this session started, and where its output goes.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

/// A running private headless Mutter session.
pub struct HeadlessDesktop {
    dir: Option<tempfile::TempDir>,
    dbus_address: String,
    wayland_display: String,
    cfg: HeadlessConfig,
    /// In start order; stopped in reverse.
    procs: Vec<Proc>,
}

impl std::fmt::Debug for HeadlessDesktop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadlessDesktop")
            .field("runtime_dir", &self.runtime_dir())
            .field("dbus_address", &self.dbus_address)
            .field("wayland_display", &self.wayland_display)
            .finish()
    }
}

impl HeadlessDesktop {
    /// Starts the session and returns once Mutter's ScreenCast and
    /// RemoteDesktop APIs answer and its Wayland socket is there (the apps
    /// are started but not waited for).
    pub async fn start(cfg: HeadlessConfig) -> Result<HeadlessDesktop, DesktopError> {
        // Mutter starts with a 0x0 monitor, which shows nothing: refuse it here.
        if !(1..=16384).contains(&cfg.width) || !(1..=16384).contains(&cfg.height) {
            let (w, h) = (cfg.width, cfg.height);
            return Err(DesktopError::Unavailable(format!("a {w}x{h} monitor: each side must be 1 to 16384 pixels")));
        }
        for bin in ["dbus-daemon", "pipewire", "wireplumber", "mutter"] {
            if find_in_path(bin).is_none() {
                return Err(DesktopError::NotInstalled(bin.into()));
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("hxfr-gnome-")
            .tempdir()
            .map_err(|e| DesktopError::io("creating the session's runtime dir", e))?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
            .map_err(|e| DesktopError::io("making the runtime dir private", e))?;
        fs::create_dir(dir.path().join("log")).map_err(|e| DesktopError::io("creating the log dir", e))?;
        let bus_path = dir.path().join("bus");
        let mut d = HeadlessDesktop {
            dbus_address: format!("unix:path={}", bus_path.display()),
            wayland_display: "hxfr-wayland-0".into(),
            dir: Some(dir),
            cfg: cfg.clone(),
            procs: Vec::new(),
        };
        // On any error below, dropping `d` stops what was started.
        d.start_bus().await?;
        d.spawn_named("pipewire", &["pipewire".into()])?;
        let pw = d.pipewire_socket();
        d.wait_for("pipewire", "the pipewire-0 socket", || pw.exists()).await?;
        d.spawn_named("wireplumber", &["wireplumber".into()])?;
        d.start_mutter().await?;
        for app in &cfg.apps {
            d.spawn(app)?;
        }
        Ok(d)
    }

    /// The private session bus's address.
    pub fn dbus_address(&self) -> &str {
        &self.dbus_address
    }

    pub fn runtime_dir(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).unwrap_or(Path::new(""))
    }

    /// The name of the compositor's Wayland socket in [`Self::runtime_dir`].
    pub fn wayland_display(&self) -> &str {
        &self.wayland_display
    }

    /// PipeWire's socket: connect to it and hand the fd to `pipewiresrc fd=`.
    pub fn pipewire_socket(&self) -> PathBuf {
        self.runtime_dir().join("pipewire-0")
    }

    /// What a program needs to live in this session.
    pub fn env(&self) -> Vec<(String, OsString)> {
        let dir = self.runtime_dir().as_os_str().to_owned();
        vec![
            ("DBUS_SESSION_BUS_ADDRESS".into(), self.dbus_address.clone().into()),
            ("XDG_RUNTIME_DIR".into(), dir.clone()),
            ("WAYLAND_DISPLAY".into(), self.wayland_display.clone().into()),
            ("PIPEWIRE_RUNTIME_DIR".into(), dir),
            ("XDG_SESSION_TYPE".into(), "wayland".into()),
            // Settings stay in memory: no dconf service, nothing written to $HOME.
            ("GSETTINGS_BACKEND".into(), "memory".into()),
        ]
    }

    /// Starts another program in the session; it is stopped with the session.
    pub fn spawn(&mut self, cmd: &[String]) -> Result<u32, DesktopError> {
        let name = cmd.first().map(|c| c.rsplit('/').next().unwrap_or(c).to_string()).unwrap_or_default();
        self.spawn_named(&name, cmd)
    }

    /// Kills Mutter and starts it again (apps lose their display and exit):
    /// a compositor crash and restart, as a capturer sees it. SIGKILL, as in
    /// a crash (and Mutter 43 does not act on SIGTERM while a remote desktop
    /// session is running).
    pub async fn restart_compositor(&mut self) -> Result<(), DesktopError> {
        if let Some(i) = self.procs.iter().position(|p| p.name == "mutter") {
            let mut p = self.procs.remove(i);
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        self.start_mutter().await
    }

    /// Pids of the running processes this session started, by name.
    pub fn pids(&mut self) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        for p in &mut self.procs {
            if matches!(p.child.try_wait(), Ok(None)) {
                out.push((p.name.clone(), p.child.id()));
            }
        }
        out
    }

    async fn start_bus(&mut self) -> Result<(), DesktopError> {
        let conf = self.runtime_dir().join("bus.conf");
        // No service directories: nothing gets activated behind our back (and
        // left running after us); every process on this bus is ours.
        let xml = format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>{}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
            self.dbus_address
        );
        fs::write(&conf, xml).map_err(|e| DesktopError::io("writing the bus config", e))?;
        let cmd: Vec<String> =
            vec!["dbus-daemon".into(), format!("--config-file={}", conf.display()), "--nofork".into()];
        self.spawn_named("dbus-daemon", &cmd)?;
        let addr = self.dbus_address.clone();
        self.wait_for_async("dbus-daemon", "the session bus", || {
            let addr = addr.clone();
            async move { bus(&addr).await.is_ok() }
        })
        .await
    }

    async fn start_mutter(&mut self) -> Result<(), DesktopError> {
        let socket = self.runtime_dir().join(&self.wayland_display);
        let cmd: Vec<String> = vec![
            "mutter".into(),
            "--headless".into(),
            "--virtual-monitor".into(),
            format!("{}x{}", self.cfg.width, self.cfg.height),
            "--wayland".into(),
            "--no-x11".into(),
            format!("--wayland-display={}", self.wayland_display),
        ];
        self.spawn_named("mutter", &cmd)?;
        let conn = bus(&self.dbus_address).await.map_err(|e| DesktopError::Bus { what: "session bus", msg: e })?;
        self.wait_for_async("mutter", "Mutter's ScreenCast and RemoteDesktop D-Bus APIs", || {
            let conn = conn.clone();
            async move { owned(&conn, &MUTTER_NAMES).await }
        })
        .await?;
        self.wait_for("mutter", "Mutter's Wayland socket", || socket.exists()).await
    }

    fn spawn_named(&mut self, name: &str, cmd: &[String]) -> Result<u32, DesktopError> {
        let (prog, args) = cmd.split_first().ok_or_else(|| DesktopError::Unavailable("an empty command".into()))?;
        let log_path = self.runtime_dir().join("log").join(format!("{name}-{}.log", self.procs.len()));
        let log = fs::File::create(&log_path).map_err(|e| DesktopError::io("creating a log file", e))?;
        let log2 = log.try_clone().map_err(|e| DesktopError::io("duplicating a log file", e))?;
        let mut c = Command::new(prog);
        c.args(args).stdin(Stdio::null()).stdout(log).stderr(log2);
        // Whatever session this process lives in is not the children's.
        for var in ["DISPLAY", "PIPEWIRE_REMOTE", "DBUS_SYSTEM_BUS_ADDRESS", "WAYLAND_SOCKET"] {
            c.env_remove(var);
        }
        c.envs(self.env());
        let child = c.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DesktopError::NotInstalled(prog.clone()),
            _ => DesktopError::io(format!("starting {prog}"), e),
        })?;
        let pid = child.id();
        tracing::debug!(pid, "headless desktop: started {cmd:?}");
        self.procs.push(Proc { name: name.into(), child, log: log_path });
        Ok(pid)
    }

    /// Waits until `ready()`, failing early when `name` exits.
    async fn wait_for(&mut self, name: &str, what: &str, mut ready: impl FnMut() -> bool) -> Result<(), DesktopError> {
        self.wait_for_async(name, what, || std::future::ready(ready())).await
    }

    async fn wait_for_async<F: Future<Output = bool>>(
        &mut self,
        name: &str,
        what: &str,
        mut ready: impl FnMut() -> F,
    ) -> Result<(), DesktopError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            if ready().await {
                tracing::debug!("headless desktop: {what} up after {:?}", start.elapsed());
                return Ok(());
            }
            let p = self.procs.iter_mut().rev().find(|p| p.name == name);
            let exited = p.map(|p| matches!(p.child.try_wait(), Ok(Some(_)))).unwrap_or(true);
            if exited || start.elapsed() > READY {
                let why = if exited { format!("{name} exited") } else { format!("not within {READY:?}") };
                return Err(DesktopError::NotReady { what: what.into(), why, log: self.log_tail(name) });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// The end of the last `name` process's output.
    fn log_tail(&self, name: &str) -> String {
        self.procs.iter().rev().find(|p| p.name == name).map(|p| tail_of(&p.log)).unwrap_or_default()
    }
}

impl Drop for HeadlessDesktop {
    fn drop(&mut self) {
        // Apps first, the bus last: each stops while what it uses is still there.
        self.procs.reverse();
        stop_all(&mut self.procs);
        if let Some(dir) = self.dir.take()
            && let Err(e) = dir.close()
        {
            tracing::warn!("headless desktop: removing its runtime dir: {e}");
        }
    }
}

/// One at a time, in the order given: SIGTERM, a bounded wait, then SIGKILL;
/// each reaped. One at a time because Mutter hangs on SIGTERM when PipeWire
/// goes away under it at the same moment (and its clients with it).
fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter_mut() {
        if !matches!(p.child.try_wait(), Ok(None)) {
            continue;
        }
        terminate(&p.child);
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            match p.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Ok(None) => {
                    tracing::warn!(
                        "headless desktop: {} ({}) ignored SIGTERM; killing it. Its output ends with:\n{}",
                        p.name,
                        p.child.id(),
                        tail_of(&p.log)
                    );
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    break;
                }
            }
        }
    }
}

fn tail_of(log: &Path) -> String {
    let Ok(mut f) = fs::File::open(log) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_string()
}

fn terminate(child: &Child) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else { return };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours. The
    // pid is our own child's, not yet reaped, so it cannot name another process.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

fn find_in_path(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(bin)).find(|p| p.is_file())
}

async fn bus(addr: &str) -> Result<zbus::Connection, String> {
    let b = zbus::connection::Builder::address(addr).map_err(|e| e.to_string())?;
    b.build().await.map_err(|e| e.to_string())
}

async fn owned(conn: &zbus::Connection, names: &[&str]) -> bool {
    let Ok(dbus) = zbus::fdo::DBusProxy::new(conn).await else { return false };
    for n in names {
        let Ok(name) = zbus::names::BusName::try_from(*n) else { return false };
        if !dbus.name_has_owner(name).await.unwrap_or(false) {
            return false;
        }
    }
    true
}
