//! What a run measured, as data (JSON in and out) and as Markdown tables.

use anyhow::Result;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathKind {
    InProcess,
    InlineUnix,
    InlineTcp,
    SharedMemory,
    SocatHop,
    GuestLocal,
    /// The real vsockenc element (`appsrc ! vsockenc ! fakesink`), inline over UNIX.
    Vsockenc,
}

impl PathKind {
    pub fn label(self) -> &'static str {
        match self {
            PathKind::InProcess => "in-process",
            PathKind::InlineUnix => "inline UNIX",
            PathKind::InlineTcp => "inline TCP",
            PathKind::SharedMemory => "shared memory",
            PathKind::SocatHop => "socat hop",
            PathKind::GuestLocal => "guest x264enc",
            PathKind::Vsockenc => "vsockenc element",
        }
    }

    /// Bytes of the frame copied per frame by construction of the path:
    /// a socket costs one copy in and one out of the kernel; shared memory
    /// one memcpy; the socat hop crosses two sockets.
    pub fn copies(self) -> u64 {
        match self {
            PathKind::InProcess | PathKind::GuestLocal => 0,
            PathKind::InlineUnix | PathKind::InlineTcp | PathKind::Vsockenc => 2,
            PathKind::SharedMemory => 1,
            PathKind::SocatHop => 4,
        }
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    pub width: u32,
    pub height: u32,
    pub format: String,
    pub content: String,
    pub path: PathKind,
    /// Throughput with frames in flight.
    pub fps: f64,
    /// fps divided by in-process fps for the same input.
    pub ratio: f64,
    /// Frame handed over → access unit back, at a paced 30 fps.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub host_cpu_ms_per_frame: f64,
    pub guest_cpu_ms_per_frame: f64,
    pub bytes_copied_per_frame: u64,
    pub peak_rss_mb: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Floor {
    pub width: u32,
    pub height: u32,
    pub frame_bytes: usize,
    /// Bare UNIX-socket send of the BGRx frame.
    pub socket_ms: f64,
    /// Bare memcpy of the BGRx frame.
    pub memcpy_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleRow {
    pub sessions: usize,
    pub fps_per_session_min: f64,
    pub aggregate_fps: f64,
    /// Aggregate fps over the single-session in-process capacity at 1280x720.
    pub vs_in_process_capacity: f64,
    pub sustained: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub what: String,
    pub met: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub machine: String,
    pub in_flight: usize,
    pub cells: Vec<Cell>,
    pub floors: Vec<Floor>,
    pub scale: Vec<ScaleRow>,
    pub targets: Vec<Target>,
    pub skipped: Vec<String>,
}

pub fn print_markdown(r: &Report, out: &mut dyn std::io::Write) -> Result<()> {
    writeln!(out, "\n### Paths ({}, {} frames in flight)\n", r.machine, r.in_flight)?;
    writeln!(
        out,
        "| size | input | content | path | fps | × in-process | p50 ms @30fps | p99 ms | host CPU ms/frame | guest CPU ms/frame | copied MB/frame | peak RSS MB |"
    )?;
    writeln!(out, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for c in &r.cells {
        writeln!(
            out,
            "| {}x{} | {} | {} | {} | {:.1} | {:.2}× | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0} |",
            c.width,
            c.height,
            c.format,
            c.content,
            c.path.label(),
            c.fps,
            c.ratio,
            c.p50_ms,
            c.p99_ms,
            c.host_cpu_ms_per_frame,
            c.guest_cpu_ms_per_frame,
            c.bytes_copied_per_frame as f64 / 1e6,
            c.peak_rss_mb
        )?;
    }
    writeln!(out, "\n### Physical floor (BGRx frame)\n")?;
    writeln!(out, "| size | bytes | UNIX socket send ms | memcpy ms |")?;
    writeln!(out, "|---|---:|---:|---:|")?;
    for f in &r.floors {
        writeln!(out, "| {}x{} | {} | {:.2} | {:.2} |", f.width, f.height, f.frame_bytes, f.socket_ms, f.memcpy_ms)?;
    }
    writeln!(out, "\n### Sessions at once (1280x720 BGRx, each paced at 30 fps)\n")?;
    writeln!(out, "| sessions | slowest session fps | aggregate fps | × in-process capacity | sustained |")?;
    writeln!(out, "|---:|---:|---:|---:|---|")?;
    for s in &r.scale {
        writeln!(
            out,
            "| {} | {:.1} | {:.1} | {:.2}× | {} |",
            s.sessions,
            s.fps_per_session_min,
            s.aggregate_fps,
            s.vs_in_process_capacity,
            if s.sustained { "yes" } else { "no" }
        )?;
    }
    if !r.targets.is_empty() {
        writeln!(out, "\n### Targets\n")?;
        for t in &r.targets {
            writeln!(out, "- {} {}: {}", if t.met { "MET" } else { "NOT MET" }, t.what, t.detail)?;
        }
    }
    for s in &r.skipped {
        writeln!(out, "\nskipped: {s}")?;
    }
    Ok(())
}
