//! `au_csv`: a generic AU manifest for DISFA-like datasets: one CSV row per image,
//! `image,subject,AU1,AU2,...` (AU columns named `AU<n>` or `<n>`; 1 present, 0 absent, 9 / -1 / empty
//! unknown), image paths relative to the manifest. The 12 AUs of the paper that the manifest has are
//! used, in the paper's order; the split is the same subject-exclusive 3 folds as `bp4d`.

use super::bp4d::{au_number, build, repeated_au_column};
use super::faces::AUS;
use super::{resolve_under, RawDataset, UNKNOWN};
use anyhow::{bail, Context, Result};
use std::path::Path;

pub fn load(manifest: &Path, side: usize, fold: usize) -> Result<RawDataset> {
    let base = manifest.parent().unwrap_or(Path::new("."));
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).from_path(manifest).with_context(|| {
        format!("cannot open the AU manifest {}: data.path must name a CSV file", manifest.display())
    })?;
    let headers = reader
        .headers()
        .with_context(|| format!("{}: the header row is not valid CSV (UTF-8 text expected)", manifest.display()))?
        .clone();
    let col = |name: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(name));
    let (Some(img_col), Some(subj_col)) = (col("image"), col("subject")) else {
        bail!(
            "{}: the header must have `image` and `subject` columns, then AU columns (AU1, AU2, ...)",
            manifest.display()
        );
    };
    for (i, h) in headers.iter().enumerate() {
        if i != img_col && i != subj_col && au_number(h).is_none() {
            bail!("{}: column `{h}` is not an AU column (expected AU<n> or <n>)", manifest.display());
        }
    }
    if let Some(h) = repeated_au_column(&headers) {
        bail!("{}: AU column `{h}` appears twice in the header (the same AU); keep one", manifest.display());
    }
    let au_cols: Vec<(u32, usize)> =
        AUS.iter().filter_map(|&au| headers.iter().position(|h| au_number(h) == Some(au)).map(|c| (au, c))).collect();
    if au_cols.len() != AUS.len() {
        let missing: Vec<String> =
            AUS.iter().filter(|a| !au_cols.iter().any(|(b, _)| b == *a)).map(|a| format!("AU{a}")).collect();
        bail!(
            "{}: missing AU columns {} (the 12 AUs of the paper are needed; mark unknown values 9)",
            manifest.display(),
            missing.join(", ")
        );
    }
    let mut rows = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (i, rec) in reader.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: row {} is not valid CSV", manifest.display(), i + 2))?;
        let mut targets = Vec::with_capacity(AUS.len());
        for &(au, c) in &au_cols {
            targets.push(match rec.get(c).unwrap_or("") {
                "1" => 1.0,
                "0" => 0.0,
                "9" | "-1" | "" => UNKNOWN,
                other => bail!("{}: row {}: AU{au} = `{other}`; allowed: 0, 1, 9 (unknown)", manifest.display(), i + 2),
            });
        }
        let row = i + 2;
        let image = resolve_under(base, rec.get(img_col).unwrap_or(""))
            .map_err(|e| anyhow::anyhow!("{}: row {row}: image {e}", manifest.display()))?;
        if !image.is_file() {
            bail!("{}: row {row}: image {} does not exist", manifest.display(), image.display());
        }
        let subject = rec.get(subj_col).unwrap_or("").to_string();
        if subject.is_empty() {
            bail!(
                "{}: row {row}: the subject is empty; every image needs one (folds split by subject)",
                manifest.display()
            );
        }
        if let Some(first) = seen.insert(image.clone(), row) {
            bail!(
                "{}: row {row}: image {} is already row {first}; list each image once",
                manifest.display(),
                image.display()
            );
        }
        rows.push((subject, image, targets));
    }
    if rows.is_empty() {
        bail!("{} has no rows", manifest.display());
    }
    build(rows, side, fold, "au_csv")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_manifest_and_rejects_unknown_columns() {
        let dir = tempfile::tempdir().unwrap();
        let aus: Vec<String> = AUS.iter().map(|a| format!("AU{a}")).collect();
        let mut csv = format!("image,subject,{}\n", aus.join(","));
        for i in 0..9 {
            let name = format!("img{i}.png");
            image::RgbImage::from_pixel(8, 8, image::Rgb([i as u8 * 20, 0, 0])).save(dir.path().join(&name)).unwrap();
            let vals: Vec<&str> = (0..12)
                .map(|k| {
                    if k == 3 && i == 0 {
                        "9"
                    } else if (i + k) % 2 == 0 {
                        "1"
                    } else {
                        "0"
                    }
                })
                .collect();
            csv.push_str(&format!("{name},S{},{}\n", i % 3, vals.join(",")));
        }
        let manifest = dir.path().join("manifest.csv");
        std::fs::write(&manifest, &csv).unwrap();
        let d = load(&manifest, 8, 1).unwrap();
        assert_eq!(d.test.len(), 3);
        assert!(d.test.subjects.iter().all(|s| s == "S1"));
        assert_eq!(d.train.targets.len(), 6 * 12);

        for (bad, why) in [
            (csv.replacen("img1.png", "../img1.png", 1), "without `..`"),
            (csv.replacen("img1.png", "/etc/hostname", 1), "without `..`"),
            (csv.replacen("img1.png,S1", "img1.png,", 1), "subject is empty"),
            (csv.replacen("img1.png", "img2.png", 1), "already row"),
            (csv.replacen("AU24", "AU1", 1), "same AU"),
        ] {
            std::fs::write(&manifest, bad).unwrap();
            let msg = load(&manifest, 8, 0).unwrap_err().to_string();
            assert!(msg.contains(why), "{why}: {msg}");
        }

        std::fs::write(&manifest, csv.replacen("AU24", "smile", 1)).unwrap();
        let msg = load(&manifest, 8, 0).unwrap_err().to_string();
        assert!(msg.contains("`smile` is not an AU column"), "{msg}");
    }
}
