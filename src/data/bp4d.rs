//! BP4D-Spontaneous, as the user has it (it is licensed, not downloadable): AU occurrence CSVs plus face
//! images, split by the subject-exclusive 3-fold protocol.
//!
//! Layout read:
//! ```text
//! ROOT/AU_OCC/<subject>_<task>.csv     header `Frame,1,2,4,...` (AU numbers); 1 = present, 0 = absent,
//!                                      9 = unknown (masked out of loss and metrics)
//! ROOT/images/<subject>/<task>/<frame>.jpg|png   the frame number is the file name's number
//! ```
//! The 12 AUs of the paper are used; other AU columns are ignored. Subjects are sorted by name and
//! subject i goes to fold i mod 3; `data.fold` is the test fold, the other two train.

use super::faces::AUS;
use super::{folder::load_image, resolve_under, RawDataset, Split, Task, UNKNOWN};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Loads every annotated frame that has an image, resized to `side`, with `fold` as the test set.
pub fn load(root: &Path, side: usize, fold: usize) -> Result<RawDataset> {
    let occ = root.join("AU_OCC");
    if !occ.is_dir() {
        bail!(
            "{} has no AU_OCC folder: data.path must be the BP4D folder holding AU_OCC/<subject>_<task>.csv and images/<subject>/<task>/<frame>.jpg",
            root.display()
        );
    }
    let mut csvs: Vec<PathBuf> = std::fs::read_dir(&occ)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")))
        .collect();
    csvs.sort();
    if csvs.is_empty() {
        bail!("{} holds no .csv files", occ.display());
    }
    let mut rows: Vec<(String, PathBuf, Vec<f32>)> = Vec::new();
    let mut missing_images = 0usize;
    for csv_path in &csvs {
        let stem = csv_path.file_stem().unwrap_or_default().to_string_lossy().to_string();
        let (subject, task) = stem
            .split_once('_')
            .with_context(|| format!("{}: expected a name like F001_T1.csv (subject_task)", csv_path.display()))?;
        if subject.is_empty() || task.is_empty() {
            bail!("{}: expected a name like F001_T1.csv (subject_task), both non-empty", csv_path.display());
        }
        let frames_dir = resolve_under(&root.join("images"), &format!("{subject}/{task}"))
            .map_err(|e| anyhow::anyhow!("{}: its subject and task name {e}", csv_path.display()))?;
        let frames = frame_files(&frames_dir)?;
        for (frame, targets) in read_occurrence(csv_path)? {
            match frames.get(&frame) {
                Some(img) => rows.push((subject.to_string(), img.clone(), targets)),
                None => missing_images += 1,
            }
        }
    }
    if rows.is_empty() {
        bail!(
            "no annotated frame of {} has an image under {}/images/<subject>/<task>/ ({missing_images} frames without one)",
            occ.display(),
            root.display()
        );
    }
    build(rows, side, fold, "bp4d")
}

/// Frame number -> image file in one task folder.
fn frame_files(dir: &Path) -> Result<HashMap<u64, PathBuf>> {
    let mut map = HashMap::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return Ok(map) };
    for e in rd.flatten() {
        let p = e.path();
        if let Some(n) = p
            .file_stem()
            .and_then(|s| s.to_string_lossy().trim_start_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        {
            map.insert(n, p);
        }
    }
    Ok(map)
}

/// The first header naming an AU that an earlier header already names (`AU4` after `4`).
pub(crate) fn repeated_au_column(headers: &csv::StringRecord) -> Option<&str> {
    let mut seen = BTreeSet::new();
    headers.iter().find(|h| au_number(h).is_some_and(|au| !seen.insert(au)))
}

/// Parses an AU column header: `12`, `AU12` or `au12`.
pub(crate) fn au_number(header: &str) -> Option<u32> {
    let h = header.trim();
    let h = h.strip_prefix("AU").or_else(|| h.strip_prefix("au")).unwrap_or(h);
    h.parse().ok()
}

/// (frame, targets of the 12 AUs) for every row of one occurrence CSV.
fn read_occurrence(path: &Path) -> Result<Vec<(u64, Vec<f32>)>> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let headers = reader.headers().with_context(|| format!("{}: no header row", path.display()))?.clone();
    if let Some(h) = repeated_au_column(&headers) {
        bail!("{}: AU column `{h}` appears twice in the header (the same AU); keep one", path.display());
    }
    let mut columns = Vec::new();
    for au in AUS {
        let col = headers.iter().position(|h| au_number(h) == Some(au));
        columns.push(col.with_context(|| {
            format!(
                "{} has no column for AU {au}; its header is `{}` (the 12 AUs of the paper are needed)",
                path.display(),
                headers.iter().collect::<Vec<_>>().join(",")
            )
        })?);
    }
    let mut out = Vec::new();
    let mut seen = HashMap::new();
    for (i, rec) in reader.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: row {} is not valid CSV", path.display(), i + 2))?;
        let frame: u64 = rec
            .get(0)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{}: row {}: the first column must be the frame number", path.display(), i + 2))?;
        let mut targets = Vec::with_capacity(AUS.len());
        for (&col, au) in columns.iter().zip(AUS) {
            let v = rec.get(col).unwrap_or("");
            targets.push(match v {
                "1" => 1.0,
                "0" => 0.0,
                "9" | "" | "-1" => UNKNOWN,
                other => {
                    bail!("{}: row {}: AU {au} has value `{other}`; allowed: 0, 1, 9 (unknown)", path.display(), i + 2)
                }
            });
        }
        if let Some(first) = seen.insert(frame, i + 2) {
            bail!("{}: row {}: frame {frame} is already row {first}; list each frame once", path.display(), i + 2);
        }
        out.push((frame, targets));
    }
    Ok(out)
}

/// Subject-exclusive fold of every subject: sorted, subject i in fold i mod 3.
pub fn folds(subjects: &BTreeSet<String>) -> HashMap<String, usize> {
    subjects.iter().enumerate().map(|(i, s)| (s.clone(), i % 3)).collect()
}

/// Decodes the images and splits rows (subject, image, targets) into train/test by fold.
pub(crate) fn build(
    rows: Vec<(String, PathBuf, Vec<f32>)>,
    side: usize,
    fold: usize,
    name: &str,
) -> Result<RawDataset> {
    let subjects: BTreeSet<String> = rows.iter().map(|r| r.0.clone()).collect();
    if subjects.len() < 3 {
        bail!("{name}: {} subject(s) found; the subject-exclusive 3-fold protocol needs at least 3", subjects.len());
    }
    let fold_of = folds(&subjects);
    let (mut train, mut test) = (Split::default(), Split::default());
    for (subject, image, targets) in rows {
        let split = if fold_of[&subject] == fold { &mut test } else { &mut train };
        split.images.extend(load_image(&image, side)?);
        split.labels.push(0);
        split.targets.extend(targets);
        split.subjects.push(subject);
    }
    Ok(RawDataset {
        name: format!("{name} fold {fold}"),
        task: Task::MultiLabel,
        classes: super::faces::au_names(),
        shape: [3, side, side],
        train,
        test,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a small BP4D-like tree: `subjects` x 2 tasks x `frames` frames, with one unknown (9).
    pub fn write_fixture(root: &Path, subjects: &[&str], frames: usize) {
        std::fs::create_dir_all(root.join("AU_OCC")).unwrap();
        for (si, s) in subjects.iter().enumerate() {
            for task in ["T1", "T2"] {
                let mut csv = String::from("Frame,1,2,4,5,6,7,9,10,12,14,15,17,23,24,27\n");
                let dir = root.join("images").join(s).join(task);
                std::fs::create_dir_all(&dir).unwrap();
                for f in 0..frames {
                    let frame = 100 + f;
                    let vals: Vec<String> = (0..15)
                        .map(|k| if f == 0 && k == 0 { "9".into() } else { ((f + k + si) % 2).to_string() })
                        .collect();
                    csv.push_str(&format!("{frame},{}\n", vals.join(",")));
                    let img = image::RgbImage::from_pixel(20, 24, image::Rgb([(si * 60) as u8, 100, (f * 30) as u8]));
                    img.save(dir.join(format!("{frame:04}.jpg"))).unwrap();
                }
                std::fs::write(root.join("AU_OCC").join(format!("{s}_{task}.csv")), csv).unwrap();
            }
        }
    }

    #[test]
    fn loads_the_real_layout_with_subject_exclusive_folds_and_unknowns() {
        let dir = tempfile::tempdir().unwrap();
        write_fixture(dir.path(), &["F001", "F002", "M001", "M002", "M003", "F003"], 3);
        let mut seen_test = BTreeSet::new();
        for fold in 0..3 {
            let d = load(dir.path(), 16, fold).unwrap();
            assert_eq!(d.train.len() + d.test.len(), 6 * 2 * 3);
            let tr: BTreeSet<_> = d.train.subjects.iter().cloned().collect();
            let te: BTreeSet<_> = d.test.subjects.iter().cloned().collect();
            assert!(tr.is_disjoint(&te), "fold {fold}: a subject is in train and test");
            assert_eq!(te.len(), 2);
            seen_test.extend(te);
            assert_eq!(d.train.targets.len(), d.train.len() * 12);
            assert!(d.train.targets.iter().chain(&d.test.targets).any(|&t| t == UNKNOWN), "9 is read as unknown");
        }
        assert_eq!(seen_test.len(), 6, "every subject is tested exactly once over the 3 folds");
    }

    #[test]
    fn clear_errors_for_missing_files_columns_and_bad_images() {
        let dir = tempfile::tempdir().unwrap();
        let msg = load(dir.path(), 16, 0).unwrap_err().to_string();
        assert!(msg.contains("AU_OCC"), "{msg}");

        write_fixture(dir.path(), &["F001", "F002", "F003"], 2);
        std::fs::write(dir.path().join("AU_OCC/F001_T1.csv"), "Frame,1,2\n100,0,1\n").unwrap();
        let msg = format!("{:#}", load(dir.path(), 16, 0).unwrap_err());
        assert!(msg.contains("no column for AU 4"), "{msg}");

        write_fixture(dir.path(), &["F001", "F002", "F003"], 2);
        std::fs::write(dir.path().join("images/F002/T2/0101.jpg"), b"garbage").unwrap();
        let msg = format!("{:#}", load(dir.path(), 16, 0).unwrap_err());
        assert!(msg.contains("0101.jpg") && msg.contains("decoded"), "{msg}");

        // Names that would leave the images folder, repeated frames and repeated AU columns.
        let bad = tempfile::tempdir().unwrap();
        write_fixture(bad.path(), &["F001", "F002", "F003"], 2);
        std::fs::write(bad.path().join("AU_OCC/.._x.csv"), "Frame,1\n7,1\n").unwrap();
        let msg = format!("{:#}", load(bad.path(), 16, 0).unwrap_err());
        assert!(msg.contains(".._x.csv") && msg.contains("without `..`"), "{msg}");
        std::fs::remove_file(bad.path().join("AU_OCC/.._x.csv")).unwrap();
        let csv_path = bad.path().join("AU_OCC/F001_T1.csv");
        let csv = std::fs::read_to_string(&csv_path).unwrap();
        std::fs::write(&csv_path, csv.replacen("\n101,", "\n100,", 1)).unwrap();
        let msg = format!("{:#}", load(bad.path(), 16, 0).unwrap_err());
        assert!(msg.contains("frame 100 is already row 2"), "{msg}");
        std::fs::write(&csv_path, csv.replacen(",27", ",AU4", 1)).unwrap();
        let msg = format!("{:#}", load(bad.path(), 16, 0).unwrap_err());
        assert!(msg.contains("appears twice"), "{msg}");
    }
}
