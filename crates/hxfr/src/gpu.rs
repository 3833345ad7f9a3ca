//! `hxfr host --vhost-user-gpu [NAME=]PATH`: the host as each VM's GPU, and
//! which guest connections belong to which VM (`NAME@ADDR` on `--listen`
//! and `--connect`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Result, bail};
use hxfr_host::{ResourceResolver, ScanoutSource};

/// One `--vhost-user-gpu`.
pub struct GpuArg {
    pub name: String,
    pub socket: PathBuf,
}

/// How a guest connection reaches the host.
// Read only where there is a device to bind connections to.
#[cfg_attr(not(all(target_os = "linux", feature = "vhost-user-gpu")), allow(dead_code))]
pub enum Via {
    /// The n-th `--listen`.
    Listen(usize),
    /// A `--connect` socket.
    Connect(PathBuf),
}

/// A VM name: letters, digits, `-`, `_` and `.`.
fn is_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

pub fn parse_devices(args: &[String]) -> Result<Vec<GpuArg>> {
    let mut out: Vec<GpuArg> = Vec::new();
    for a in args {
        let (name, path) = match a.split_once('=') {
            Some((n, p)) if is_name(n) => (n.to_owned(), p),
            _ if args.len() == 1 => ("vm".to_owned(), a.as_str()),
            _ => bail!("--vhost-user-gpu {a}: with several VMs, name each: NAME=PATH"),
        };
        if path.is_empty() {
            bail!("--vhost-user-gpu {a}: no socket path");
        }
        if out.iter().any(|g| g.name == name) {
            bail!("--vhost-user-gpu: VM {name:?} is named twice");
        }
        out.push(GpuArg { name, socket: PathBuf::from(path) });
    }
    if !out.is_empty() && !cfg!(all(target_os = "linux", feature = "vhost-user-gpu")) {
        bail!("--vhost-user-gpu: this build has no vhost-user-gpu device (Linux only)");
    }
    Ok(out)
}

/// `NAME@ADDR` → (Some(NAME), ADDR) when NAME is one of `vms`; anything else is all address.
pub fn split_vm<'a>(arg: &'a str, vms: &[&str]) -> (Option<&'a str>, &'a str) {
    match arg.split_once('@') {
        Some((n, rest)) if vms.contains(&n) => (Some(n), rest),
        _ => (None, arg),
    }
}

/// What the devices give the host: frames by resource id, and the VMs'
/// displays for SUBSCRIBE, each routed to the connection's own VM.
pub type Devices = (Option<Arc<dyn ResourceResolver>>, Option<Arc<dyn ScanoutSource>>);

/// Starts every device. `vias` are the bound listeners' addresses, in
/// `--listen` order.
#[cfg(all(target_os = "linux", feature = "vhost-user-gpu"))]
/// `dbus`: the bus of QEMU's D-Bus display (ENABLE_SCANOUT); `None`: the session bus.
pub fn start(gpus: &[GpuArg], bindings: &[(Via, String)], vias: &[String], dbus: Option<String>) -> Result<Devices> {
    use hxfr_host::gpu::{Config, GpuResolver, GpuScanouts, spawn_device};
    use hxfr_host::qemu_display::QemuDisplay;
    use hxfr_host::{VmResolvers, VmScanouts, Vms};
    if gpus.is_empty() {
        if !bindings.is_empty() {
            bail!("NAME@ADDR needs a --vhost-user-gpu NAME=PATH");
        }
        return Ok((None, None));
    }
    let mut vms: Vec<(String, Arc<dyn ResourceResolver>)> = Vec::new();
    let mut displays: Vec<(String, Arc<dyn ScanoutSource>)> = Vec::new();
    for g in gpus {
        let dev = spawn_device(&g.name, &g.socket, Config::default()).map_err(anyhow::Error::msg)?;
        tracing::info!(
            "VM {}: vhost-user-gpu on {} (QEMU: -chardev socket,id=gpu,path={} -device vhost-user-gpu-pci,chardev=gpu)",
            g.name,
            g.socket.display(),
            g.socket.display()
        );
        vms.push((g.name.clone(), Arc::new(GpuResolver::new(dev.resources()))));
        displays.push((g.name.clone(), GpuScanouts::attach(&dev, QemuDisplay { bus: dbus.clone() })));
    }
    let (mut resolvers, mut scanouts) = (Vms::new(vms), Vms::new(displays));
    for (via, vm) in bindings {
        let key = match via {
            Via::Listen(i) => vias[*i].clone(),
            Via::Connect(p) => format!("unix:{}", p.display()),
        };
        resolvers.bind(key.clone(), vm).map_err(anyhow::Error::msg)?;
        scanouts.bind(key, vm).map_err(anyhow::Error::msg)?;
    }
    if gpus.len() > 1 && bindings.is_empty() {
        tracing::warn!("several VMs and no NAME@ADDR bindings: no connection can name a resource or watch a display");
    }
    Ok((Some(Arc::new(VmResolvers(resolvers))), Some(Arc::new(VmScanouts(scanouts)))))
}

#[cfg(not(all(target_os = "linux", feature = "vhost-user-gpu")))]
pub fn start(gpus: &[GpuArg], bindings: &[(Via, String)], _vias: &[String], _dbus: Option<String>) -> Result<Devices> {
    if !gpus.is_empty() || !bindings.is_empty() {
        bail!("--vhost-user-gpu: this build has no vhost-user-gpu device (Linux only)");
    }
    Ok((None, None))
}

/// Removes the sockets the devices listened on: nothing is left behind.
pub fn cleanup(gpus: &[GpuArg]) {
    for g in gpus {
        let _ = std::fs::remove_file(&g.socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_bindings() {
        let one = parse_devices(&["/run/gpu.sock".into()]).unwrap();
        assert_eq!((one[0].name.as_str(), one[0].socket.to_str().unwrap()), ("vm", "/run/gpu.sock"));
        let two = parse_devices(&["a=/run/a.sock".into(), "b=/run/b.sock".into()]).unwrap();
        assert_eq!(two[1].name, "b");
        assert!(parse_devices(&["/run/a.sock".into(), "/run/b.sock".into()]).is_err(), "two unnamed");
        assert!(parse_devices(&["a=/x".into(), "a=/y".into()]).is_err(), "a name twice");
        assert_eq!(split_vm("a@unix:/run/s", &["a"]), (Some("a"), "unix:/run/s"));
        assert_eq!(split_vm("unix:/run/x@y", &["a"]), (None, "unix:/run/x@y"), "an @ in a path stays");
    }
}
