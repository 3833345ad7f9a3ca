//! `hxfr demo`: the guest→host path end to end on one machine.
//!
//! Starts a host on a private UNIX socket, streams a moving test pattern into
//! it at the chosen rate the way vsockenc does (pipelined, frames in flight),
//! decodes every answer with a real decoder and reports frame rate, round
//! trip latency and picture quality. The browser half arrives with
//! `hxfr bridge`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use hxfr_encode::EncoderKind;
use hxfr_guest::{Connection, HostAddr};
use hxfr_host::{HostConfig, ListenAddr};
use hxfr_proto::{FrameRequest, Message, Packet, PixelFormat};
use hxfr_testkit::{Content, Output, decode_h264, pattern_bgrx, psnr_bgrx};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// How long to stream.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Frame size, WIDTHxHEIGHT.
    #[arg(long, default_value = "1280x720")]
    size: String,
    #[arg(long, default_value_t = 30)]
    fps: u32,
    /// Host encoder: auto, x264 or gst:ELEMENT.
    #[arg(long, default_value = "auto")]
    encoder: EncoderKind,
    /// Write the stream the host sent back to this file (H.264 Annex B).
    #[arg(long)]
    output: Option<std::path::PathBuf>,
}

pub fn run(a: DemoArgs) -> Result<()> {
    let (w, h) = crate::parse_size(&a.size)?;
    if a.fps == 0 || a.fps > 240 {
        bail!("--fps must be 1..240");
    }
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("hxfr-host.sock");
    let host = hxfr_host::spawn(
        HostConfig { encoder: a.encoder, ..Default::default() },
        vec![ListenAddr::Unix(sock.clone())],
        vec![],
    )?;
    println!("hxfr demo: host listening on unix:{} (encoder {})", sock.display(), host.encoder);
    println!("guest: {w}x{h} BGRx moving pattern at {} fps for {} s, inline over the socket", a.fps, a.seconds);

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc_on(move || stop.store(true, Ordering::Relaxed));
    }
    let conn = Connection::connect(&HostAddr::Unix(sock), Duration::from_secs(5))?;
    let (mut tx, mut rx) = conn.split();
    let frames = a.seconds * a.fps as u64;
    let stride = w as usize * 4;
    // A few distinct frames, reused: the guest's drawing must not be what limits the rate.
    let patterns: Vec<Bytes> = (0..30).map(|i| Bytes::from(pattern_bgrx(Content::Motion, w, h, stride, i))).collect();
    let interval = Duration::from_secs_f64(1.0 / a.fps as f64);
    let start = Instant::now();
    let send_times = Arc::new(std::sync::Mutex::new(Vec::with_capacity(frames as usize)));
    let sender = {
        let (patterns, send_times, stop) = (patterns.clone(), send_times.clone(), stop.clone());
        std::thread::spawn(move || -> Result<u64> {
            let mut sent = 0;
            for i in 0..frames {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let due = start + interval * i as u32;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                send_times.lock().unwrap().push(Instant::now());
                let req = FrameRequest {
                    resource_id: 0,
                    width: w,
                    height: h,
                    format: PixelFormat::Bgrx.fourcc(),
                    stride: stride as u32,
                    pts: i as i64 * interval.as_nanos() as i64,
                    duration: interval.as_nanos() as i64,
                    force_keyframe: i == 0,
                    pixels: Some(patterns[(i % 30) as usize].clone()),
                };
                tx.send(&Packet::new(1, Message::FrameRequest(req)))?;
                sent += 1;
            }
            Ok(sent)
        })
    };
    let mut aus = Vec::new();
    let mut rtt_ms = Vec::new();
    let mut last_print = Instant::now();
    loop {
        let p = match rx.recv() {
            Ok(p) => p,
            Err(e) => bail!("host connection failed: {e}"),
        };
        let Message::FrameResponse(r) = p.message else { bail!("host answered {}", p.message.name()) };
        let sent_at = send_times.lock().unwrap()[aus.len()];
        rtt_ms.push(sent_at.elapsed().as_secs_f64() * 1e3);
        aus.push(r.to_annex_b());
        if last_print.elapsed() > Duration::from_secs(1) {
            last_print = Instant::now();
            let secs = start.elapsed().as_secs_f64();
            eprint!("\r  {:5.1} s  {:5} frames  {:5.1} fps  ", secs, aus.len(), aus.len() as f64 / secs);
        }
        let done = sender.is_finished() && aus.len() == send_times.lock().unwrap().len();
        if done || aus.len() as u64 == frames {
            break;
        }
    }
    let sent = sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    let elapsed = start.elapsed().as_secs_f64();
    eprintln!();
    rtt_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| rtt_ms[((rtt_ms.len() - 1) as f64 * p) as usize];
    let bytes: usize = aus.iter().map(Bytes::len).sum();
    println!("frames: {sent} sent, {} answered in {:.1} s ({:.1} fps)", aus.len(), elapsed, aus.len() as f64 / elapsed);
    println!("round trip (frame handed over -> H.264 back): p50 {:.2} ms, p99 {:.2} ms", pct(0.5), pct(0.99));
    println!("bitrate: {:.2} Mbit/s", bytes as f64 * 8.0 / elapsed / 1e6);
    let pics = decode_h264(&aus, Output::Bgrx).map_err(anyhow::Error::msg)?;
    let psnr: Vec<f64> =
        pics.iter().enumerate().map(|(i, p)| psnr_bgrx(&patterns[i % 30], stride, &p.data, w, h)).collect();
    let (min, avg) = (psnr.iter().cloned().fold(f64::MAX, f64::min), psnr.iter().sum::<f64>() / psnr.len() as f64);
    println!(
        "decoded: {} of {} access units with avdec_h264; PSNR avg {avg:.1} dB, min {min:.1} dB",
        pics.len(),
        aus.len()
    );
    if let Some(path) = &a.output {
        std::fs::write(path, aus.concat()).with_context(|| format!("writing {}", path.display()))?;
        println!("stream written to {} (play: gst-play-1.0 {})", path.display(), path.display());
    }
    for s in host.stats() {
        println!("host: {s}");
    }
    host.stop();
    if pics.len() != aus.len() || aus.len() as u64 != sent {
        bail!("frames were lost");
    }
    Ok(())
}

/// Runs `f` on Ctrl-C (a small tokio runtime on its own thread).
fn ctrlc_on(f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        f();
    });
    Ok(())
}
