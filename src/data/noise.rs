//! Label noise: re-annotate a seeded random fraction s of the training labels.

use crate::config::{NoiseConfig, NoiseKind};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Training labels after corruption.
#[derive(Debug, Clone, PartialEq)]
pub struct NoisyLabels {
    pub labels: Vec<u32>,
    /// `true` where the new label differs from the true one.
    pub corrupted: Vec<bool>,
    /// Fraction of examples that were re-annotated (round(s·N)/N).
    pub picked_rate: f64,
    /// Fraction of labels that really changed; about s·(C-1)/C for `uniform`, s for `flip` and `pair`.
    pub measured_rate: f64,
}

/// Picks exactly round(s·N) examples with a seeded RNG and gives each a new label drawn by `kind`.
pub fn corrupt(clean: &[u32], num_classes: usize, cfg: &NoiseConfig) -> NoisyLabels {
    let n = clean.len();
    let picked = ((cfg.rate * n as f64).round() as usize).min(n);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut labels = clean.to_vec();
    let c = num_classes as u32;
    if c >= 2 {
        for i in sample(&mut rng, n, picked).into_iter() {
            labels[i] = match cfg.kind {
                NoiseKind::Uniform => rng.random_range(0..c),
                NoiseKind::Flip => {
                    let other = rng.random_range(0..c - 1);
                    if other >= clean[i] {
                        other + 1
                    } else {
                        other
                    }
                }
                NoiseKind::Pair => (clean[i] + 1) % c,
            };
        }
    }
    let corrupted: Vec<bool> = labels.iter().zip(clean).map(|(a, b)| a != b).collect();
    let changed = corrupted.iter().filter(|&&x| x).count();
    let denom = n.max(1) as f64;
    NoisyLabels { labels, corrupted, picked_rate: picked as f64 / denom, measured_rate: changed as f64 / denom }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(kind: NoiseKind, rate: f64, seed: u64) -> NoiseConfig {
        NoiseConfig { kind, rate, seed }
    }

    proptest! {
        #[test]
        fn flip_and_pair_change_exactly_round_s_n(n in 1usize..2000, rate in 0.0f64..=1.0, seed in 0u64..1000, classes in 2usize..20) {
            let clean: Vec<u32> = (0..n).map(|i| (i % classes) as u32).collect();
            for kind in [NoiseKind::Flip, NoiseKind::Pair] {
                let out = corrupt(&clean, classes, &cfg(kind, rate, seed));
                let expected = (rate * n as f64).round() as usize;
                prop_assert_eq!(out.corrupted.iter().filter(|&&c| c).count(), expected);
                prop_assert!(out.labels.iter().all(|&l| (l as usize) < classes));
                if kind == NoiseKind::Pair {
                    for ((&l, &c), &bad) in out.labels.iter().zip(&clean).zip(&out.corrupted) {
                        if bad { prop_assert_eq!(l, (c + 1) % classes as u32); }
                    }
                }
            }
        }

        #[test]
        fn noise_is_deterministic_per_seed(n in 1usize..500, rate in 0.0f64..=1.0, seed in 0u64..1000) {
            let clean: Vec<u32> = (0..n).map(|i| (i % 10) as u32).collect();
            let a = corrupt(&clean, 10, &cfg(NoiseKind::Uniform, rate, seed));
            let b = corrupt(&clean, 10, &cfg(NoiseKind::Uniform, rate, seed));
            prop_assert_eq!(a, b);
        }

        #[test]
        fn uniform_never_changes_more_than_picked(n in 1usize..2000, rate in 0.0f64..=1.0, seed in 0u64..100) {
            let clean: Vec<u32> = (0..n).map(|i| (i % 10) as u32).collect();
            let out = corrupt(&clean, 10, &cfg(NoiseKind::Uniform, rate, seed));
            let changed = out.corrupted.iter().filter(|&&c| c).count();
            prop_assert!(changed <= (rate * n as f64).round() as usize);
            prop_assert!((out.measured_rate - changed as f64 / n as f64).abs() < 1e-12);
        }
    }

    #[test]
    fn uniform_measured_rate_is_about_s_times_nine_tenths() {
        let clean: Vec<u32> = (0..50_000).map(|i| (i % 10) as u32).collect();
        let out = corrupt(&clean, 10, &cfg(NoiseKind::Uniform, 0.4, 7));
        assert!((out.picked_rate - 0.4).abs() < 1e-9);
        assert!((out.measured_rate - 0.36).abs() < 0.005, "{}", out.measured_rate);
    }

    #[test]
    fn different_seeds_pick_different_examples() {
        let clean: Vec<u32> = vec![0; 1000];
        let a = corrupt(&clean, 10, &cfg(NoiseKind::Flip, 0.3, 1));
        let b = corrupt(&clean, 10, &cfg(NoiseKind::Flip, 0.3, 2));
        assert_ne!(a.corrupted, b.corrupted);
    }
}
