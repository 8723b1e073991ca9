//! The one percentile rule and latency summary of every report (replay, compare, load, and the
//! harness's load, latency and gRPC figures), so figures from different commands compare.
//!
//! Rule: **nearest rank**. The q-quantile of n sorted samples is the sample of rank ⌈q·n⌉
//! (1-based, at least 1): the smallest sample with at least a share q of the samples at or below
//! it. It is always an observed value, never an interpolation, and the p100 is the maximum.
//! Histograms (the EPP's own decision-time buckets) are the exception: their quantiles can only
//! be interpolated within a bucket, and their reports say so.

use serde::Serialize;

/// The nearest-rank `q`-quantile (`q` in [0, 1]) of `sorted` (ascending); 0 when empty.
pub fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Sort `samples` in place and return their nearest-rank quantiles at `qs`.
pub fn quantiles<const N: usize>(samples: &mut [f64], qs: [f64; N]) -> [f64; N] {
    samples.sort_by(f64::total_cmp);
    qs.map(|q| nearest_rank(samples, q))
}

/// Latency summary in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Mean.
    pub mean_s: f64,
    /// Median.
    pub p50_s: f64,
    /// 90th percentile.
    pub p90_s: f64,
    /// 99th percentile.
    pub p99_s: f64,
    /// Maximum.
    pub max_s: f64,
}

impl Latency {
    /// Summarise `values` (seconds); all zero when empty.
    pub fn of(mut values: Vec<f64>) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_by(f64::total_cmp);
        let rank = |q: f64| nearest_rank(&values, q);
        Self {
            mean_s: values.iter().sum::<f64>() / values.len() as f64,
            p50_s: rank(0.50),
            p90_s: rank(0.90),
            p99_s: rank(0.99),
            max_s: values[values.len() - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let l = Latency::of((1..=100).map(f64::from).collect());
        assert_eq!((l.p50_s, l.p90_s, l.p99_s, l.max_s), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(l.mean_s, 50.5);
        assert_eq!(Latency::of(vec![]), Latency::default());
        assert_eq!(Latency::of(vec![3.0]).p99_s, 3.0);
    }

    #[test]
    fn a_quantile_is_an_observed_sample_of_rank_ceil_q_n() {
        let mut s = vec![4.0, 1.0, 3.0, 2.0];
        assert_eq!(
            quantiles(&mut s, [0.0, 0.25, 0.26, 0.5, 0.99, 1.0]),
            [1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
        );
        assert_eq!(s, [1.0, 2.0, 3.0, 4.0], "sorted in place");
        assert_eq!(nearest_rank(&[], 0.5), 0.0);
        assert_eq!(nearest_rank(&[7.0], 0.99), 7.0);
    }
}
