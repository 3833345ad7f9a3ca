//! Repeated measurements: a figure is the median of its repetitions with
//! their spread (least to greatest); a ratio or difference against
//! in-process is taken per repetition, from runs made back to back, and
//! then its median; a target is judged on the median and called within
//! noise when the spread straddles it.

use serde::{Deserialize, Serialize};

/// A repeated figure: the median of the repetitions, and their least and
/// greatest value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Figure {
    /// The figure of `v` (nearest-rank median, as every percentile in
    /// hxfr); all zero when `v` is empty.
    pub fn of(v: &[f64]) -> Figure {
        hxfr_metrics::Spread::of(v).map_or(Figure::one(0.0), |s| Figure { median: s.median, min: s.min, max: s.max })
    }

    /// A figure measured once.
    pub fn one(x: f64) -> Figure {
        Figure { median: x, min: x, max: x }
    }

    /// The median with its spread, as the tables print it: `12.3 (11.9–13.0)`,
    /// or just the median when there was one repetition.
    pub fn show(&self, decimals: usize) -> String {
        if self.min == self.max {
            format!("{:.*}", decimals, self.median)
        } else {
            format!("{:.*} ({:.*}–{:.*})", decimals, self.median, decimals, self.min, decimals, self.max)
        }
    }
}

/// Per repetition: `path[i] / base[i]` (0 where the base is 0), for runs
/// of a path and of in-process made back to back.
pub fn paired_ratios(path: &[f64], base: &[f64]) -> Vec<f64> {
    path.iter().zip(base).map(|(p, b)| if *b > 0.0 { p / b } else { 0.0 }).collect()
}

/// Per repetition: `path[i] - base[i]`.
pub fn paired_differences(path: &[f64], base: &[f64]) -> Vec<f64> {
    path.iter().zip(base).map(|(p, b)| p - b).collect()
}

/// A target judged on a repeated figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judged {
    /// The median meets the target.
    pub met: bool,
    /// The spread straddles the target: some repetitions meet it and some
    /// do not, so this run cannot tell.
    pub within_noise: bool,
}

/// `f` must be at least `limit`.
pub fn at_least(f: Figure, limit: f64) -> Judged {
    Judged { met: f.median >= limit, within_noise: f.min < limit && f.max >= limit }
}

/// `f` must be at most `limit`.
pub fn at_most(f: Figure, limit: f64) -> Judged {
    Judged { met: f.median <= limit, within_noise: f.min <= limit && f.max > limit }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_is_the_median_and_the_spread() {
        assert_eq!(Figure::of(&[3.0, 9.0, 1.0, 4.0, 5.0]), Figure { median: 4.0, min: 1.0, max: 9.0 });
        assert_eq!(Figure::of(&[2.0]), Figure::one(2.0));
        assert_eq!(Figure::of(&[]), Figure::one(0.0));
        assert_eq!(Figure::of(&[3.0, 9.0, 1.0]).show(1), "3.0 (1.0–9.0)");
        assert_eq!(Figure::one(0.5).show(2), "0.50");
    }

    /// Ratios pair each repetition with its own in-process run: a machine
    /// that slows down for one repetition slows both sides of that pair.
    #[test]
    fn ratios_are_paired_before_the_median() {
        let base = [100.0, 50.0, 100.0, 100.0, 100.0];
        let path = [95.0, 47.5, 96.0, 94.0, 95.0];
        let r = Figure::of(&paired_ratios(&path, &base));
        assert!((r.median - 0.95).abs() < 1e-9, "{r:?}");
        assert!(r.max - r.min < 0.03, "the slow repetition does not widen the spread: {r:?}");
        // Unpaired (median over median) would mix repetitions.
        assert_eq!(paired_ratios(&[1.0], &[0.0]), vec![0.0]);
        assert_eq!(paired_differences(&[5.0, 7.0], &[4.0, 4.5]), vec![1.0, 2.5]);
    }

    #[test]
    fn a_target_is_judged_on_the_median_and_within_noise_when_straddled() {
        let f = Figure { median: 0.96, min: 0.93, max: 0.99 };
        assert_eq!(at_least(f, 0.95), Judged { met: true, within_noise: true });
        assert_eq!(at_least(f, 0.97), Judged { met: false, within_noise: true });
        assert_eq!(at_least(f, 0.90), Judged { met: true, within_noise: false });
        assert_eq!(at_least(f, 1.00), Judged { met: false, within_noise: false });
        assert_eq!(at_most(f, 0.95), Judged { met: false, within_noise: true });
        assert_eq!(at_most(f, 1.00), Judged { met: true, within_noise: false });
        assert_eq!(at_most(f, 0.90), Judged { met: false, within_noise: false });
        // One repetition: never within noise.
        assert_eq!(at_least(Figure::one(0.95), 0.95), Judged { met: true, within_noise: false });
        assert_eq!(at_most(Figure::one(0.95), 0.95), Judged { met: true, within_noise: false });
    }
}
