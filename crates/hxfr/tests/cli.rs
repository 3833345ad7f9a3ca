//! The `hxfr` binary as a person runs it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hxfr_guest::{Connection, HostAddr};
use hxfr_proto::{FrameRequest, Message, Packet, PixelFormat};

fn hxfr() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hxfr"))
}

#[test]
fn demo_serves_a_stream_that_hxfr_stream_measures_then_stops_on_ctrl_c() {
    use std::io::BufRead;
    let mut demo = hxfr()
        .args(["demo", "--listen", "127.0.0.1:0", "--size", "640x360", "--encoder", "x264"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(demo.stdout.take().unwrap()).lines();
    let (mut url, mut helix_url, mut shows, mut session) = (None, None, None, None);
    while helix_url.is_none() {
        let line = lines.next().expect("demo printed its URLs").unwrap();
        if let Some(s) = line.trim().strip_prefix("showing ") {
            shows = Some(s.to_string());
        }
        if let Some(d) = line.trim().strip_prefix("desktop session in ") {
            session = Some(d.to_string());
        }
        if let Some(u) = line.trim().strip_prefix("open ") {
            url = Some(u.to_string());
        }
        if let Some(u) = line.trim().strip_prefix("Helix's client: ") {
            helix_url = Some(u.to_string());
        }
    }
    let (url, helix_url) = (url.expect("the page URL comes first"), helix_url.unwrap());
    // The demo shows a desktop (make test installs Mutter): no fallback here.
    assert_eq!(shows.as_deref(), Some("a headless GNOME desktop (Mutter) with a terminal in it"));
    let session = session.expect("the desktop's runtime dir");
    let out = hxfr().args(["stream", &url, "--duration", "3", "--json"]).output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{report:#}");
    assert!(report["frames"].as_u64().unwrap() >= 60, "{report:#}");
    assert_eq!((report["width"].as_u64(), report["height"].as_u64()), (Some(640), Some(360)));
    assert_eq!(report["encoder"], "vsockenc");
    assert_eq!(report["starts_with_idr"], true);
    // Helix's protocol, recognised by the /ws/stream path: the same figures.
    assert!(helix_url.starts_with("ws://") && helix_url.ends_with("/ws/stream"), "{helix_url}");
    let out = hxfr().args(["stream", &helix_url, "--duration", "2", "--json"]).output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{report:#}");
    assert_eq!(report["protocol"], "helix");
    assert!(report["frames"].as_u64().unwrap() >= 40, "{report:#}");
    assert_eq!((report["width"].as_u64(), report["height"].as_u64()), (Some(640), Some(360)));
    assert_eq!(report["starts_with_idr"], true);
    assert!(report["latency_ms_p50"].is_number(), "{report:#}");
    // SAFETY: signalling the child we started, by its pid.
    unsafe { libc::kill(demo.id() as i32, libc::SIGINT) };
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(demo.wait().unwrap().success());
    assert!(rest.iter().any(|l| l.starts_with("host: conn")), "host stats on exit: {rest:?}");
    // Nothing of the desktop is left: no process runs in its session, its dir is gone.
    assert!(!std::path::Path::new(&session).exists(), "{session} is left behind");
    let needle = format!("XDG_RUNTIME_DIR={session}");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|p| p.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|p| {
            std::fs::read(p.path().join("environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
        })
        .map(|p| std::fs::read_to_string(p.path().join("cmdline")).unwrap_or_default().replace('\0', " "))
        .collect();
    assert!(left.is_empty(), "left running after the demo: {left:?}");
}

#[test]
fn stream_fails_when_nothing_is_there() {
    let out = hxfr().args(["stream", "http://127.0.0.1:9/", "--duration", "1"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bench_quick_prints_the_table_json_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let (json, svg) = (dir.path().join("b.json"), dir.path().join("b.svg"));
    let out = hxfr()
        .args(["bench", "--quick", "--sizes", "320x240"])
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for path in ["in-process", "inline UNIX", "inline TCP", "shared memory", "guest x264enc", "vsockenc element"] {
        assert!(stdout.lines().any(|l| l.contains(&format!("| {path} |"))), "no row for {path}: {stdout}");
    }
    assert!(stdout.contains("### Sessions at once"), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let cells = report["cells"].as_array().unwrap();
    assert!(cells.len() >= 6);
    assert!(cells.iter().all(|c| c["fps"].as_f64().unwrap() > 0.0), "{report:#}");
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
}

#[test]
fn host_serves_then_stops_on_ctrl_c_with_final_stats() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("h.sock");
    let child = hxfr()
        .args(["host", "--encoder", "x264", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "host did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = Connection::connect(&HostAddr::Unix(sock.clone()), Duration::from_secs(5)).unwrap();
    let px = hxfr_testkit::pattern_bgrx(hxfr_testkit::Content::Motion, 320, 240, 1280, 0);
    let req = FrameRequest {
        resource_id: 0,
        width: 320,
        height: 240,
        format: PixelFormat::Bgrx.fourcc(),
        stride: 1280,
        pts: 5,
        duration: 33_333_333,
        force_keyframe: true,
        pixels: Some(Bytes::from(px)),
    };
    c.send(&Packet::new(1, Message::FrameRequest(req))).unwrap();
    match c.recv().unwrap().message {
        Message::FrameResponse(r) => assert!(r.pts == 5 && r.is_keyframe),
        other => panic!("{other:?}"),
    }
    // SAFETY: signalling the child we started, by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("final: conn 1 session 1") && log.contains("1 frames (1 key, 0 dropped)"), "{log}");
}

#[test]
fn bad_flags_say_what_is_wrong() {
    let cases: [(&[&str], &str); 5] = [
        (&["host", "--listen", "tcp:0.0.0.0:0"], "--allow-remote"),
        (&["host", "--encoder", "quantum"], "unknown encoder \"quantum\": use auto,"),
        (&["host", "--listen", "carrier-pigeon:1"], "expected tcp:HOST:PORT"),
        (&["demo", "--size", "big"], "expected WIDTHxHEIGHT"),
        (&["bridge", "--source", "webcam"], "expected test, gnome, x11"),
    ];
    for (args, needle) in cases {
        let out = hxfr().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
