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
