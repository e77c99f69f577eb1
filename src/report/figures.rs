//! The paper's figures from run records: first as data ([`Figure`], what the snapshot tests pin
//! down), then drawn by plotters as SVG and PNG.
//!
//! - Fig. 1: train (dashed) and eval (solid) loss per epoch, the baseline against W4/A4, each the
//!   mean over its seeds.
//! - Fig. 2: (a) the gain in final test accuracy over the baseline against the noise rate s, (b) the
//!   accuracy itself; one line per method.
//! - Fig. 3: the gain per parameter setting against s, one panel per method (quantization, pruning,
//!   dropout).
//!
//! Only completed and early-stopped runs enter the means.

use super::final_acc;
use crate::config::{Dropout, Pruning, Quantization, Regularizer};
use crate::runs::RunRecord;
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// A figure as data: panels side by side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figure {
    /// File stem (`fig1`, ...).
    pub name: String,
    pub title: String,
    pub panels: Vec<Panel>,
}

/// One chart.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub lines: Vec<Line>,
}

/// One series of a chart.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Line {
    pub name: String,
    /// Index into the palette: lines of one method share it.
    pub color: usize,
    pub dashed: bool,
    pub points: Vec<(f64, f64)>,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Labels in order of first appearance, the baseline first.
fn methods(records: &[&RunRecord]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in records {
        let l = r.experiment.method_label();
        if !out.contains(&l) {
            out.push(l);
        }
    }
    out.sort_by_key(|l| l != "baseline");
    out
}

/// Noise rates present, ascending (as per-mille integers, so that they group exactly).
fn rates(records: &[&RunRecord]) -> Vec<u64> {
    let mut r: Vec<u64> = records.iter().map(|r| per_mille(r.experiment.data.noise.rate)).collect();
    r.sort();
    r.dedup();
    r
}

fn per_mille(rate: f64) -> u64 {
    (rate * 1000.0).round() as u64
}

/// Mean final accuracy (%) of the runs of `label` at `rate`.
fn acc_at(records: &[&RunRecord], label: &str, rate: u64) -> Option<f64> {
    let v: Vec<f64> = records
        .iter()
        .filter(|r| r.experiment.method_label() == label && per_mille(r.experiment.data.noise.rate) == rate)
        .filter_map(|r| final_acc(r))
        .collect();
    (!v.is_empty()).then(|| mean(&v) * 100.0)
}

/// The runs that enter means.
fn usable(records: &[RunRecord]) -> Vec<&RunRecord> {
    records.iter().filter(|r| r.finished_ok()).collect()
}

/// Fig. 1: the loss curves of the baseline and of the quantized runs (mean over seeds, up to the
/// shortest run), at the noise rate nearest 40% where both exist.
pub fn fig1(records: &[RunRecord]) -> Option<Figure> {
    let ok = usable(records);
    let is_quant = |r: &&RunRecord| matches!(r.experiment.regularizer, Regularizer::Quantization(_));
    let is_base = |r: &&RunRecord| r.experiment.regularizer == Regularizer::None;
    let both: Vec<u64> = rates(&ok)
        .into_iter()
        .filter(|&s| ok.iter().any(|r| is_base(r) && per_mille(r.experiment.data.noise.rate) == s))
        .filter(|&s| ok.iter().any(|r| is_quant(r) && per_mille(r.experiment.data.noise.rate) == s))
        .collect();
    let rate = *both.iter().min_by_key(|&&s| s.abs_diff(400))?;
    let at: Vec<&RunRecord> = ok
        .into_iter()
        .filter(|r| per_mille(r.experiment.data.noise.rate) == rate)
        .filter(|r| is_base(r) || is_quant(r))
        .collect();
    let mut lines = Vec::new();
    for (color, label) in methods(&at).into_iter().enumerate() {
        let group: Vec<&&RunRecord> = at.iter().filter(|r| r.experiment.method_label() == label).collect();
        let epochs = group.iter().map(|r| r.metrics.len()).min().unwrap_or(0);
        let curve = |pick: fn(&crate::train::EpochMetrics) -> f64| -> Vec<(f64, f64)> {
            (0..epochs)
                .map(|e| ((e + 1) as f64, mean(&group.iter().map(|r| pick(&r.metrics[e])).collect::<Vec<_>>())))
                .collect()
        };
        lines.push(Line { name: format!("{label} train"), color, dashed: true, points: curve(|m| m.train_loss) });
        lines.push(Line { name: format!("{label} eval"), color, dashed: false, points: curve(|m| m.eval_loss) });
    }
    let dataset = at.first()?.experiment.data.dataset.name();
    Some(Figure {
        name: "fig1".into(),
        title: format!("Fig. 1: train (dashed) and eval (solid) loss, {dataset}, s = {}%", rate / 10),
        panels: vec![Panel { title: String::new(), x_label: "epoch".into(), y_label: "loss".into(), lines }],
    })
}

/// Fig. 2: gain over the baseline and accuracy against the noise rate, one line per method.
pub fn fig2(records: &[RunRecord]) -> Option<Figure> {
    let ok = usable(records);
    let rs = rates(&ok);
    let labels = methods(&ok);
    if !labels.iter().any(|l| l == "baseline") || rs.is_empty() {
        return None;
    }
    let (mut gains, mut accs) = (Vec::new(), Vec::new());
    for (color, label) in labels.iter().enumerate() {
        let acc: Vec<(f64, f64)> = rs.iter().filter_map(|&s| Some((s as f64 / 10.0, acc_at(&ok, label, s)?))).collect();
        let gain: Vec<(f64, f64)> = rs
            .iter()
            .filter_map(|&s| Some((s as f64 / 10.0, acc_at(&ok, label, s)? - acc_at(&ok, "baseline", s)?)))
            .collect();
        accs.push(Line { name: label.clone(), color, dashed: false, points: acc });
        if label != "baseline" {
            gains.push(Line { name: label.clone(), color, dashed: false, points: gain });
        }
    }
    let dataset = ok.first()?.experiment.data.dataset.name();
    Some(Figure {
        name: "fig2".into(),
        title: format!("Fig. 2 on {dataset}: final test accuracy against the noise rate s"),
        panels: vec![
            Panel {
                title: "(a) gain over the baseline".into(),
                x_label: "s (%)".into(),
                y_label: "accuracy gain (points)".into(),
                lines: gains,
            },
            Panel {
                title: "(b) accuracy".into(),
                x_label: "s (%)".into(),
                y_label: "accuracy (%)".into(),
                lines: accs,
            },
        ],
    })
}

/// Fig. 3: for quantization, pruning and dropout (those with two settings or more), the gain of each
/// setting over the baseline against s.
pub fn fig3(records: &[RunRecord]) -> Option<Figure> {
    let ok = usable(records);
    let rs = rates(&ok);
    let mut panels = Vec::new();
    for kind in ["quantization", "pruning", "dropout"] {
        // Each setting of the method with its parameter value, in increasing order.
        let mut settings: Vec<(f64, String)> = Vec::new();
        for r in ok.iter().filter(|r| r.experiment.regularizer.kind() == kind) {
            let label = r.experiment.method_label();
            if let Some(x) = parameter(&r.experiment.regularizer) {
                if !settings.iter().any(|(_, l)| *l == label) {
                    settings.push((x, label));
                }
            }
        }
        if settings.len() < 2 {
            continue;
        }
        settings.sort_by(|a, b| a.0.total_cmp(&b.0));
        // As in the paper: the gain against the parameter, one line per noise rate.
        let lines: Vec<Line> = rs
            .iter()
            .enumerate()
            .map(|(color, &s)| Line {
                name: format!("s = {}%", s as f64 / 10.0),
                color,
                dashed: false,
                points: settings
                    .iter()
                    .filter_map(|(x, label)| Some((*x, acc_at(&ok, label, s)? - acc_at(&ok, "baseline", s)?)))
                    .collect(),
            })
            .filter(|l| !l.points.is_empty())
            .collect();
        let x_label = match kind {
            "quantization" => "weight bits",
            "pruning" => "pruning ratio (%)",
            _ => "dropout p",
        };
        panels.push(Panel {
            title: format!("({}) {kind}", ["a", "b", "c"][panels.len()]),
            x_label: x_label.into(),
            y_label: "accuracy gain (points)".into(),
            lines,
        });
    }
    (!panels.is_empty()).then(|| Figure {
        name: "fig3".into(),
        title: "Fig. 3: gain over the baseline per parameter setting".into(),
        panels,
    })
}

/// The parameter Fig. 3 varies: weight bits, pruning ratio (%) or dropout probability.
fn parameter(r: &Regularizer) -> Option<f64> {
    match r {
        Regularizer::Quantization(Quantization { weight_bits, .. }) => Some(*weight_bits as f64),
        Regularizer::Pruning(Pruning { ratio, .. }) => Some(ratio * 100.0),
        Regularizer::Dropout(Dropout { p, .. }) => Some(*p),
        _ => None,
    }
}

pub(crate) fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The bundled font renders PNG text without any system font.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// Draws `fig` as `DIR/<name>.svg` and `DIR/<name>.png`; returns both paths.
pub fn draw(fig: &Figure, dir: &Path) -> Result<[PathBuf; 2]> {
    register_font();
    std::fs::create_dir_all(dir)?;
    let size = (520 * fig.panels.len().max(1) as u32, 420);
    let svg = dir.join(format!("{}.svg", fig.name));
    let png = dir.join(format!("{}.png", fig.name));
    // Drawn to temporary names, then renamed: a reader never sees half a figure.
    let (svg_tmp, png_tmp) = (svg.with_extension("svg.tmp"), png.with_extension("tmp.png"));
    draw_on(SVGBackend::new(&svg_tmp, size).into_drawing_area(), fig)?;
    draw_on(BitMapBackend::new(&png_tmp, size).into_drawing_area(), fig)?;
    std::fs::rename(&svg_tmp, &svg)?;
    std::fs::rename(&png_tmp, &png)?;
    Ok([svg, png])
}

fn draw_on<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, fig: &Figure) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing {}: {e}", fig.name);
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(&fig.title, ("sans-serif", 18)).map_err(err)?;
    let areas = root.split_evenly((1, fig.panels.len().max(1)));
    for (area, panel) in areas.iter().zip(&fig.panels) {
        let points = panel.lines.iter().flat_map(|l| l.points.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in points {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if !x0.is_finite() {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        let pad = ((y1 - y0) * 0.08).max(0.05);
        let (x1, y0, y1) = (if x1 > x0 { x1 } else { x0 + 1.0 }, y0 - pad, y1 + pad);
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 15))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        chart.configure_mesh().x_desc(&panel.x_label).y_desc(&panel.y_label).draw().map_err(err)?;
        for line in &panel.lines {
            let color = Palette99::pick(line.color).to_rgba();
            let style = ShapeStyle { color, filled: false, stroke_width: 2 };
            let points = line.points.clone();
            let drawn = if line.dashed {
                chart.draw_series(DashedLineSeries::new(points, 6, 4, style)).map_err(err)?
            } else {
                chart.draw_series(LineSeries::new(points, style)).map_err(err)?
            };
            drawn.label(&line.name).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
            if !line.dashed {
                chart.draw_series(line.points.iter().map(|&p| Circle::new(p, 3, style.filled()))).map_err(err)?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
