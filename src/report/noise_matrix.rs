//! The noise transition matrix of a sweep's training labels as a heatmap: one per distinct noise
//! (dataset, kind, rate or human label set), read from the records' summaries.

use crate::runs::RunRecord;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// A heatmap as data: what the snapshot tests pin down and what [`draw`] draws.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NoiseMatrix {
    /// File stem (`noise-cifar10-human-worst`, ...).
    pub name: String,
    pub title: String,
    /// Class names, in row and column order.
    pub classes: Vec<String>,
    /// Row i: the share of clean class i labelled j.
    pub cells: Vec<Vec<f64>>,
}

/// One matrix per distinct noise among the records that stored one (single-label runs of format 1).
pub fn noise_matrices(records: &[RunRecord]) -> Vec<NoiseMatrix> {
    let mut out: Vec<NoiseMatrix> = Vec::new();
    for r in records {
        let Some(s) = r.summary.as_ref().filter(|s| !s.transition.is_empty()) else { continue };
        let d = &r.experiment.data;
        let what = if d.noise.set.is_empty() {
            format!("{}-{:.0}pct", d.noise.kind.name(), d.noise.rate * 100.0)
        } else {
            format!("{}-{}", d.noise.kind.name(), d.noise.set)
        };
        let name = format!("noise-{}-{what}", d.dataset.name());
        if out.iter().any(|m| m.name == name) {
            continue;
        }
        let classes = if s.classes.len() == s.transition.len() {
            s.classes.clone()
        } else {
            (0..s.transition.len()).map(|i| i.to_string()).collect()
        };
        let rate = 1.0 - (0..s.transition.len()).map(|i| s.transition[i][i]).sum::<f64>() / classes.len() as f64;
        out.push(NoiseMatrix {
            name,
            title: format!(
                "{} training labels, {} noise: true class (row) -> label given ({:.1}% off the diagonal, class mean)",
                d.dataset.name(),
                what.replace('-', " "),
                rate * 100.0
            ),
            classes,
            cells: s.transition.clone(),
        });
    }
    out
}

/// Draws `m` as `DIR/<name>.svg` and `DIR/<name>.png`; returns both paths.
pub fn draw(m: &NoiseMatrix, dir: &Path) -> Result<[PathBuf; 2]> {
    super::figures::register_font();
    std::fs::create_dir_all(dir)?;
    let svg = dir.join(format!("{}.svg", m.name));
    let png = dir.join(format!("{}.png", m.name));
    let (svg_tmp, png_tmp) = (svg.with_extension("svg.tmp"), png.with_extension("tmp.png"));
    let size = (760, 680);
    draw_on(SVGBackend::new(&svg_tmp, size).into_drawing_area(), m)?;
    draw_on(BitMapBackend::new(&png_tmp, size).into_drawing_area(), m)?;
    std::fs::rename(&svg_tmp, &svg)?;
    std::fs::rename(&png_tmp, &png)?;
    Ok([svg, png])
}

fn draw_on<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, m: &NoiseMatrix) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing {}: {e}", m.name);
    let n = m.cells.len();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(&m.title, ("sans-serif", 13)).map_err(err)?;
    let names = m.classes.clone();
    let mut chart = ChartBuilder::on(&root)
        .margin(16)
        .x_label_area_size(90)
        .y_label_area_size(90)
        .build_cartesian_2d((0..n - 1).into_segmented(), (0..n - 1).into_segmented())
        .map_err(err)?;
    // Ticks name the classes at the centres of their cells; the rows run top-down as a matrix reads.
    let x_names = names.clone();
    let x_label = move |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(j) => x_names.get(*j).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    let y_label = move |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) if *i < n => names.get(n - 1 - *i).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(n.min(20))
        .y_labels(n.min(20))
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .x_desc("label given")
        .y_desc("true class")
        .draw()
        .map_err(err)?;
    let at = |j: usize, i: usize| (SegmentValue::Exact(j), SegmentValue::Exact(i));
    chart
        .draw_series(m.cells.iter().enumerate().flat_map(|(i, row)| {
            row.iter().enumerate().map(move |(j, &v)| {
                // White at 0, dark red at 1; the square root lets small off-diagonal shares show.
                let t = v.clamp(0.0, 1.0).sqrt();
                let shade = |full: f64| (255.0 - t * (255.0 - full)) as u8;
                let color = RGBColor(shade(160.0), shade(20.0), shade(20.0));
                Rectangle::new([at(j, n - 1 - i), at(j + 1, n - i)], color.filled())
            })
        }))
        .map_err(err)?;
    if n <= 12 {
        let cells = m.cells.iter().enumerate().flat_map(|(i, row)| {
            row.iter().enumerate().map(move |(j, &v)| {
                let color = if v > 0.4 { WHITE } else { BLACK };
                Text::new(format!(" {:.0}", v * 100.0), at(j, n - i), ("sans-serif", 12).into_font().color(&color))
            })
        });
        chart.draw_series(cells).map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: &str, rate: f64, set: &str, transition: Vec<Vec<f64>>) -> RunRecord {
        let mut e = crate::config::Experiment::default();
        e.data.dataset = crate::config::DatasetKind::Cifar10;
        e.data.noise.kind = match kind {
            "human" => crate::config::NoiseKind::Human,
            _ => crate::config::NoiseKind::Uniform,
        };
        e.data.noise.rate = rate;
        e.data.noise.set = set.into();
        let summary = crate::runs::Summary {
            transition,
            classes: vec!["a".into(), "b".into()],
            ..crate::runs::Summary::started("n", "baseline", rate)
        };
        RunRecord { dir: PathBuf::new(), experiment: e, metrics: vec![], summary: Some(summary) }
    }

    #[test]
    fn one_matrix_per_distinct_noise_is_drawn_from_the_records() {
        let uniform = vec![vec![0.8, 0.2], vec![0.2, 0.8]];
        let worst = vec![vec![0.5, 0.5], vec![0.1, 0.9]];
        let records = vec![
            record("uniform", 0.4, "", uniform.clone()),
            record("uniform", 0.4, "", uniform.clone()),
            record("human", 0.0, "worst", worst.clone()),
            record("uniform", 0.2, "", vec![]),
        ];
        let ms = noise_matrices(&records);
        let names: Vec<&str> = ms.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["noise-cifar10-uniform-40pct", "noise-cifar10-human-worst"]);
        assert_eq!(ms[1].cells, worst);
        assert!(ms[1].title.contains("30.0% off the diagonal"), "{}", ms[1].title);
        let dir = tempfile::tempdir().unwrap();
        let [svg, png] = draw(&ms[1], dir.path()).unwrap();
        let svg = std::fs::read_to_string(svg).unwrap();
        let text = svg.replace('\n', "");
        assert!(text.contains(">true class<") && text.contains("> 50<"), "the cells carry their percentages");
        assert!(std::fs::metadata(png).unwrap().len() > 1000);
    }
}
