//! Line charts with a shaded band (mean ± std over seeds), written as SVG.
//!
//! One drawing routine serves every picture the CLI makes: the learning
//! curves of `ddppo plot` (the paper's Figure 1) and the error curves of
//! `ddppo grad-error` (Figure 2).

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use std::path::Path;

/// One curve: `mean[i] ± std[i]` at `x[i]`.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub x: Vec<f64>,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// One set of axes.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_y: bool,
    pub series: Vec<Series>,
}

const PANEL_W: u32 = 560;
const PANEL_H: u32 = 400;

/// Draws `panels` side by side (wrapping after three) into an SVG file.
pub fn write_svg(path: &Path, panels: &[Panel]) -> Result<()> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => {}
        _ => bail!("{}: only .svg output is supported", path.display()),
    }
    if panels.is_empty() {
        bail!("nothing to plot");
    }
    let cols = panels.len().min(3);
    let rows = panels.len().div_ceil(cols);
    let root = SVGBackend::new(path, (PANEL_W * cols as u32, PANEL_H * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    // A label keeps its colour in every panel.
    let mut labels: Vec<&str> = panels.iter().flat_map(|p| p.series.iter().map(|s| s.label.as_str())).collect();
    labels.sort_unstable();
    labels.dedup();
    let areas = root.split_evenly((rows, cols));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        draw_panel(area, panel, &labels)?;
    }
    root.present().map_err(draw_err).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing failed: {e:?}")
}

fn draw_panel(area: &DrawingArea<SVGBackend, plotters::coord::Shift>, panel: &Panel, labels: &[&str]) -> Result<()> {
    let finite = |v: f64| v.is_finite() && (!panel.log_y || v > 0.0);
    let mut x_range = (f64::INFINITY, f64::NEG_INFINITY);
    let mut y_range = (f64::INFINITY, f64::NEG_INFINITY);
    for s in &panel.series {
        for i in 0..s.x.len() {
            let (lo, hi) = (s.mean[i] - s.std[i], s.mean[i] + s.std[i]);
            x_range = (x_range.0.min(s.x[i]), x_range.1.max(s.x[i]));
            for v in [lo, hi, s.mean[i]] {
                if finite(v) {
                    y_range = (y_range.0.min(v), y_range.1.max(v));
                }
            }
        }
    }
    if !x_range.0.is_finite() || !y_range.0.is_finite() {
        bail!("panel '{}' has no finite data to plot", panel.title);
    }
    if x_range.1 <= x_range.0 {
        x_range.1 = x_range.0 + 1.0;
    }
    let mut builder = ChartBuilder::on(area);
    builder.caption(&panel.title, ("sans-serif", 20)).margin(12).x_label_area_size(40).y_label_area_size(64);
    if panel.log_y {
        let (lo, hi) = y_axis(y_range, true);
        // Our own ticks: plotters labels only the powers of ten inside the
        // range, which is one label (or none) for data within a decade.
        let y = (lo..hi).log_scale().with_key_points(log_ticks(lo, hi));
        let mut chart = builder.build_cartesian_2d(x_range.0..x_range.1, y).map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc(&panel.x_label)
            .y_desc(&panel.y_label)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| tick_label(*y))
            .draw()
            .map_err(draw_err)?;
        draw_series(&mut chart, panel, labels, &finite)?;
    } else {
        let (lo, hi) = y_axis(y_range, false);
        let y = lo..hi;
        let mut chart = builder.build_cartesian_2d(x_range.0..x_range.1, y).map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc(&panel.x_label)
            .y_desc(&panel.y_label)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(draw_err)?;
        draw_series(&mut chart, panel, labels, &finite)?;
    }
    Ok(())
}

fn draw_series<'a, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    panel: &Panel,
    labels: &[&str],
    finite: &dyn Fn(f64) -> bool,
) -> Result<()>
where
    Y: Ranged<ValueType = f64>,
{
    for s in &panel.series {
        let k = labels.iter().position(|l| *l == s.label).unwrap_or(0);
        let color = Palette99::pick(k).to_rgba();
        let pts = |f: &dyn Fn(usize) -> f64| -> Vec<(f64, f64)> {
            (0..s.x.len()).filter(|&i| finite(f(i))).map(|i| (s.x[i], f(i))).collect()
        };
        let upper = pts(&|i| s.mean[i] + s.std[i]);
        let lower = pts(&|i| s.mean[i] - s.std[i]);
        if upper.len() > 1 && lower.len() > 1 {
            let band: Vec<(f64, f64)> = upper.iter().copied().chain(lower.iter().rev().copied()).collect();
            chart.draw_series(std::iter::once(Polygon::new(band, color.mix(0.2).filled()))).map_err(draw_err)?;
        }
        chart
            .draw_series(LineSeries::new(pts(&|i| s.mean[i]), color.stroke_width(2)))
            .map_err(draw_err)?
            .label(&s.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

/// The y axis drawn for data spanning `lo..=hi` (finite; both positive on a
/// log axis): 5% of the span beyond each end on a linear axis, a factor of
/// 1.25 on a log axis. Data of one value gets a span around it first: 1
/// either side on a linear axis, a factor of 2 on a log axis (an additive 1
/// would take a log axis's lower end to zero or below for values under 1).
fn y_axis((lo, hi): (f64, f64), log: bool) -> (f64, f64) {
    if log {
        let (lo, hi) = if hi > lo { (lo, hi) } else { (lo / 2.0, hi * 2.0) };
        (lo / 1.25, hi * 1.25)
    } else {
        let (lo, hi) = if hi > lo { (lo, hi) } else { (lo - 1.0, hi + 1.0) };
        let pad = 0.05 * (hi - lo);
        (lo - pad, hi + pad)
    }
}

/// The labelled ticks of a log axis over `lo..hi` (`0 < lo < hi`): the
/// powers of ten inside it when there are at least three (thinned to at
/// most eight), else the 1-2-5 values inside it when there are at least
/// three, else evenly spaced round values (a range within a decade).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let inside = |mantissas: &[f64]| -> Vec<f64> {
        let (e0, e1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        (e0..=e1)
            .flat_map(|e| mantissas.iter().map(move |m| m * 10f64.powi(e)))
            .filter(|v| (lo..=hi).contains(v))
            .collect()
    };
    let powers = inside(&[1.0]);
    if powers.len() >= 3 {
        let stride = powers.len().div_ceil(8);
        return powers.into_iter().step_by(stride).collect();
    }
    let nice = inside(&[1.0, 2.0, 5.0]);
    if nice.len() >= 3 {
        return nice;
    }
    // The smallest of 1, 2, 5 (or 10) times the power of ten at or below a
    // fifth of the range that gives at most ten steps across it.
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powi(raw.log10().floor() as i32);
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| (hi - lo) / s <= 10.0).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).filter(|v| *v > 0.0).collect()
}

/// A tick value with as many digits as it needs (`0.85`, `1.2`, `300`, `1e-5`).
fn tick_label(y: f64) -> String {
    if y != 0.0 && !(1e-3..1e5).contains(&y.abs()) {
        let s = format!("{y:.1e}");
        return s.replace(".0e", "e");
    }
    let s = format!("{y:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// Mean and population standard deviation of `v`.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_ticks(lo: f64, hi: f64, want: &[f64]) {
        let got = log_ticks(lo, hi);
        assert_eq!(got.len(), want.len(), "{lo}..{hi}: {got:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-12 * w.abs(), "{lo}..{hi}: {got:?}");
        }
    }

    #[test]
    fn log_ticks_are_powers_of_ten_over_wide_ranges() {
        assert_ticks(3e-5, 20.0, &[1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]);
        // Thinned to at most eight: 1e-12..1e4 has 17 powers, every third kept.
        let t = log_ticks(1e-12, 1e4);
        assert_eq!(t.len(), 6, "{t:?}");
        assert!((t[1] / 1e-9 - 1.0).abs() < 1e-12, "{t:?}");
    }

    #[test]
    fn log_ticks_use_1_2_5_within_two_decades() {
        assert_ticks(0.04, 3.0, &[0.05, 0.1, 0.2, 0.5, 1.0, 2.0]);
    }

    #[test]
    fn log_ticks_within_a_decade_are_evenly_spaced() {
        // 0.704..1.575: step 0.1 (8.7 steps fit, at most ten allowed).
        assert_ticks(0.704, 1.575, &[0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5]);
        // 300..420: step 20.
        assert_ticks(300.0, 420.0, &[300.0, 320.0, 340.0, 360.0, 380.0, 400.0, 420.0]);
    }

    #[test]
    fn log_axis_of_one_value_stays_positive() {
        // Every value 0.5: the old rule (1 either side) gave -0.5..1.5.
        let (lo, hi) = y_axis((0.5, 0.5), true);
        assert!(lo > 0.0 && lo < 0.5 && hi > 0.5, "{lo}..{hi}");
        assert!((lo - 0.2).abs() < 1e-12 && (hi - 1.25).abs() < 1e-12, "{lo}..{hi}");
        assert!(log_ticks(lo, hi).len() >= 3, "{:?}", log_ticks(lo, hi));
        // A spread keeps the 1.25 margin; the linear axis its 5% and its 1.
        let (lo, hi) = y_axis((1e-3, 1e-1), true);
        assert!((lo - 8e-4).abs() < 1e-15 && (hi - 0.125).abs() < 1e-12, "{lo}..{hi}");
        for (data, want) in [((0.0, 10.0), (-0.5, 10.5)), ((3.0, 3.0), (1.9, 4.1))] {
            let got = y_axis(data, false);
            assert!((got.0 - want.0).abs() < 1e-12 && (got.1 - want.1).abs() < 1e-12, "{data:?}: {got:?}");
        }
    }

    #[test]
    fn tick_labels_are_short_and_exact() {
        let cases = [
            (0.8, "0.8"),
            (1.0, "1"),
            (0.30000000000000004, "0.3"),
            (320.0, "320"),
            (1e-5, "1e-5"),
            (2.5e-7, "2.5e-7"),
            (1e6, "1e6"),
        ];
        for (v, want) in cases {
            assert_eq!(tick_label(v), want, "{v}");
        }
    }
}
