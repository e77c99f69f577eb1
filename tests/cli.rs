//! The binary as a user runs it: headless runs, presets, overrides, sweeps, reports and clear errors.

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn qat_lab(args: &[&str], runs: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qat-lab"))
        .args(args)
        .env("QAT_LAB_RUNS", runs)
        .env("RAYON_NUM_THREADS", "2")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .output()
        .expect("run qat-lab")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn lists_presets_one_line_each() {
    let tmp = tempfile::tempdir().unwrap();
    let o = qat_lab(&["run", "--list"], tmp.path());
    assert!(o.status.success());
    let out = text(&o);
    for name in ["demo-digits", "fig1-baseline", "fig1-w4a4", "fig2-noise-sweep", "fig3-quant-bits"] {
        assert!(out.lines().any(|l| l.starts_with(name)), "{name} missing from:\n{out}");
    }
    assert!(!out.contains("INVALID"), "{out}");
}

#[test]
fn a_headless_run_writes_its_record_and_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("records");
    let o = qat_lab(
        &[
            "run",
            "demo-digits",
            "--set",
            "train.epochs=2",
            "--set",
            "regularizer.kind=quantization",
            "--set",
            "regularizer.weight_bits=4",
            "--set",
            "data.noise.rate=0.4",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        tmp.path(),
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("completed after 2 epochs"), "{out}");
    assert!(out.contains("W4/A4"), "{out}");
    let records = qat_lab::runs::list(&out_dir);
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.metrics.len(), 2);
    assert_eq!(r.experiment.data.noise.rate, 0.4);
    assert!(r.dir.join("model.safetensors").is_file());
}

#[test]
fn bad_input_gets_a_message_naming_cause_and_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let o = qat_lab(&["run", "demo-digits", "--set", "train.epoks=3"], tmp.path());
    assert!(!o.status.success());
    let out = text(&o);
    assert!(out.contains("epoks") && out.contains("epochs"), "{out}");

    let o = qat_lab(&["run", "no-such-preset"], tmp.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("run --list"), "{}", text(&o));

    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[data]\nnoise = 3\n").unwrap();
    let o = qat_lab(&["run", bad.to_str().unwrap()], tmp.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("bad.toml"), "{}", text(&o));

    // --device and --data are shorthands for --set; their errors name the fix.
    if !cfg!(feature = "cuda") {
        let o = qat_lab(&["run", "demo-digits", "--device", "cuda"], tmp.path());
        assert!(!o.status.success());
        assert!(text(&o).contains("--features cuda"), "{}", text(&o));
    }
    let o = qat_lab(&["run", "fig1-baseline", "--data", "/nonexistent/cifar"], tmp.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("/nonexistent/cifar") && text(&o).contains("data fetch cifar10"), "{}", text(&o));

    let o = qat_lab(&["data", "fetch", "imagenet"], tmp.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("cifar10"));

    let o = qat_lab(&["bench", "--batch", "0", "--no-torch"], tmp.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("--batch 0 measures nothing"), "{}", text(&o));

    let o = qat_lab(&["run", "/dev/zero"], tmp.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("not a regular file"), "{}", text(&o));

    let o = qat_lab(&["run", "fig1-baseline", "--data", "Cargo.toml"], tmp.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("not a .tar.gz") && !text(&o).contains("delete"), "{}", text(&o));

    // Hundreds of GiB of activations: refused from the estimate, before 100,000 images are generated.
    let o = qat_lab(
        &[
            "run",
            "demo",
            "--set",
            "data.train_subset=100000",
            "--set",
            "train.batch_size=65536",
            "--set",
            "model.width=2.0",
        ],
        tmp.path(),
    );
    assert!(!o.status.success());
    let out = text(&o);
    assert!(
        out.contains("GiB of memory (data") && out.contains("at batch 65536") && out.contains("is available"),
        "{out}"
    );
    assert!(out.contains("lower train.batch_size"), "{out}");
}

#[test]
fn human_noise_on_the_shuffled_cifar_sample_is_refused_with_the_reason() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets");
    let (sample, labels) =
        (shared.join("cifar10-sample/cifar-10-sample-binary.tar.gz"), shared.join("cifar-n/CIFAR-10_human.pt"));
    if !sample.is_file() || !labels.is_file() {
        eprintln!("skipped: the shared CIFAR-10 sample or CIFAR-10_human.pt is absent from {}", shared.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let o = qat_lab(
        &[
            "run",
            "fig1-baseline",
            "--data",
            sample.to_str().unwrap(),
            "--set",
            "data.noise.kind=human",
            "--set",
            &format!("data.noise.labels={}", labels.display()),
            "--set",
            "data.noise.set=worst",
        ],
        tmp.path(),
    );
    assert!(!o.status.success());
    let out = text(&o);
    assert!(out.contains("not in the official order") && out.contains("labels 50000 training images"), "{out}");
    // Without a set, or on another dataset, the preset is refused before anything loads.
    let o = qat_lab(&["run", "demo", "--set", "data.noise.kind=human"], tmp.path());
    assert!(!o.status.success() && text(&o).contains("needs data.dataset = \"cifar10\""), "{}", text(&o));
    let o = qat_lab(
        &["run", "fig1-baseline", "--set", "data.noise.kind=human", "--set", "data.noise.labels=x.pt"],
        tmp.path(),
    );
    assert!(!o.status.success() && text(&o).contains("allowed: aggre, rand1, rand2, rand3, worst"), "{}", text(&o));
}

/// A loopback HTTP server that answers one GET with `body`.
fn serve_once(body: Vec<u8>) -> String {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
            line.clear();
        }
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&body).unwrap();
    });
    format!("http://{addr}/CIFAR-10_human.pt")
}

#[test]
fn data_fetch_cifar10n_downloads_and_verifies_the_label_file() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets/cifar-n/CIFAR-10_human.pt");
    let Ok(body) = std::fs::read(&shared) else {
        eprintln!("skipped: {} is absent (served on loopback as the official file)", shared.display());
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar-n");
    let o = qat_lab(
        &["data", "fetch", "cifar10n", "--dir", dir.to_str().unwrap(), "--url", &serve_once(body.clone())],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("CIFAR-10N's labels ready at") && text(&o).contains("SHA-256 verified"), "{}", text(&o));
    assert_eq!(std::fs::read(dir.join("CIFAR-10_human.pt")).unwrap(), body);
    // A file that is not the official one is refused and removed.
    let other = tmp.path().join("other");
    let o = qat_lab(
        &["data", "fetch", "cifar10n", "--dir", other.to_str().unwrap(), "--url", &serve_once(b"not it".to_vec())],
        tmp.path(),
    );
    assert!(!o.status.success() && text(&o).contains("corrupt"), "{}", text(&o));
    assert!(!other.join("CIFAR-10_human.pt").exists());
}

#[test]
fn the_lab_refuses_a_non_terminal_and_points_to_headless_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let o = qat_lab(&[], tmp.path());
    assert!(!o.status.success());
    let out = text(&o);
    assert!(out.contains("not a terminal") || out.contains("not one"), "{out}");
    assert!(out.contains("qat-lab run"), "{out}");
}

#[test]
fn a_sweep_trains_the_grid_and_prints_the_tables_then_compare_and_report_read_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("sweep");
    let o = qat_lab(
        &[
            "sweep",
            "demo-sweep-digits",
            "--vary",
            "regularizer.kind=none,quantization",
            "--vary",
            "robust.kind=none,gce",
            "--vary",
            "data.noise.rate=0.2",
            "--set",
            "train.epochs=1",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        tmp.path(),
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("sweep: 4 runs"), "{out}");
    assert!(out.contains("| W4/A4 |") && out.contains("| W4/A4 + GCE q=0.7 |") && out.contains("s=20%"), "{out}");
    let dirs: Vec<String> = qat_lab::runs::list(&out_dir).iter().map(|r| r.dir.display().to_string()).collect();
    assert_eq!(dirs.len(), 4);
    let o = qat_lab(&["compare", "--table", &dirs[0], &dirs[1]], tmp.path());
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("gain vs baseline"));
    let o = qat_lab(&["report", out_dir.to_str().unwrap()], tmp.path());
    assert!(o.status.success(), "{}", text(&o));
}

/// `bench` as BENCHMARKS.md runs it: every configuration timed over rounds, the QAT cost, peak memory,
/// and with `--ops` a line per convolution of the network and its share of a step, then each fused
/// training layer timed float, keep and fold, with their per-step totals.
#[test]
fn bench_prints_throughput_qat_cost_and_the_per_op_table() {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["bench", "--arch", "resnet8", "--batch", "8", "--steps", "1", "--warmup", "1", "--rounds", "2"];
    let o = qat_lab(&[&args[..], &["--ops", "--no-torch"]].concat(), tmp.path());
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("median of 2 interleaved rounds"), "{out}");
    for name in ["float", "w4a4-fold", "w4a4-keep"] {
        assert!(out.lines().any(|l| l.starts_with(name)), "{name} missing:\n{out}");
    }
    assert!(out.contains("QAT cost (w4a4-keep)") && out.contains("peak memory"), "{out}");
    // ResNet-8: the stem and one row per stage shape, then the total.
    for shape in ["3->16, 32x32, s1", "16->16, 32x32, s1", "16->32, 32x32, s2", "64->64, 8x8, s1"] {
        assert!(out.contains(shape), "{shape} missing:\n{out}");
    }
    assert!(out.contains("float training step"), "{out}");
    let layers = out.lines().find(|l| l.starts_with("layers per step: float")).unwrap_or_else(|| panic!("{out}"));
    assert!(layers.contains(", keep ") && layers.contains(", fold "), "{layers}");
    // Integer inference beside the fake-quant eval, at batch 1 and 256, for both bit widths.
    assert!(out.contains("integer inference (kernel: "), "{out}");
    for (net, batch) in [("w4a4", 1), ("w4a4", 256), ("w8a8", 1), ("w8a8", 256)] {
        let row = out.lines().find(|l| l.split_whitespace().take(2).eq([net, &batch.to_string()]));
        let row = row.unwrap_or_else(|| panic!("no {net} batch {batch} row:\n{out}"));
        let rate: f64 = row.split_whitespace().nth(3).unwrap().parse().unwrap();
        assert!(rate > 0.0, "{row}");
    }
    let o = qat_lab(&["bench", "--only", "int8", "--no-torch"], tmp.path());
    assert!(!o.status.success() && text(&o).contains("--only must be one of"), "{}", text(&o));
}

/// `sweep --slurm` writes a job-array script; its tasks, run by hand as Slurm would run them, give
/// the same records as the sweep run here, and a task whose point is finished trains nothing.
#[test]
fn slurm_array_tasks_run_by_hand_give_the_same_records_as_the_sweep() {
    let tmp = tempfile::tempdir().unwrap();
    let grid = [
        "demo-sweep-digits",
        "--vary",
        "regularizer.kind=none,quantization",
        "--vary",
        "data.noise.rate=0.2,0.4",
        "--set",
        "train.epochs=2",
        "--set",
        "data.train_subset=300",
    ];
    let sweep_dir = tmp.path().join("here");
    let mut args = vec!["sweep"];
    args.extend(grid);
    args.extend(["--out", sweep_dir.to_str().unwrap()]);
    let o = qat_lab(&args, tmp.path());
    assert!(o.status.success(), "{}", text(&o));

    let array_dir = tmp.path().join("array");
    let mut args = vec!["sweep"];
    args.extend(grid);
    args.extend(["--out", array_dir.to_str().unwrap(), "--slurm", "--max-parallel", "2", "--time", "00:30:00"]);
    let o = qat_lab(&args, tmp.path());
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("4 array tasks") && text(&o).contains("sbatch "), "{}", text(&o));
    let script = std::fs::read_to_string(array_dir.join("slurm/qat-lab-sweep-demo-sweep-digits.sbatch")).unwrap();
    assert!(script.contains("#SBATCH --array=0-3%2") && script.contains("#SBATCH --time=00:30:00"), "{script}");
    let exec = script.lines().find(|l| l.starts_with("exec ")).unwrap();
    assert!(exec.ends_with("--task \"$SLURM_ARRAY_TASK_ID\"") && exec.contains("--set train.epochs=2"), "{exec}");
    assert!(qat_lab::runs::list(&array_dir).is_empty(), "--slurm trains nothing here");

    let task = |i: usize| {
        let mut args = vec!["sweep"];
        args.extend(grid);
        let i = i.to_string();
        args.extend(["--out", array_dir.to_str().unwrap(), "--task", &i]);
        qat_lab(&args, tmp.path())
    };
    for i in 0..4 {
        let o = task(i);
        assert!(o.status.success(), "task {i}: {}", text(&o));
    }
    let o = task(2);
    assert!(text(&o).contains("already finished"), "{}", text(&o));
    let o = task(4);
    assert!(!o.status.success() && text(&o).contains("tasks run from 0 to 3"), "{}", text(&o));

    let key = |r: &qat_lab::runs::RunRecord| {
        let m: Vec<(f64, f64, f64)> = r.metrics.iter().map(|m| (m.train_loss, m.eval_loss, m.eval_acc)).collect();
        (r.experiment.to_toml(), m)
    };
    let here = qat_lab::runs::list(&sweep_dir);
    let array = qat_lab::runs::list(&array_dir);
    assert_eq!(array.len(), 4, "one record per task, none twice");
    for r in &here {
        let twin = array.iter().find(|a| a.experiment == r.experiment).expect("every grid point has its task");
        assert_eq!(key(twin), key(r), "{}", r.id());
        assert!(twin.id().ends_with(&r.id()[r.id().rfind("-g").unwrap()..]), "ids carry the grid index");
    }
    let o = qat_lab(&["run", "--resume", array[0].dir.to_str().unwrap()], tmp.path());
    assert!(!o.status.success() && text(&o).contains("nothing to resume"), "{}", text(&o));
    let o = qat_lab(&["compare", "--table", array_dir.to_str().unwrap()], tmp.path());
    assert!(o.status.success() && text(&o).contains("W4/A4"), "{}", text(&o));
}
