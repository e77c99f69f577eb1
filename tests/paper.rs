//! `qat-lab paper`: the verdicts on hand-made records (held, not held, inconclusive), the figures'
//! data (snapshots), and a real call at the test budget that a second call reuses.

use qat_lab::config::{Experiment, Regularizer};
use qat_lab::paper::claims;
use qat_lab::paper::protocol::{Budget, Point, Protocol};
use qat_lab::paper::verdict::Verdict;
use qat_lab::report::figures;
use qat_lab::runs::RunRecord;
use qat_lab::train::{EpochMetrics, Status, Summary};
use std::process::{Command, Stdio};

fn smoke() -> Protocol {
    Protocol::new(Budget::Smoke, None, qat_lab::config::DeviceKind::Cpu, qat_lab::paper::protocol::HUMAN_LABELS)
}

/// A completed record of `exp` with the given eval losses per epoch and final accuracy.
fn record(exp: Experiment, eval_losses: &[f64], acc: f64) -> RunRecord {
    let metrics: Vec<EpochMetrics> = eval_losses
        .iter()
        .enumerate()
        .map(|(i, &l)| EpochMetrics {
            epoch: i + 1,
            eval_loss: l,
            train_loss: 1.0 / (i + 1) as f64,
            eval_acc: acc,
            ..Default::default()
        })
        .collect();
    let summary = Summary {
        status: Status::Completed,
        epochs_run: metrics.len(),
        last: metrics.last().cloned(),
        final_eval_acc: Some(acc),
        ..Summary::started(&exp.name, &exp.method_label(), exp.data.noise.rate)
    };
    RunRecord { dir: "runs/x".into(), experiment: exp, metrics, summary: Some(summary) }
}

/// F1's records: per seed, the baseline's and W4/A4's eval-loss curves.
fn f1_records(p: &Protocol, curves: &[(&[f64], &[f64])]) -> Vec<RunRecord> {
    p.f1_points()
        .into_iter()
        .zip(curves)
        .flat_map(|((b, q), (cb, cq))| {
            [record(Protocol::experiment(&p.fig1, &b), cb, 0.3), record(Protocol::experiment(&p.fig1, &q), cq, 0.4)]
        })
        .collect()
}

#[test]
fn fig1_verdicts_follow_the_loss_curves() {
    let p = smoke();
    // The baseline turns up by 50% and 40%, W4/A4 stays flat: held.
    let held = f1_records(&p, &[(&[1.0, 0.8, 1.2], &[1.0, 0.8, 0.8]), (&[1.0, 0.8, 1.12], &[1.0, 0.8, 0.81])]);
    let c = claims::fig1(&p, &held);
    assert_eq!(c.verdict, Verdict::Held, "{}", c.numbers);
    assert!(c.numbers.contains("baseline +45.0%"), "{}", c.numbers);
    // W4/A4 turns up more than the baseline on both seeds: not held.
    let not = f1_records(&p, &[(&[1.0, 0.8, 0.96], &[1.0, 0.8, 1.6]), (&[1.0, 0.8, 0.92], &[1.0, 0.8, 1.5])]);
    assert_eq!(claims::fig1(&p, &not).verdict, Verdict::NotHeld);
    // The seeds disagree: inconclusive.
    let mixed = f1_records(&p, &[(&[1.0, 0.8, 1.2], &[1.0, 0.8, 0.8]), (&[1.0, 0.8, 1.0], &[1.0, 0.8, 1.36])]);
    assert_eq!(claims::fig1(&p, &mixed).verdict, Verdict::Inconclusive);
    // No over-fitting to fight (the baseline's loss never turns up): not held, and it says why.
    let flat = f1_records(&p, &[(&[1.0, 0.9, 0.8], &[1.0, 0.9, 0.8]), (&[1.0, 0.9, 0.8], &[1.0, 0.9, 0.8])]);
    let c = claims::fig1(&p, &flat);
    assert_eq!(c.verdict, Verdict::NotHeld);
    assert!(c.numbers.contains("no over-fitting to fight"), "{}", c.numbers);
    // Runs missing: inconclusive, and the missing seeds are named.
    let c = claims::fig1(&p, &held[..2]);
    assert_eq!(c.verdict, Verdict::Inconclusive);
    assert!(c.details.iter().any(|d| d.contains("seed 1")), "{:?}", c.details);
}

/// F2's grid with accuracies from `acc(method kind, rate, seed)`.
fn f2_records(p: &Protocol, acc: impl Fn(&str, f64, u64) -> f64) -> Vec<RunRecord> {
    let mut out = Vec::new();
    for reg in p.fig2_methods() {
        for &rate in &p.rates {
            for &seed in &p.seeds {
                let exp = Protocol::experiment(&p.classes, &Point { regularizer: reg.clone(), rate, seed });
                out.push(record(exp, &[1.0], acc(reg.kind(), rate, seed)));
            }
        }
    }
    out
}

#[test]
fn fig2_needs_quantization_best_below_40_and_dropout_or_pruning_above() {
    let p = smoke();
    let jitter = |seed: u64| seed as f64 * 0.004;
    let paper_like = |kind: &str, rate: f64, seed: u64| {
        let base = 0.8 - rate * 0.5 + jitter(seed);
        match (kind, rate < 0.4) {
            ("quantization", true) => base + 0.10,
            ("quantization", false) => base + 0.02,
            ("dropout", false) => base + 0.08,
            _ => base,
        }
    };
    let c = claims::fig2(&p, &f2_records(&p, paper_like));
    assert_eq!(c.verdict, Verdict::Held, "{}", c.numbers);
    assert!(c.numbers.contains("best other dropout p=0.1"), "{}", c.numbers);
    // Quantization best everywhere: the high-noise part is not held, so the claim is not.
    let quant_everywhere = |kind: &str, rate: f64, seed: u64| {
        0.8 - rate * 0.5 + jitter(seed) + if kind == "quantization" { 0.1 } else { 0.0 }
    };
    assert_eq!(claims::fig2(&p, &f2_records(&p, quant_everywhere)).verdict, Verdict::NotHeld);
    // Differences inside the seed spread: inconclusive.
    let noisy = |kind: &str, rate: f64, seed: u64| {
        let flip = if seed == 0 { 0.05 } else { -0.05 };
        0.8 - rate * 0.5 + if kind == "quantization" { flip } else { 0.0 }
    };
    assert_eq!(claims::fig2(&p, &f2_records(&p, noisy)).verdict, Verdict::Inconclusive);
}

#[test]
fn fig3_compares_spreads_over_settings() {
    let p = smoke();
    let mut recs = Vec::new();
    for (name, settings) in p.fig3_panels() {
        for (i, reg) in settings.iter().enumerate() {
            for &rate in &p.f3_rates {
                for &seed in &p.seeds {
                    // Quantization's settings differ by 1 point, the others' by 10.
                    let step = if name == "quantization" { 0.01 } else { 0.10 };
                    let exp = Protocol::experiment(&p.classes, &Point { regularizer: reg.clone(), rate, seed });
                    recs.push(record(exp, &[1.0], 0.4 + step * i as f64 + seed as f64 * 0.003));
                }
            }
        }
    }
    let c = claims::fig3(&p, &recs);
    assert_eq!(c.verdict, Verdict::Held, "{}", c.numbers);
    assert!(c.numbers.contains("quantization 1.00 pts"), "{}", c.numbers);
}

#[test]
fn table1_reads_each_run_at_its_best_validation_epoch() {
    let p = smoke();
    let mut recs = Vec::new();
    for reg in p.table1_methods() {
        for &seed in &p.t1_seeds {
            let exp = Protocol::experiment(&p.faces, &Point { regularizer: reg.clone(), rate: 0.2, seed });
            let mut r = record(exp, &[1.0, 1.1], 0.5);
            let good = if reg.kind() == "quantization" { 0.7 } else { 0.6 } + seed as f64 * 0.01;
            // Epoch 1 has the best validation F1; epoch 2 has fallen (over-fitting).
            r.metrics[0].val_f1 = Some(0.6);
            r.metrics[0].f1 = vec![good; 12];
            r.metrics[1].val_f1 = Some(0.5);
            r.metrics[1].f1 = vec![0.4; 12];
            recs.push(r);
        }
    }
    let c = claims::table1(&p, &recs);
    assert_eq!(c.verdict, Verdict::Held, "{}", c.numbers);
    assert!(c.numbers.contains("W4/A4 70.5"), "{}", c.numbers);
    assert!(c.details[0].starts_with("ordering by average F1 (ours): W4/A4 70.5 >"), "{:?}", c.details);
}

#[test]
fn figure_data_snapshots() {
    let p = smoke();
    let f1 = f1_records(&p, &[(&[1.0, 0.8, 1.2], &[1.0, 0.8, 0.8]), (&[1.0, 0.8, 1.0], &[1.0, 0.9, 0.7])]);
    let fig = figures::fig1(&f1).expect("fig1");
    insta::assert_snapshot!("fig1", serde_json::to_string_pretty(&fig).unwrap());
    let f2 = f2_records(&p, |kind, rate, seed| {
        0.8 - rate * 0.5 + seed as f64 * 0.01 + if kind == "quantization" { 0.05 } else { 0.0 }
    });
    let fig = figures::fig2(&f2).expect("fig2");
    insta::assert_snapshot!("fig2", serde_json::to_string_pretty(&fig).unwrap());
    // Interrupted runs never enter the means.
    let mut with_interrupted = f2.clone();
    let mut bad = f2[0].clone();
    bad.summary.as_mut().unwrap().status = Status::Stopped;
    bad.summary.as_mut().unwrap().final_eval_acc = Some(0.0);
    with_interrupted.push(bad);
    assert_eq!(figures::fig2(&with_interrupted), Some(fig));
    let mut f3 = Vec::new();
    for (_, settings) in p.fig3_panels() {
        for (i, reg) in settings.iter().chain([&Regularizer::None]).enumerate() {
            let exp = Protocol::experiment(&p.classes, &Point { regularizer: reg.clone(), rate: 0.6, seed: 0 });
            f3.push(record(exp, &[1.0], 0.3 + 0.02 * i as f64));
        }
    }
    let fig = figures::fig3(&f3).expect("fig3");
    assert_eq!(fig.panels.len(), 3);
    insta::assert_snapshot!("fig3", serde_json::to_string_pretty(&fig).unwrap());
    // And they draw: SVG and PNG.
    let dir = tempfile::tempdir().unwrap();
    let [svg, png] = figures::draw(&fig, dir.path()).unwrap();
    assert!(std::fs::read_to_string(svg).unwrap().starts_with("<svg"));
    assert_eq!(&std::fs::read(png).unwrap()[1..4], b"PNG");
}

#[test]
fn a_second_paper_call_reuses_the_finished_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("paper");
    let call_with = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_qat-lab"))
            .args(["paper", "--budget", "smoke", "--out"])
            .arg(&out)
            .args(extra)
            .env("RAYON_NUM_THREADS", "2")
            .stdin(Stdio::null())
            .output()
            .expect("run qat-lab")
    };
    let call = || call_with(&[]);
    let first = call();
    let text = String::from_utf8_lossy(&first.stdout).to_string();
    assert!(first.status.success(), "{text}{}", String::from_utf8_lossy(&first.stderr));
    for f in [
        "report.md",
        "fig1.svg",
        "fig1.png",
        "fig2.svg",
        "fig2.png",
        "fig3.svg",
        "fig3.png",
        "table1.md",
        "table1.csv",
        "table1.tex",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for id in ["| F1 ", "| F2 ", "| F3 ", "| T1 "] {
        let line = report.lines().find(|l| l.starts_with(id)).unwrap_or_else(|| panic!("no {id} line in\n{report}"));
        assert!(["**held**", "**not held**", "**inconclusive**"].iter().any(|v| line.contains(v)), "{line}");
        assert!(line.contains("Δ = "), "the verdict shows its numbers: {line}");
    }
    let trained: usize =
        text.split(" runs trained").next().and_then(|s| s.rsplit('(').next()).unwrap().parse().unwrap();
    assert!(trained > 20, "{text}");
    let second = call();
    let text2 = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success());
    assert!(text2.contains(&format!("(0 runs trained, {trained} reused)")), "{text2}");
    // The same records give the same verdicts.
    let verdicts =
        |t: &str| t.lines().filter(|l| l.starts_with('F') || l.starts_with('T')).map(String::from).collect::<Vec<_>>();
    assert_eq!(verdicts(&text), verdicts(&text2));

    // --extended trains only the noisy-label methods, reuses the paper's runs and adds its own section.
    let third = call_with(&["--extended"]);
    let text3 = String::from_utf8_lossy(&third.stdout);
    assert!(third.status.success(), "{text3}{}", String::from_utf8_lossy(&third.stderr));
    assert!(text3.contains(&format!("{trained} reused)")), "{text3}");
    assert_eq!(verdicts(&text), verdicts(&text3), "the paper's verdicts do not move");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    let section =
        report.split("## Beyond the paper").nth(1).unwrap_or_else(|| panic!("no extended section:\n{report}"));
    for method in [
        "| baseline |",
        "| W4/A4 |",
        "| GCE q=0.7 |",
        "| SCE a=0.1 b=1 |",
        "| co-teaching |",
        "| W4/A4 + co-teaching |",
    ] {
        assert!(section.contains(method), "{method} missing from the extended section:\n{section}");
    }
    assert!(out.join("fig2-extended.svg").is_file());
}

/// F2H's grid at `standard` with accuracies from `acc(method kind, set, seed)`, each record carrying
/// its label set's measured noise rate.
fn human_records(p: &Protocol, acc: impl Fn(&str, &str, u64) -> f64) -> Vec<RunRecord> {
    let family = p.human.as_ref().expect("standard runs F2H");
    let rates = [("aggre", 0.0901), ("rand1", 0.1723), ("worst", 0.4021)];
    let mut out = Vec::new();
    for reg in p.fig2_methods() {
        for (set, rate) in rates {
            for &seed in &p.seeds {
                let exp = Protocol::human_experiment(family, &reg, set, seed);
                let mut r = record(exp, &[1.0, 0.9], acc(reg.kind(), set, seed));
                r.summary.as_mut().unwrap().measured_noise_rate = rate;
                out.push(r);
            }
        }
    }
    out
}

#[test]
fn fig2_on_human_noise_splits_the_label_sets_by_their_measured_rate() {
    use qat_lab::paper::protocol::{HUMAN_LABELS, HUMAN_SETS};
    let p = Protocol::new(Budget::Standard, Some("cifar"), qat_lab::config::DeviceKind::Cpu, HUMAN_LABELS);
    let plan = p.human_plan();
    assert_eq!(plan.len(), p.fig2_methods().len() * HUMAN_SETS.len() * p.seeds.len());
    assert!(plan.iter().all(|e| e.data.noise.kind == qat_lab::config::NoiseKind::Human && e.validate().is_ok()));
    assert!(plan.iter().all(|e| p.plan().contains(e)), "the budget trains F2H's runs");
    // W4/A4 best on aggre and rand1 (below 40%), dropout best on worst (above): held.
    let noise = |seed: u64| seed as f64 * 0.002;
    let held = human_records(&p, |kind, set, seed| {
        noise(seed)
            + match (kind, set) {
                ("quantization", "worst") => 0.50,
                ("quantization", _) => 0.80,
                ("dropout", "worst") => 0.55,
                _ => 0.70,
            }
    });
    let c = claims::fig2_human(&p, &held);
    assert_eq!(c.verdict, Verdict::Held, "{}", c.numbers);
    assert!(c.numbers.contains("below 40% (aggre 9.0%, rand1 17.2%)"), "{}", c.numbers);
    assert!(c.numbers.contains("above 40% (worst 40.2%)"), "{}", c.numbers);
    // W4/A4 behind weight decay below 40%: not held.
    let not = human_records(&p, |kind, set, seed| {
        noise(seed)
            + match (kind, set) {
                ("weight_decay", "aggre" | "rand1") => 0.85,
                ("dropout", "worst") => 0.55,
                _ => 0.70,
            }
    });
    assert_eq!(claims::fig2_human(&p, &not).verdict, Verdict::NotHeld);
    // No runs: inconclusive, every missing point named.
    let c = claims::fig2_human(&p, &[]);
    assert_eq!(c.verdict, Verdict::Inconclusive);
    assert!(c.details.iter().any(|d| d.contains("label sets with no finished run")), "{:?}", c.details);
    // `quick` does not run it, and says why.
    let c = claims::fig2_human(&smoke(), &[]);
    assert_eq!(c.verdict, Verdict::NotRun);
    assert!(c.numbers.contains("--budget standard"), "{}", c.numbers);
}
