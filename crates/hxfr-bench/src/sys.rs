//! What the kernel knows about this process: CPU time per thread, peak memory,
//! and the physical floor (bare socket send, bare memcpy) to compare against.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// CPU nanoseconds used so far, split by side: host threads (named
/// `hxfr-host*`, the session threads `hxfr-c*` and push feeds
/// `hxfr-scanout*`, and the encoder threads they start, which inherit their
/// names) versus everything else (the guest
/// side of the benchmark).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSplit {
    pub host_ns: u64,
    pub guest_ns: u64,
}

/// Whether a thread is the host's: its runtime (`hxfr-host*`), a
/// connection's session (`hxfr-c*`) or a scanout's push feed
/// (`hxfr-scanout*`), and the encoder threads they start (which inherit the
/// name).
fn is_host(name: &str) -> bool {
    name.starts_with("hxfr-host") || name.starts_with("hxfr-c") || name.starts_with("hxfr-scanout")
}

/// Per-thread CPU time from /proc/self/task/*/schedstat (nanoseconds on CPU).
fn threads() -> HashMap<u64, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return out };
    for t in tasks.flatten() {
        let tid: u64 = t.file_name().to_string_lossy().parse().unwrap_or(0);
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_string();
        let ns = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        out.insert(tid, (name, ns));
    }
    out
}

/// A snapshot to diff against later.
pub struct CpuMark(HashMap<u64, (String, u64)>);

impl CpuMark {
    pub fn now() -> CpuMark {
        CpuMark(threads())
    }

    /// CPU used since this mark, by side. Threads that ended in between are
    /// lost, so take the second mark while the measured threads still live.
    pub fn since(&self) -> CpuSplit {
        let mut s = CpuSplit::default();
        for (tid, (name, ns)) in threads() {
            let before = self.0.get(&tid).map_or(0, |(_, b)| *b);
            let used = ns.saturating_sub(before);
            if is_host(&name) {
                s.host_ns += used;
            } else {
                s.guest_ns += used;
            }
        }
        s
    }
}

impl CpuMark {
    /// CPU nanoseconds used since this mark, by thread name (threads of
    /// the same name summed), most first.
    pub fn since_by_name(&self) -> Vec<(String, u64)> {
        let mut by: HashMap<String, u64> = HashMap::new();
        for (tid, (name, ns)) in threads() {
            let before = self.0.get(&tid).map_or(0, |(_, b)| *b);
            *by.entry(name).or_default() += ns.saturating_sub(before);
        }
        let mut v: Vec<_> = by.into_iter().filter(|(_, ns)| *ns > 0).collect();
        v.sort_by_key(|(_, ns)| std::cmp::Reverse(*ns));
        v
    }
}

/// Resets the process's peak-RSS counter (Linux 4.0+).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory (VmHWM) since the last reset, in bytes.
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Median milliseconds to push `bytes` through a UNIX socket pair (the bare
/// cost of moving a frame inline, no protocol, no encoder).
pub fn socket_floor_ms(bytes: usize, reps: usize) -> f64 {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut left = bytes * reps;
        while left > 0 {
            match b.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    });
    let data = vec![7u8; bytes];
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        a.write_all(&data).expect("socket write");
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(a);
    let _ = reader.join();
    median(times)
}

/// Median milliseconds for one memcpy of `bytes` (the shared-memory path's one copy).
pub fn memcpy_floor_ms(bytes: usize, reps: usize) -> f64 {
    let src = vec![7u8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut times = Vec::with_capacity(reps);
    for i in 0..reps {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst[i % bytes]);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    median(times)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    hxfr_metrics::percentile(&mut v, 0.5).unwrap_or(0.0)
}

/// Minor page faults of this process so far (`/proc/self/stat`, field 10).
pub fn minor_faults() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| s.rsplit_once(')')?.1.split_whitespace().nth(7)?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_threads_by_name() {
        for host in ["hxfr-host", "hxfr-host-main", "hxfr-c3-s1", "hxfr-scanout0"] {
            assert!(super::is_host(host), "{host}");
        }
        for guest in ["main", "hxfr-bench", "vsockenc", "x264"] {
            assert!(!super::is_host(guest), "{guest}");
        }
    }
}
