//! Command line: the lab (default), headless runs and sweeps, data fetching, reports.

use crate::config::{self, Experiment};
use crate::runs::{self, kib};
use crate::train::{self, RunOptions, Status, Summary, TrainEvent};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "qat-lab",
    version,
    about = "Watch, live, whether quantization-aware training stops a network from memorising noisy labels"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Open the interactive lab (the default).
    Lab {
        /// Folder of run records to show and write.
        #[arg(long, default_value_os_t = runs::default_root())]
        runs: PathBuf,
    },
    /// Train one experiment headless, with a progress bar and a summary.
    Run {
        /// Preset name (see --list) or path to a TOML file.
        preset: Option<String>,
        /// Go on with a cut-short run (stopped, killed, preempted) from its last checkpoint, in its
        /// own folder: `qat-lab run --resume runs/<id>`.
        #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["preset", "set", "device", "data"])]
        resume: Option<PathBuf>,
        /// Override any field, e.g. --set train.epochs=4 --set regularizer.kind=quantization.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Folder that receives the run record.
        #[arg(long, default_value_os_t = runs::default_root())]
        out: PathBuf,
        /// List the presets, one line each.
        #[arg(long)]
        list: bool,
        /// Print one line per epoch instead of a progress bar.
        #[arg(long)]
        plain: bool,
        /// Shorthand for --set train.device=cpu|cuda.
        #[arg(long)]
        device: Option<String>,
        /// Shorthand for --set data.path=DIR (an existing dataset copy).
        #[arg(long)]
        data: Option<String>,
    },
    /// Train every combination of the preset's `[sweep]` values (and --vary) headless, then print tables.
    Sweep {
        /// Preset with a `[sweep]` table, e.g. fig2-noise-sweep.
        preset: String,
        /// KEY=V1,V2,... ; repeat for a grid, e.g. --vary data.noise.rate=0,0.2,0.4.
        #[arg(long = "vary", value_name = "KEY=V1,V2,...")]
        vary: Vec<String>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[arg(long, default_value_os_t = runs::default_root())]
        out: PathBuf,
        /// Shorthand for --set train.device=cpu|cuda.
        #[arg(long)]
        device: Option<String>,
        /// Shorthand for --set data.path=DIR.
        #[arg(long)]
        data: Option<String>,
        /// Runs trained at once (they share the cores; 1 is fastest per run on 2 cores).
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// Train only grid point N (0-based): what each task of a --slurm job array runs.
        #[arg(long, value_name = "N")]
        task: Option<usize>,
        #[command(flatten)]
        slurm: crate::slurm::SlurmArgs,
    },
    /// Reproduce the paper's four claims (Fig. 1, 2, 3, Table 1) at a budget, and Fig. 2 on human noise
    /// (CIFAR-10N, from `standard` on): trains what the out folder lacks, then writes report.md with one
    /// verdict per claim, the figures and Table 1.
    Paper {
        /// quick: <= 15 min on 2 cores (embedded data, plus CIFAR-10 for Fig. 1 with --data);
        /// standard: <= 2 h on 2 cores (CIFAR-10 subsets, needs --data); full: the paper's protocol.
        #[arg(long, value_enum, default_value_t = crate::paper::protocol::Budget::Quick)]
        budget: crate::paper::protocol::Budget,
        /// Folder for runs/, report.md, fig1/2/3 (.svg, .png) and table1 (.md, .csv, .tex).
        #[arg(long, default_value = "paper")]
        out: PathBuf,
        /// CIFAR-10 folder or archive (see `qat-lab data fetch cifar10`).
        #[arg(long)]
        data: Option<String>,
        /// CIFAR-10N's label file for F2H at `standard` and `full` (see `qat-lab data fetch cifar10n`).
        #[arg(long, value_name = "PATH", default_value = crate::paper::protocol::HUMAN_LABELS)]
        human_labels: String,
        #[arg(long, value_enum, default_value_t = BenchDevice::Cpu)]
        device: BenchDevice,
        /// Runs trained at once.
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// Also train GCE, SCE, co-teaching and co-teaching + W4/A4 on the F2 and T1 grids, reported in a
        /// section of their own (not the paper's comparison).
        #[arg(long)]
        extended: bool,
        /// Train only run N (0-based) of the budget's plan, and write no report: what each task of a
        /// --slurm job array runs.
        #[arg(long, value_name = "N")]
        task: Option<usize>,
        #[command(flatten)]
        slurm: crate::slurm::SlurmArgs,
    },
    /// Compare finished or running runs side by side in the lab.
    Compare {
        /// Run folders (`runs/<id>`).
        runs: Vec<PathBuf>,
        /// Print the comparison table as Markdown instead of opening the lab.
        #[arg(long)]
        table: bool,
    },
    /// Tables (Markdown) of the runs in a folder: final/best metrics, accuracy vs noise rate.
    Report {
        #[arg(default_value_os_t = runs::default_root())]
        runs: PathBuf,
        /// Also draw the paper's figures of these runs (fig1/2/3 .svg and .png) into the folder.
        #[arg(long)]
        figures: bool,
    },
    /// Training and eval throughput of ResNet-20 (float, W4/A4), peak memory, and the ratios to PyTorch
    /// running the same configurations (when torch is installed).
    Bench {
        #[arg(long, default_value_t = 128)]
        batch: usize,
        /// Timed training steps per round (eval times twice as many forward passes).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Rounds; the configurations are timed round-robin and each one's median is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, value_enum, default_value = "cpu")]
        device: BenchDevice,
        /// resnet8, resnet14 or resnet20.
        #[arg(long, default_value = "resnet20")]
        arch: String,
        /// Skip the PyTorch reference even when torch is installed.
        #[arg(long)]
        no_torch: bool,
        /// Measure one configuration only: float, w4a4-fold or w4a4-keep.
        #[arg(long)]
        only: Option<String>,
        /// Also time every convolution kernel, and every fused training layer float, keep and fold, on its
        /// own (the per-op breakdown; CPU).
        #[arg(long)]
        ops: bool,
    },
    /// Export a finished run's network: `int`, the packed integer model (weights at their bit width,
    /// batch norm folded, the activation scales), whose file size is the model's real size; `onnx`, a
    /// standard ONNX file (QDQ with clipped int8 ranges for QAT runs, float for the others).
    Export {
        /// The run folder (`runs/<id>`).
        run: PathBuf,
        /// int (the packed integer model) or onnx.
        #[arg(long, value_enum, default_value = "int")]
        format: ExportFormat,
        /// Where to write it (default: `runs/<id>/model.int.safetensors` or `runs/<id>/model.onnx`).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Evaluate a finished run on its test set; with --int, in integers on its packed model, beside
    /// the fake-quant network (accuracy of both, top-1 agreement, images/s).
    Eval {
        /// The run folder (`runs/<id>`).
        run: PathBuf,
        /// Run the packed integer model (integer inputs and weights, i32 accumulators, fixed-point
        /// requantization) and compare it with the fake-quant evaluation.
        #[arg(long)]
        int: bool,
        /// The dataset copy to read, when it is not where the run read it (shorthand for data.path).
        #[arg(long)]
        data: Option<String>,
        /// Images per batch.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// With --int, also evaluate the quantized network in f64 (exact arithmetic, slower), to
        /// tell the integer model's departures from the f32 fake-quant evaluation's own rounding.
        #[arg(long)]
        exact: bool,
        /// Also run the run's ONNX export in onnxruntime (through python3) and compare it.
        #[arg(long)]
        onnx: bool,
    },
    /// Datasets that need a download.
    Data {
        #[command(subcommand)]
        action: DataAction,
    },
}

/// What `export` writes.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ExportFormat {
    Int,
    Onnx,
}

/// Device for `bench` and `paper`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum BenchDevice {
    Cpu,
    Cuda,
}

impl BenchDevice {
    fn name(self) -> &'static str {
        match self {
            BenchDevice::Cpu => "cpu",
            BenchDevice::Cuda => "cuda",
        }
    }

    fn kind(self) -> crate::config::DeviceKind {
        match self {
            BenchDevice::Cpu => crate::config::DeviceKind::Cpu,
            BenchDevice::Cuda => crate::config::DeviceKind::Cuda,
        }
    }
}

/// Draws the paper's figures that the records allow into `dir`, naming each file.
fn draw_figures(records: &[runs::RunRecord], dir: &std::path::Path) -> Result<()> {
    use crate::report::figures;
    let figs: Vec<_> =
        [figures::fig1(records), figures::fig2(records), figures::fig3(records)].into_iter().flatten().collect();
    if figs.is_empty() {
        eprintln!("no figure to draw: Fig. 1 needs a baseline and a quantized run at one noise rate, Fig. 2 a baseline, Fig. 3 two settings of a method");
    }
    for fig in figs {
        let [svg, png] = figures::draw(&fig, dir)?;
        println!("{}: {} and {}", fig.name, svg.display(), png.display());
    }
    for matrix in crate::report::noise_matrix::noise_matrices(records) {
        let [svg, png] = crate::report::noise_matrix::draw(&matrix, dir)?;
        println!("{} (noise transition matrix): {} and {}", matrix.name, svg.display(), png.display());
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum DataAction {
    /// Download and verify a dataset archive (resumes an interrupted download).
    Fetch {
        /// What to fetch: cifar10 / cifar100 (the images), or cifar10n / cifar100n (CIFAR-N's human labels).
        dataset: String,
        /// Folder to put the file in [default: data/cifar10 or data/cifar100, or data/cifar-n for the label files].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Download from this address instead of the official one (same checksum required).
        #[arg(long)]
        url: Option<String>,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command.unwrap_or(Command::Lab { runs: runs::default_root() }) {
        Command::Lab { runs } => {
            crate::threads::configure(true);
            open_lab(crate::ui::LabStart::Setup, runs)
        }
        Command::Run { list: true, .. } => {
            print_presets();
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { resume: Some(dir), plain, .. } => {
            crate::threads::configure(false);
            let summary = resume_headless(&dir, plain || !std::io::stderr().is_terminal())?;
            print_summary(&summary);
            Ok(exit_for(&summary))
        }
        Command::Run { preset: None, .. } => {
            print_presets();
            bail!("name a preset: qat-lab run PRESET (the list is above)")
        }
        Command::Run { preset: Some(preset), set, out, plain, device, data, .. } => {
            crate::threads::configure(false);
            let set = with_shorthands(set, device, data);
            let exp = Experiment::load(&config::resolve_preset(&preset), &set)?;
            let summary = run_headless(&exp, &out, plain || !std::io::stderr().is_terminal())?;
            print_summary(&summary);
            Ok(exit_for(&summary))
        }
        Command::Sweep { preset, vary, set, out, device, data, parallel, task, slurm } => {
            crate::threads::configure(false);
            let set = with_shorthands(set, device, data);
            let exps = sweep_plan(&preset, &vary, &set)?;
            if slurm.slurm {
                let mut argv = vec!["sweep".to_string(), preset.clone()];
                argv.extend(vary.iter().flat_map(|v| ["--vary".to_string(), v.clone()]));
                argv.extend(set.iter().flat_map(|v| ["--set".to_string(), v.clone()]));
                return job_array(&slurm, &["sweep", &preset], argv, exps.len(), &out, |out| {
                    format!("qat-lab report {}", out.display())
                });
            }
            sweep(&exps, &out, parallel, task)
        }
        Command::Paper { budget, out, data, human_labels, device, parallel, extended, task, slurm } => {
            crate::threads::configure(false);
            let opts = crate::paper::PaperOptions {
                budget,
                out: out.clone(),
                data: data.clone(),
                human_labels: human_labels.clone(),
                device: device.kind(),
                runner: crate::runner::RunnerOptions {
                    parallel,
                    progress: std::io::stderr().is_terminal(),
                    ..Default::default()
                },
                extended,
            };
            if slurm.slurm || task.is_some() {
                let plan = crate::paper::distinct_plan(&opts)?;
                if !slurm.slurm {
                    return train_task(&plan, &out.join("runs"), task.unwrap_or(0));
                }
                let mut argv = vec!["paper".to_string(), "--budget".into(), budget.name().into()];
                argv.extend(data.iter().flat_map(|d| ["--data".to_string(), d.clone()]));
                argv.extend(["--device".to_string(), device.name().into()]);
                if extended {
                    argv.push("--extended".into());
                }
                let again = argv[1..].join(" ");
                return job_array(&slurm, &["paper", budget.name()], argv, plan.len(), &out, |out| {
                    format!("qat-lab paper {again} --out {} (it trains only what is missing)", out.display())
                });
            }
            let outcome = crate::paper::run(&opts)?;
            for c in &outcome.claims {
                println!("{} {}: {} — {}", c.id, c.title, c.verdict.name(), c.numbers);
            }
            println!(
                "report: {} ({} runs trained, {} reused)",
                outcome.report.display(),
                outcome.trained,
                outcome.reused
            );
            Ok(if outcome.stopped { ExitCode::from(130) } else { ExitCode::SUCCESS })
        }
        Command::Export { run, format: ExportFormat::Onnx, out } => {
            let trained = crate::export::Trained::load(&run)?;
            let bytes = trained.onnx()?;
            let path = out.unwrap_or_else(|| run.join(crate::export::ONNX_FILE));
            runs::write_atomic(&path, &bytes)?;
            println!(
                "{}: ONNX (opset 13, {}), {:.1} KiB",
                path.display(),
                if trained.net.stem.quant.is_some() { "QDQ, int8 weights with clipped ranges" } else { "float" },
                kib(bytes.len())
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Export { run, format: ExportFormat::Int, out } => {
            let trained = crate::export::Trained::load(&run)?;
            let model = trained.int_model()?;
            let path = out.unwrap_or_else(|| run.join(crate::export::INT_MODEL_FILE));
            let bytes = model.write(&path)?;
            let float = trained.float_bytes()?;
            println!(
                "{}: {} layers, {} weights, {:.1} KiB (float weights {:.1} KiB: {:.1}x smaller)",
                path.display(),
                model.layers().count(),
                model.weight_count(),
                kib(bytes),
                kib(float),
                float as f64 / bytes as f64
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval { run, int, data, batch, exact, onnx } => {
            crate::threads::configure(false);
            eval_run(&run, EvalWith { int, exact, onnx }, data, batch)
        }
        Command::Compare { runs: dirs, table } => {
            if dirs.is_empty() {
                bail!("name run folders to compare, e.g. qat-lab compare runs/<id-a> runs/<id-b>");
            }
            let records = compare_records(&dirs)?;
            if table {
                print_tables(&records);
                return Ok(ExitCode::SUCCESS);
            }
            let root = dirs[0].parent().map(PathBuf::from).unwrap_or_else(runs::default_root);
            open_lab(crate::ui::LabStart::Compare(records), root)
        }
        Command::Report { runs: root, figures } => {
            let scan = runs::scan(&root);
            if let Some(note) = scan.unreadable_note() {
                eprintln!("{note}");
            }
            if scan.records.is_empty() {
                bail!("no readable run records under {}: train some with `qat-lab run` or the lab", root.display());
            }
            print_tables(&scan.records);
            if figures {
                draw_figures(&scan.records, &root)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { batch, steps, warmup, rounds, device, arch, no_torch, only, ops } => {
            for (flag, v) in [("--batch", batch), ("--steps", steps), ("--rounds", rounds)] {
                if v == 0 {
                    bail!("{flag} 0 measures nothing; give at least 1 (defaults: --batch 128 --steps 10 --rounds 3)");
                }
            }
            crate::threads::configure(false);
            let Some(arch) = crate::config::Arch::ALL.into_iter().find(|a| a.name() == arch) else {
                bail!("unknown --arch {arch}; allowed: resnet8, resnet14, resnet20");
            };
            let device = device.kind();
            crate::bench::run(&crate::bench::BenchOptions {
                batch,
                steps,
                warmup,
                rounds,
                device,
                arch,
                torch: !no_torch,
                only,
                ops,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Data { action: DataAction::Fetch { dataset, dir, url } } => {
            use crate::data::{cifar, cifar_n, fetch};
            let (mut remote, default_dir, file, what) = match dataset.as_str() {
                "cifar10" => (fetch::cifar10(), cifar::CIFAR10.default_dir, cifar::CIFAR10.archive_name, "CIFAR-10"),
                "cifar100" => {
                    (fetch::cifar100(), cifar::CIFAR100.default_dir, cifar::CIFAR100.archive_name, "CIFAR-100")
                }
                "cifar10n" => (fetch::cifar10n(), cifar_n::DEFAULT_DIR, "CIFAR-10_human.pt", "CIFAR-10N's labels"),
                "cifar100n" => (fetch::cifar100n(), cifar_n::DEFAULT_DIR, "CIFAR-100_human.pt", "CIFAR-100N's labels"),
                _ => bail!(
                    "unknown dataset `{dataset}` to fetch; allowed: cifar10, cifar100, cifar10n, cifar100n (digits and shapes need no download)"
                ),
            };
            if let Some(u) = url {
                remote.url = u;
            }
            let dest = dir.unwrap_or_else(|| PathBuf::from(default_dir)).join(file);
            let path = fetch::download(&remote, &dest, std::io::stderr().is_terminal())?;
            println!(
                "{what} ready at {} ({} verified); presets read it from there",
                path.display(),
                remote.checksum.name()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `--device X` and `--data DIR` as the `--set` overrides they stand for (applied last).
/// `qat-lab eval`: the run's test accuracy, and with `int` its integer model's beside it.
/// What `eval` runs beside the lab's own evaluation.
struct EvalWith {
    int: bool,
    exact: bool,
    onnx: bool,
}

fn eval_run(run: &std::path::Path, with: EvalWith, data: Option<String>, batch: usize) -> Result<ExitCode> {
    let EvalWith { int, exact, onnx } = with;
    if exact && !int {
        bail!("--exact compares the integer model with an f64 evaluation: add --int");
    }
    if batch == 0 {
        bail!("--batch 0 evaluates nothing; give at least 1 (default 256)");
    }
    let trained = crate::export::Trained::load(run)?;
    let mut exp = trained.record.experiment.clone();
    if let Some(path) = data {
        exp.data.path = path;
    }
    let dataset =
        crate::data::load(&exp.data).context("loading the run's test set (pass --data PATH where it moved)")?;
    let test = &dataset.test;
    if test.labels.is_empty() {
        bail!("the run's test set is empty");
    }
    let model = if int {
        // Through the packed bytes, so that what runs is what `export` writes.
        let bytes = trained.int_model()?.to_bytes()?;
        Some((crate::export::int_model::IntModel::from_bytes(&bytes, "the packed model")?, bytes.len()))
    } else {
        None
    };
    if onnx && dataset.is_multi_label() {
        bail!("--onnx compares top-1 classes; {} is a multi-label run (its integer model: --int)", trained.record.id());
    }
    let onnx =
        if onnx { Some(crate::export::onnx_agreement(&trained, &test.images, &test.labels, batch)?) } else { None };
    let print_onnx = |o: &crate::export::OnnxAgreement| {
        for (how, f) in [("as written", &o.as_written), ("optimized", &o.optimized)] {
            println!(
                "  onnxruntime {} ({how}) {:.2}%   {:.0} images/s; same top-1 as qat-lab's evaluation on {:.2}%, largest logit difference {:.4}",
                o.version,
                f.acc * 100.0,
                f.images_per_sec,
                f.same_top1 * 100.0,
                f.max_logit_diff
            );
        }
        println!("  model.onnx: {:.1} KiB", kib(o.bytes));
    };
    let Some((model, bytes)) = model else {
        let eval = crate::train::trainer::evaluate(&trained.net, test, &dataset, &candle_core::Device::Cpu, None)?;
        println!(
            "{}: test {} {:.2}% on {} images (loss {:.4})",
            trained.record.id(),
            if dataset.is_multi_label() { "average F1" } else { "accuracy" },
            eval.acc * 100.0,
            test.labels.len(),
            eval.loss
        );
        onnx.iter().for_each(print_onnx);
        return Ok(ExitCode::SUCCESS);
    };
    let multi = dataset.is_multi_label();
    let truth =
        if multi { crate::export::Truth::Labels(&test.targets) } else { crate::export::Truth::Classes(&test.labels) };
    let a = crate::export::compare(&trained.net, &model, &test.images, truth, dataset.shape, batch, exact)?;
    let (metric, prediction) = if multi { ("average F1", "decision (image, AU)") } else { ("accuracy", "top-1") };
    let float = trained.float_bytes()?;
    println!(
        "{} on {} test images (CPU: {}; integer kernel: {})",
        trained.record.id(),
        a.images,
        crate::bench::cpu_model(),
        crate::export::infer::kernel_name()
    );
    println!("  fake-quant {metric}  {:.2}%   {:.0} images/s", a.fake_quant_acc * 100.0, a.fake_quant_images_per_sec);
    println!("  integer {metric}     {:.2}%   {:.0} images/s", a.int_acc * 100.0, a.int_images_per_sec);
    println!(
        "  same {prediction} on {:.2}%; {metric} differs by {:+.2} points; largest logit difference {:.4} (logits up to {:.2})",
        a.same_top1 * 100.0,
        (a.int_acc - a.fake_quant_acc) * 100.0,
        a.max_logit_diff,
        a.max_logit
    );
    if let Some(e) = a.exact {
        println!(
            "  f64 evaluation       {:.2}%   same {prediction} as the integer model on {:.2}%, as the fake-quant one on {:.2}%",
            e.acc * 100.0,
            e.int_same_top1 * 100.0,
            e.fake_quant_same_top1 * 100.0
        );
    }
    onnx.iter().for_each(print_onnx);
    println!(
        "  size: integer {:.1} KiB, float {:.1} KiB ({:.1}x smaller)",
        kib(bytes),
        kib(float),
        float as f64 / bytes as f64
    );
    if a.meets_bar() {
        println!("  agreement: meets the bar (same {prediction} on at least 99.5%, {metric} within 0.3 points)");
    } else {
        println!("  agreement: BELOW the bar (same {prediction} on at least 99.5%, {metric} within 0.3 points)");
    }
    Ok(ExitCode::SUCCESS)
}

fn with_shorthands(mut set: Vec<String>, device: Option<String>, data: Option<String>) -> Vec<String> {
    if let Some(d) = device {
        set.push(format!("train.device={d}"));
    }
    if let Some(p) = data {
        set.push(format!("data.path={p}"));
    }
    set
}

fn open_lab(start: crate::ui::LabStart, runs_root: PathBuf) -> Result<ExitCode> {
    if !std::io::stdout().is_terminal() {
        bail!(
            "the lab needs a terminal, but stdout is not one (a pipe or a file). For scripts use `qat-lab run PRESET` \
             (headless, see `qat-lab run --list`) or `qat-lab sweep`"
        );
    }
    crate::ui::run_lab(start, runs_root)?;
    Ok(ExitCode::SUCCESS)
}

fn exit_for(summary: &Summary) -> ExitCode {
    match summary.status {
        Status::Completed | Status::EarlyStopped => ExitCode::SUCCESS,
        Status::Stopped => ExitCode::from(130),
        _ => ExitCode::FAILURE,
    }
}

fn print_presets() {
    let presets = config::list_presets();
    if presets.is_empty() {
        println!("no presets found in {}", config::presets_dir().display());
    }
    for p in presets {
        let name = p.path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        match p.experiment {
            Ok(e) => println!("{name:<28} {}", e.description),
            Err(err) => println!("{name:<28} INVALID: {err}"),
        }
    }
}

/// Trains with a progress bar (or plain lines) on stderr; Ctrl-C stops the run cleanly and keeps its record.
pub fn run_headless(exp: &Experiment, out: &std::path::Path, plain: bool) -> Result<Summary> {
    let opts = RunOptions { runs_root: out.to_path_buf(), ..Default::default() };
    train_headless(exp, opts, plain)
}

/// `run --resume DIR`: goes on with a cut-short run from its checkpoint, in its own folder.
fn resume_headless(dir: &std::path::Path, plain: bool) -> Result<Summary> {
    let record = runs::load(dir)?;
    if record.is_result() {
        let status = record.summary.as_ref().map(|s| s.status.name()).unwrap_or_default();
        bail!("{} has already ended ({status}): there is nothing to resume", dir.display());
    }
    let opts = RunOptions {
        runs_root: dir.parent().map(PathBuf::from).unwrap_or_default(),
        resume: Some(dir.to_path_buf()),
        ..Default::default()
    };
    train_headless(&record.experiment, opts, plain)
}

fn train_headless(exp: &Experiment, mut opts: RunOptions, plain: bool) -> Result<Summary> {
    opts.batch_events_every = if plain { 0 } else { 1 };
    let (control, mut rx, handle) = train::spawn(exp.clone(), opts);
    crate::signals::install();
    crate::signals::register(&control);
    let bar =
        if plain { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(exp.train.epochs as u64) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:25}] epoch {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{} [{}]", exp.name, exp.method_label()));
    let say = |line: String| {
        if plain {
            eprintln!("{line}")
        } else {
            bar.println(line)
        }
    };
    let mut last_epoch_line = String::new();
    while let Some(event) = rx.blocking_recv() {
        match event {
            TrainEvent::Started(info) => {
                say(format!(
                    "run {} -> {}\n{} ({} train / {} val / {} test), noise {:.0}% requested, {:.1}% of labels wrong; {} parameters, {:.1}M MACs/image",
                    info.run_id,
                    info.dir.display(),
                    info.dataset,
                    info.train_size,
                    info.val_size,
                    info.test_size,
                    info.noise_rate * 100.0,
                    info.measured_noise_rate * 100.0,
                    info.params,
                    info.macs as f64 / 1e6
                ));
            }
            TrainEvent::Batch(b) => {
                bar.set_message(format!(
                    "batch {}/{} loss {:.3} {:.0} img/s {}",
                    b.batch, b.batches, b.loss, b.images_per_sec, last_epoch_line
                ));
            }
            TrainEvent::Epoch(m) => {
                last_epoch_line = format!(
                    "| train {:.3} eval {:.3} acc {:.1}% memorised {:.1}%",
                    m.train_loss,
                    m.eval_loss,
                    m.eval_acc * 100.0,
                    m.memorized * 100.0
                );
                if plain {
                    eprintln!(
                        "epoch {:>3}: train loss {:.4}  eval loss {:.4}  eval acc {:.2}%  memorised {:.1}%  clean fit {:.1}%  gap {:+.3}  {:.0} img/s",
                        m.epoch,
                        m.train_loss,
                        m.eval_loss,
                        m.eval_acc * 100.0,
                        m.memorized * 100.0,
                        m.clean_fit * 100.0,
                        m.gap,
                        m.images_per_sec
                    );
                }
                bar.set_position(m.epoch as u64);
                bar.set_message(last_epoch_line.clone());
            }
            TrainEvent::Log(msg) => say(msg),
            TrainEvent::Finished(_) => break,
        }
    }
    bar.finish_and_clear();
    crate::signals::unregister(&control);
    handle.join().map_err(|_| anyhow::anyhow!("the training thread panicked"))
}

fn print_summary(s: &Summary) {
    println!(
        "\n== {} [{}]: {} after {} epochs in {:.1}s ==",
        s.name,
        s.label,
        s.status.name(),
        s.epochs_run,
        s.wall_secs
    );
    if let Some(msg) = &s.message {
        println!("   {msg}");
    }
    if let Some(m) = &s.last {
        println!(
            "   last epoch:  eval acc {:.2}%  eval loss {:.4}  train loss {:.4}  gap {:+.3}  memorised {:.1}%  {:.0} img/s",
            m.eval_acc * 100.0,
            m.eval_loss,
            m.train_loss,
            m.gap,
            m.memorized * 100.0,
            m.images_per_sec
        );
    }
    if let Some(b) = &s.best {
        println!("   best epoch:  {} with eval acc {:.2}% (looks at the test set)", b.epoch, b.eval_acc * 100.0);
    }
    if let (Some(e), Some(acc)) = (s.restored_epoch, s.final_eval_acc) {
        println!("   kept weights of epoch {e} (best validation): eval acc {:.2}%", acc * 100.0);
    }
    if s.params == 0 {
        return; // it ended before the data and the model existed
    }
    println!(
        "   noise: {:.0}% requested, {:.1}% of labels wrong; {} parameters{}",
        s.noise_rate * 100.0,
        s.measured_noise_rate * 100.0,
        s.params,
        match (s.pruned_params, s.pruned_macs) {
            (Some(p), Some(m)) => format!(" ({p} after pruning, {:.1}x fewer MACs)", s.macs as f64 / m.max(1) as f64),
            _ => String::new(),
        }
    );
    if let Some(size) = &s.size {
        println!("   size: {}", size.describe());
    }
    if !s.run_id.is_empty() {
        println!("   record: {}", s.run_id);
    }
}

/// The distinct experiments of a sweep, in grid order (every combination validated).
fn sweep_plan(preset: &str, vary: &[String], set: &[String]) -> Result<Vec<Experiment>> {
    let path = config::resolve_preset(preset);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut axes = config::sweep_axes(&text, &path.display().to_string())?;
    for v in vary {
        let (key, values) = v
            .split_once('=')
            .with_context(|| format!("--vary {v}: expected KEY=V1,V2,... e.g. data.noise.rate=0,0.2,0.4"))?;
        let values: Vec<String> = values.split(',').map(|s| s.trim().to_string()).collect();
        match axes.iter_mut().find(|(k, _)| k == key) {
            Some(axis) => axis.1 = values,
            None => axes.push((key.to_string(), values)),
        }
    }
    if axes.is_empty() {
        bail!("{} has no [sweep] table and no --vary was given: nothing to sweep", path.display());
    }
    // `regularizer.kind` first, so that the other regularizer keys apply to the chosen kind.
    axes.sort_by_key(|(k, _)| k != "regularizer.kind");
    let mut grid: Vec<Vec<String>> = vec![Vec::new()];
    for (key, values) in &axes {
        let mut next = Vec::new();
        for base in &grid {
            for value in values {
                let mut o = base.clone();
                o.push(format!("{key}={value}"));
                next.push(o);
            }
        }
        grid = next;
    }
    for o in &mut grid {
        o.extend(set.iter().cloned());
    }
    // Validate every combination before training any.
    let mut exps: Vec<Experiment> = Vec::new();
    for o in &grid {
        let exp = Experiment::from_toml(&text, &path.display().to_string(), o)?;
        if !exps.contains(&exp) {
            exps.push(exp);
        }
    }
    Ok(exps)
}

fn sweep(exps: &[Experiment], out: &std::path::Path, parallel: usize, task: Option<usize>) -> Result<ExitCode> {
    if let Some(task) = task {
        return train_task(exps, out, task);
    }
    eprintln!("sweep: {} runs", exps.len());
    let progress = std::io::stderr().is_terminal();
    let opts = crate::runner::RunnerOptions { parallel, progress, ..Default::default() };
    let outcome = crate::runner::run(exps, out, &opts)?;
    let records = outcome.finished();
    if outcome.stopped {
        eprintln!("stopped: {} of {} runs finished; the same command goes on from there", records.len(), exps.len());
    }
    print_tables(&records);
    Ok(if outcome.stopped { ExitCode::from(130) } else { ExitCode::SUCCESS })
}

/// One task of a job array: trains grid point `task` of `plan` into `out` (or resumes it, or finds it
/// finished and exits at once).
fn train_task(plan: &[Experiment], out: &std::path::Path, task: usize) -> Result<ExitCode> {
    crate::slurm::check_task(task, plan.len())?;
    let opts = crate::runner::RunnerOptions { first_index: task, ..Default::default() };
    let outcome = crate::runner::run(std::slice::from_ref(&plan[task]), out, &opts)?;
    let exp = &plan[task];
    match outcome.records.first().cloned().flatten() {
        Some(r) => {
            let s = r.summary.as_ref();
            println!(
                "task {task} ({} [{}]): {} in {}{}",
                exp.name,
                exp.method_label(),
                s.map(|s| s.status.name()).unwrap_or_default(),
                r.dir.display(),
                if outcome.trained == 0 { ", already finished" } else { "" }
            );
            Ok(if r.finished_ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        None if outcome.stopped => {
            println!(
                "task {task} ({} [{}]): stopped; it resumes from its checkpoint when run again",
                exp.name,
                exp.method_label()
            );
            Ok(ExitCode::from(130))
        }
        None => {
            let why = outcome.summaries.first().and_then(|s| s.message.clone()).unwrap_or_default();
            bail!("task {task} ({} [{}]) did not finish: {why}", exp.name, exp.method_label())
        }
    }
}

/// `--slurm`: writes the job-array script of `tasks` tasks, each running `qat-lab <argv> --out OUT
/// --task $SLURM_ARRAY_TASK_ID`, and submits it when asked.
fn job_array(
    slurm: &crate::slurm::SlurmArgs,
    name: &[&str],
    mut argv: Vec<String>,
    tasks: usize,
    out: &std::path::Path,
    afterwards: impl Fn(&std::path::Path) -> String,
) -> Result<ExitCode> {
    slurm.validate()?;
    let workdir = std::env::current_dir().context("reading the current folder")?;
    let out = workdir.join(out);
    let exe = std::env::current_exe().context("finding the qat-lab binary")?;
    argv.insert(0, exe.display().to_string());
    argv.extend(["--out".to_string(), out.display().to_string()]);
    let job =
        crate::slurm::ArrayJob { name: crate::slurm::job_name(name), tasks, command: argv, out: out.clone(), workdir };
    let script = slurm.write(&job)?;
    println!("wrote {} ({tasks} array tasks, one per run; logs in {}/slurm/)", script.display(), out.display());
    if slurm.submit {
        let id = crate::slurm::submit(&script)?;
        println!("submitted job {id}: follow it with `squeue -j {id}`; results land in {}", out.display());
    } else {
        println!("submit it with: sbatch {}", script.display());
    }
    println!(
        "watch finished and running runs with `qat-lab compare {}` (r reloads); when the array is done: {}",
        out.display(),
        afterwards(&out)
    );
    Ok(ExitCode::SUCCESS)
}

/// The runs named on `compare`'s command line: run folders, or folders of them (a sweep's out folder).
fn compare_records(dirs: &[PathBuf]) -> Result<Vec<runs::RunRecord>> {
    let mut records = Vec::new();
    for d in dirs {
        if d.join(runs::EXPERIMENT_FILE).is_file() {
            records.push(runs::load(d)?);
            continue;
        }
        let scan = runs::scan(d);
        if let Some(note) = scan.unreadable_note() {
            eprintln!("{note}");
        }
        if scan.records.is_empty() {
            bail!("{} is neither a run folder nor a folder of runs", d.display());
        }
        records.extend(scan.records);
    }
    Ok(records)
}

/// The comparison table, then accuracy vs noise rate, then (multi-label runs) the Table-1 layout.
fn print_tables(records: &[runs::RunRecord]) {
    println!("{}", crate::report::comparison_table(records));
    println!("{}", crate::report::noise_sweep_table(records));
    let left_out = crate::report::left_out_of_means(records);
    if !left_out.is_empty() {
        println!("{left_out}\n");
    }
    let names = records.iter().find(|r| r.experiment.data.dataset.is_multi_label()).map(|r| r.label_names());
    let t1 = crate::report::table1(records, &names.unwrap_or_default());
    if !t1.is_empty() {
        println!("{t1}");
    }
}
