//! The compression half: a trained W4/A4 run exported as a packed integer model, evaluated in
//! integers beside the fake-quant network, its size in the record, and the refusals.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn qat_lab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qat-lab"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .output()
        .expect("run qat-lab")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Trains `preset` with `sets` into `out` and returns its run folder.
fn train(out: &Path, preset: &str, sets: &[&str]) -> PathBuf {
    let mut args = vec!["run", preset, "--plain", "--out", out.to_str().unwrap()];
    for s in sets {
        args.extend(["--set", s]);
    }
    let o = qat_lab(&args);
    assert!(o.status.success(), "{}", text(&o));
    let records = qat_lab::runs::list(out);
    assert_eq!(records.len(), 1);
    records[0].dir.clone()
}

/// The number after `label` in `out` (as in "same top-1 on 99.72% of images").
fn number_after(out: &str, label: &str) -> f64 {
    let at = out.find(label).unwrap_or_else(|| panic!("no `{label}` in:\n{out}")) + label.len();
    let digits: String = out[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '-' || *c == '+')
        .collect();
    digits.parse().unwrap_or_else(|_| panic!("no number after `{label}` in:\n{out}"))
}

#[test]
fn a_trained_w4a4_run_exports_and_runs_in_integers_like_its_fake_quant_network() {
    let tmp = tempfile::tempdir().unwrap();
    let run = train(tmp.path(), "demo-digits-w4a4", &["train.epochs=4"]);
    // The record knows its sizes.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let float = summary["size"]["float_bytes"].as_u64().unwrap();
    let int = summary["size"]["int_bytes"].as_u64().expect("a W4/A4 run has an integer size");
    assert!(int * 5 < float, "int {int} B vs float {float} B");

    let o = qat_lab(&["export", run.to_str().unwrap()]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let file = run.join("model.int.safetensors");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), int, "the record's size is the file's");
    assert!(out.contains("x smaller"), "{out}");
    // The file reads back as the same model.
    let model = qat_lab::export::int_model::IntModel::read(&file).unwrap();
    assert_eq!(model.classes(), 10);

    let o = qat_lab(&["eval", run.to_str().unwrap(), "--int", "--exact"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(number_after(&out, "same top-1 on") >= 99.5, "{out}");
    assert!(number_after(&out, "accuracy differs by").abs() <= 0.3, "{out}");
    assert_eq!(number_after(&out, "same top-1 as the integer model on"), 100.0, "{out}");
    assert!(out.contains("meets the bar"), "{out}");
    let fq = number_after(&out, "fake-quant accuracy");
    let acc = summary["final_eval_acc"].as_f64().unwrap() * 100.0;
    assert!((fq - acc).abs() < 0.01, "eval's fake-quant accuracy {fq} is the run's {acc}:\n{out}");

    // Another batch size gives the same figures; batch 0 is refused; --out puts the file elsewhere.
    let o = qat_lab(&["eval", run.to_str().unwrap(), "--int", "--batch", "7"]);
    assert_eq!(number_after(&text(&o), "integer accuracy"), number_after(&out, "integer accuracy"), "{}", text(&o));
    let o = qat_lab(&["eval", run.to_str().unwrap(), "--int", "--batch", "0"]);
    assert!(!o.status.success() && text(&o).contains("--batch 0"), "{}", text(&o));
    let elsewhere = tmp.path().join("shipped.safetensors");
    let o = qat_lab(&["export", run.to_str().unwrap(), "--out", elsewhere.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&elsewhere).unwrap(), std::fs::read(&file).unwrap(), "the same model, byte for byte");

    // eval --onnx: onnxruntime runs the graph as written and agrees; skipped, saying why, without it.
    let o = qat_lab(&["eval", run.to_str().unwrap(), "--onnx"]);
    let out = text(&o);
    if out.contains("onnxruntime is not installed") || out.contains("python3 is not installed") {
        eprintln!("skipped eval --onnx: {out}");
        return;
    }
    assert!(o.status.success(), "{out}");
    let as_written = out.lines().find(|l| l.contains("(as written)")).unwrap_or_else(|| panic!("{out}"));
    assert!(number_after(as_written, "same top-1 as qat-lab's evaluation on") >= 99.5, "{out}");
}

#[test]
fn export_refuses_what_has_no_integer_model_naming_why() {
    let tmp = tempfile::tempdir().unwrap();
    let float = train(&tmp.path().join("float"), "demo-digits", &["train.epochs=1"]);
    let o = qat_lab(&["export", float.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("is float: only quantization-aware runs"), "{}", text(&o));

    let quant = train(&tmp.path().join("quant"), "demo-digits-w4a4", &["train.epochs=1"]);
    let summary = quant.join("summary.json");
    let finished = std::fs::read_to_string(&summary).unwrap();
    std::fs::write(&summary, finished.replace("\"completed\"", "\"stopped\"")).unwrap();
    let o = qat_lab(&["export", quant.to_str().unwrap()]);
    assert!(text(&o).contains("did not finish (stopped): go on with `qat-lab run --resume"), "{}", text(&o));
    std::fs::write(&summary, finished.replace("\"completed\"", "\"diverged\"")).unwrap();
    let o = qat_lab(&["eval", quant.to_str().unwrap(), "--int"]);
    assert!(text(&o).contains("diverged: its weights are not a trained network"), "{}", text(&o));

    std::fs::write(&summary, &finished).unwrap();
    std::fs::remove_file(quant.join("model.safetensors")).unwrap();
    let o = qat_lab(&["export", quant.to_str().unwrap()]);
    assert!(text(&o).contains("has no model.safetensors"), "{}", text(&o));
    std::fs::write(quant.join("model.safetensors"), b"not a safetensors file").unwrap();
    let o = qat_lab(&["export", quant.to_str().unwrap()]);
    assert!(text(&o).contains("the file is damaged"), "{}", text(&o));

    // Multi-label QAT with batch norm kept has one head per AU: not an architecture the exporter has.
    let heads = train(
        &tmp.path().join("heads"),
        "demo-faces",
        &[
            "train.epochs=1",
            "data.train_subset=200",
            "data.test_subset=50",
            "regularizer.kind=quantization",
            "regularizer.bn=keep",
        ],
    );
    let o = qat_lab(&["export", heads.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("one classifier head per label"), "{}", text(&o));
    let o = qat_lab(&["eval", heads.to_str().unwrap(), "--int"]);
    assert!(text(&o).contains("one classifier head per label"), "{}", text(&o));
    let o = qat_lab(&["eval", heads.to_str().unwrap(), "--onnx"]);
    assert!(text(&o).contains("multi-label run"), "{}", text(&o));
    // With batch norm folded the AU network has one classifier: it runs in integers, compared
    // decision by decision.
    let folded = train(
        &tmp.path().join("folded"),
        "demo-faces",
        &["train.epochs=1", "data.train_subset=200", "data.test_subset=50", "regularizer.kind=quantization"],
    );
    let o = qat_lab(&["eval", folded.to_str().unwrap(), "--int", "--exact"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(number_after(&out, "same decision (image, AU) as the integer model on") == 100.0, "{out}");

    let o = qat_lab(&["export", tmp.path().to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("not a run folder"), "{}", text(&o));
    let o = qat_lab(&["eval", float.to_str().unwrap(), "--exact"]);
    assert!(text(&o).contains("add --int"), "{}", text(&o));
}

#[test]
fn the_onnx_export_runs_in_onnxruntime_and_gives_qat_labs_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for (preset, what) in [("demo-digits-w4a4", "QDQ"), ("demo-digits", "float")] {
        let run = train(&tmp.path().join(preset), preset, &["train.epochs=2"]);
        let o = qat_lab(&["export", run.to_str().unwrap(), "--format", "onnx"]);
        let out = text(&o);
        assert!(o.status.success(), "{out}");
        assert!(out.contains(what), "{out}");
        let trained = qat_lab::export::Trained::load(&run).unwrap();
        let shape = trained.image_shape();
        let n = 50;
        let images: Vec<f32> =
            (0..n * shape.0 * shape.1 * shape.2).map(|i| ((i * 7919) % 200) as f32 / 50.0 - 2.0).collect();
        let ort = match qat_lab::export::onnx::run_onnxruntime(&run.join("model.onnx"), &images, n, shape, 16, false) {
            Ok(ort) => ort,
            Err(e) => {
                eprintln!("skipped: onnxruntime cannot run here ({e:#})");
                return;
            }
        };
        let x = candle_core::Tensor::from_slice(&images, (n, shape.0, shape.1, shape.2), &candle_core::Device::Cpu)
            .unwrap();
        let ours = trained.net.forward(&x, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(ours.len(), ort.logits.len());
        let scale = ours.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = ours.iter().zip(&ort.logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // The graph as written is qat-lab's evaluation, up to float summation order (which can move
        // a value across a 4-bit rounding point: a few logits may differ by a step).
        let close = ours.iter().zip(&ort.logits).filter(|(a, b)| (**a - **b).abs() <= 1e-3 * scale.max(1.0)).count();
        assert!(
            close * 100 >= 98 * ours.len(),
            "{preset}: {close} of {} logits within 1e-3 (worst {worst})",
            ours.len()
        );
    }
}

#[test]
fn a_resnet20_on_the_cifar_sample_evaluates_in_integers_from_a_moved_data_copy() {
    let sample = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/datasets/cifar10-sample/cifar-10-sample-binary.tar.gz");
    if !sample.is_file() {
        eprintln!(
            "SKIPPED: the CIFAR-10 sample is not at {} (only present beside the project's checkout)",
            sample.display()
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Train from a copy, then delete it: eval must be told where the data is now.
    let copy = tmp.path().join("copy.tar.gz");
    std::fs::copy(&sample, &copy).unwrap();
    let sets = [
        "train.epochs=1".to_string(),
        "data.train_subset=300".into(),
        "data.test_subset=100".into(),
        format!("data.path={}", copy.display()),
    ];
    let run = train(tmp.path(), "fig1-w4a4", &sets.iter().map(String::as_str).collect::<Vec<_>>());
    std::fs::remove_file(&copy).unwrap();
    let o = qat_lab(&["eval", run.to_str().unwrap(), "--int"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("pass --data PATH where it moved"), "{}", text(&o));
    let o = qat_lab(&["eval", run.to_str().unwrap(), "--int", "--exact", "--data", sample.to_str().unwrap()]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("on 100 test images"), "{out}");
    assert_eq!(number_after(&out, "same top-1 as the integer model on"), 100.0, "{out}");
}
