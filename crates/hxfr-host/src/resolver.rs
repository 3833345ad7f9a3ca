//! Frames named by virtio-gpu resource id (the zero-copy path).
//!
//! The seam a GPU device plugs in behind: the host asks a
//! [`ResourceResolver`] for the pixels behind an id when the frame is about
//! to be encoded (not when the request arrives), so a resource freed while a
//! frame naming it waits in a queue is answered with ERROR -2 and nothing
//! reads freed memory. [`Resolved::data`] keeps the pixels alive until the
//! frame is encoded: a resolver whose memory can go away hands out
//! `Bytes::from_owner(guard)`, and the guard lives exactly as long as the
//! host reads the frame.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hxfr_proto::Layout;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error("resource {0} not found")]
    NotFound(u32),
    #[error("resource {id}: {why}")]
    Unusable { id: u32, why: String },
}

/// The pixels behind a resource id and how they are laid out.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The bytes the layout's planes lie in. They must stay valid while this
    /// value (or any clone of the `Bytes`) lives; see the module doc.
    pub data: Bytes,
    pub layout: Layout,
}

/// Which connection a resolver is asked to serve (a guest: one VM, or one
/// conversation on a virtio-serial port).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Peer<'a> {
    /// The host's id for the connection, as in the logs and stats.
    pub conn_id: u64,
    /// Where it came from: `vsock:CID:PORT`, `tcp:ADDR`, `unix:PATH`, `serial:PATH`.
    pub addr: &'a str,
    /// How it reached the host: the listener's address as `--listen` names
    /// it (`tcp:127.0.0.1:15937`, `unix:PATH`, `vsock:PORT`) or the
    /// `--connect` socket (`unix:PATH`). A host serving several VMs tells
    /// them apart by this.
    pub via: &'a str,
}

/// Maps a virtio-gpu resource id to its pixels. A VMM that owns the guest's
/// GPU memory (Helix's patched QEMU on a Mac does, through IOSurfaces; a
/// vhost-user-gpu device would) implements this. Without one, requests by
/// resource id get ERROR -2 and the connection stays usable.
pub trait ResourceResolver: Send + Sync {
    /// The pixels of `resource_id` now. Called on the session's thread just
    /// before the frame is encoded.
    fn resolve(&self, resource_id: u32) -> Result<Resolved, ResolveError>;

    /// A resolver for one connection only: resource ids belong to one guest,
    /// so a host serving several VMs resolves each connection's ids in that
    /// VM. Called once when the connection starts; `None` (the default)
    /// means this resolver serves every connection as it is.
    fn scope(&self, _peer: Peer<'_>) -> Option<Arc<dyn ResourceResolver>> {
        None
    }
}

/// Resources held in memory, added and freed by the caller: a test double
/// for the resolver seam, and a reference for real ones. A frame being
/// encoded keeps its pixels (a `Bytes` clone) even if its resource is freed
/// meanwhile.
#[derive(Default)]
pub struct MemoryResolver {
    resources: Mutex<HashMap<u32, Resolved>>,
}

impl MemoryResolver {
    pub fn insert(&self, resource_id: u32, resolved: Resolved) {
        self.resources.lock().unwrap().insert(resource_id, resolved);
    }

    /// Frees a resource: later requests naming it get ERROR -2.
    pub fn remove(&self, resource_id: u32) -> Option<Resolved> {
        self.resources.lock().unwrap().remove(&resource_id)
    }
}

impl ResourceResolver for MemoryResolver {
    fn resolve(&self, resource_id: u32) -> Result<Resolved, ResolveError> {
        self.resources.lock().unwrap().get(&resource_id).cloned().ok_or(ResolveError::NotFound(resource_id))
    }
}

/// Several VMs' devices, and which connections belong to which VM: a
/// connection that came through a listener or `--connect` socket bound to a
/// VM is that VM's; with one VM and no bindings, every connection is. A
/// connection bound to no VM gets nothing from any of them, so one VM can
/// never name another's resources or watch its displays.
pub struct Vms<T: ?Sized> {
    vms: Vec<(String, Arc<T>)>,
    /// `Peer::via` → index into `vms`.
    bindings: HashMap<String, usize>,
}

impl<T: ?Sized> Vms<T> {
    /// `vms`: each VM's name and its part (resolver, scanouts).
    pub fn new(vms: Vec<(String, Arc<T>)>) -> Vms<T> {
        Vms { vms, bindings: HashMap::new() }
    }

    /// Connections that come through `via` (a listen address as `--listen`
    /// names it, or `unix:PATH` of a `--connect` socket) belong to VM `name`.
    pub fn bind(&mut self, via: String, name: &str) -> Result<(), String> {
        let i = self.vms.iter().position(|(n, _)| n == name).ok_or_else(|| {
            let known: Vec<&str> = self.vms.iter().map(|(n, _)| n.as_str()).collect();
            format!("{via} is bound to VM {name:?}, which has no --vhost-user-gpu (known: {known:?})")
        })?;
        self.bindings.insert(via, i);
        Ok(())
    }

    /// The VM `peer` belongs to, or why none.
    pub fn of(&self, peer: Peer<'_>) -> Result<&Arc<T>, String> {
        match self.bindings.get(peer.via) {
            Some(&i) => Ok(&self.vms[i].1),
            None if self.bindings.is_empty() && self.vms.len() == 1 => Ok(&self.vms[0].1),
            None => Err(format!(
                "{} came through {}, which is bound to no VM's GPU (give --listen/--connect as NAME@ADDR)",
                peer.addr, peer.via
            )),
        }
    }
}

/// Each connection resolves ids in its own VM's device only ([`Vms`]).
pub struct VmResolvers(pub Vms<dyn ResourceResolver>);

/// What a connection bound to no VM resolves: nothing.
struct Unbound(String);

impl ResourceResolver for Unbound {
    fn resolve(&self, resource_id: u32) -> Result<Resolved, ResolveError> {
        Err(ResolveError::Unusable { id: resource_id, why: self.0.clone() })
    }
}

impl ResourceResolver for VmResolvers {
    fn resolve(&self, resource_id: u32) -> Result<Resolved, ResolveError> {
        // Only reached unscoped, which `scope` never leaves a connection.
        Err(ResolveError::NotFound(resource_id))
    }

    fn scope(&self, peer: Peer<'_>) -> Option<Arc<dyn ResourceResolver>> {
        Some(match self.0.of(peer) {
            Ok(vm) => vm.clone(),
            Err(why) => Arc::new(Unbound(why)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hxfr_proto::PixelFormat;

    fn vm_with(id: u32) -> Arc<dyn ResourceResolver> {
        let m = MemoryResolver::default();
        let layout = Layout::inline(PixelFormat::Bgrx, 2, 2, 8);
        m.insert(id, Resolved { data: Bytes::from(vec![0u8; 16]), layout });
        Arc::new(m)
    }

    fn peer(via: &str) -> Peer<'_> {
        Peer { conn_id: 1, addr: "tcp:127.0.0.1:5", via }
    }

    #[test]
    fn one_vm_without_bindings_serves_every_connection() {
        let r = VmResolvers(Vms::new(vec![("vm1".into(), vm_with(7))]));
        assert!(r.scope(peer("tcp:127.0.0.1:15937")).unwrap().resolve(7).is_ok());
    }

    #[test]
    fn each_connection_sees_only_its_own_vms_resources() {
        let mut vms = Vms::new(vec![("a".into(), vm_with(1)), ("b".into(), vm_with(2))]);
        vms.bind("unix:/run/a.sock".into(), "a").unwrap();
        vms.bind("vsock:5000".into(), "b").unwrap();
        assert!(vms.bind("x".into(), "c").unwrap_err().contains("no --vhost-user-gpu"));
        let r = VmResolvers(vms);
        let a = r.scope(peer("unix:/run/a.sock")).unwrap();
        let b = r.scope(peer("vsock:5000")).unwrap();
        assert!(a.resolve(1).is_ok() && b.resolve(2).is_ok());
        assert!(matches!(a.resolve(2), Err(ResolveError::NotFound(2))), "a cannot see b's resource 2");
        assert!(matches!(b.resolve(1), Err(ResolveError::NotFound(1))));
        let stray = r.scope(peer("tcp:127.0.0.1:15937")).unwrap().resolve(1).unwrap_err().to_string();
        assert!(stray.contains("bound to no VM"), "{stray}");
    }
}
