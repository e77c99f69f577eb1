//! `folder`: user images, one sub-folder per class (the ImageFolder layout). With `train/` and `test/`
//! sub-folders those are used as the splits; otherwise a fixed, seeded 80/20 split is made.

use super::{RawDataset, Split, DATA_SEED};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// Loads every image under `root`, resized to `side`x`side` RGB.
pub fn load(root: &Path, side: usize) -> Result<RawDataset> {
    if !root.is_dir() {
        bail!("{} is not a folder: data.path must name a folder with one sub-folder per class", root.display());
    }
    let (train_dir, test_dir) = (root.join("train"), root.join("test"));
    if train_dir.is_dir() != test_dir.is_dir() {
        let (has, lacks) = if train_dir.is_dir() { ("train", "test") } else { ("test", "train") };
        bail!(
            "{} has a {has}/ folder but no {lacks}/: add {lacks}/ with the same class sub-folders, or put the class folders directly in {} for an 80/20 split",
            root.display(),
            root.display()
        );
    }
    let (classes, train, test) = if train_dir.is_dir() {
        let classes = class_names(&train_dir)?;
        let test_classes = sub_folders(&test_dir)?;
        let unknown: Vec<&String> = test_classes.iter().filter(|c| !classes.contains(c)).collect();
        if !unknown.is_empty() {
            bail!(
                "{}: test classes {unknown:?} have no folder in {}; every test class needs training images",
                test_dir.display(),
                train_dir.display()
            );
        }
        let train = read_split(&train_dir, &classes, side)?;
        let test = read_split(&test_dir, &classes, side)?;
        (classes, train, test)
    } else {
        let classes = class_names(root)?;
        let all = read_split(root, &classes, side)?;
        let mut order: Vec<usize> = (0..all.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(DATA_SEED));
        let n_test = (all.len() / 5).max(1);
        let (te, tr) = order.split_at(n_test);
        let len = 3 * side * side;
        (classes, all.select(tr, len), all.select(te, len))
    };
    Ok(RawDataset {
        task: super::Task::Classify,
        name: format!("folder:{}", root.display()),
        classes,
        shape: [3, side, side],
        train,
        test,
    })
}

/// Decodes an image file to `side`x`side` RGB in [0, 1], CHW; the error names the file and the fix.
pub(crate) fn load_image(path: &Path, side: usize) -> Result<Vec<f32>> {
    let img = image::open(path)
        .with_context(|| {
            format!("{} could not be decoded as an image (PNG, JPEG or BMP); remove or convert it", path.display())
        })?
        .to_rgb8();
    let img = image::imageops::resize(&img, side as u32, side as u32, image::imageops::FilterType::Triangle);
    let mut out = Vec::with_capacity(3 * side * side);
    for c in 0..3 {
        out.extend(img.pixels().map(|p| p.0[c] as f32 / 255.0));
    }
    Ok(out)
}

fn sub_folders(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    Ok(names)
}

fn class_names(dir: &Path) -> Result<Vec<String>> {
    let names = sub_folders(dir)?;
    if names.len() < 2 {
        bail!(
            "{} has {} class sub-folders; at least 2 are needed (one sub-folder of images per class)",
            dir.display(),
            names.len()
        );
    }
    Ok(names)
}

fn read_split(dir: &Path, classes: &[String], side: usize) -> Result<Split> {
    let mut split = Split::default();
    for (label, class) in classes.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(class))
            .with_context(|| format!("reading {}", dir.join(class).display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files {
            split.images.extend(load_image(&f, side)?);
            split.labels.push(label as u32);
        }
    }
    if split.is_empty() {
        bail!("{} holds no images", dir.display());
    }
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_class_folders_and_reports_bad_images() {
        let dir = tempfile::tempdir().unwrap();
        for (c, colour) in [("cats", [200u8, 10, 10]), ("dogs", [10, 10, 200])] {
            std::fs::create_dir(dir.path().join(c)).unwrap();
            for i in 0..5 {
                let img = image::RgbImage::from_pixel(12, 9, image::Rgb(colour));
                img.save(dir.path().join(c).join(format!("{i}.png"))).unwrap();
            }
        }
        let ds = load(dir.path(), 8).unwrap();
        assert_eq!(ds.classes, ["cats", "dogs"]);
        assert_eq!(ds.train.len() + ds.test.len(), 10);
        assert_eq!(ds.test.len(), 2);
        assert_eq!(ds.shape, [3, 8, 8]);

        std::fs::write(dir.path().join("dogs").join("broken.png"), b"not a png").unwrap();
        let msg = format!("{:#}", load(dir.path(), 8).unwrap_err());
        assert!(msg.contains("broken.png") && msg.contains("decoded"), "{msg}");
        assert!(load(&dir.path().join("missing"), 8).unwrap_err().to_string().contains("not a folder"));

        let split = tempfile::tempdir().unwrap();
        for c in ["train/cats", "train/dogs"] {
            std::fs::create_dir_all(split.path().join(c)).unwrap();
        }
        let msg = load(split.path(), 8).unwrap_err().to_string();
        assert!(msg.contains("no test/"), "{msg}");
        std::fs::create_dir_all(split.path().join("test/birds")).unwrap();
        let msg = load(split.path(), 8).unwrap_err().to_string();
        assert!(msg.contains("birds") && msg.contains("no folder in"), "{msg}");
    }
}
