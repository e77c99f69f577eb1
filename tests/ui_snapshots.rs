//! Snapshot tests of every screen at 80x24 and at a large size, with live and finished runs.
//! Update after an intended change with `INSTA_UPDATE=always cargo test --release --test ui_snapshots`.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use qat_lab::config::{Experiment, Regularizer};
use qat_lab::train::events::BatchProgress;
use qat_lab::train::{EpochMetrics, Status, Summary};
use qat_lab::ui::app::{App, RunState, RunView, Screen};
use qat_lab::ui::setup::SetupForm;
use qat_lab::ui::views;
use ratatui::backend::TestBackend;
use ratatui::Terminal;

fn presets() -> Vec<(String, Experiment)> {
    qat_lab::config::list_presets()
        .into_iter()
        .filter_map(|p| Some((p.path.file_stem()?.to_string_lossy().to_string(), p.experiment.ok()?)))
        .collect()
}

fn app() -> App {
    App::new(SetupForm::new(presets(), 2, false))
}

/// A made-up but typical run: train loss falls; eval loss falls, then (if `overfits`) climbs again.
fn metrics(epochs: usize, overfits: bool) -> Vec<EpochMetrics> {
    (1..=epochs)
        .map(|e| {
            let t = e as f64;
            let train_loss = 2.2 * (-t / 6.0).exp() + 0.02;
            let eval_loss = if overfits { 0.7 + 0.004 * (t - 6.0).powi(2) } else { 0.75 + 0.6 * (-t / 4.0).exp() };
            let memorized = if overfits { 1.0 - (-t / 8.0).exp() } else { 0.3 * (1.0 - (-t / 10.0).exp()) };
            let eval_acc =
                if overfits { 0.93 - 0.01 * (t - 4.0).max(0.0) } else { 0.80 + 0.1 * (1.0 - (-t / 5.0).exp()) };
            EpochMetrics {
                epoch: e,
                train_loss,
                train_acc: 1.0 - train_loss / 2.5,
                memorized,
                // Class 3 memorised most, then 8, then 5 (class 0 had no corrupted example).
                memorized_per_class: (0..10)
                    .map(|c| (c > 0).then(|| memorized * [0.0, 0.5, 0.4, 1.0, 0.3, 0.8, 0.2, 0.6, 0.9, 0.1][c]))
                    .collect(),
                clean_fit: 0.95,
                eval_loss,
                eval_acc,
                per_class_acc: vec![eval_acc; 10],
                val_loss: None,
                val_acc: None,
                gap: eval_loss - train_loss,
                images_per_sec: 5000.0,
                epoch_secs: 0.3,
                ..Default::default()
            }
        })
        .collect()
}

fn run(reg: Regularizer, epochs: usize, done: usize, overfits: bool, finished: bool) -> RunView {
    let mut e = presets().into_iter().find(|(n, _)| n == "demo-digits").unwrap().1;
    let quantized = matches!(reg, Regularizer::Quantization(_));
    e.regularizer = reg;
    e.train.epochs = epochs;
    let mut v = RunView::queued(e);
    v.record.metrics = metrics(done, overfits);
    v.record.dir = format!("runs/20260101-000000-demo-{}", v.label()).into();
    if finished {
        v.state = RunState::Done;
        let last = v.record.metrics.last().cloned();
        let best = v
            .record
            .metrics
            .iter()
            .max_by(|a, b| a.eval_acc.partial_cmp(&b.eval_acc).unwrap())
            .map(|m| qat_lab::train::events::Best { epoch: m.epoch, eval_acc: m.eval_acc, eval_loss: m.eval_loss });
        v.record.summary = Some(Summary {
            run_id: "id".into(),
            status: Status::Completed,
            epochs_run: done,
            final_eval_acc: last.as_ref().map(|m| m.eval_acc),
            final_eval_loss: last.as_ref().map(|m| m.eval_loss),
            last,
            best,
            measured_noise_rate: 0.361,
            params: 75002,
            macs: 1_000_000,
            wall_secs: 8.0,
            device: "cpu".into(),
            size: Some(qat_lab::runs::ModelSize {
                float_bytes: 4 * 75002,
                pruned_float_bytes: None,
                int_bytes: quantized.then_some(44_130),
            }),
            ..Summary::started("demo-digits", &v.label(), 0.4)
        });
    } else {
        v.state = RunState::Running;
        v.batch = Some(BatchProgress { epoch: done + 1, batch: 7, batches: 23, loss: 0.4, images_per_sec: 5123.0 });
    }
    v
}

fn render(app: &App, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| views::draw(f, app)).unwrap();
    format!("{}", t.backend())
}

fn key(c: char) -> KeyEvent {
    KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE)
}

fn lab_with_runs() -> App {
    let mut a = app();
    a.runs.push(run(Regularizer::None, 40, 40, true, true));
    a.runs.push(run(Regularizer::default_for("quantization").unwrap(), 40, 17, false, false));
    a.screen = Screen::Live;
    a.push_log("[baseline] started: 1437 train images, 36.1% labels wrong, 75002 params".into());
    a.push_log("[baseline] completed after 40 epochs, eval acc 65.8%".into());
    a.push_log("[W4/A4] started: 1437 train images, 36.1% labels wrong, 75002 params".into());
    a
}

#[test]
fn setup_screen() {
    let a = app();
    insta::assert_snapshot!("setup_80x24", render(&a, 80, 24));
    insta::assert_snapshot!("setup_160x48", render(&a, 160, 48));
}

#[test]
fn setup_explains_an_invalid_choice() {
    let mut a = app();
    // Regularizer -> early stopping, with no validation split.
    a.setup.cursor =
        qat_lab::ui::setup::FIELDS.iter().position(|f| *f == qat_lab::ui::setup::Field::Regularizer).unwrap();
    a.setup.cycle(1);
    a.on_key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE));
    let screen = render(&a, 80, 24);
    assert!(screen.contains("val_fraction"), "{screen}");
    insta::assert_snapshot!("setup_invalid_80x24", screen);
}

#[test]
fn setup_shows_the_noise_matrix_on_the_noise_rows() {
    use qat_lab::ui::setup::{Field, FIELDS};
    let mut a = app();
    a.setup.cursor = FIELDS.iter().position(|f| *f == Field::NoiseRate).unwrap();
    let uniform = render(&a, 80, 24);
    // Uniform 40% over 10 classes: 64% kept, 4% to every other class.
    assert!(uniform.contains("64%") && uniform.contains("most confused 0->1 (4%)"), "{uniform}");
    insta::assert_snapshot!("setup_noise_uniform_80x24", uniform);
    a.setup.cursor = FIELDS.iter().position(|f| *f == Field::NoiseKind).unwrap();
    a.setup.cycle(1);
    a.setup.cycle(1);
    assert_eq!(a.setup.experiment.data.noise.kind, qat_lab::config::NoiseKind::Pair);
    let pair = render(&a, 80, 24);
    assert!(pair.contains("60%") && pair.contains("most confused 0->1 (40%)"), "{pair}");
    insta::assert_snapshot!("setup_noise_pair_80x24", pair);
}

#[test]
fn setup_shows_the_memory_estimate_against_what_is_free() {
    let mut a = app();
    a.available_memory = Some(64 << 30);
    let screen = render(&a, 160, 48);
    assert!(screen.contains("Memory: about") && screen.contains("of 64.0 GiB free"), "{screen}");
    a.available_memory = Some(100 << 20);
    let screen = render(&a, 160, 48);
    assert!(screen.contains("more than the 100 MiB free"), "{screen}");
}

#[test]
fn live_screen_single_run_running() {
    let mut a = app();
    a.runs.push(run(Regularizer::None, 40, 15, true, false));
    a.screen = Screen::Live;
    insta::assert_snapshot!("live_single_80x24", render(&a, 80, 24));
}

#[test]
fn live_screen_side_by_side() {
    let a = lab_with_runs();
    let small = render(&a, 80, 24);
    assert!(small.contains("over-fits"), "{small}");
    insta::assert_snapshot!("live_two_80x24", small);
    insta::assert_snapshot!("live_two_200x60", render(&a, 200, 60));
}

#[test]
fn live_screen_ascii_mode() {
    let mut a = lab_with_runs();
    a.on_key(key('g'));
    let s = render(&a, 80, 24);
    assert!(s.chars().all(|c| c.is_ascii() || c == '\n'), "ASCII mode must be plain ASCII:\n{s}");
    insta::assert_snapshot!("live_ascii_80x24", s);
}

#[test]
fn compare_screen() {
    let mut a = lab_with_runs();
    a.runs[1] = run(Regularizer::default_for("quantization").unwrap(), 40, 40, false, true);
    a.screen = Screen::Compare;
    let s = render(&a, 80, 24);
    assert!(s.contains("gain"), "{s}");
    insta::assert_snapshot!("compare_80x24", s);
    insta::assert_snapshot!("compare_160x48", render(&a, 160, 48));
}

#[test]
fn help_and_quit_confirmation() {
    let mut a = lab_with_runs();
    a.on_key(key('?'));
    insta::assert_snapshot!("help_80x24", render(&a, 80, 24));
    a.on_key(key('x')); // any key closes help
    a.on_key(key('q'));
    assert!(a.confirm_quit, "a running run makes q ask first");
    insta::assert_snapshot!("quit_confirm_80x24", render(&a, 80, 24));
}

fn multi_label_run(reg: Regularizer, seed_shift: f64, finished: bool) -> RunView {
    let mut v = run(reg, 20, 12, true, finished);
    v.record.experiment.data.dataset = qat_lab::config::DatasetKind::Faces;
    for m in &mut v.record.metrics {
        let t = m.epoch as f64;
        m.f1 = (0..12).map(|j| (0.2 + 0.05 * j as f64 + 0.02 * t + seed_shift).min(0.95)).collect();
        m.eval_acc = m.f1.iter().sum::<f64>() / 12.0;
    }
    v
}

#[test]
fn multi_label_live_sparklines_and_table1() {
    let mut a = app();
    a.runs.push(multi_label_run(Regularizer::None, 0.0, false));
    a.runs.push(multi_label_run(Regularizer::default_for("quantization").unwrap(), 0.05, true));
    a.screen = Screen::Live;
    let live = render(&a, 80, 24);
    assert!(live.contains("F1 per AU") && live.contains("AU24"), "{live}");
    insta::assert_snapshot!("live_multilabel_80x24", live);
    insta::assert_snapshot!("live_multilabel_160x48", render(&a, 160, 48));
    a.screen = Screen::Compare;
    let cmp = render(&a, 80, 24);
    assert!(cmp.contains("Table 1"), "{cmp}");
    insta::assert_snapshot!("compare_multilabel_80x24", cmp);
    insta::assert_snapshot!("compare_multilabel_160x48", render(&a, 160, 48));
}

#[test]
fn tiny_terminal_gets_a_message() {
    let a = lab_with_runs();
    let s = render(&a, 40, 10);
    assert!(s.contains("too small"), "{s}");
}

#[test]
fn empty_live_and_compare_screens_say_what_to_do() {
    let mut a = app();
    a.screen = Screen::Live;
    assert!(render(&a, 80, 24).contains("No runs yet"));
    a.screen = Screen::Compare;
    assert!(render(&a, 80, 24).contains("Nothing to compare"));
}
