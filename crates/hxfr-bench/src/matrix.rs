//! The matrix: every path at every size, format and content, then session
//! scaling, judged and printed.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use hxfr_guest::HostAddr;
use hxfr_proto::{PixelFormat, Size};
use hxfr_testkit::Content;

use crate::cli::BenchArgs;
use crate::paths::{Env, Input, PACE, run_path, through_host};
use crate::report::{Cell, Floor, PathKind, Report, ScaleRow, print_markdown};
use crate::{plot, sys, targets};

fn sizes(a: &BenchArgs) -> Result<Vec<(u32, u32)>> {
    let names: Vec<String> = if !a.sizes.is_empty() {
        a.sizes.clone()
    } else if a.quick {
        vec!["640x360".into(), "1280x720".into()]
    } else {
        ["640x360", "1280x720", "1920x1080", "2560x1440", "3840x2160"].map(String::from).to_vec()
    };
    names.iter().map(|s| s.parse::<Size>().map(|z| (z.width, z.height)).map_err(anyhow::Error::msg)).collect()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next()?.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0.0, |kb| kb as f64 / 1024.0 / 1024.0);
    format!("{cpu}, {cores} cores, {mem:.0} GiB")
}

/// Runs the matrix and prints it; returns the report.
pub fn run(a: BenchArgs) -> Result<Report> {
    if let Some(f) = &a.from_json {
        let report: Report =
            serde_json::from_slice(&std::fs::read(f).with_context(|| format!("reading {}", f.display()))?)?;
        print_markdown(&report, &mut std::io::stdout())?;
        if let Some(p) = &a.plot {
            plot::draw(&report, p)?;
        }
        return Ok(report);
    }
    if a.in_flight == 0 || a.in_flight > 4 {
        bail!("--in-flight must be 1..4");
    }
    let sizes = sizes(&a)?;
    let formats: &[PixelFormat] = if a.quick { &[PixelFormat::Bgrx] } else { &[PixelFormat::Bgrx, PixelFormat::Nv12] };
    let contents: &[Content] = if a.quick { &[Content::Motion] } else { &[Content::Desktop, Content::Motion] };
    let mut env = Env::start(a.in_flight)?;
    let mut skipped = Vec::new();
    let mut paths = vec![
        PathKind::InProcess,
        PathKind::InlineUnix,
        PathKind::InlineTcp,
        PathKind::SharedMemory,
        PathKind::SocatHop,
        PathKind::GuestLocal,
        PathKind::Vsockenc,
    ];
    if env.socat.is_none() {
        paths.retain(|p| *p != PathKind::SocatHop);
        skipped.push("socat hop: socat is not installed (apt-get install socat)".to_string());
    }
    let machine = machine();
    println!("hxfr bench on {machine}: x264 ultrafast/zerolatency 4 Mbit/s, {} in flight", a.in_flight);

    let total = (sizes.len() * formats.len() * contents.len() * paths.len()) as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut cells = Vec::new();
    let mut floors = Vec::new();
    for &(w, h) in &sizes {
        let bytes = (w * h * 4) as usize;
        floors.push(Floor {
            width: w,
            height: h,
            frame_bytes: bytes,
            socket_ms: sys::socket_floor_ms(bytes, 20),
            memcpy_ms: sys::memcpy_floor_ms(bytes, 20),
        });
        for &format in formats {
            for &content in contents {
                if format == PixelFormat::Nv12 && content == Content::Desktop {
                    // NV12 inputs come from one synthetic pattern; the desktop
                    // content is drawn in RGB only.
                    bar.inc(paths.len() as u64);
                    continue;
                }
                let input = Input::new(format, content, w, h);
                let mut base_fps = 0.0;
                for &path in &paths {
                    bar.set_message(format!("{w}x{h} {format:?} {content:?} {}", path.label()));
                    // About `seconds` of work at the encoder's own rate (in-process runs first).
                    let est_fps =
                        if base_fps > 0.0 { base_fps } else { (300.0 * 921_600.0 / (w * h) as f64).clamp(15.0, 600.0) };
                    let frames = if a.quick { 20 } else { ((a.seconds * est_fps) as u32).clamp(30, 600) };
                    sys::reset_peak_rss();
                    let t = run_path(&mut env, path, &input, frames, a.in_flight, None)
                        .with_context(|| format!("{} at {w}x{h}", path.label()))?;
                    let peak = sys::peak_rss();
                    let paced_frames = if a.quick { 10 } else { 45 };
                    let l = run_path(&mut env, path, &input, paced_frames, a.in_flight, Some(PACE))?;
                    let fps = t.frames as f64 / t.secs;
                    if path == PathKind::InProcess {
                        base_fps = fps;
                    }
                    cells.push(Cell {
                        width: w,
                        height: h,
                        format: if format == PixelFormat::Nv12 { "NV12" } else { "BGRx" }.into(),
                        content: if content == Content::Desktop { "desktop" } else { "motion" }.into(),
                        path,
                        fps,
                        ratio: if base_fps > 0.0 { fps / base_fps } else { 0.0 },
                        p50_ms: l.rtt_ms[0],
                        p99_ms: l.rtt_ms[1],
                        host_cpu_ms_per_frame: t.cpu.host_ns as f64 / 1e6 / t.frames as f64,
                        guest_cpu_ms_per_frame: t.cpu.guest_ns as f64 / 1e6 / t.frames as f64,
                        bytes_copied_per_frame: path.copies() * input.bytes() as u64,
                        peak_rss_mb: peak as f64 / 1e6,
                    });
                    bar.inc(1);
                }
            }
        }
    }
    bar.finish_and_clear();
    let scale = scale(&env, if a.quick { &[1, 2] } else { &[1, 2, 4, 8] }, &cells, a.quick)?;
    let targets = targets::targets(&cells, &floors);
    let report = Report { machine, in_flight: a.in_flight, cells, floors, scale, targets, skipped };
    print_markdown(&report, &mut std::io::stdout())?;
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.plot {
        plot::draw(&report, p)?;
    }
    Ok(report)
}

/// N guests at once, each 1280x720 BGRx paced at 30 fps on its own
/// connection, until one of them cannot keep up.
fn scale(env: &Env, counts: &[usize], cells: &[Cell], quick: bool) -> Result<Vec<ScaleRow>> {
    let capacity = cells
        .iter()
        .find(|c| c.path == PathKind::InProcess && c.width == 1280 && c.format == "BGRx")
        .map_or(0.0, |c| c.fps);
    let input = Arc::new(Input::new(PixelFormat::Bgrx, Content::Desktop, 1280, 720));
    let frames = if quick { 30 } else { 90 };
    let mut rows = Vec::new();
    for &n in counts {
        let workers: Vec<_> = (0..n)
            .map(|_| {
                let input = input.clone();
                let addr = HostAddr::Unix(env.unix.clone());
                std::thread::spawn(move || through_host(&addr, &input, frames, 2, Some(PACE), None))
            })
            .collect();
        let mut fps = Vec::new();
        for w in workers {
            let r = w.join().map_err(|_| anyhow::anyhow!("scale worker panicked"))??;
            fps.push(r.frames as f64 / r.secs);
        }
        let min = fps.iter().copied().fold(f64::MAX, f64::min);
        let sustained = min >= 28.5;
        rows.push(ScaleRow {
            sessions: n,
            fps_per_session_min: min,
            aggregate_fps: fps.iter().sum(),
            vs_in_process_capacity: if capacity > 0.0 { fps.iter().sum::<f64>() / capacity } else { 0.0 },
            sustained,
        });
        if !sustained {
            break;
        }
    }
    Ok(rows)
}
