//! The performance targets, judged on a run.

use crate::report::{Cell, Floor, PathKind, Target};

fn cell<'a>(cells: &'a [Cell], w: u32, format: &str, content: &str, path: PathKind) -> Option<&'a Cell> {
    cells.iter().find(|c| c.width == w && c.format == format && c.content == content && c.path == path)
}

/// The targets of issue 6, judged on this run.
pub fn targets(cells: &[Cell], floors: &[Floor]) -> Vec<Target> {
    let mut t = Vec::new();
    for (w, name) in [(1280, "1280x720"), (1920, "1920x1080")] {
        for content in ["desktop", "motion"] {
            let (unix_min, shm_min) = if w == 1280 { (0.90, 0.97) } else { (0.85, 0.97) };
            for (path, min) in [(PathKind::InlineUnix, unix_min), (PathKind::SharedMemory, shm_min)] {
                if let Some(c) = cell(cells, w, "BGRx", content, path) {
                    t.push(Target {
                        what: format!("{} ≥ {min:.2}× in-process fps, {name} BGRx {content}", path.label()),
                        met: c.ratio >= min,
                        detail: format!("{:.2}×", c.ratio),
                    });
                }
                let (Some(c), Some(base), Some(f)) = (
                    cell(cells, w, "BGRx", content, path),
                    cell(cells, w, "BGRx", content, PathKind::InProcess),
                    floors.iter().find(|f| f.width == w),
                ) else {
                    continue;
                };
                let floor = if path == PathKind::SharedMemory { f.memcpy_ms } else { f.socket_ms };
                let added = c.p50_ms - base.p50_ms;
                t.push(Target {
                    what: format!("{} added p50 ≤ bare move + 0.5 ms, {name} BGRx {content}", path.label()),
                    met: added <= floor + 0.5,
                    detail: format!("added {added:.2} ms, floor {floor:.2} ms"),
                });
            }
        }
        if w == 1920 {
            for content in ["desktop", "motion"] {
                if let (Some(best), Some(local)) = (
                    cell(cells, w, "BGRx", content, PathKind::SharedMemory),
                    cell(cells, w, "BGRx", content, PathKind::GuestLocal),
                ) {
                    let x = best.fps / local.fps;
                    t.push(Target {
                        what: format!("host offload ≥ 1.5× guest x264enc fps, 1920x1080 BGRx {content}"),
                        met: x >= 1.5,
                        detail: format!("{x:.2}× ({:.0} vs {:.0} fps)", best.fps, local.fps),
                    });
                }
            }
        }
    }
    t
}
