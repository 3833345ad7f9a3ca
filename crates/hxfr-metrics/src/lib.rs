//! Latency samples and their percentiles.
//!
//! Every crate that reports p50/p99 (the element's round trips, the host's
//! encode times, `hxfr stream`, the benchmark) takes them from here, so a
//! percentile means the same thing everywhere: nearest rank on the sorted
//! samples, `p` in 0..=1.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

use std::collections::VecDeque;

/// The `p` quantile (0..=1) of `v`, nearest rank; `None` when empty.
/// Sorts `v` in place.
pub fn percentile(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[rank(v.len(), p)])
}

fn rank(len: usize, p: f64) -> usize {
    ((len - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize
}

/// The median, minimum and maximum of a set of measurements: how a
/// repeated figure is reported (median with its spread).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(v: &[f64]) -> Option<Spread> {
        let mut s = v.to_vec();
        let median = percentile(&mut s, 0.5)?;
        Some(Spread { median, min: s[0], max: s[s.len() - 1] })
    }
}

/// The most recent `cap` samples: bounded memory however long a stream runs.
#[derive(Debug, Clone)]
pub struct Window {
    cap: usize,
    samples: VecDeque<f64>,
}

impl Window {
    pub fn new(cap: usize) -> Window {
        Window { cap: cap.max(1), samples: VecDeque::with_capacity(cap.clamp(1, 4096)) }
    }

    pub fn push(&mut self, x: f64) {
        if self.samples.len() == self.cap {
            self.samples.pop_front();
        }
        self.samples.push_back(x);
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn clear(&mut self) {
        self.samples.clear();
    }

    /// The `p` quantile of the samples held, or 0 when there are none.
    pub fn percentile(&self, p: f64) -> f64 {
        let mut v: Vec<f64> = self.samples.iter().copied().collect();
        percentile(&mut v, p).unwrap_or(0.0)
    }

    /// Several quantiles with one sort.
    pub fn percentiles<const N: usize>(&self, ps: [f64; N]) -> [f64; N] {
        let mut v: Vec<f64> = self.samples.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        ps.map(|p| if v.is_empty() { 0.0 } else { v[rank(v.len(), p)] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.0), Some(1.0));
        assert_eq!(percentile(&mut v, 0.5), Some(51.0)); // rank round(99 × 0.5) = 50 → the 51st
        assert_eq!(percentile(&mut v, 0.99), Some(99.0));
        assert_eq!(percentile(&mut v, 1.0), Some(100.0));
        assert_eq!(percentile(&mut [], 0.5), None);
        assert_eq!(percentile(&mut [3.0], 0.99), Some(3.0));
    }

    #[test]
    fn a_window_keeps_only_the_latest() {
        let mut w = Window::new(3);
        assert_eq!(w.percentile(0.5), 0.0);
        for x in [100.0, 1.0, 2.0, 3.0] {
            w.push(x);
        }
        assert_eq!(w.len(), 3);
        assert_eq!(w.percentiles([0.0, 0.5, 1.0]), [1.0, 2.0, 3.0]);
    }

    #[test]
    fn spread_is_median_min_max() {
        assert_eq!(Spread::of(&[5.0, 1.0, 9.0]), Some(Spread { median: 5.0, min: 1.0, max: 9.0 }));
        assert_eq!(Spread::of(&[]), None);
    }
}
