//! Bounded fuzzing of every parser of outside input, in the normal suite: the preset reader (and its
//! sweep axes), `--set` overrides, CIFAR-10 batch files, the CIFAR-10 .tar.gz (at the gzip and at the
//! tar layer), BP4D occurrence CSVs and au_csv manifests. Each input is a seed from `tests/corpus/`
//! (and the shipped presets) changed by a few random edits; every one must end in a value or a clean
//! error, never a panic. The runs are seeded, so a failure reproduces, and proptest shrinks it to a
//! few edits.
//!
//! `FUZZ_CASES=N cargo test --release --test fuzz -- --nocapture` runs N inputs per target and prints
//! the counts.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use qat_lab::config::{sweep_axes, Experiment};
use qat_lab::data::{au_csv, bp4d, cifar::CIFAR10, Split};
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn corpus(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(rel)
}

/// One edit of an input.
#[derive(Debug, Clone)]
enum Edit {
    FlipBit(usize, u8),
    SetByte(usize, u8),
    Delete(usize, usize),
    /// Inserts a token that parsers tend to trip on (huge or negative numbers, separators, `..`).
    InsertToken(usize, usize),
    Duplicate(usize, usize),
    Truncate(usize),
}

const TOKENS: &[&str] = &[
    "99999999999999999999",
    "18446744073709551616",
    "4294967296",
    "-1",
    "-0",
    "0",
    "1e309",
    "nan",
    "inf",
    "..",
    "../..",
    "/",
    "\\",
    ",",
    "\n",
    "\r\n",
    "\"",
    "'",
    "[",
    "]",
    "{",
    "=",
    "[sweep]",
    "[[data]]",
    "kind = \"quantization\"",
    "AU1",
    "Frame",
    "9",
    "\u{0}",
    "\u{feff}",
    "é",
];

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(p, b)| Edit::FlipBit(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, v)| Edit::SetByte(p, v)),
        (any::<usize>(), 1usize..64).prop_map(|(p, n)| Edit::Delete(p, n)),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(p, t)| Edit::InsertToken(p, t)),
        (any::<usize>(), 1usize..64).prop_map(|(p, n)| Edit::Duplicate(p, n)),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for e in edits {
        let at = |p: usize, len: usize| if len == 0 { 0 } else { p % len };
        match *e {
            Edit::FlipBit(p, b) if !v.is_empty() => {
                let i = at(p, v.len());
                v[i] ^= 1 << b;
            }
            Edit::SetByte(p, x) if !v.is_empty() => {
                let i = at(p, v.len());
                v[i] = x;
            }
            Edit::Delete(p, n) if !v.is_empty() => {
                let i = at(p, v.len());
                v.drain(i..(i + n).min(v.len()));
            }
            Edit::InsertToken(p, t) => {
                let i = at(p, v.len() + 1);
                v.splice(i..i, TOKENS[t].bytes());
            }
            Edit::Duplicate(p, n) if !v.is_empty() => {
                let i = at(p, v.len());
                let part = v[i..(i + n).min(v.len())].to_vec();
                v.splice(i..i, part);
            }
            Edit::Truncate(p) => {
                let len = at(p, v.len() + 1);
                v.truncate(len);
            }
            _ => {}
        }
    }
    v
}

/// What the inputs of one target came to.
#[derive(Debug, Default)]
struct Counts {
    tried: usize,
    accepted: usize,
    clean_errors: usize,
}

/// Feeds `cases` edited seeds to `target`. A panic fails the test (shrunk to its fewest edits); an
/// error must say something.
fn fuzz(name: &str, seeds: &[Vec<u8>], target: impl Fn(&[u8]) -> Result<(), String>) {
    let cases = std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let counts = std::cell::RefCell::new(Counts::default());
    let strategy = (0..seeds.len(), prop::collection::vec(edit(), 1..6));
    let result = runner.run(&strategy, |(seed, edits)| {
        let input = apply(&seeds[seed], &edits);
        let outcome = catch_unwind(AssertUnwindSafe(|| target(&input)));
        let mut c = counts.borrow_mut();
        c.tried += 1;
        match outcome {
            Ok(Ok(())) => c.accepted += 1,
            Ok(Err(message)) => {
                if std::env::var_os("FUZZ_SHOW").is_some() {
                    println!("  {name}: {}", message.lines().next().unwrap_or(""));
                }
                prop_assert!(!message.trim().is_empty(), "an empty error message");
                c.clean_errors += 1;
            }
            Err(_) => return Err(TestCaseError::fail(format!("{name} panicked on seed {seed} with {edits:?}"))),
        }
        Ok(())
    });
    let c = counts.into_inner();
    println!("fuzz {name}: {} inputs, {} accepted, {} clean errors, 0 panics", c.tried, c.accepted, c.clean_errors);
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    assert!(c.clean_errors > 0, "{name}: no input was refused, so the edits reach nothing");
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("corpus file {}: {e}", path.display()))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

fn message(e: anyhow::Error) -> String {
    format!("{e:#}")
}

#[test]
fn presets_and_their_sweep_axes() {
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for dir in [Path::new(env!("CARGO_MANIFEST_DIR")).join("presets"), corpus("preset")] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
        files.sort();
        seeds.extend(files.iter().filter(|p| p.extension().is_some_and(|e| e == "toml")).map(|p| read(p)));
    }
    assert!(seeds.len() > 10, "the shipped presets are the corpus");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("fuzzed.toml");
    fuzz("preset", &seeds, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        let exp = Experiment::load(&path, &[]).map_err(|e| e.to_string())?;
        // A preset that loads must also survive its own round trip and its sweep table.
        Experiment::from_toml(&exp.to_toml(), "round trip", &[]).map_err(|e| format!("round trip: {e}"))?;
        let text = String::from_utf8_lossy(bytes);
        sweep_axes(&text, "fuzzed.toml").map_err(|e| e.to_string())?;
        Ok(())
    });
}

#[test]
fn set_overrides() {
    let seeds: Vec<Vec<u8>> = [
        "train.epochs=3",
        "regularizer.kind=quantization",
        "regularizer.weight_bits=4",
        "data.noise.rate=0.4",
        "data.train_subset=500",
        "model.arch=resnet20",
        "regularizer={ kind = \"dropout\", p = 0.1, position = \"before_fc\" }",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let demo = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("presets/demo.toml")).unwrap();
    fuzz("--set override", &seeds, |bytes| {
        let assignment = String::from_utf8_lossy(bytes).to_string();
        Experiment::from_toml(&demo, "demo.toml", &[assignment]).map_err(|e| e.to_string())?;
        Ok(())
    });
}

#[test]
fn cifar10_batch_files() {
    let seeds = vec![read(&corpus("cifar10/data_batch_1.bin"))];
    fuzz("cifar10 batch", &seeds, |bytes| {
        let mut split = Split::default();
        CIFAR10.parse_records(bytes, "data_batch_1.bin", &mut split).map_err(message)?;
        assert_eq!(split.images.len(), split.labels.len() * 3072);
        Ok(())
    });
}

#[test]
fn cifar10_archives_at_the_gzip_and_the_tar_layer() {
    let tar = read(&corpus("cifar10/sample.tar"));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sample.tar.gz");
    let load = |gz: &[u8]| {
        std::fs::write(&path, gz).unwrap();
        let d = CIFAR10.load(&path).map_err(message)?;
        assert!(!d.train.is_empty() && !d.test.is_empty());
        Ok(())
    };
    fuzz("cifar10 .tar.gz (gzip bytes)", &[gzip(&tar)], load);
    fuzz("cifar10 .tar.gz (tar bytes)", std::slice::from_ref(&tar), |t| load(&gzip(t)));
}

/// Tiny face images for every frame and row the seeds name.
fn write_image(path: &Path, shade: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(6, 6, image::Rgb([shade, 40, 80])).save(path).unwrap();
}

#[test]
fn bp4d_occurrence_csvs() {
    let seed = read(&corpus("bp4d/F001_T1.csv"));
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let occ = root.join("AU_OCC");
    std::fs::create_dir_all(&occ).unwrap();
    for (i, subject) in ["F001", "F002", "M001"].iter().enumerate() {
        for frame in 1..=4 {
            write_image(&root.join(format!("images/{subject}/T1/{frame:04}.png")), (i * 60 + frame * 10) as u8);
        }
        if *subject != "F001" {
            std::fs::write(occ.join(format!("{subject}_T1.csv")), &seed).unwrap();
        }
    }
    fuzz("bp4d csv", std::slice::from_ref(&seed), |bytes| {
        std::fs::write(occ.join("F001_T1.csv"), bytes).unwrap();
        let d = bp4d::load(root, 8, 0).map_err(message)?;
        assert_eq!(d.train.images.len(), d.train.len() * 3 * 8 * 8);
        Ok(())
    });
}

#[test]
fn au_csv_manifests() {
    let seed = read(&corpus("au_csv/manifest.csv"));
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..6 {
        write_image(&tmp.path().join(format!("img{i}.png")), i as u8 * 30);
    }
    let manifest = tmp.path().join("manifest.csv");
    fuzz("au_csv manifest", &[seed], |bytes| {
        std::fs::write(&manifest, bytes).unwrap();
        let d = au_csv::load(&manifest, 8, 0).map_err(message)?;
        assert_eq!(d.test.targets.len(), d.test.len() * d.classes.len());
        Ok(())
    });
}
