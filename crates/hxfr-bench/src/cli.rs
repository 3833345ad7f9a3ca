//! `hxfr bench`'s command line.

use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// A reduced matrix that finishes in well under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Sizes to run (default: 640x360 to 3840x2160; --quick: 640x360, 1280x720).
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<String>,
    /// Frames outstanding on the socket paths (vsockenc's max-in-flight).
    #[arg(long, default_value_t = 2)]
    pub in_flight: usize,
    /// Seconds of work per throughput cell (frames are counted to fit).
    #[arg(long, default_value_t = 1.5)]
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
