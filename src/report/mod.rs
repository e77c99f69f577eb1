//! Tables from run records: final and best metrics with the gain over the baseline, and accuracy as a
//! function of the noise rate (the paper's Fig. 2), as Markdown.

pub mod figures;
pub mod noise_matrix;

use crate::runs::{self, RunRecord};
use std::collections::BTreeMap;

/// Final test accuracy a record reports (kept weights), falling back to its last epoch.
pub fn final_acc(r: &RunRecord) -> Option<f64> {
    r.summary.as_ref().and_then(|s| s.final_eval_acc).or_else(|| r.metrics.last().map(|m| m.eval_acc))
}

/// Status name of a record read from disk. A record still marked `running` belongs to a process that
/// died (or is training elsewhere): it is shown as interrupted; re-run it with
/// `qat-lab run runs/<id>/experiment.toml`.
pub fn status_name(r: &RunRecord) -> &'static str {
    match &r.summary {
        Some(s) if s.status != crate::train::Status::Running => s.status.name(),
        _ => "interrupted",
    }
}

/// The runs that stay out of every mean (only completed and early-stopped runs enter them), counted
/// and named with their status; empty when there are none.
pub fn left_out_of_means(records: &[RunRecord]) -> String {
    let out: Vec<String> =
        records.iter().filter(|r| !r.finished_ok()).map(|r| format!("{} ({})", r.id(), status_name(r))).collect();
    if out.is_empty() {
        return String::new();
    }
    format!("{} run(s) left out of the means and gains, as not finished: {}", out.len(), out.join(", "))
}

/// Key that groups runs trained on the same data: dataset, noise kind and rate.
fn data_key(r: &RunRecord) -> (String, String, u64) {
    let d = &r.experiment.data;
    // Human noise is told apart by its label set (its rate field is unused).
    let kind = if d.noise.set.is_empty() {
        d.noise.kind.name().to_string()
    } else {
        format!("{}:{}", d.noise.kind.name(), d.noise.set)
    };
    (d.dataset.name().to_string(), kind, (d.noise.rate * 1000.0).round() as u64)
}

/// The baseline's final accuracy for the same data, averaged over its seeds.
pub fn baseline_acc(records: &[RunRecord], r: &RunRecord) -> Option<f64> {
    let accs: Vec<f64> = records
        .iter()
        .filter(|b| b.finished_ok() && b.experiment.is_baseline() && data_key(b) == data_key(r))
        .filter_map(final_acc)
        .collect();
    mean(&accs)
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn std_dev(v: &[f64]) -> f64 {
    let Some(m) = mean(v) else { return 0.0 };
    if v.len() < 2 {
        return 0.0;
    }
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

fn pct(v: Option<f64>) -> String {
    v.map(|x| format!("{:.2}", x * 100.0)).unwrap_or_else(|| "-".into())
}

/// One row per run: final and best accuracy, gain over the baseline on the same data, losses, memorisation.
pub fn comparison_table(records: &[RunRecord]) -> String {
    let mut out = String::from(
        "| run | method | data | noise | status | epochs | final acc % | best acc % (epoch) | gain vs baseline | eval loss | gap | memorised % | size KiB (smaller) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in records {
        let s = r.summary.as_ref();
        let last = r.metrics.last();
        let best = s.and_then(|s| s.best.as_ref());
        let gain = gain_vs_baseline(records, r).map(|g| format!("{g:+.2}")).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "| {} | {} | {} | {:.0}% {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.id(),
            r.experiment.method_label(),
            r.experiment.data.dataset.name(),
            r.experiment.data.noise.rate * 100.0,
            r.experiment.data.noise.kind.name(),
            status_name(r),
            r.metrics.len(),
            pct(final_acc(r)),
            best.map(|b| format!("{:.2} ({})", b.eval_acc * 100.0, b.epoch)).unwrap_or_else(|| "-".into()),
            gain,
            last.map(|m| format!("{:.4}", m.eval_loss)).unwrap_or_else(|| "-".into()),
            last.map(|m| format!("{:+.3}", m.gap)).unwrap_or_else(|| "-".into()),
            pct(last.map(|m| m.memorized)),
            size_cell(r, false),
        ));
    }
    out
}

/// The run's deployed size in KiB and how many times smaller than the float network it is
/// ("145.6 (7.2x)"; `narrow`: at most 10 characters, "146 7.2x"), or "-" for records without a size.
pub fn size_cell(r: &RunRecord, narrow: bool) -> String {
    match r.summary.as_ref().and_then(|s| s.size) {
        Some(size) if narrow => format!("{:.0} {:.1}x", runs::kib(size.deployed_bytes()), size.shrink()),
        Some(size) => format!("{:.1} ({:.1}x)", runs::kib(size.deployed_bytes()), size.shrink()),
        None => "-".into(),
    }
}

/// One row per method and architecture: what its network weighs (float, after pruning, packed integer
/// model) and how many times smaller than the float network it ships; empty when no record has a size.
pub fn size_table(records: &[RunRecord]) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    for r in records {
        let Some(size) = r.summary.as_ref().and_then(|s| s.size) else { continue };
        let arch = format!("{:?}", r.experiment.model.arch).to_lowercase();
        let method = format!("{} | {arch} x{}", r.experiment.method_label(), r.experiment.model.width);
        if rows.iter().any(|(m, _)| *m == method) {
            continue;
        }
        let kib = |b: Option<usize>| b.map(|b| format!("{:.1}", runs::kib(b))).unwrap_or_else(|| "-".into());
        rows.push((
            method.clone(),
            format!(
                "| {method} | {} | {} | {} | {:.1}x |\n",
                kib(Some(size.float_bytes)),
                kib(size.pruned_float_bytes),
                kib(size.int_bytes),
                size.shrink()
            ),
        ));
    }
    if rows.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "| method | model | float KiB | after pruning KiB | integer KiB | smaller |\n|---|---|---|---|---|---|\n",
    );
    rows.iter().for_each(|(_, row)| out.push_str(row));
    out
}

/// Accuracies (fractions) as a table cell in percent: `mean ± std` over several, the value of one,
/// `-` for none.
pub fn mean_std_cell(v: &[f64]) -> String {
    match v {
        [] => "-".into(),
        [one] => format!("{:.2}", one * 100.0),
        _ => format!("{:.2} ± {:.2}", mean(v).unwrap_or(0.0) * 100.0, std_dev(v) * 100.0),
    }
}

/// Accuracy (mean ± std over seeds) per method and noise rate, as in the paper's Fig. 2.
pub fn noise_sweep_table(records: &[RunRecord]) -> String {
    let mut rates: Vec<u64> = records.iter().map(|r| data_key(r).2).collect();
    rates.sort();
    rates.dedup();
    let mut cells: BTreeMap<(String, u64), Vec<f64>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.finished_ok()) {
        if let Some(a) = final_acc(r) {
            cells.entry((r.experiment.method_label(), data_key(r).2)).or_default().push(a);
        }
    }
    let methods: Vec<String> = {
        let mut m: Vec<String> = cells.keys().map(|k| k.0.clone()).collect();
        m.dedup();
        m
    };
    let mut out = String::from("| method |");
    for r in &rates {
        out.push_str(&format!(" s={}% |", r / 10));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(rates.len()));
    out.push('\n');
    for m in methods {
        out.push_str(&format!("| {m} |"));
        for r in &rates {
            let cell = cells.get(&(m.clone(), *r)).map_or_else(|| "-".to_string(), |v| mean_std_cell(v));
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out
}

/// Per-label F1 (×100) of the weights a multi-label record keeps: the restored epoch's under early
/// stopping, else the last epoch's.
pub fn label_f1(r: &RunRecord) -> Option<Vec<f64>> {
    let kept = r.summary.as_ref().and_then(|s| s.restored_epoch).and_then(|e| r.metrics.iter().find(|m| m.epoch == e));
    kept.or(r.metrics.last()).filter(|m| !m.f1.is_empty()).map(|m| m.f1.iter().map(|f| f * 100.0).collect())
}

/// The paper's Table 1 for multi-label runs: one row per method, the F1 of each label and the
/// average, as the mean over the method's runs (seeds); the average also shows its spread (±1 std).
pub fn table1(records: &[RunRecord], label_names: &[String]) -> String {
    table1_markdown(&table1_rows(records), label_names)
}

/// Table 1 rows as Markdown.
pub fn table1_markdown(rows: &[Table1Row], label_names: &[String]) -> String {
    let Some(first) = rows.first() else { return String::new() };
    let width = first.f1.len();
    let mut out = format!(
        "| F1 score (%) | {} | Avg. | runs |\n|---|",
        label_names.iter().take(width).cloned().collect::<Vec<_>>().join(" | ")
    );
    out.push_str(&"---|".repeat(width + 2));
    out.push('\n');
    for row in rows {
        let cells: Vec<String> = row.f1.iter().map(|v| format!("{v:.1}")).collect();
        out.push_str(&format!("| {} | {} | {} | {} |\n", row.method, cells.join(" | "), row.average_text(), row.runs));
    }
    out
}

/// Table 1 rows as CSV: method, one column per label, the average, its spread and the run count.
pub fn table1_csv(rows: &[Table1Row], label_names: &[String]) -> String {
    let width = rows.first().map_or(0, |r| r.f1.len());
    let mut out =
        format!("method,{},avg,avg_std,runs\n", label_names.iter().take(width).cloned().collect::<Vec<_>>().join(","));
    for row in rows {
        let cells: Vec<String> = row.f1.iter().map(|v| format!("{v:.2}")).collect();
        let spread = row.spread.map(|s| format!("{s:.2}")).unwrap_or_default();
        out.push_str(&format!("\"{}\",{},{:.2},{spread},{}\n", row.method, cells.join(","), row.average, row.runs));
    }
    out
}

/// Table 1 rows as a LaTeX `tabular` (booktabs), the best average in bold.
pub fn table1_latex(rows: &[Table1Row], label_names: &[String]) -> String {
    let width = rows.first().map_or(0, |r| r.f1.len());
    let best = rows.iter().map(|r| r.average).fold(f64::NEG_INFINITY, f64::max);
    let escape =
        |s: &str| s.replace('\\', "\\textbackslash{}").replace('&', "\\&").replace('%', "\\%").replace('_', "\\_");
    let mut out = format!("\\begin{{tabular}}{{l{}c}}\n\\toprule\n", "c".repeat(width));
    let names: Vec<String> = label_names.iter().take(width).map(|n| escape(n)).collect();
    out.push_str(&format!("F1 score (\\%) & {} & Avg. \\\\\n\\midrule\n", names.join(" & ")));
    for row in rows {
        let cells: Vec<String> = row.f1.iter().map(|v| format!("{v:.1}")).collect();
        let avg =
            if row.average == best { format!("\\textbf{{{:.1}}}", row.average) } else { format!("{:.1}", row.average) };
        out.push_str(&format!("{} & {} & {avg} \\\\\n", escape(&row.method), cells.join(" & ")));
    }
    out.push_str("\\bottomrule\n\\end{tabular}\n");
    out
}

/// One method's line of Table 1: per-label F1 (×100) averaged over its runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Table1Row {
    pub method: String,
    pub f1: Vec<f64>,
    /// Mean over runs of each run's average F1, and its spread (±1 std) when there are several runs.
    pub average: f64,
    pub spread: Option<f64>,
    pub runs: usize,
}

impl Table1Row {
    /// `62.7 ± 4.1`, or `62.7` for a single run.
    pub fn average_text(&self) -> String {
        match self.spread {
            Some(s) => format!("{:.1} ± {s:.1}", self.average),
            None => format!("{:.1}", self.average),
        }
    }
}

/// The rows of [`table1`], methods in order of first appearance.
pub fn table1_rows(records: &[RunRecord]) -> Vec<Table1Row> {
    table1_rows_by(records, label_f1)
}

/// Table 1's rows with each run's per-label F1 (×100) read by `pick`.
pub fn table1_rows_by(records: &[RunRecord], pick: impl Fn(&RunRecord) -> Option<Vec<f64>>) -> Vec<Table1Row> {
    let mut groups: Vec<(String, Vec<Vec<f64>>)> = Vec::new();
    for r in records.iter().filter(|r| r.finished_ok()) {
        let Some(f1) = pick(r) else { continue };
        let method = r.experiment.method_label();
        match groups.iter_mut().find(|g| g.0 == method) {
            Some(g) => g.1.push(f1),
            None => groups.push((method, vec![f1])),
        }
    }
    groups
        .into_iter()
        .map(|(method, runs)| {
            let width = runs[0].len();
            let f1 = (0..width).map(|j| runs.iter().map(|r| r[j]).sum::<f64>() / runs.len() as f64).collect();
            let avgs: Vec<f64> = runs.iter().map(|r| r.iter().sum::<f64>() / width.max(1) as f64).collect();
            Table1Row {
                method,
                f1,
                average: mean(&avgs).unwrap_or(0.0),
                spread: (runs.len() > 1).then(|| std_dev(&avgs)),
                runs: runs.len(),
            }
        })
        .collect()
}

/// Final accuracy (or average F1) minus the baseline's on the same data, in points; `None` for the
/// baseline itself or when there is no baseline.
pub fn gain_vs_baseline(records: &[RunRecord], r: &RunRecord) -> Option<f64> {
    if r.experiment.is_baseline() {
        return None;
    }
    Some((final_acc(r)? - baseline_acc(records, r)?) * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Experiment, Regularizer};
    use crate::train::{EpochMetrics, Status, Summary};

    fn record(reg: Regularizer, rate: f64, acc: f64) -> RunRecord {
        let mut exp = Experiment { regularizer: reg, ..Default::default() };
        exp.data.noise.rate = rate;
        let m = EpochMetrics { epoch: 1, eval_acc: acc, ..Default::default() };
        let summary = Summary {
            status: Status::Completed,
            epochs_run: 1,
            last: Some(m.clone()),
            final_eval_acc: Some(acc),
            final_eval_loss: Some(1.0),
            measured_noise_rate: rate,
            ..Summary::started("n", &exp.method_label(), rate)
        };
        RunRecord { dir: "runs/x".into(), experiment: exp, metrics: vec![m], summary: Some(summary) }
    }

    #[test]
    fn the_size_table_has_one_row_per_method_with_the_shrink() {
        use crate::runs::ModelSize;
        let sized = |reg, size| {
            let mut r = record(reg, 0.4, 0.5);
            r.summary.as_mut().unwrap().size = Some(size);
            r
        };
        let float = ModelSize { float_bytes: 1_078_888, pruned_float_bytes: None, int_bytes: None };
        let int = ModelSize { int_bytes: Some(151_962), ..float };
        let pruned = ModelSize { pruned_float_bytes: Some(511_000), ..float };
        let records = [
            sized(Regularizer::None, float),
            sized(Regularizer::None, float),
            sized(Regularizer::default_for("quantization").unwrap(), int),
            sized(Regularizer::default_for("pruning").unwrap(), pruned),
            record(Regularizer::None, 0.2, 0.5),
        ];
        let t = size_table(&records);
        assert_eq!(t.lines().count(), 2 + 3, "{t}");
        assert!(t.contains("| baseline | resnet20 x1 | 1053.6 | - | - | 1.0x |"), "{t}");
        assert!(t.contains("| W4/A4 | resnet20 x1 | 1053.6 | - | 148.4 | 7.1x |"), "{t}");
        assert!(t.contains("| 1053.6 | 499.0 | - | 2.1x |"), "{t}");
        assert_eq!(size_table(&records[4..]), "");
    }

    #[test]
    fn table1_averages_seeds_per_method() {
        let mut a = record(Regularizer::None, 0.2, 0.5);
        a.metrics[0].f1 = vec![0.5, 0.7];
        let mut b = a.clone();
        b.metrics[0].f1 = vec![0.7, 0.9];
        let mut q = record(Regularizer::default_for("quantization").unwrap(), 0.2, 0.5);
        q.metrics[0].f1 = vec![0.8, 0.8];
        let t = table1(&[a, b, q.clone()], &["AU1".into(), "AU2".into()]);
        assert!(t.contains("| baseline | 60.0 | 80.0 | 70.0 ± 14.1 | 2 |"), "{t}");
        assert!(t.contains("| W4/A4 | 80.0 | 80.0 | 80.0 | 1 |"), "{t}");
        // Early stopping keeps an earlier epoch's weights: its F1 is reported, not the last epoch's.
        let mut es = q;
        let mut later = es.metrics[0].clone();
        later.epoch = 2;
        later.f1 = vec![0.1, 0.1];
        es.metrics.push(later);
        es.summary.as_mut().unwrap().restored_epoch = Some(1);
        assert_eq!(label_f1(&es).unwrap(), vec![80.0, 80.0]);
    }

    #[test]
    fn gain_is_measured_against_the_baseline_on_the_same_noise() {
        let q = Regularizer::default_for("quantization").unwrap();
        let recs = vec![
            record(Regularizer::None, 0.4, 0.60),
            record(q.clone(), 0.4, 0.70),
            record(Regularizer::None, 0.2, 0.80),
            record(q, 0.2, 0.78),
        ];
        let t = comparison_table(&recs);
        assert!(t.contains("+10.00"), "{t}");
        assert!(t.contains("-2.00"), "{t}");
        let s = noise_sweep_table(&recs);
        assert!(s.contains("s=20%") && s.contains("s=40%"), "{s}");
        assert!(s.contains("| W4/A4 | 78.00 | 70.00 |"), "{s}");
    }

    #[test]
    fn only_finished_runs_enter_means_and_the_others_are_named() {
        let q = Regularizer::default_for("quantization").unwrap();
        let mut interrupted = record(Regularizer::None, 0.4, 0.95);
        interrupted.summary.as_mut().unwrap().status = Status::Running;
        interrupted.dir = "runs/cut".into();
        let mut diverged = record(Regularizer::None, 0.4, 0.10);
        diverged.summary.as_mut().unwrap().status = Status::Diverged;
        diverged.dir = "runs/nan".into();
        let recs = vec![record(Regularizer::None, 0.4, 0.60), interrupted, diverged, record(q, 0.4, 0.70)];
        let s = noise_sweep_table(&recs);
        assert!(s.contains("| baseline | 60.00 |"), "{s}");
        assert_eq!(gain_vs_baseline(&recs, &recs[3]).map(|g| (g * 100.0).round()), Some(1000.0));
        let note = left_out_of_means(&recs);
        assert!(
            note.starts_with("2 run(s)") && note.contains("cut (interrupted)") && note.contains("nan (diverged)"),
            "{note}"
        );
        assert_eq!(left_out_of_means(&recs[..1]), "");
    }
}
