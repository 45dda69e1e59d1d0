//! A log-linear histogram of microsecond values: 64 sub-buckets per power of
//! two (≤ 1.6 % relative error), exact below 64 µs, exact maximum.
//!
//! Recording is an index computation and one increment, so it can sit on the
//! per-message path of the load generator without allocating.

use serde::{Deserialize, Serialize};

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Buckets for every `u64`: 64 exact ones, then 64 per power of two.
const BUCKETS: usize = ((64 - SUB_BITS + 1) as usize) * SUB as usize;

#[derive(Clone)]
pub struct Hist {
    counts: Box<[u64]>,
    total: u64,
    sum: u128,
    max: u64,
}

/// The wire form between worker and coordinator: only non-empty buckets.
#[derive(Serialize, Deserialize, Default)]
pub struct SparseHist {
    pub buckets: Vec<(u32, u64)>,
    pub sum: u128,
    pub max: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            sum: 0,
            max: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let e = 63 - v.leading_zeros();
    let sub = (v >> (e - SUB_BITS)) & (SUB - 1);
    ((e - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

/// The middle of bucket `i`.
fn value(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let e = (i / SUB - 1) as u32 + SUB_BITS;
    let width = 1u64 << (e - SUB_BITS);
    (1u64 << e) + (i % SUB) * width + width / 2
}

impl Hist {
    #[inline]
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
        self.sum += v as u128;
        if v > self.max {
            self.max = v;
        }
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value at quantile `q` (0..=1); 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value(i).min(self.max);
            }
        }
        self.max
    }

    pub fn merge(&mut self, other: &SparseHist) {
        for &(i, c) in &other.buckets {
            if let Some(slot) = self.counts.get_mut(i as usize) {
                *slot += c;
                self.total += c;
            }
        }
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    pub fn to_sparse(&self) -> SparseHist {
        SparseHist {
            buckets: self
                .counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| (i as u32, *c))
                .collect(),
            sum: self.sum,
            max: self.max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_close() {
        let mut last = 0;
        for v in (0..5_000_000u64)
            .step_by(37)
            .chain([u64::MAX / 2, u64::MAX])
        {
            let i = index(v);
            assert!(i < BUCKETS);
            assert!(i >= last);
            last = i;
            let mid = value(i) as f64;
            assert!(
                (mid - v as f64).abs() <= (v as f64) / 60.0 + 1.0,
                "{v} -> {mid}"
            );
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Hist::default();
        for v in 1..=1000 {
            h.record(v);
        }
        assert_eq!(h.quantile(0.0), 1);
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 500.0).abs() < 10.0, "{p50}");
        let p99 = h.quantile(0.99) as f64;
        assert!((p99 - 990.0).abs() < 16.0, "{p99}");
        assert_eq!(h.quantile(1.0), 1000);
        let mut m = Hist::default();
        m.merge(&h.to_sparse());
        assert_eq!(m.quantile(0.5), h.quantile(0.5));
        assert_eq!(m.count(), 1000);
    }
}
