//! SVG plots of replay results (plotters' SVG backend: no fonts or system libraries needed).
//!
//! - [`ttft_cdf`]: the TTFT distribution of several runs on one log-scaled time axis;
//! - [`pod_load`]: each pod's mean (running + waiting) per second of simulated time.

use std::path::Path;

use plotters::prelude::*;

use super::{Outcome, RunOutcome};

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// TTFTs of completed requests, seconds, sorted.
pub fn ttfts(run: &RunOutcome) -> Vec<f64> {
    let mut v: Vec<f64> = run
        .records
        .iter()
        .filter(|r| r.outcome == Outcome::Completed)
        .filter_map(|r| Some(r.first_token_ns?.saturating_sub(r.arrival_ns) as f64 / 1e9))
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

fn plot_error(e: impl std::fmt::Display) -> String {
    format!("plot: {e}")
}

/// Write the TTFT CDFs of `runs` to `path`.
///
/// # Errors
/// The file cannot be written.
pub fn ttft_cdf(path: &Path, title: &str, runs: &[&RunOutcome]) -> Result<(), String> {
    let series: Vec<(String, Vec<f64>)> = runs.iter().map(|r| (r.name.clone(), ttfts(r))).collect();
    let lo = series
        .iter()
        .filter_map(|(_, v)| v.first())
        .fold(f64::INFINITY, |a, b| a.min(*b))
        .max(1e-3);
    let hi = series
        .iter()
        .filter_map(|(_, v)| v.last())
        .fold(0.0f64, |a, b| a.max(*b))
        .max(lo * 10.0);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), 0.0..1.0)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("time to first token (s, log scale)")
        .y_desc("fraction of requests")
        .draw()
        .map_err(plot_error)?;
    for (i, (name, values)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let n = values.len().max(1) as f64;
        // At most ~1,000 points per curve keeps the SVG small.
        let stride = (values.len() / 1000).max(1);
        let points = values
            .iter()
            .enumerate()
            .filter(|(k, _)| k % stride == 0 || *k + 1 == values.len())
            .map(|(k, v)| (v.max(lo * 0.9), (k + 1) as f64 / n));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(plot_error)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)
}

/// Write the per-pod load over time of `run` to `path`.
///
/// # Errors
/// The file cannot be written.
pub fn pod_load(path: &Path, run: &RunOutcome) -> Result<(), String> {
    let seconds = run
        .pods
        .iter()
        .map(|p| p.load_per_second.len())
        .max()
        .unwrap_or(0)
        .max(1);
    // Average into at most 600 buckets so long runs stay readable.
    let bucket = seconds.div_ceil(600).max(1);
    let series: Vec<Vec<(f64, f64)>> = run
        .pods
        .iter()
        .map(|p| {
            p.load_per_second
                .chunks(bucket)
                .enumerate()
                .map(|(i, c)| ((i * bucket) as f64, c.iter().sum::<f64>() / c.len() as f64))
                .collect()
        })
        .collect();
    let top = series.iter().flatten().map(|(_, y)| *y).fold(1.0f64, f64::max);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: requests per pod (running + waiting)", run.name),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..seconds as f64, 0.0..top * 1.05)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("simulated time (s)")
        .y_desc("requests on the pod")
        .draw()
        .map_err(plot_error)?;
    for (i, points) in series.into_iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(1)))
            .map_err(plot_error)?
            .label(format!("pod {i}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)
}
