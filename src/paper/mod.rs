//! `qat-lab paper`: the paper's four claims (Fig. 1, Fig. 2, Fig. 3, Table 1), and Fig. 2 on human
//! label noise (F2H, from `standard` on), trained at a budget
//! and judged from the records, with the figures and Table 1 written beside a `report.md`.
//!
//! The flow is one way: [`protocol`] says what to train, [`crate::runner`] trains what the out folder
//! lacks, [`claims`] reads the records into verdicts ([`verdict`]'s rule), and this module writes the
//! files.

pub mod claims;
pub mod protocol;
pub mod verdict;

use crate::config::{DeviceKind, Experiment};
use crate::report::{self, figures};
use crate::runner::{self, RunnerOptions};
use crate::runs::{self, RunRecord, Unreadable};
use anyhow::{bail, Result};
use claims::Claim;
use protocol::{Budget, Point, Protocol, F1_RATE, FACES_NOISE};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `qat-lab paper` was asked.
#[derive(Debug, Clone)]
pub struct PaperOptions {
    pub budget: Budget,
    /// Receives `runs/`, `report.md`, the figures and Table 1.
    pub out: PathBuf,
    /// A CIFAR-10 folder or archive.
    pub data: Option<String>,
    /// CIFAR-10N's label file (F2H, at `standard` and `full`).
    pub human_labels: String,
    pub device: DeviceKind,
    pub runner: RunnerOptions,
    /// Also train the methods made for noisy labels ([`Protocol::extended_plan`]) and report them in a
    /// section of their own.
    pub extended: bool,
}

/// What a `paper` call did.
#[derive(Debug)]
pub struct PaperOutcome {
    pub claims: Vec<Claim>,
    pub report: PathBuf,
    pub trained: usize,
    pub reused: usize,
    /// A stop signal ended training early; the report covers what finished.
    pub stopped: bool,
    pub unreadable: Vec<Unreadable>,
}

/// The paper's Table 1 (BP4D, F1 ×100 per AU 1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24, then the
/// average), set beside ours in the report.
pub const PAPER_TABLE1: [(&str, [f64; 13]); 6] = [
    ("Baseline", [49.6, 45.8, 55.1, 74.8, 75.5, 83.7, 87.1, 62.7, 47.0, 56.4, 44.8, 41.2, 60.3]),
    ("Weight Decay", [52.6, 46.8, 54.3, 75.3, 76.4, 83.1, 87.2, 58.6, 44.6, 58.5, 44.1, 43.1, 60.4]),
    ("Dropout", [50.2, 46.1, 57.5, 75.3, 75.8, 83.1, 87.1, 60.5, 47.9, 58.4, 46.9, 47.9, 61.4]),
    ("Label Smoothing", [48.8, 45.7, 56.0, 75.3, 74.8, 82.7, 87.3, 60.1, 44.0, 57.1, 43.8, 41.5, 59.8]),
    ("Pruning", [51.0, 45.0, 56.2, 76.1, 76.4, 82.5, 86.8, 61.3, 47.1, 58.0, 44.2, 42.8, 60.6]),
    ("Quantization", [51.7, 48.2, 57.6, 75.4, 76.9, 83.9, 87.8, 59.7, 48.4, 59.0, 47.8, 53.4, 62.5]),
];

/// Trains what the budget needs and writes the report.
/// The protocol and every run it plans (with repeats, for the claims that share runs).
fn protocol_and_plan(opts: &PaperOptions) -> Result<(Protocol, Vec<Experiment>)> {
    if opts.data.is_none() && matches!(opts.budget, Budget::Standard | Budget::Full) {
        bail!(
            "`--budget {}` trains on CIFAR-10: pass --data PATH (a folder or the archive; `qat-lab data fetch cifar10` downloads it)",
            opts.budget.name()
        );
    }
    let mut protocol = Protocol::new(opts.budget, opts.data.as_deref(), opts.device, &opts.human_labels);
    // Without the label file F2H is reported as not run, and the other claims still train.
    if protocol.human.is_ok() && !Path::new(&opts.human_labels).is_file() {
        protocol.human = Err(format!(
            "CIFAR-10N's label file `{}` is absent; `qat-lab data fetch cifar10n` downloads it (or pass --human-labels PATH)",
            opts.human_labels
        ));
    }
    let mut plan = protocol.plan();
    if opts.extended {
        plan.extend(protocol.extended_plan());
    }
    Ok((protocol, plan))
}

/// Every distinct run of the budget, in plan order: the tasks of `paper --slurm`.
pub fn distinct_plan(opts: &PaperOptions) -> Result<Vec<Experiment>> {
    let (_, plan) = protocol_and_plan(opts)?;
    let mut distinct: Vec<Experiment> = Vec::new();
    for e in plan {
        if !distinct.contains(&e) {
            distinct.push(e);
        }
    }
    Ok(distinct)
}

pub fn run(opts: &PaperOptions) -> Result<PaperOutcome> {
    let (protocol, plan) = protocol_and_plan(opts)?;
    let distinct = distinct_plan(opts)?.len();
    eprintln!("paper --budget {}: {distinct} distinct runs into {}", opts.budget.name(), opts.out.display());
    let started = Instant::now();
    let outcome = runner::run(&plan, &opts.out.join("runs"), &opts.runner)?;
    let records = outcome.finished();
    let claims = claims::evaluate(&protocol, &records);
    let meta = Meta {
        wall_secs: started.elapsed().as_secs_f64(),
        trained: outcome.trained,
        reused: outcome.reused,
        distinct,
        stopped: outcome.stopped,
        unreadable: &outcome.unreadable,
    };
    let report = write(&protocol, &records, &claims, &meta, opts.extended, &opts.out)?;
    Ok(PaperOutcome {
        claims,
        report,
        trained: outcome.trained,
        reused: outcome.reused,
        stopped: outcome.stopped,
        unreadable: outcome.unreadable,
    })
}

/// How the records came to be, for the report's header.
pub struct Meta<'a> {
    pub wall_secs: f64,
    pub trained: usize,
    pub reused: usize,
    pub distinct: usize,
    pub stopped: bool,
    pub unreadable: &'a [Unreadable],
}

/// The records of the experiments of one grid, in the records' order.
fn of_grid(records: &[RunRecord], grid: &[Experiment]) -> Vec<RunRecord> {
    records.iter().filter(|r| r.finished_ok() && grid.contains(&r.experiment)).cloned().collect()
}

fn f1_grid(p: &Protocol) -> Vec<Experiment> {
    p.f1_points()
        .into_iter()
        .flat_map(|(b, q)| [Protocol::experiment(&p.fig1, &b), Protocol::experiment(&p.fig1, &q)])
        .collect()
}

fn f2_grid(p: &Protocol) -> Vec<Experiment> {
    let mut g = Vec::new();
    for reg in p.fig2_methods() {
        for &rate in &p.rates {
            for &seed in &p.seeds {
                g.push(Protocol::experiment(&p.classes, &Point { regularizer: reg.clone(), rate, seed }));
            }
        }
    }
    g
}

fn f3_grid(p: &Protocol) -> Vec<Experiment> {
    let mut g = Vec::new();
    for (_, settings) in p.fig3_panels() {
        for reg in settings.iter().chain([&crate::config::Regularizer::None]) {
            for &rate in &p.f3_rates {
                for &seed in &p.seeds {
                    g.push(Protocol::experiment(&p.classes, &Point { regularizer: reg.clone(), rate, seed }));
                }
            }
        }
    }
    g
}

/// `--extended`'s section: the methods made for noisy labels beside the paper's baseline and W4/A4,
/// on F2's grid (table and figure) and on T1's faces (Table 1's layout). No verdict: the paper makes
/// no claim about them.
fn extended_section(p: &Protocol, records: &[RunRecord], dir: &Path) -> Result<String> {
    let mut md = String::from(
        "\n## Beyond the paper: methods made for noisy labels (`--extended`)\n\nNot the paper's comparison: it compared \
         quantization only with general-purpose regularizers. Here GCE, SCE and co-teaching (and co-teaching with W4/A4) \
         train on exactly the data, model and schedule of F2 and T1, with their own papers' defaults; the baseline and \
         W4/A4 rows are the same runs as above.\n",
    );
    let w4a4 = |e: &Experiment| {
        matches!(
            e.regularizer,
            crate::config::Regularizer::Quantization(crate::config::Quantization { weight_bits: 4, act_bits: 4, .. })
        )
    };
    let paper_rows = |e: &Experiment| e.robust == crate::config::Robust::None && (e.is_baseline() || w4a4(e));
    let f2: Vec<RunRecord> = of_grid(records, &f2_grid(p))
        .into_iter()
        .filter(|r| paper_rows(&r.experiment))
        .chain(of_grid(records, &p.extended_plan()).into_iter().filter(|r| !r.experiment.data.dataset.is_multi_label()))
        .collect();
    md.push_str(&format!("\nFinal test accuracy (%), mean ± std over seeds:\n\n{}", report::noise_sweep_table(&f2)));
    if let Some(mut fig) = figures::fig2(&f2) {
        fig.name = "fig2-extended".into();
        fig.title = format!("{} — with methods made for noisy labels", fig.title);
        figures::draw(&fig, dir)?;
        md.push_str(&format!("\n![{}]({}.svg)\n", fig.title, fig.name));
    }
    let faces: Vec<RunRecord> = claims::table1_records(p, records)
        .into_iter()
        .filter(|r| paper_rows(&r.experiment))
        .chain(of_grid(records, &p.extended_plan()).into_iter().filter(|r| r.experiment.data.dataset.is_multi_label()))
        .collect();
    let names = faces.first().map(|r| r.label_names()).unwrap_or_default();
    let rows = report::table1_rows_by(&faces, claims::kept_f1);
    md.push_str(&format!(
        "\nTable 1's layout on the faces (test F1 at the best-validation epoch, mean of the seeds):\n\n{}",
        report::table1_markdown(&rows, &names)
    ));
    Ok(md)
}

/// The CPU's model name, as /proc/cpuinfo gives it.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn family_line(name: &str, e: &Experiment) -> String {
    let d = &e.data;
    format!(
        "| {name} | {} | {} | {} | {} ×{} | {} | {} | {} | {} | {} {:.0}% |",
        d.dataset.name(),
        if d.train_subset == 0 { "all".into() } else { d.train_subset.to_string() },
        if d.test_subset == 0 { "all".into() } else { d.test_subset.to_string() },
        e.model.arch.name(),
        e.model.width,
        e.train.epochs,
        e.train.batch_size,
        e.train.lr,
        if d.augment { "yes" } else { "no" },
        d.noise.kind.name(),
        d.noise.rate * 100.0,
    )
}

/// Writes `report.md`, `fig1/2/3.{svg,png}` and `table1.{md,csv,tex}` into `dir` (with `extended`, also
/// the noisy-label methods' section and `fig2-extended`); returns the report's path.
pub fn write(
    p: &Protocol,
    records: &[RunRecord],
    claims: &[Claim],
    meta: &Meta,
    extended: bool,
    dir: &Path,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut md = format!(
        "# The paper, reproduced by qat-lab — budget `{}`\n\n\"Fighting over-fitting with quantization for learning deep neural networks on noisy labels\": \
         its four claims (and F2H, Fig. 2 on human noise), trained by `qat-lab paper --budget {}` and judged from the run records in `runs/`.\n\n",
        p.budget.name(),
        p.budget.name()
    );
    md.push_str(&format!(
        "- Machine: {}, {} threads; qat-lab {}.\n- Runs: {} distinct, {} trained by this call, {} reused from earlier calls; {:.1} min of training this call.\n",
        cpu_model(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        env!("CARGO_PKG_VERSION"),
        meta.distinct,
        meta.trained,
        meta.reused,
        meta.wall_secs / 60.0
    ));
    if meta.stopped {
        md.push_str("- **Stopped before the end**: the verdicts below read only the runs that finished; run the same command again to go on.\n");
    }
    if !meta.unreadable.is_empty() {
        md.push_str(&format!(
            "- {} record(s) under `runs/` could not be read and are left out:\n",
            meta.unreadable.len()
        ));
        for u in meta.unreadable {
            md.push_str(&format!("  - `{}`: {}\n", u.dir.display(), u.reason));
        }
    }
    md.push_str("\n## Verdicts\n\n| claim | verdict | numbers |\n|---|---|---|\n");
    for c in claims {
        md.push_str(&format!("| {} {} | **{}** | {} |\n", c.id, c.title, c.verdict.name(), c.numbers));
    }
    md.push_str(
        "\nThe rule: with the per-seed (paired) differences d₁…dₙ, their mean Δ and standard error SE = sd/√n, a claim is \
         **held** when Δ > 2·SE, **not held** when Δ < −2·SE or its precondition fails, and **inconclusive** when the \
         difference lies inside the seed spread (|Δ| ≤ 2·SE) or fewer than two seeds finished. The methods keep the \
         paper's hyper-parameters at every budget; nothing is tuned per claim.\n",
    );
    let figs = [
        ("F1", figures::fig1(&of_grid(records, &f1_grid(p)))),
        ("F2", figures::fig2(&of_grid(records, &f2_grid(p)))),
        ("F3", figures::fig3(&of_grid(records, &f3_grid(p)))),
    ];
    for c in claims {
        md.push_str(&format!(
            "\n## {} — {}: **{}**\n\n- The paper: {}\n- Criterion: {}.\n- Ours: {}\n",
            c.id,
            c.title,
            c.verdict.name(),
            c.paper,
            c.criterion,
            c.numbers
        ));
        for d in &c.details {
            md.push_str(&format!("- {d}\n"));
        }
        if let Some((_, Some(fig))) = figs.iter().find(|(id, _)| *id == c.id) {
            figures::draw(fig, dir)?;
            md.push_str(&format!("\n![{}]({}.svg)\n", fig.title, fig.name));
        }
        if c.id == "F2" {
            let f2 = of_grid(records, &f2_grid(p));
            md.push_str(&format!(
                "\nFinal test accuracy (%), mean ± std over seeds:\n\n{}",
                report::noise_sweep_table(&f2)
            ));
        }
        if c.id == "T1" {
            md.push_str(&format!("\n{}", write_table1(p, records, dir)?));
        }
        if c.id == "F2H" {
            md.push_str(&human_table(p, records));
        }
    }
    md.push_str("\n## What was trained\n\nEvery method of a family trains on the same data, model and schedule; only the regularizer, the noise rate and the seed differ.\n\n");
    md.push_str("| family | dataset | train images | test images | model | epochs | batch | lr | augment | noise |\n|---|---|---|---|---|---|---|---|---|---|\n");
    md.push_str(&format!("{}\n", family_line("F1", &p.fig1)));
    md.push_str(&format!("{}\n", family_line("F2, F3", &p.classes)));
    md.push_str(&format!("{}\n", family_line("T1", &p.faces)));
    if let Ok(human) = &p.human {
        md.push_str(&format!("{}\n", family_line("F2H", human)));
    }
    let labels = |v: Vec<crate::config::Regularizer>| v.iter().map(|r| r.label()).collect::<Vec<_>>().join(", ");
    md.push_str(&format!(
        "\n- Validation: {:.0}% of the training images held out for every run (early stopping reads it).\n- F1: seeds {:?} at s = {:.0}%.\n- F2: {} at s = {}, seeds {:?}.\n- F3: {}; at s = {}.\n- T1: {} at {:.0}% annotation noise on ambiguous activations, seeds {:?}.\n",
        p.classes.data.val_fraction * 100.0,
        p.seeds,
        F1_RATE * 100.0,
        labels(p.fig2_methods()),
        p.rates.iter().map(|s| format!("{:.0}%", s * 100.0)).collect::<Vec<_>>().join(", "),
        p.seeds,
        p.fig3_panels().into_iter().map(|(n, s)| format!("{n}: {}", labels(s))).collect::<Vec<_>>().join("; "),
        p.f3_rates.iter().map(|s| format!("{:.0}%", s * 100.0)).collect::<Vec<_>>().join(", "),
        labels(p.table1_methods()),
        FACES_NOISE * 100.0,
        p.t1_seeds,
    ));
    let sizes = report::size_table(records);
    if !sizes.is_empty() {
        md.push_str(&format!(
            "\n## Model size\n\nThe paper's second half: quantization also compresses. Sizes of the kept networks (`qat-lab export runs/<id>` writes the integer model; `qat-lab eval runs/<id> --int` runs it):\n\n{sizes}"
        ));
    }
    if extended {
        md.push_str(&extended_section(p, records, dir)?);
    }
    let path = dir.join("report.md");
    runs::write_atomic(&path, md.as_bytes())?;
    Ok(path)
}

/// F2H's final test accuracy (%) per method and CIFAR-10N label set, mean ± std over seeds (empty
/// where the budget does not run it).
fn human_table(p: &Protocol, records: &[RunRecord]) -> String {
    let Ok(family) = &p.human else { return String::new() };
    let mut md = format!(
        "\nFinal test accuracy (%), mean ± std over seeds:\n\n| method | {} |\n|---{}|\n",
        protocol::HUMAN_SETS.join(" | "),
        "|---".repeat(protocol::HUMAN_SETS.len())
    );
    for reg in p.fig2_methods() {
        let cells: Vec<String> = protocol::HUMAN_SETS
            .iter()
            .map(|set| {
                let accs: Vec<f64> = p
                    .seeds
                    .iter()
                    .filter_map(|&seed| claims::find(records, &Protocol::human_experiment(family, &reg, set, seed)))
                    .filter_map(report::final_acc)
                    .collect();
                report::mean_std_cell(&accs)
            })
            .collect();
        md.push_str(&format!("| {} | {} |\n", reg.label(), cells.join(" | ")));
    }
    md
}

/// Writes `table1.{md,csv,tex}` (ours, read at the best-validation epoch) and returns the Markdown
/// for the report, with the paper's table beneath.
fn write_table1(p: &Protocol, records: &[RunRecord], dir: &Path) -> Result<String> {
    let t1 = claims::table1_records(p, records);
    let rows = report::table1_rows_by(&t1, claims::kept_f1);
    let names = t1.first().map(|r| r.label_names()).unwrap_or_default();
    let ours = report::table1_markdown(&rows, &names);
    runs::write_atomic(&dir.join("table1.md"), ours.as_bytes())?;
    runs::write_atomic(&dir.join("table1.csv"), report::table1_csv(&rows, &names).as_bytes())?;
    runs::write_atomic(&dir.join("table1.tex"), report::table1_latex(&rows, &names).as_bytes())?;
    let mut paper = String::from(
        "| F1 score (%) | AU1 | AU2 | AU4 | AU6 | AU7 | AU10 | AU12 | AU14 | AU15 | AU17 | AU23 | AU24 | Avg. |\n|---|",
    );
    paper.push_str(&"---|".repeat(13));
    paper.push('\n');
    for (method, v) in PAPER_TABLE1 {
        paper.push_str(&format!(
            "| {method} | {} |\n",
            v.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(" | ")
        ));
    }
    Ok(format!(
        "Ours (procedural faces, {:.0}% annotation noise; test F1 at the best-validation epoch, mean of the seeds; Avg. ± std over seeds):\n\n{ours}\nThe paper's (BP4D):\n\n{paper}",
        FACES_NOISE * 100.0
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NoiseKind;

    /// Without CIFAR-10N's label file F2H trains nothing and says how to get the file; with it, its runs
    /// join the plan.
    #[test]
    fn f2_on_human_noise_needs_the_label_file() {
        let dir = tempfile::tempdir().unwrap();
        let opts = |labels: &Path| PaperOptions {
            budget: Budget::Standard,
            out: dir.path().into(),
            data: Some("cifar".into()),
            human_labels: labels.display().to_string(),
            device: DeviceKind::Cpu,
            runner: RunnerOptions::default(),
            extended: false,
        };
        let absent = dir.path().join("CIFAR-10_human.pt");
        let (protocol, plan) = protocol_and_plan(&opts(&absent)).unwrap();
        assert!(protocol.human.unwrap_err().contains("qat-lab data fetch cifar10n"));
        assert!(plan.iter().all(|e| e.data.noise.kind != NoiseKind::Human));
        std::fs::write(&absent, b"labels").unwrap();
        let (_, plan) = protocol_and_plan(&opts(&absent)).unwrap();
        assert!(plan.iter().any(|e| e.data.noise.kind == NoiseKind::Human));
    }
}
