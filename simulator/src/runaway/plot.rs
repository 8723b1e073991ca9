//! The runaway story's plot: each tenant's cumulative spend over the simulated hours, per run,
//! on a log scale (the runaway's unlimited spend is a hundred times a well-behaved tenant's).

use std::path::Path;

use epp::budget::NANOS_PER_UNIT;
use plotters::prelude::*;

use super::{RUNAWAY, RunawayArgs, Tallies};

/// The bottom of the log-scaled spend axis (a cent); less is drawn there.
const FLOOR: f64 = 0.01;

fn plot_error(e: impl std::fmt::Display) -> String {
    format!("plot: {e}")
}

/// Write the cumulative spend of every tenant in every run to `path` (SVG): the runaway tenant
/// solid, the others dashed, one colour per run.
///
/// # Errors
/// The file cannot be written.
pub fn spend(path: &Path, args: &RunawayArgs, tallies: &Tallies) -> Result<(), String> {
    let dollars = |n: u64| n as f64 / NANOS_PER_UNIT as f64;
    let top = tallies
        .iter()
        .flat_map(|(_, t)| t.values())
        .filter_map(|t| t.hourly_nanos.last())
        .fold(1.0f64, |m, n| m.max(dollars(*n)));
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{RUNAWAY} retrying every {} s: spend over the weekend",
                args.retry_every
            ),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..args.hours, (FLOOR..top * 1.5).log_scale())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc(format!("hours since the start ({})", args.time_zone))
        .y_desc("cumulative spend (USD, log scale)")
        .draw()
        .map_err(plot_error)?;
    let colors = [RGBColor(214, 39, 40), RGBColor(31, 119, 180)];
    for (i, (run, tenants)) in tallies.iter().enumerate() {
        let color = colors[i % colors.len()];
        for (name, t) in tenants {
            let points: Vec<(f64, f64)> = std::iter::once((0.0, 0.0))
                .chain(
                    t.hourly_nanos
                        .iter()
                        .enumerate()
                        .map(|(h, n)| ((h + 1) as f64, dollars(*n))),
                )
                .map(|(h, d)| (h.min(args.hours), d.max(FLOOR)))
                .collect();
            let label = format!("{name}, {run}");
            if name == RUNAWAY {
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(3)))
                    .map_err(plot_error)?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
            } else {
                chart
                    .draw_series(DashedLineSeries::new(points, 4, 3, color.stroke_width(1)))
                    .map_err(plot_error)?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1)));
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)
}
