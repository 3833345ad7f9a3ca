//! The matrix: every path at every size, format and content, each cell
//! repeated (in-process run back to back with each path), then session
//! scaling, judged on medians and printed.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use hxfr_guest::HostAddr;
use hxfr_proto::{PixelFormat, Size};
use hxfr_testkit::Content;

use crate::cli::BenchArgs;
use crate::paths::{Env, Input, PACE, Via, run_path, through_host};
use crate::report::{Cell, Floor, PathKind, PushIdle, PushRow, Report, ScaleRow, Spreads, print_markdown};
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

const PATH_NAMES: &str =
    "inline-unix, inline-tcp, shm, socat, guest-x264enc, vsockenc, resource, resource-contiguous, scanout-push";

/// The paths `--paths` names (in-process always runs: every ratio needs it),
/// and whether scanout push runs (a section of its own, not a path of the
/// matrix: its frames come from flips, not requests).
fn paths(a: &BenchArgs) -> Result<(Vec<PathKind>, bool)> {
    let all = [
        PathKind::InlineUnix,
        PathKind::InlineTcp,
        PathKind::SharedMemory,
        PathKind::SocatHop,
        PathKind::GuestLocal,
        PathKind::Vsockenc,
        PathKind::Resource,
        PathKind::ResourceContiguous,
    ];
    let mut out = vec![PathKind::InProcess];
    if a.paths.is_empty() {
        out.extend(all);
        return Ok((out, true));
    }
    let mut push = false;
    for name in &a.paths {
        let p = match name.as_str() {
            "in-process" => continue,
            "scanout-push" | "push" => {
                push = true;
                continue;
            }
            "resource" | "vhost-user-gpu" => PathKind::Resource,
            "resource-contiguous" => PathKind::ResourceContiguous,
            "inline-unix" | "unix" => PathKind::InlineUnix,
            "inline-tcp" | "tcp" => PathKind::InlineTcp,
            "shm" | "shared-memory" => PathKind::SharedMemory,
            "socat" | "socat-hop" => PathKind::SocatHop,
            "guest-x264enc" | "guest" => PathKind::GuestLocal,
            "vsockenc" => PathKind::Vsockenc,
            other => bail!("unknown path {other:?} ({PATH_NAMES})"),
        };
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok((out, push))
}

/// Whether `path` takes `format`: a virtio-gpu 2D resource holds BGRx only.
fn takes(path: PathKind, format: PixelFormat) -> bool {
    !matches!(path, PathKind::Resource | PathKind::ResourceContiguous) || format == PixelFormat::Bgrx
}

/// The inputs `--inputs` names, as (format, content).
fn inputs(a: &BenchArgs) -> Result<Vec<(PixelFormat, Content)>> {
    if a.inputs.is_empty() {
        return Ok(if a.quick {
            vec![(PixelFormat::Bgrx, Content::Motion)]
        } else {
            // NV12 inputs come from one synthetic pattern; the desktop
            // content is drawn in RGB only.
            vec![
                (PixelFormat::Bgrx, Content::Desktop),
                (PixelFormat::Bgrx, Content::Motion),
                (PixelFormat::Nv12, Content::Motion),
            ]
        });
    }
    a.inputs
        .iter()
        .map(|name| match name.as_str() {
            "bgrx-desktop" => Ok((PixelFormat::Bgrx, Content::Desktop)),
            "bgrx-motion" => Ok((PixelFormat::Bgrx, Content::Motion)),
            "nv12-motion" => Ok((PixelFormat::Nv12, Content::Motion)),
            other => bail!("unknown input {other:?} (bgrx-desktop, bgrx-motion, nv12-motion)"),
        })
        .collect()
}

/// One repetition of one path: its throughput run, the in-process run made
/// just before it, and its paced run.
struct Rep {
    fps: f64,
    base_fps: f64,
    host_cpu_ms: f64,
    base_host_cpu_ms: f64,
    guest_cpu_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    base_p50_ms: f64,
    peak_rss: u64,
    request_bytes: Option<u64>,
}

/// A cell from its repetitions: medians, spreads, paired ratios.
fn cell(w: u32, h: u32, input: &Input, path: PathKind, reps: &[Rep]) -> Cell {
    use crate::repeat::{Figure, paired_differences, paired_ratios};
    let col = |f: fn(&Rep) -> f64| reps.iter().map(f).collect::<Vec<f64>>();
    let host = col(|r| r.host_cpu_ms);
    let p50 = col(|r| r.p50_ms);
    let ratios = paired_ratios(&col(|r| r.fps), &col(|r| r.base_fps));
    let spreads = Spreads {
        repeat: reps.len(),
        fps: Figure::of(&col(|r| r.fps)),
        ratio: Figure::of(&ratios),
        p99_over_p50: Figure::of(&paired_ratios(&col(|r| r.p99_ms), &p50)),
        ratios,
        p50_ms: Figure::of(&p50),
        p99_ms: Figure::of(&col(|r| r.p99_ms)),
        host_cpu_ms_per_frame: Figure::of(&host),
        host_cpu_over_in_process_ms: Figure::of(&paired_differences(&host, &col(|r| r.base_host_cpu_ms))),
        added_p50_ms: Figure::of(&paired_differences(&p50, &col(|r| r.base_p50_ms))),
    };
    Cell {
        width: w,
        height: h,
        format: if input.format() == PixelFormat::Nv12 { "NV12" } else { "BGRx" }.into(),
        content: if input.content() == Content::Desktop { "desktop" } else { "motion" }.into(),
        path,
        fps: spreads.fps.median,
        ratio: spreads.ratio.median,
        p50_ms: spreads.p50_ms.median,
        p99_ms: spreads.p99_ms.median,
        host_cpu_ms_per_frame: spreads.host_cpu_ms_per_frame.median,
        guest_cpu_ms_per_frame: Figure::of(&col(|r| r.guest_cpu_ms)).median,
        bytes_copied_per_frame: path.copies() * input.bytes() as u64,
        peak_rss_mb: reps.iter().map(|r| r.peak_rss).max().unwrap_or(0) as f64 / 1e6,
        request_bytes: reps.iter().find_map(|r| r.request_bytes),
        spreads: Some(spreads),
    }
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
    let repeat = a.repeat.unwrap_or(if a.quick { 1 } else { 5 });
    if !(1..=100).contains(&repeat) {
        bail!("--repeat must be 1..100");
    }
    let sizes = sizes(&a)?;
    let inputs = inputs(&a)?;
    let (mut paths, push) = paths(&a)?;
    let mut env = Env::start(a.in_flight)?;
    let mut skipped = Vec::new();
    if env.socat.is_none() && paths.contains(&PathKind::SocatHop) {
        paths.retain(|p| *p != PathKind::SocatHop);
        skipped.push("socat hop: socat is not installed (apt-get install socat)".to_string());
    }
    let machine = machine();
    println!(
        "hxfr bench on {machine}: x264 ultrafast/zerolatency 4 Mbit/s, {} in flight, {repeat} repetition(s)",
        a.in_flight
    );

    // Per repetition: one paced in-process run, then for each path an
    // in-process throughput run, the path's, and the path's paced run.
    let runs_per_rep = |f: PixelFormat| {
        let n = paths.iter().filter(|p| takes(**p, f)).count();
        1 + n + 2 * (n - 1)
    };
    let bgrx = inputs.iter().filter(|(f, _)| *f == PixelFormat::Bgrx).count();
    let total = (sizes.len() * repeat * inputs.iter().map(|(f, _)| runs_per_rep(*f)).sum::<usize>()
        + if push { sizes.len() * bgrx * repeat * 2 } else { 0 }) as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut cells = Vec::new();
    let mut floors = Vec::new();
    let paced_frames = if a.quick { 10 } else { 30 };
    for &(w, h) in &sizes {
        let bytes = (w * h * 4) as usize;
        floors.push(Floor {
            width: w,
            height: h,
            frame_bytes: bytes,
            socket_ms: sys::socket_floor_ms(bytes, 20),
            memcpy_ms: sys::memcpy_floor_ms(bytes, 20),
        });
        for &(format, content) in &inputs {
            let input = Input::new(format, content, w, h);
            let mut reps: Vec<Vec<Rep>> = paths.iter().map(|_| Vec::new()).collect();
            // Frames per throughput run: about `seconds` at the encoder's own
            // rate, from the first in-process run (a guess before it).
            let mut frames = if a.quick {
                20
            } else {
                ((a.seconds * (300.0 * 921_600.0 / (w * h) as f64).clamp(15.0, 600.0)) as u32).clamp(30, 600)
            };
            for rep in 0..repeat {
                let what = |p: PathKind| format!("{w}x{h} {format:?} {content:?} {} ({}/{repeat})", p.label(), rep + 1);
                bar.set_message(what(PathKind::InProcess));
                let base_paced =
                    run_path(&mut env, PathKind::InProcess, &input, paced_frames, a.in_flight, Some(PACE))?;
                bar.inc(1);
                for (k, &path) in paths.iter().enumerate() {
                    if !takes(path, format) {
                        continue;
                    }
                    bar.set_message(what(path));
                    if path == PathKind::InProcess {
                        sys::reset_peak_rss();
                    }
                    let base = run_path(&mut env, PathKind::InProcess, &input, frames, a.in_flight, None)
                        .with_context(|| format!("in-process at {w}x{h}"))?;
                    bar.inc(1);
                    let base_fps = base.frames as f64 / base.secs;
                    if !a.quick && rep == 0 && k == 0 {
                        frames = ((a.seconds * base_fps) as u32).clamp(30, 600);
                    }
                    let (t, l) = if path == PathKind::InProcess {
                        (base.clone(), base_paced.clone())
                    } else {
                        sys::reset_peak_rss();
                        let t = run_path(&mut env, path, &input, frames, a.in_flight, None)
                            .with_context(|| format!("{} at {w}x{h}", path.label()))?;
                        bar.inc(1);
                        let l = run_path(&mut env, path, &input, paced_frames, a.in_flight, Some(PACE))
                            .with_context(|| format!("{} paced at {w}x{h}", path.label()))?;
                        bar.inc(1);
                        (t, l)
                    };
                    let per_frame = |ns: u64, n: u32| ns as f64 / 1e6 / n as f64;
                    reps[k].push(Rep {
                        fps: t.frames as f64 / t.secs,
                        base_fps,
                        host_cpu_ms: per_frame(t.cpu.host_ns, t.frames),
                        base_host_cpu_ms: per_frame(base.cpu.host_ns, base.frames),
                        guest_cpu_ms: per_frame(t.cpu.guest_ns, t.frames),
                        p50_ms: l.rtt_ms[0],
                        p99_ms: l.rtt_ms[1],
                        base_p50_ms: base_paced.rtt_ms[0],
                        peak_rss: sys::peak_rss(),
                        request_bytes: t.request_bytes,
                    });
                }
            }
            for (k, &path) in paths.iter().enumerate() {
                if !reps[k].is_empty() {
                    cells.push(cell(w, h, &input, path, &reps[k]));
                }
            }
        }
    }
    let (push, push_idle) = if push {
        push_section(&mut env, &sizes, &inputs, repeat, paced_frames, a.quick, &bar)?
    } else {
        (Vec::new(), None)
    };
    bar.finish_and_clear();
    let scale = scale(&env, if a.quick { &[1, 2] } else { &[1, 2, 4, 8] }, &cells, a.quick)?;
    let targets = targets::targets(&cells, &floors);
    let report =
        Report { machine, in_flight: a.in_flight, repeat, cells, floors, scale, targets, skipped, push, push_idle };
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
                std::thread::spawn(move || through_host(&addr, &input, frames, 2, Some(PACE), Via::Inline))
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

/// Scanout push at every size and BGRx input of the run, each repetition
/// paired with a paced in-process run of the same frames; then, once, the
/// host's CPU with a subscriber and no flips (10 s; --quick: 1 s).
#[cfg(target_os = "linux")]
fn push_section(
    env: &mut Env,
    sizes: &[(u32, u32)],
    inputs: &[(PixelFormat, Content)],
    repeat: usize,
    frames: u32,
    quick: bool,
    bar: &indicatif::ProgressBar,
) -> Result<(Vec<PushRow>, Option<PushIdle>)> {
    use crate::repeat::{Figure, paired_differences};
    let inputs: Vec<_> = inputs.iter().filter(|(f, _)| *f == PixelFormat::Bgrx).collect();
    let idle_for = std::time::Duration::from_secs(if quick { 1 } else { 10 });
    let (mut rows, mut idle) = (Vec::new(), None);
    for (n, &(w, h)) in sizes.iter().enumerate() {
        for (m, &&(format, content)) in inputs.iter().enumerate() {
            let input = Input::new(format, content, w, h);
            let (mut p50, mut p99, mut base_p50, mut host, mut base_host) = (vec![], vec![], vec![], vec![], vec![]);
            for rep in 0..repeat {
                bar.set_message(format!("{w}x{h} {content:?} scanout push ({}/{repeat})", rep + 1));
                let base = run_path(env, PathKind::InProcess, &input, frames, 2, Some(PACE))?;
                bar.inc(1);
                let last = n + 1 == sizes.len() && m + 1 == inputs.len() && rep + 1 == repeat;
                let r = crate::paths::push(env, &input, frames, last.then_some(idle_for))
                    .with_context(|| format!("scanout push at {w}x{h}"))?;
                bar.inc(1);
                let per_frame = |ns: u64, n: u32| ns as f64 / 1e6 / n as f64;
                p50.push(r.rtt_ms[0]);
                p99.push(r.rtt_ms[1]);
                base_p50.push(base.rtt_ms[0]);
                host.push(per_frame(r.cpu.host_ns, r.frames));
                base_host.push(per_frame(base.cpu.host_ns, base.frames));
                if let Some((secs, ns, got)) = r.idle {
                    idle = Some(PushIdle { width: w, height: h, secs, host_cpu_ms: ns as f64 / 1e6, frames: got });
                }
            }
            rows.push(PushRow {
                width: w,
                height: h,
                content: if content == Content::Desktop { "desktop" } else { "motion" }.into(),
                frames,
                p50_ms: Figure::of(&p50),
                p99_ms: Figure::of(&p99),
                added_p50_ms: Figure::of(&paired_differences(&p50, &base_p50)),
                host_cpu_ms_per_frame: Figure::of(&host),
                in_process_host_cpu_ms_per_frame: Figure::of(&base_host),
            });
        }
    }
    Ok((rows, idle))
}

#[cfg(not(target_os = "linux"))]
fn push_section(
    _env: &mut Env,
    _sizes: &[(u32, u32)],
    _inputs: &[(PixelFormat, Content)],
    _repeat: usize,
    _frames: u32,
    _quick: bool,
    _bar: &indicatif::ProgressBar,
) -> Result<(Vec<PushRow>, Option<PushIdle>)> {
    bail!("scanout push needs Linux (the host's virtio-gpu device)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: BenchArgs,
    }

    fn args(v: &[&str]) -> BenchArgs {
        Cli::parse_from(std::iter::once("bench").chain(v.iter().copied())).a
    }

    #[test]
    fn resource_and_push_are_named_paths_and_run_by_default() {
        let (p, push) = paths(&args(&["--paths", "resource,scanout-push"])).unwrap();
        assert_eq!(p, vec![PathKind::InProcess, PathKind::Resource]);
        assert!(push);
        let (p, push) = paths(&args(&["--paths", "resource-contiguous,inline-unix"])).unwrap();
        assert_eq!(p, vec![PathKind::InProcess, PathKind::ResourceContiguous, PathKind::InlineUnix]);
        assert!(!push);
        let (p, push) = paths(&args(&[])).unwrap();
        assert!(p.contains(&PathKind::Resource) && p.contains(&PathKind::ResourceContiguous) && push);
        let e = paths(&args(&["--paths", "gpu"])).unwrap_err().to_string();
        assert!(e.contains("resource") && e.contains("scanout-push"), "{e}");
    }

    #[test]
    fn resources_take_bgrx_only() {
        assert!(takes(PathKind::Resource, PixelFormat::Bgrx));
        assert!(!takes(PathKind::Resource, PixelFormat::Nv12));
        assert!(!takes(PathKind::ResourceContiguous, PixelFormat::Nv12));
        assert!(takes(PathKind::InlineUnix, PixelFormat::Nv12));
    }
}
