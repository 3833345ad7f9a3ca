//! `hxfr bench`'s command line.

use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// A reduced matrix that finishes in well under a minute (one repetition, short cells).
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of every cell: figures are their medians, with the spread
    /// (default 5; --quick: 1).
    #[arg(long, value_name = "N")]
    pub repeat: Option<usize>,
    /// Paths to run besides in-process, which always runs (default: all):
    /// inline-unix, inline-tcp, shm, socat, guest-x264enc, vsockenc,
    /// resource (by virtio-gpu resource id, scattered backing),
    /// resource-contiguous, scanout-push (a section of its own: flip-to-AU
    /// latency, host CPU per frame and idle).
    #[arg(long, value_delimiter = ',', value_name = "PATHS")]
    pub paths: Vec<String>,
    /// Inputs to run (default: all; --quick: bgrx-motion): bgrx-desktop,
    /// bgrx-motion, nv12-motion.
    #[arg(long, value_delimiter = ',', value_name = "INPUTS")]
    pub inputs: Vec<String>,
    /// Sizes to run (default: 640x360 to 3840x2160; --quick: 640x360, 1280x720).
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<String>,
    /// Frames outstanding on the socket paths (vsockenc's max-in-flight).
    #[arg(long, default_value_t = 2)]
    pub in_flight: usize,
    /// Seconds of work per throughput run, each repetition (frames are counted to fit).
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Write every figure as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Draw fps and p50 latency by size and path (SVG) here.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Print (and plot) a run saved with --json instead of measuring.
    #[arg(long, value_name = "FILE")]
    pub from_json: Option<PathBuf>,
}
