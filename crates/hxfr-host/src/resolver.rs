//! Frames named by virtio-gpu resource id (the zero-copy path).

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
pub struct Resolved {
    pub data: Bytes,
    pub layout: Layout,
}

/// Maps a virtio-gpu resource id to its pixels. A VMM that owns the guest's
/// GPU memory (Helix's patched QEMU on a Mac does, through IOSurfaces) would
/// implement this; no Linux host has one today, so requests by resource id get
/// ERROR -2 and the connection stays usable.
pub trait ResourceResolver: Send + Sync {
    fn resolve(&self, resource_id: u32) -> Result<Resolved, ResolveError>;
}
