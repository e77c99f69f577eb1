//! The bundled UCI handwritten digits (8x8, 1,797 images; see `data/README.md` for source and licence).

use super::{RawDataset, Split, DATA_SEED};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::io::Read;

const DIGITS_CSV_GZ: &[u8] = include_bytes!("../../data/digits.csv.gz");
/// Images in the fixed training split; the remaining 360 form the test set.
pub const TRAIN_LEN: usize = 1437;
/// Images in the embedded set (train and test).
pub const ALL_LEN: usize = 1797;

/// Decodes the embedded file and makes a fixed, seeded 1,437 / 360 train/test split.
pub fn load() -> Result<RawDataset> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_CSV_GZ).read_to_string(&mut text).context("embedded digits data")?;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let values: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<std::result::Result<_, _>>()
            .with_context(|| format!("digits line {}", n + 1))?;
        if values.len() != 65 {
            bail!("digits line {} has {} values, expected 65", n + 1, values.len());
        }
        images.extend(values[..64].iter().map(|v| v / 16.0));
        labels.push(values[64] as u32);
    }
    let all = Split { images, labels, ..Default::default() };
    let mut order: Vec<usize> = (0..all.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(DATA_SEED ^ 0xd161));
    let (tr, te) = order.split_at(TRAIN_LEN);
    Ok(RawDataset {
        task: super::Task::Classify,
        name: "digits".into(),
        classes: (0..10).map(|d| d.to_string()).collect(),
        shape: [1, 8, 8],
        train: all.select(tr, 64),
        test: all.select(te, 64),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn loads_all_1797_with_ten_classes() {
        let d = super::load().unwrap();
        assert_eq!(d.train.len() + d.test.len(), 1797);
        assert_eq!(d.test.len(), 360);
        for c in 0..10 {
            assert!(d.train.labels.iter().filter(|&&l| l == c).count() > 100);
        }
        assert!(d.train.images.iter().all(|&v| (0.0..=1.0).contains(&v)));
    }
}
