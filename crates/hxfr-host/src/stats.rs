//! Per-session counters and encode-time percentiles.

use std::fmt;

use hxfr_metrics::Window;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Encode times kept for percentiles: the most recent ones.
const SAMPLES: usize = 4096;
/// Ended sessions kept for the summary on exit.
const KEEP_ENDED: usize = 256;

/// Who a session is and what it has done: the counters behind the stats lines.
#[derive(Debug, Clone, Default)]
pub struct SessionInfo {
    pub conn_id: u64,
    pub session_id: u16,
    pub peer: String,
    pub encoder: String,
    pub width: u32,
    pub height: u32,
    pub frames: u64,
    pub keyframes: u64,
    /// Requests answered with ERROR.
    pub dropped: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug)]
pub struct SessionStats {
    pub info: SessionInfo,
    pub started: Instant,
    pub ended: Option<Instant>,
    encode_ms: Window,
    /// (when, frames) at the last report, for the interval fps.
    last_report: (Instant, u64),
}

impl SessionStats {
    fn new(conn_id: u64, session_id: u16, peer: String) -> SessionStats {
        let now = Instant::now();
        SessionStats {
            info: SessionInfo { conn_id, session_id, peer, ..Default::default() },
            started: now,
            ended: None,
            encode_ms: Window::new(SAMPLES),
            last_report: (now, 0),
        }
    }

    pub fn record_encode(&mut self, took: Duration, bytes_in: usize, bytes_out: usize, keyframe: bool) {
        let i = &mut self.info;
        i.frames += 1;
        i.keyframes += keyframe as u64;
        i.bytes_in += bytes_in as u64;
        i.bytes_out += bytes_out as u64;
        self.encode_ms.push(took.as_secs_f64() * 1000.0);
    }

    pub fn snapshot(&self) -> Snapshot {
        let [p50, p99] = self.encode_ms.percentiles([0.5, 0.99]);
        let end = self.ended.unwrap_or_else(Instant::now);
        let secs = end.duration_since(self.started).as_secs_f64().max(1e-3);
        Snapshot {
            info: self.info.clone(),
            fps: self.info.frames as f64 / secs,
            encode_p50_ms: p50 as _,
            encode_p99_ms: p99 as _,
            active: self.ended.is_none(),
        }
    }
}

/// A point-in-time copy of one session's figures.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub info: SessionInfo,
    /// Average over the session's life (over the interval in periodic reports).
    pub fps: f64,
    pub encode_p50_ms: f32,
    pub encode_p99_ms: f32,
    pub active: bool,
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.info;
        write!(
            f,
            "conn {} session {} ({}) {} {}x{}: {} frames ({} key, {} dropped), {:.1} fps, encode p50 {:.2} ms p99 {:.2} ms, in {:.1} MB, out {:.2} MB{}",
            i.conn_id,
            i.session_id,
            i.peer,
            if i.encoder.is_empty() { "-" } else { &i.encoder },
            i.width,
            i.height,
            i.frames,
            i.keyframes,
            i.dropped,
            self.fps,
            self.encode_p50_ms,
            self.encode_p99_ms,
            i.bytes_in as f64 / 1e6,
            i.bytes_out as f64 / 1e6,
            if self.active { "" } else { " (ended)" }
        )
    }
}

/// Every session the host has served (active, and the most recent ended ones).
#[derive(Clone, Default)]
pub struct StatsRegistry {
    inner: Arc<Mutex<Vec<Arc<Mutex<SessionStats>>>>>,
}

impl StatsRegistry {
    pub fn register(&self, conn_id: u64, session_id: u16, peer: String) -> Arc<Mutex<SessionStats>> {
        let s = Arc::new(Mutex::new(SessionStats::new(conn_id, session_id, peer)));
        let mut all = self.inner.lock().unwrap();
        // Bound the history: drop the oldest ended sessions beyond KEEP_ENDED.
        let ended = all.iter().filter(|s| s.lock().unwrap().ended.is_some()).count();
        if ended >= KEEP_ENDED
            && let Some(pos) = all.iter().position(|s| s.lock().unwrap().ended.is_some())
        {
            all.remove(pos);
        }
        all.push(s.clone());
        s
    }

    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.inner.lock().unwrap().iter().map(|s| s.lock().unwrap().snapshot()).collect()
    }

    /// Lines for the periodic report: active sessions with their fps over the
    /// last interval.
    pub fn report(&self) -> Vec<String> {
        let now = Instant::now();
        let all = self.inner.lock().unwrap();
        let mut lines = Vec::new();
        for s in all.iter() {
            let mut s = s.lock().unwrap();
            if s.ended.is_some() {
                continue;
            }
            let (t, n) = s.last_report;
            let fps = (s.info.frames - n) as f64 / now.duration_since(t).as_secs_f64().max(1e-3);
            s.last_report = (now, s.info.frames);
            let mut snap = s.snapshot();
            snap.fps = fps;
            lines.push(snap.to_string());
        }
        lines
    }
}
