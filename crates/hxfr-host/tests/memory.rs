//! Host memory under floods (issue 18 rows 5 and 7), measured as the RSS
//! of this process, which runs the host in-process. One test in its own
//! binary, so nothing else allocates meanwhile.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hxfr_encode::EncoderKind;
use hxfr_guest::{Connection, HostAddr};
use hxfr_host::{HostConfig, Limits, ListenAddr, MessageDeadline};
use hxfr_proto::{Header, msg_type};

mod common;
use common::{TIMEOUT, bgrx_frame, wait_for};

const MIB: u64 = 1 << 20;

fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// The highest RSS seen while it runs, sampled every 5 ms.
struct Peak {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Peak {
    fn start() -> Peak {
        let (peak, stop) = (Arc::new(AtomicU64::new(rss())), Arc::new(AtomicBool::new(false)));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Peak { peak, stop }
    }

    fn end(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.peak.load(Ordering::Relaxed).max(rss())
    }
}

#[test]
fn host_memory_is_bounded_through_floods_and_returned_after_them() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("host.sock");
    let budget = 32 * MIB;
    let limits = Limits {
        max_buffered: budget,
        max_encoders: 8,
        message_deadline: MessageDeadline { floor: Duration::from_secs(1), min_rate: 64_000_000 },
        ..Default::default()
    };
    let config = HostConfig { encoder: EncoderKind::X264, limits, ..Default::default() };
    let host = hxfr_host::spawn(config, vec![ListenAddr::Unix(sock.clone())], vec![]).unwrap();
    let addr = HostAddr::Unix(sock.clone());
    let (w, h) = (640, 360);
    let px = Bytes::from(vec![0x80u8; (w * h * 4) as usize]);
    // What the guests below send, resident before the baseline.
    let payload = Arc::new(vec![1u8; 32 * MIB as usize]);
    let flood = |conns: usize, sessions: u16| {
        let guests: Vec<_> = (0..conns)
            .map(|_| {
                let (addr, px) = (addr.clone(), px.clone());
                std::thread::spawn(move || {
                    let mut c = Connection::connect(&addr, TIMEOUT).unwrap();
                    c.rx.set_timeout(Some(TIMEOUT)).unwrap();
                    for s in 1..=sessions {
                        c.send(&bgrx_frame(s, w, h, px.clone())).unwrap();
                    }
                    // Every request is answered: a frame, or ERROR over --max-encoders.
                    for _ in 1..=sessions {
                        c.recv().unwrap();
                    }
                })
            })
            .collect();
        for g in guests {
            g.join().unwrap();
        }
        wait_for("every session to end", || host.stats().iter().all(|s| !s.active));
    };
    // Warm up (libraries, runtime, the first encoder), then the baseline.
    flood(1, 1);
    std::thread::sleep(Duration::from_millis(1500)); // past the trim after the warm-up's encoder closed
    let start = rss();

    // Row 5: guests promise 64 MiB messages and send half. Each takes the
    // whole 32 MiB budget before its payload is read, so one at a time is
    // read; the others wait unread until its deadline closes it.
    let peak = Peak::start();
    let header = Header { msg_type: msg_type::FRAME_REQUEST, flags: 1, session_id: 1, payload_size: 64 << 20 };
    let holders: Vec<_> = (0..4)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.write_all(&header.to_bytes()).unwrap();
            let payload = payload.clone();
            std::thread::spawn(move || {
                // Half the payload, then hold the connection open until the host closes it.
                if s.write_all(&payload).is_ok() {
                    let _ = s.read(&mut [0u8; 1]);
                }
            })
        })
        .collect();
    for holder in holders {
        holder.join().unwrap();
    }
    let held = peak.end() - start;
    assert!(held <= budget + 16 * MIB, "4 guests x 32 MiB held {} MiB over a {} MiB budget", held / MIB, budget / MIB);
    assert_eq!(host.buffers().in_use, 0);

    // Row 7: three floods of 64 sessions, 8 encoders at most.
    let peak = Peak::start();
    for _ in 0..3 {
        flood(8, 8);
    }
    let flooded = peak.end() - start;
    assert!(flooded <= 160 * MIB, "three floods took RSS {} MiB over its start", flooded / MIB);
    assert_eq!(host.encoders().live, 0, "every encoder closed with its session");
    // Returned: within 24 MiB of the start, once the trim has run.
    wait_for("memory to be returned", || rss() <= start + 24 * MIB);
    eprintln!(
        "RSS: start {} MiB, huge headers +{} MiB (budget {} MiB), floods +{} MiB, after {} MiB",
        start / MIB,
        held / MIB,
        budget / MIB,
        flooded / MIB,
        rss() / MIB
    );
}
