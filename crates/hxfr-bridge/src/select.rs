//! Which H.264 encoder the guest uses, chosen by its GPU.

use std::path::Path;

/// The encoder element and why it was chosen (shown in the log and on the page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub element: String,
    pub reason: String,
}

/// PCI vendors of the GPUs under `<root>/class/drm/card*/device/vendor`.
pub fn gpu_vendors(sysfs: &Path) -> Vec<u16> {
    let Ok(entries) = std::fs::read_dir(sysfs.join("class/drm")) else { return Vec::new() };
    let mut cards: Vec<_> = entries
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("card") && !n.contains('-')
        })
        .map(|e| e.path())
        .collect();
    cards.sort();
    cards
        .iter()
        .filter_map(|c| std::fs::read_to_string(c.join("device/vendor")).ok())
        .filter_map(|v| u16::from_str_radix(v.trim().trim_start_matches("0x"), 16).ok())
        .collect()
}

/// `auto`: NVIDIA → nvh264enc; virtio-gpu → vsockenc (host encoding); Intel or
/// AMD → vah264enc, else vaapih264enc; anything else, or a missing element →
/// x264enc in the guest. A name forces that element. `exists` says whether a
/// GStreamer element is available.
pub fn choose(requested: &str, sysfs: &Path, exists: &dyn Fn(&str) -> bool) -> Choice {
    if requested != "auto" {
        return Choice { element: requested.to_string(), reason: "named explicitly".into() };
    }
    let vendors = gpu_vendors(sysfs);
    let fallback =
        |why: String| Choice { element: "x264enc".into(), reason: format!("{why}: x264 in the guest (last resort)") };
    for v in &vendors {
        let (name, candidates): (&str, &[&str]) = match v {
            0x10de => ("NVIDIA", &["nvh264enc"]),
            0x1af4 => ("virtio-gpu", &["vsockenc"]),
            0x8086 => ("Intel", &["vah264enc", "vaapih264enc"]),
            0x1002 => ("AMD", &["vah264enc", "vaapih264enc"]),
            _ => continue,
        };
        return match candidates.iter().find(|e| exists(e)) {
            Some(e) => Choice { element: e.to_string(), reason: format!("{name} GPU ({v:#06x})") },
            None => fallback(format!("{name} GPU ({v:#06x}) but no {} element", candidates.join("/"))),
        };
    }
    match vendors.first() {
        Some(v) => fallback(format!("GPU vendor {v:#06x} has no hardware encoder we know")),
        None => fallback("no GPU found".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(vendors: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (card, v) in vendors {
            let d = root.path().join("class/drm").join(card).join("device");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("vendor"), format!("{v}\n")).unwrap();
        }
        root
    }

    #[test]
    fn encoder_follows_the_gpu_vendor() {
        let all = |_: &str| true;
        let none = |e: &str| e == "x264enc";
        let cases = [
            ("0x10de", "nvh264enc"),
            ("0x1af4", "vsockenc"),
            ("0x8086", "vah264enc"),
            ("0x1002", "vah264enc"),
            ("0x1234", "x264enc"),
        ];
        for (vendor, want) in cases {
            let t = tree(&[("card0", vendor)]);
            assert_eq!(choose("auto", t.path(), &all).element, want, "vendor {vendor}");
        }
        let t = tree(&[("card0", "0x10de")]);
        let c = choose("auto", t.path(), &none);
        assert_eq!(c.element, "x264enc");
        assert!(c.reason.contains("no nvh264enc"), "{}", c.reason);
        let va_legacy = |e: &str| e == "vaapih264enc";
        assert_eq!(choose("auto", tree(&[("card0", "0x8086")]).path(), &va_legacy).element, "vaapih264enc");
        assert_eq!(
            choose("auto", Path::new("/nonexistent"), &all).reason,
            "no GPU found: x264 in the guest (last resort)"
        );
        // Connector entries (card0-HDMI-A-1) are not cards.
        let t = tree(&[("card0-HDMI-A-1", "0x10de"), ("card1", "0x1af4")]);
        assert_eq!(choose("auto", t.path(), &all).element, "vsockenc");
        assert_eq!(choose("openh264enc", t.path(), &all).element, "openh264enc");
    }
}
