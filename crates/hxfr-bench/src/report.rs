//! What a run measured, as data (JSON in and out) and as Markdown tables.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::repeat::Figure;

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
    /// FRAME_REQUEST by virtio-gpu resource id (`hxfr host --vhost-user-gpu`),
    /// the resource's backing scattered 4 KiB pages as a Linux guest's dumb
    /// buffers: the host gathers them into one buffer.
    Resource,
    /// The same with the backing one contiguous extent: read in place.
    ResourceContiguous,
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
            PathKind::Resource => "resource (vhost-user-gpu)",
            PathKind::ResourceContiguous => "resource, contiguous backing",
        }
    }

    /// Bytes of the frame copied per frame by construction of the path:
    /// a socket costs one copy in and one out of the kernel; shared memory
    /// one memcpy; the socat hop crosses two sockets; a resource with
    /// scattered backing one gather on the host, a contiguous one none (the
    /// guest drawing into its buffer is not a copy).
    pub fn copies(self) -> u64 {
        match self {
            PathKind::InProcess | PathKind::GuestLocal | PathKind::ResourceContiguous => 0,
            PathKind::InlineUnix | PathKind::InlineTcp | PathKind::Vsockenc => 2,
            PathKind::SharedMemory | PathKind::Resource => 1,
            PathKind::SocatHop => 4,
        }
    }
}

/// The repetitions behind a cell's figures: each its median and spread.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spreads {
    pub repeat: usize,
    pub fps: Figure,
    /// fps over that of the in-process run made just before, per repetition.
    pub ratio: Figure,
    pub p50_ms: Figure,
    pub p99_ms: Figure,
    pub host_cpu_ms_per_frame: Figure,
    /// Host CPU per frame minus that of the in-process run made just
    /// before, per repetition.
    pub host_cpu_over_in_process_ms: Figure,
    /// p50 minus in-process's p50 in the same repetition.
    pub added_p50_ms: Figure,
    /// p99 over p50, per repetition.
    pub p99_over_p50: Figure,
    /// The ratio of each repetition, in order (to pair with another path's).
    pub ratios: Vec<f64>,
}

/// One cell of the matrix. With repetitions, every figure is the median
/// of the repetitions (`spreads` has their spread).
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
    /// Bytes written to the host's socket per frame request (`None`: no
    /// socket, or not counted).
    #[serde(default)]
    pub request_bytes: Option<u64>,
    /// Absent in runs saved before the benchmark repeated its cells.
    #[serde(default)]
    pub spreads: Option<Spreads>,
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
    /// Judged on the median of the repetitions.
    pub met: bool,
    /// The repetitions' spread straddles the target.
    #[serde(default)]
    pub within_noise: bool,
    pub detail: String,
}

impl Target {
    /// "MET", "NOT MET", with "(within noise)" when the spread straddles it.
    pub fn verdict(&self) -> &'static str {
        match (self.met, self.within_noise) {
            (true, false) => "MET",
            (true, true) => "MET (within noise)",
            (false, false) => "NOT MET",
            (false, true) => "NOT MET (within noise)",
        }
    }
}

fn one() -> usize {
    1
}

/// Scanout push at one size: the guest flips at 30 fps and a subscriber
/// takes the access units; each figure the median of the repetitions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushRow {
    pub width: u32,
    pub height: u32,
    pub content: String,
    /// Flips per repetition.
    pub frames: u32,
    /// Flip (its CLOCK_MONOTONIC time, the AU's pts) → access unit read by the subscriber.
    pub p50_ms: Figure,
    pub p99_ms: Figure,
    /// p50 minus in-process's paced p50 in the same repetition.
    pub added_p50_ms: Figure,
    pub host_cpu_ms_per_frame: Figure,
    /// In-process's (paced, same frames) host CPU per frame, same repetitions.
    pub in_process_host_cpu_ms_per_frame: Figure,
}

/// Scanout push with a subscriber and no flips.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushIdle {
    pub width: u32,
    pub height: u32,
    pub secs: f64,
    pub host_cpu_ms: f64,
    /// Frames the subscriber got meanwhile (should be 0).
    pub frames: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub machine: String,
    pub in_flight: usize,
    /// Repetitions of every cell.
    #[serde(default = "one")]
    pub repeat: usize,
    pub cells: Vec<Cell>,
    pub floors: Vec<Floor>,
    pub scale: Vec<ScaleRow>,
    pub targets: Vec<Target>,
    pub skipped: Vec<String>,
    #[serde(default)]
    pub push: Vec<PushRow>,
    #[serde(default)]
    pub push_idle: Option<PushIdle>,
}

pub fn print_markdown(r: &Report, out: &mut dyn std::io::Write) -> Result<()> {
    writeln!(out, "\n### Paths ({}, {} frames in flight)\n", r.machine, r.in_flight)?;
    if r.repeat > 1 {
        writeln!(
            out,
            "Each cell ran {} times; figures are medians, with the least and greatest repetition in brackets. \
             Ratios are taken per repetition against an in-process run made just before.\n",
            r.repeat
        )?;
    }
    writeln!(
        out,
        "| size | input | content | path | fps | × in-process | p50 ms @30fps | p99 ms | host CPU ms/frame | guest CPU ms/frame | copied MB/frame | socket bytes/request | peak RSS MB |"
    )?;
    writeln!(out, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for c in &r.cells {
        let (fps, ratio, p50, host) = match &c.spreads {
            Some(s) => (s.fps.show(1), s.ratio.show(2), s.p50_ms.show(2), s.host_cpu_ms_per_frame.show(2)),
            None => (
                format!("{:.1}", c.fps),
                format!("{:.2}", c.ratio),
                format!("{:.2}", c.p50_ms),
                format!("{:.2}", c.host_cpu_ms_per_frame),
            ),
        };
        writeln!(
            out,
            "| {}x{} | {} | {} | {} | {fps} | {ratio}× | {p50} | {:.2} | {host} | {:.2} | {:.1} | {} | {:.0} |",
            c.width,
            c.height,
            c.format,
            c.content,
            c.path.label(),
            c.p99_ms,
            c.guest_cpu_ms_per_frame,
            c.bytes_copied_per_frame as f64 / 1e6,
            c.request_bytes.map_or_else(|| "–".to_string(), |b| b.to_string()),
            c.peak_rss_mb
        )?;
    }
    if !r.push.is_empty() {
        writeln!(out, "\n### Scanout push (guest flips at 30 fps, one subscriber over UNIX)\n")?;
        writeln!(
            out,
            "| size | content | flips | flip→AU p50 ms | p99 ms | added p50 ms (vs in-process) | host CPU ms/frame | in-process host CPU ms/frame |"
        )?;
        writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|")?;
        for p in &r.push {
            writeln!(
                out,
                "| {}x{} | {} | {} | {} | {} | {} | {} | {} |",
                p.width,
                p.height,
                p.content,
                p.frames,
                p.p50_ms.show(2),
                p.p99_ms.show(2),
                p.added_p50_ms.show(2),
                p.host_cpu_ms_per_frame.show(2),
                p.in_process_host_cpu_ms_per_frame.show(2)
            )?;
        }
    }
    if let Some(i) = &r.push_idle {
        writeln!(
            out,
            "\nIdle (subscribed at {}x{}, no flips for {:.1} s): host CPU {:.1} ms ({:.3}% of a core), {} frame(s) pushed.",
            i.width,
            i.height,
            i.secs,
            i.host_cpu_ms,
            i.host_cpu_ms / (i.secs * 1e3) * 100.0,
            i.frames
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
            writeln!(out, "- {} {}: {}", t.verdict(), t.what, t.detail)?;
        }
    }
    for s in &r.skipped {
        writeln!(out, "\nskipped: {s}")?;
    }
    Ok(())
}
