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
    if y_range.1 <= y_range.0 {
        y_range = (y_range.0 - 1.0, y_range.1 + 1.0);
    }
    let mut builder = ChartBuilder::on(area);
    builder.caption(&panel.title, ("sans-serif", 20)).margin(12).x_label_area_size(40).y_label_area_size(64);
    if panel.log_y {
        let y = (y_range.0 * 0.8)..(y_range.1 * 1.25);
        let mut chart = builder.build_cartesian_2d(x_range.0..x_range.1, y.log_scale()).map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc(&panel.x_label)
            .y_desc(&panel.y_label)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0e}"))
            // A log axis gets a minor line per unit step; they blur into a band.
            .light_line_style(TRANSPARENT)
            .draw()
            .map_err(draw_err)?;
        draw_series(&mut chart, panel, labels, &finite)?;
    } else {
        let pad = 0.05 * (y_range.1 - y_range.0);
        let y = (y_range.0 - pad)..(y_range.1 + pad);
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

/// Mean and population standard deviation of `v`.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}
