//! A profiling harness for the inline receive path: one path, no pacing.
//!
//! `inline_recv <in-process|unix|tcp|shm|vsockenc|resource|resource-contiguous> WxH FRAMES` prints host and guest
//! CPU per frame and minor page faults per frame. Under
//! `valgrind --tool=callgrind`, the instructions of `unix` minus those of
//! `in-process` (same frames, same encoder) are what the socket path costs.

use anyhow::{Context, Result, bail};
use hxfr_bench::PathKind;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path, size, frames] = &args[..] else {
        bail!("usage: inline_recv <in-process|unix|tcp|shm|vsockenc|resource|resource-contiguous> WxH FRAMES");
    };
    let path = match path.as_str() {
        "in-process" => PathKind::InProcess,
        "unix" => PathKind::InlineUnix,
        "tcp" => PathKind::InlineTcp,
        "shm" => PathKind::SharedMemory,
        "vsockenc" => PathKind::Vsockenc,
        "resource" => PathKind::Resource,
        "resource-contiguous" => PathKind::ResourceContiguous,
        p => bail!("unknown path {p}"),
    };
    let (w, h) = size.split_once('x').context("size is WxH")?;
    let p = hxfr_bench::paths::profile(path, w.parse()?, h.parse()?, frames.parse()?, 2)?;
    let per = |ns: u64| ns as f64 / 1e6 / p.frames as f64;
    println!(
        "{} {size}: {} frames in {:.2}s ({:.1} fps), host CPU {:.2} ms/frame, guest CPU {:.2} ms/frame, {:.0} minor faults/frame",
        path.label(),
        p.frames,
        p.secs,
        p.frames as f64 / p.secs,
        per(p.cpu.host_ns),
        per(p.cpu.guest_ns),
        p.minor_faults_per_frame
    );
    if std::env::var_os("THREADS").is_some() {
        for (name, ns) in &p.threads {
            println!("  {name}: {:.2} ms/frame", per(*ns));
        }
    }
    Ok(())
}
