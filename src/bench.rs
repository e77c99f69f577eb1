//! `qat-lab bench`: steady-state training and eval throughput of ResNet-20 (float and W4/A4 QAT) at a
//! given batch size, peak memory, and — when PyTorch is installed — the same configurations in PyTorch
//! (float and the W4/A4 networks), measured in the same invocation, with the ratios.

use crate::config::{Arch, DeviceKind, Quantization, Regularizer};
use crate::model::resnet::NetSpec;
use crate::model::ResNet;
use crate::ops::cpu::conv::{self, Geometry};
use crate::threads;
use crate::train::optim::Adam;
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub batch: usize,
    /// Timed training steps per round (after warm-up).
    pub steps: usize,
    /// Rounds: every configuration is timed once per round, round-robin, and the median is reported,
    /// so that a slow spell of the machine (shared vCPUs drift by ±5%) hits them all alike.
    pub rounds: usize,
    pub warmup: usize,
    pub device: DeviceKind,
    pub arch: Arch,
    /// Run the bundled PyTorch reference when `python3 -c 'import torch'` works.
    pub torch: bool,
    /// Measure only this configuration (`float`, `w4a4-fold`, `w4a4-keep`); all when `None`.
    pub only: Option<String>,
    /// Also time each convolution kernel of the network on its own (CPU): the per-op breakdown.
    pub ops: bool,
}

/// One measured configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub name: String,
    pub train_images_per_sec: f64,
    pub eval_images_per_sec: f64,
}

fn sync(device: &Device) -> Result<()> {
    device.synchronize()?;
    Ok(())
}

/// One network configuration on random data, built and warmed up once, then timed in rounds.
struct Subject {
    name: String,
    net: ResNet,
    opt: Adam,
    x: Tensor,
    y: Tensor,
}

impl Subject {
    fn new(name: &str, reg: &Regularizer, opts: &BenchOptions, device: &Device) -> Result<Self> {
        let mut spec = NetSpec { arch: opts.arch, width: 1.0, input: [3, 32, 32], outputs: 10, per_label_heads: false };
        let wiring = crate::methods::wiring(reg, &mut spec);
        let net = ResNet::new(spec, &wiring, device, 0);
        let opt = Adam::new(&net.params.entries, 1e-3, 0.0)?;
        let x = Tensor::randn(0f32, 1.0, (opts.batch, 3, 32, 32), device)?;
        let labels: Vec<u32> = (0..opts.batch as u32).map(|i| i % 10).collect();
        let y = Tensor::new(labels.as_slice(), device)?;
        let mut subject = Subject { name: name.into(), net, opt, x, y };
        for _ in 0..opts.warmup.max(1) {
            subject.step()?;
            subject.net.forward(&subject.x, false)?;
        }
        sync(device)?;
        Ok(subject)
    }

    /// One training step, run as the trainer runs it ([`threads::compute`]).
    fn step(&mut self) -> Result<()> {
        let device = self.x.device().clone();
        threads::compute(&device, || -> Result<()> {
            let logits = self.net.forward(&self.x, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &self.y)?;
            Ok(self.opt.step(&loss.backward()?)?)
        })
    }

    /// Training images per second over `steps` steps.
    fn train(&mut self, steps: usize, device: &Device) -> Result<f64> {
        let t = Instant::now();
        for _ in 0..steps {
            self.step()?;
        }
        sync(device)?;
        Ok((steps * self.x.dim(0)?) as f64 / t.elapsed().as_secs_f64())
    }

    /// Eval (inference) images per second over `batches` forward passes.
    fn eval(&self, batches: usize, device: &Device) -> Result<f64> {
        let t = Instant::now();
        for _ in 0..batches {
            threads::compute(device, || self.net.forward(&self.x, false))?;
        }
        sync(device)?;
        Ok((batches * self.x.dim(0)?) as f64 / t.elapsed().as_secs_f64())
    }
}

/// The median of some measurements (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Times every configuration once per round, round-robin, and reports each one's median.
fn measure_all(configs: &[(&str, Regularizer)], opts: &BenchOptions, device: &Device) -> Result<Vec<BenchResult>> {
    let mut subjects =
        configs.iter().map(|(name, reg)| Subject::new(name, reg, opts, device)).collect::<Result<Vec<_>>>()?;
    let mut rates = vec![(Vec::new(), Vec::new()); subjects.len()];
    for _ in 0..opts.rounds.max(1) {
        for (subject, (train, eval)) in subjects.iter_mut().zip(&mut rates) {
            train.push(subject.train(opts.steps, device)?);
            eval.push(subject.eval(opts.steps * 2, device)?);
        }
    }
    Ok(subjects
        .iter()
        .zip(rates)
        .map(|(s, (train, eval))| BenchResult {
            name: s.name.clone(),
            train_images_per_sec: median(train),
            eval_images_per_sec: median(eval),
        })
        .collect())
}

/// The convolutions of a CIFAR ResNet (stem, then three stages of 16/32/64 channels at 32/16/8 pixels)
/// at batch `n`, each with how many times it occurs.
fn conv_shapes(arch: Arch, n: usize) -> Vec<(Geometry, usize)> {
    let blocks = arch.blocks_per_stage();
    let conv = |c, h, o, stride| Geometry { n, c, h, w: h, o, k: 3, stride, pad: 1 };
    vec![
        (conv(3, 32, 16, 1), 1),
        (conv(16, 32, 16, 1), 2 * blocks),
        (conv(16, 32, 32, 2), 1),
        (conv(32, 16, 32, 1), 2 * blocks - 1),
        (conv(32, 16, 64, 2), 1),
        (conv(64, 8, 64, 1), 2 * blocks - 1),
    ]
}

/// Median milliseconds of `f` over a few runs (after one warm-up run).
fn time_ms(mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..15)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

/// Deterministic input, weight and output gradient of a convolution, each within ±1 (for the per-op
/// timings).
fn sample_data(g: &Geometry) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let values = |len: usize, period: usize, scale: f32| -> Vec<f32> {
        (0..len).map(|i| ((i % period) as f32 - (period / 2) as f32) / scale).collect()
    };
    let (x, w) = (values(g.n * g.c * g.h * g.w, 97, 50.0), values(g.o * g.c * g.k * g.k, 13, 20.0));
    (x, w, values(g.n * g.o * g.oh() * g.ow(), 31, 30.0))
}

/// The per-op breakdown: every convolution of the network timed on its own (forward; backward, i.e.
/// input and weight gradient), its GFLOP/s, and its share of a measured training step.
fn print_conv_breakdown(opts: &BenchOptions, step: &str, step_ms: f64) {
    println!("\nconvolution kernels, batch {} (median of 15; GFLOP/s counts a multiply-add as 2)", opts.batch);
    println!(
        "{:<24} {:>5} {:>9} {:>13} {:>10} {:>18} {:>11}",
        "C->O, size, stride", "count", "fwd ms", "dX + dW ms", "(dW ms)", "GFLOP/s fwd / bwd", "ms per step"
    );
    let mut total = 0.0;
    for (g, count) in conv_shapes(opts.arch, opts.batch) {
        let (x, w, dy) = sample_data(&g);
        let fwd = time_ms(|| drop(conv::forward(g, None, &x, &w, None)));
        // The stem's input is the image: no input gradient is computed for it.
        let want_dx = g.c != 3;
        let backward = |want_dx| {
            time_ms(|| {
                drop(conv::backward(g, None, conv::OutputGrad::Given(&dy), (&x, &w), want_dx, conv::WeightGrad::Given))
            })
        };
        let (bwd, dw) = (backward(want_dx), backward(false));
        let flop = 2.0 * (g.n * g.o * g.c * g.k * g.k * g.oh() * g.ow()) as f64;
        let bwd_flop = if want_dx { 2.0 * flop } else { flop };
        let per_step = (fwd + bwd) * count as f64;
        total += per_step;
        println!(
            "{:<24} {:>5} {:>9.2} {:>13.2} {:>10.2} {:>18} {:>11.1}",
            format!("{}->{}, {}x{}, s{}", g.c, g.o, g.h, g.w, g.stride),
            count,
            fwd,
            bwd,
            dw,
            format!("{:.0} / {:.0}", flop / fwd / 1e6, bwd_flop / bwd / 1e6),
            per_step
        );
    }
    println!(
        "convolutions: {total:.0} ms of a {step_ms:.0} ms {step} training step ({:.0}%); the rest is batch norm, \
         element-wise ops, autograd and the optimiser",
        100.0 * total / step_ms
    );
}

/// The fused training layers (convolution + batch norm + ReLU, forward and backward) of every
/// convolution timed on their own, float against W4/A4 with batch norm kept and folded: where the
/// QAT cost of a training step comes from, layer by layer.
fn print_layer_breakdown(opts: &BenchOptions) {
    use crate::ops::cpu::conv_bn::{layer_round_trip, LayerKind};
    println!("\nfused training layers (conv + BN + ReLU, forward and backward), ms, median of 15 interleaved");
    println!(
        "{:<24} {:>5} {:>9} {:>13} {:>13} {:>18}",
        "C->O, size, stride", "count", "float", "W4/A4 keep", "W4/A4 fold", "fold ms per step"
    );
    let kinds = [LayerKind::Float, LayerKind::QuantKeep, LayerKind::QuantFold];
    let mut totals = [0.0; 3];
    for (g, count) in conv_shapes(opts.arch, opts.batch) {
        let (x, w, dy) = sample_data(&g);
        let gb: Vec<f32> = (0..2 * g.o).map(|i| if i < g.o { 1.0 } else { 0.1 }).collect();
        // Interleaved, so that the machine's drift over a layer's timings falls on all three alike.
        let mut runs: [Vec<f64>; 3] = Default::default();
        for repeat in 0..16 {
            for (kind, times) in kinds.iter().zip(&mut runs) {
                let t = Instant::now();
                layer_round_trip(*kind, g, (&x, &w, &gb, &dy));
                // The first round warms up.
                if repeat > 0 {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let ms = runs.map(median);
        for (total, ms) in totals.iter_mut().zip(ms) {
            *total += ms * count as f64;
        }
        println!(
            "{:<24} {:>5} {:>9.2} {:>13} {:>13} {:>18.1}",
            format!("{}->{}, {}x{}, s{}", g.c, g.o, g.h, g.w, g.stride),
            count,
            ms[0],
            relative(ms[1], ms[0]),
            relative(ms[2], ms[0]),
            ms[2] * count as f64
        );
    }
    println!(
        "layers per step: float {:.0} ms, keep {:.0} ms ({:+.0}%), fold {:.0} ms ({:+.0}%)",
        totals[0],
        totals[1],
        percent_change(totals[1], totals[0]),
        totals[2],
        percent_change(totals[2], totals[0])
    );
}

/// `ms` and its change from `base`, e.g. `2.41 (+38%)`.
fn relative(ms: f64, base: f64) -> String {
    format!("{ms:.2} ({:+.0}%)", percent_change(ms, base))
}

/// How much `value` differs from `base`, in percent of `base`.
fn percent_change(value: f64, base: f64) -> f64 {
    100.0 * (value / base - 1.0)
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Runs the bundled PyTorch reference script for `configs` (float, w4a4-fold, w4a4-keep); `None` when
/// torch is not importable.
pub fn torch_reference(opts: &BenchOptions, configs: &[&str]) -> Option<String> {
    // Beside the working directory (a copied checkout), else in the source tree this was built from.
    let local = std::path::PathBuf::from("benches/torch_reference.py");
    let script = if local.is_file() {
        local
    } else {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/torch_reference.py")
    };
    let ok = std::process::Command::new("python3").args(["-c", "import torch"]).output().ok()?.status.success();
    if !ok {
        return None;
    }
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "0".into());
    let out = std::process::Command::new("python3")
        .arg(script)
        .args([
            "--batch",
            &opts.batch.to_string(),
            "--steps",
            &opts.steps.to_string(),
            "--warmup",
            &opts.warmup.to_string(),
            "--rounds",
            &opts.rounds.to_string(),
        ])
        .args(["--threads", &threads, "--depth", &(6 * opts.arch.blocks_per_stage() + 2).to_string()])
        .args(["--device", if opts.device == DeviceKind::Cuda { "cuda" } else { "cpu" }])
        .args(["--configs", &configs.join(",")])
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

/// Parses `name train eval` lines printed by the reference script.
pub fn parse_reference(text: &str) -> Vec<BenchResult> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let tag = it.next()?;
            if tag != "RESULT" {
                return None;
            }
            let name = it.next()?.to_string();
            let train = it.next()?.parse().ok()?;
            let eval = it.next()?.parse().ok()?;
            Some(BenchResult { name, train_images_per_sec: train, eval_images_per_sec: eval })
        })
        .collect()
}

/// The configuration a reference result measured: `torch-<layout>` is float, `torch-<config>-<layout>`
/// a QAT one (the layouts are `nchw` and `channels_last`).
pub fn reference_config(name: &str) -> &str {
    let rest = name.strip_prefix("torch-").unwrap_or(name);
    rest.rsplit_once('-').map_or("float", |(config, _)| config)
}

/// The best (highest) train and eval rates among the reference results of configuration `config`.
fn best_reference(refs: &[BenchResult], config: &str) -> Option<(f64, f64)> {
    let of = refs.iter().filter(|r| reference_config(&r.name) == config);
    let best = of.fold((0f64, 0f64), |(t, e), r| (t.max(r.train_images_per_sec), e.max(r.eval_images_per_sec)));
    (best.0 > 0.0).then_some(best)
}

/// Prints the reference's results beside ours: each against our figures of the same configuration,
/// then our configurations against PyTorch's best layout of the same configuration and of float.
fn print_reference(ours: &[BenchResult], refs: &[BenchResult]) {
    println!("\n{:<30} {:>12} {:>12} {:>11} {:>11}", "PyTorch", "train img/s", "eval img/s", "ours/train", "ours/eval");
    for r in refs {
        let Some(mine) = ours.iter().find(|o| o.name == reference_config(&r.name)) else { continue };
        println!(
            "{:<30} {:>12.0} {:>12.0} {:>10.2}x {:>10.2}x",
            r.name,
            r.train_images_per_sec,
            r.eval_images_per_sec,
            mine.train_images_per_sec / r.train_images_per_sec,
            mine.eval_images_per_sec / r.eval_images_per_sec
        );
    }
    let ratios = |against: &dyn Fn(&BenchResult) -> Option<(f64, f64)>| -> Vec<String> {
        ours.iter()
            .filter_map(|o| {
                let (train, eval) = against(o)?;
                Some(format!(
                    "{} train {:.2}x eval {:.2}x",
                    o.name,
                    o.train_images_per_sec / train,
                    o.eval_images_per_sec / eval
                ))
            })
            .collect()
    };
    let same = ratios(&|o| best_reference(refs, &o.name));
    if !same.is_empty() {
        println!("ratio vs PyTorch's best layout of the same configuration: {}", same.join(", "));
    }
    let float = ratios(&|_| best_reference(refs, "float"));
    if !float.is_empty() {
        println!("ratio vs PyTorch's best layout in float: {}", float.join(", "));
    }
}

/// Integer inference of the W4/A4 and W8/A8 networks (`--arch`, BN folded, first/last layers 8-bit) beside the
/// fake-quant float eval of the same network, at batch 1 and 256: images per second, median
/// of the rounds. The networks are untrained (their input scales set by the warm-up batches): speed
/// does not depend on the weights' values.
fn integer_inference(opts: &BenchOptions) -> Result<()> {
    use crate::export::{infer::IntNetwork, int_model::IntModel};
    let device = Device::Cpu;
    println!(
        "\ninteger inference (kernel: {}), images/s, median of {} rounds",
        crate::export::infer::kernel_name(),
        opts.rounds.max(1)
    );
    println!(
        "{:<12} {:>8} {:>16} {:>16} {:>8} {:>16}",
        "network", "batch", "fake-quant eval", "integer", "ratio", "onnxruntime"
    );
    let onnx_dir = tempfile::tempdir()?;
    let mut ort_note = None;
    for (name, bits) in [("w4a4", 4), ("w8a8", 8)] {
        let reg = Regularizer::Quantization(Quantization {
            weight_bits: bits,
            act_bits: bits,
            first_last_bits: 8,
            bn: crate::config::BnMode::Fold,
            ema_momentum: 0.9,
        });
        let one = BenchOptions { batch: opts.batch.min(64), ..opts.clone() };
        let subject = Subject::new(name, &reg, &one, &device)?;
        let model = IntModel::from_network(&subject.net, "bench")?;
        let network = IntNetwork::new(&model);
        let onnx_path = onnx_dir.path().join(format!("{name}.onnx"));
        std::fs::write(&onnx_path, crate::export::onnx::to_bytes(&subject.net, Some(&model), (3, 32, 32), name)?)?;
        // The batches the issue of record asks for: one image (latency) and 256 (throughput).
        for batch in [1, 256] {
            let x = Tensor::randn(0f32, 1.0, (batch, 3, 32, 32), &device)?;
            let images = x.flatten_all()?.to_vec1::<f32>()?;
            // About as many images per round as the training figures use, and at least 8 batches.
            let batches = (opts.steps * opts.batch / batch).clamp(8, 2000);
            let (mut float, mut int) = (Vec::new(), Vec::new());
            for _ in 0..opts.rounds.max(1) {
                let t = Instant::now();
                for _ in 0..batches {
                    threads::compute(&device, || subject.net.forward(&x, false))?;
                }
                float.push((batches * batch) as f64 / t.elapsed().as_secs_f64());
                let t = Instant::now();
                for _ in 0..batches {
                    std::hint::black_box(network.forward(&images, batch, (3, 32, 32)));
                }
                int.push((batches * batch) as f64 / t.elapsed().as_secs_f64());
            }
            let (float, int) = (median(float), median(int));
            // onnxruntime (optimized graph, as deployed) on the exported file, over as many images.
            let all: Vec<f32> = images.iter().copied().cycle().take(images.len() * batches.min(64)).collect();
            let ort = match crate::export::onnx::run_onnxruntime(
                &onnx_path,
                &all,
                batch * batches.min(64),
                (3, 32, 32),
                batch,
                true,
            ) {
                Ok(run) => format!("{:.0}", run.images_per_sec),
                Err(e) => {
                    ort_note.get_or_insert_with(|| format!("onnxruntime: skipped ({e:#})"));
                    "-".into()
                }
            };
            println!("{name:<12} {batch:>8} {float:>16.0} {int:>16.0} {:>7.2}x {ort:>16}", int / float);
        }
    }
    if let Some(note) = ort_note {
        println!("{note}");
    }
    Ok(())
}

/// The CPU's model name from /proc/cpuinfo ("unknown CPU" elsewhere).
pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The CPU's model, the vector extensions the kernels can use and its cache sizes, so that every
/// figure says where it came from.
pub fn cpu_description() -> String {
    let mut isa: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        let detected = [
            ("avx2", std::is_x86_feature_detected!("avx2")),
            ("fma", std::is_x86_feature_detected!("fma")),
            ("avx512f", std::is_x86_feature_detected!("avx512f")),
            ("avx512bw", std::is_x86_feature_detected!("avx512bw")),
            ("avx512vnni", std::is_x86_feature_detected!("avx512vnni")),
            ("avx512bf16", std::is_x86_feature_detected!("avx512bf16")),
            ("avx512fp16", std::is_x86_feature_detected!("avx512fp16")),
        ];
        isa.extend(detected.iter().filter(|(_, on)| *on).map(|(name, _)| *name));
    }
    let isa = if isa.is_empty() { "baseline".to_string() } else { isa.join(" ") };
    format!("{}; {isa}; {}", cpu_model(), crate::ops::cpu::caches::description())
}

/// The `bench` command: prints a table of figures and ratios.
pub fn run(opts: &BenchOptions) -> Result<()> {
    let device = crate::train::trainer::device_for(opts.device)?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "?".into());
    println!("CPU: {}", cpu_description());
    println!(
        "ResNet-{} on 3x32x32, batch {}, median of {} interleaved rounds of {} timed steps after {} warm-up, \
         device {:?}, {} threads",
        6 * opts.arch.blocks_per_stage() + 2,
        opts.batch,
        opts.rounds.max(1),
        opts.steps,
        opts.warmup,
        opts.device,
        threads
    );
    let q = Regularizer::Quantization(Quantization {
        weight_bits: 4,
        act_bits: 4,
        first_last_bits: 8,
        bn: crate::config::BnMode::Fold,
        ema_momentum: 0.9,
    });
    let q_keep = Regularizer::Quantization(Quantization {
        weight_bits: 4,
        act_bits: 4,
        first_last_bits: 8,
        bn: crate::config::BnMode::Keep,
        ema_momentum: 0.9,
    });
    let configs: Vec<(&str, Regularizer)> = [("float", Regularizer::None), ("w4a4-fold", q), ("w4a4-keep", q_keep)]
        .into_iter()
        .filter(|(name, _)| opts.only.as_deref().is_none_or(|o| o == *name))
        .collect();
    if configs.is_empty() {
        anyhow::bail!("--only must be one of float, w4a4-fold, w4a4-keep");
    }
    let ours = measure_all(&configs, opts, &device)?;
    println!("\n{:<22} {:>14} {:>14}", "qat-lab (candle)", "train img/s", "eval img/s");
    for r in &ours {
        println!("{:<22} {:>14.0} {:>14.0}", r.name, r.train_images_per_sec, r.eval_images_per_sec);
    }
    let float = &ours[0];
    for r in ours.iter().skip(1) {
        println!(
            "QAT cost ({}): train {:+.1}%, eval {:+.1}% vs float",
            r.name,
            // A rate's inverse is the time: float's rate over this one's is this one's time over float's.
            percent_change(float.train_images_per_sec, r.train_images_per_sec),
            percent_change(float.eval_images_per_sec, r.eval_images_per_sec)
        );
    }
    if let Some(mib) = peak_memory_mib() {
        println!("peak memory (VmHWM): {mib:.0} MiB");
    }
    if opts.device == DeviceKind::Cuda {
        match crate::ops::gpu_peak_memory(0) {
            Some(bytes) => {
                println!("peak GPU memory (memory pool high-water mark): {:.0} MiB", bytes as f64 / 1048576.0)
            }
            None => println!("peak GPU memory: not reported by the driver"),
        }
    }
    if opts.ops {
        if opts.device != DeviceKind::Cpu {
            println!("\n--ops times the CPU kernels; it is skipped on {:?}", opts.device);
        } else {
            print_conv_breakdown(opts, &ours[0].name, 1e3 * opts.batch as f64 / ours[0].train_images_per_sec);
            print_layer_breakdown(opts);
        }
    }
    if opts.device == DeviceKind::Cpu && opts.only.is_none() {
        integer_inference(opts)?;
    }
    if opts.torch {
        let names: Vec<&str> = ours.iter().map(|r| r.name.as_str()).collect();
        match torch_reference(opts, &names) {
            None => println!(
                "\nPyTorch reference: skipped (`python3 -c 'import torch'` fails; see BENCHMARKS.md to install it)"
            ),
            Some(text) => {
                let refs = parse_reference(&text);
                if refs.is_empty() {
                    println!("\nPyTorch reference failed:\n{text}");
                }
                print_reference(&ours, &refs);
                // Configurations the reference could not build (an older PyTorch, say), with why.
                text.lines().filter(|l| l.starts_with("SKIPPED")).for_each(|l| println!("{l}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, train: f64, eval: f64) -> BenchResult {
        BenchResult { name: name.into(), train_images_per_sec: train, eval_images_per_sec: eval }
    }

    #[test]
    fn reference_names_map_to_configurations() {
        assert_eq!(reference_config("torch-nchw"), "float");
        assert_eq!(reference_config("torch-channels_last"), "float");
        assert_eq!(reference_config("torch-w4a4-fold-nchw"), "w4a4-fold");
        assert_eq!(reference_config("torch-w4a4-keep-channels_last"), "w4a4-keep");
    }

    #[test]
    fn the_best_layout_is_taken_per_configuration() {
        let text = "noise\nRESULT torch-nchw 800 3000\nRESULT torch-channels_last 1000 2900\n\
                    RESULT torch-w4a4-keep-nchw 500 1500\nRESULT torch-w4a4-keep-channels_last 600 1400\n";
        let refs = parse_reference(text);
        assert_eq!(refs.len(), 4);
        assert_eq!(best_reference(&refs, "float"), Some((1000.0, 3000.0)));
        assert_eq!(best_reference(&refs, "w4a4-keep"), Some((600.0, 1500.0)));
        assert_eq!(best_reference(&refs, "w4a4-fold"), None);
        // Printing with a configuration the reference lacks skips it rather than failing.
        print_reference(&[result("float", 1100.0, 3300.0), result("w4a4-fold", 700.0, 3000.0)], &refs);
    }
}
