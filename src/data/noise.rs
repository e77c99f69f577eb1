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
                // `ambiguous` is a multi-label model (config rejects it for classes); treat as `flip`.
                NoiseKind::Flip | NoiseKind::Ambiguous => {
                    let other = rng.random_range(0..c - 1);
                    if other >= clean[i] {
                        other + 1
                    } else {
                        other
                    }
                }
                NoiseKind::Pair => (clean[i] + 1) % c,
                // Human labels come from their file ([`annotated`]), never from a draw.
                NoiseKind::Human => clean[i],
            };
        }
    }
    let corrupted: Vec<bool> = labels.iter().zip(clean).map(|(a, b)| a != b).collect();
    let changed = corrupted.iter().filter(|&&x| x).count();
    let denom = n.max(1) as f64;
    NoisyLabels { labels, corrupted, picked_rate: picked as f64 / denom, measured_rate: changed as f64 / denom }
}

/// Labels that annotators gave (`noisy`, aligned with `clean`): corrupted where they differ.
pub fn annotated(clean: &[u32], noisy: Vec<u32>) -> NoisyLabels {
    let corrupted: Vec<bool> = noisy.iter().zip(clean).map(|(a, b)| a != b).collect();
    let rate = corrupted.iter().filter(|&&x| x).count() as f64 / clean.len().max(1) as f64;
    NoisyLabels { labels: noisy, corrupted, picked_rate: rate, measured_rate: rate }
}

/// The noise transition matrix of single-label data: row i is the share of the examples of clean
/// class i that carry each label j (rows of absent classes are zero).
pub fn transition_matrix(clean: &[u32], noisy: &[u32], classes: usize) -> Vec<Vec<f64>> {
    let mut counts = vec![vec![0usize; classes]; classes];
    for (&c, &y) in clean.iter().zip(noisy) {
        if (c as usize) < classes && (y as usize) < classes {
            counts[c as usize][y as usize] += 1;
        }
    }
    counts
        .into_iter()
        .map(|row| {
            let n = row.iter().sum::<usize>().max(1) as f64;
            row.into_iter().map(|k| k as f64 / n).collect()
        })
        .collect()
}

/// The transition matrix that synthetic noise of `kind` at `rate` gives single-label data in
/// expectation (what [`corrupt`] draws): `None` for the kinds that have no such matrix (`human`
/// depends on its file, `ambiguous` is per label).
pub fn expected_transition(kind: NoiseKind, rate: f64, classes: usize) -> Option<Vec<Vec<f64>>> {
    let k = classes as f64;
    let cell = |i: usize, j: usize| match kind {
        // A picked example draws any class, its own included.
        NoiseKind::Uniform => (if i == j { 1.0 - rate } else { 0.0 }) + rate / k,
        NoiseKind::Flip if i == j => 1.0 - rate,
        NoiseKind::Flip => rate / (k - 1.0),
        NoiseKind::Pair if i == j => 1.0 - rate,
        NoiseKind::Pair if j == (i + 1) % classes => rate,
        _ => 0.0,
    };
    let defined = matches!(kind, NoiseKind::Uniform | NoiseKind::Flip | NoiseKind::Pair) && classes >= 2;
    defined.then(|| (0..classes).map(|i| (0..classes).map(|j| cell(i, j)).collect()).collect())
}

/// Multi-label targets after corruption.
#[derive(Debug, Clone, PartialEq)]
pub struct NoisyTargets {
    /// (N, L) row-major, as the input; unknown entries are left unknown.
    pub targets: Vec<f32>,
    /// (N, L): `true` where the target differs from the true one.
    pub corrupted: Vec<bool>,
    pub picked_rate: f64,
    pub measured_rate: f64,
}

/// The activation at which an AU counts as present in [`crate::data::faces`]; ambiguity peaks there.
pub const PRESENCE_THRESHOLD: f32 = 0.3;

/// Per label, picks round(s·known) annotations and re-draws them: `uniform` a random 0/1, `flip` and
/// `ambiguous` the opposite value. `ambiguous` picks with weights that peak where the intensity is near
/// the presence threshold (weak, debatable activations), as annotator disagreement does.
pub fn corrupt_multi(clean: &[f32], intensity: &[f32], num_labels: usize, cfg: &NoiseConfig) -> NoisyTargets {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut targets = clean.to_vec();
    let n = clean.len().checked_div(num_labels).unwrap_or(0);
    let (mut picked_total, mut known_total) = (0usize, 0usize);
    for j in 0..num_labels {
        let known: Vec<usize> = (0..n).filter(|&i| clean[i * num_labels + j] >= 0.0).collect();
        let picked = ((cfg.rate * known.len() as f64).round() as usize).min(known.len());
        known_total += known.len();
        picked_total += picked;
        let chosen: Vec<usize> = if cfg.kind == NoiseKind::Ambiguous && !intensity.is_empty() {
            // Efraimidis-Spirakis weighted sampling without replacement: the `picked` largest u^(1/w).
            let mut keyed: Vec<(f64, usize)> = known
                .iter()
                .map(|&i| {
                    let a = intensity[i * num_labels + j];
                    let w = (-((a - PRESENCE_THRESHOLD).abs() as f64) / 0.1).exp() + 1e-3;
                    let u: f64 = rng.random_range(f64::EPSILON..1.0);
                    (u.powf(1.0 / w), i)
                })
                .collect();
            keyed.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal).then(a.1.cmp(&b.1)));
            keyed.into_iter().take(picked).map(|(_, i)| i).collect()
        } else {
            sample(&mut rng, known.len(), picked).into_iter().map(|k| known[k]).collect()
        };
        for i in chosen {
            let t = &mut targets[i * num_labels + j];
            *t = match cfg.kind {
                NoiseKind::Uniform => rng.random_range(0..2u32) as f32,
                _ => 1.0 - *t,
            };
        }
    }
    let corrupted: Vec<bool> = targets.iter().zip(clean).map(|(a, b)| a != b).collect();
    let changed = corrupted.iter().filter(|&&c| c).count();
    let denom = known_total.max(1) as f64;
    NoisyTargets { targets, corrupted, picked_rate: picked_total as f64 / denom, measured_rate: changed as f64 / denom }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(kind: NoiseKind, rate: f64, seed: u64) -> NoiseConfig {
        NoiseConfig { kind, rate, seed, ..Default::default() }
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
    fn multi_label_flips_keep_unknowns_and_favour_ambiguous_intensities() {
        let n = 4000;
        let l = 2;
        let mut clean = Vec::new();
        let mut intensity = Vec::new();
        for i in 0..n {
            let a = (i as f32 / n as f32).min(0.999); // activations spread over [0, 1)
            clean.push(if a > PRESENCE_THRESHOLD { 1.0 } else { 0.0 });
            intensity.push(a);
            clean.push(if i % 10 == 0 { crate::data::UNKNOWN } else { (i % 2) as f32 });
            intensity.push(a);
        }
        let flip = corrupt_multi(&clean, &intensity, l, &cfg(NoiseKind::Flip, 0.2, 1));
        let known1 = clean.iter().skip(1).step_by(2).filter(|v| **v >= 0.0).count();
        let flipped1 = flip.corrupted.iter().skip(1).step_by(2).filter(|c| **c).count();
        assert_eq!(flipped1, (0.2 * known1 as f64).round() as usize);
        for i in 0..n {
            if clean[i * l + 1] < 0.0 {
                assert_eq!(flip.targets[i * l + 1], crate::data::UNKNOWN, "unknown stays unknown");
            }
        }
        let amb = corrupt_multi(&clean, &intensity, l, &cfg(NoiseKind::Ambiguous, 0.1, 1));
        let near: usize =
            (0..n).filter(|&i| amb.corrupted[i * l] && (intensity[i * l] - PRESENCE_THRESHOLD).abs() < 0.15).count();
        let total: usize = (0..n).filter(|&i| amb.corrupted[i * l]).count();
        assert_eq!(total, 400);
        // 30% of the activations lie within 0.15 of the threshold; the flips concentrate there.
        assert!(near as f64 > 0.6 * total as f64, "{near} of {total} flips near the threshold");
        assert_eq!(amb, corrupt_multi(&clean, &intensity, l, &cfg(NoiseKind::Ambiguous, 0.1, 1)));
    }

    #[test]
    fn different_seeds_pick_different_examples() {
        let clean: Vec<u32> = vec![0; 1000];
        let a = corrupt(&clean, 10, &cfg(NoiseKind::Flip, 0.3, 1));
        let b = corrupt(&clean, 10, &cfg(NoiseKind::Flip, 0.3, 2));
        assert_ne!(a.corrupted, b.corrupted);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        #[test]
        fn drawn_noise_matches_its_expected_matrix(kind in 0usize..3, rate in 0.0f64..0.9, seed in 0u64..1000) {
            let kind = [NoiseKind::Uniform, NoiseKind::Flip, NoiseKind::Pair][kind];
            let clean: Vec<u32> = (0..20_000).map(|i| i % 10).collect();
            let drawn = transition_matrix(&clean, &corrupt(&clean, 10, &cfg(kind, rate, seed)).labels, 10);
            let expected = expected_transition(kind, rate, 10).unwrap();
            for (i, (d, e)) in drawn.iter().zip(&expected).enumerate() {
                proptest::prop_assert!((e.iter().sum::<f64>() - 1.0).abs() < 1e-9);
                for j in 0..10 {
                    // 2,000 examples a class: a share's standard error is below 0.012.
                    proptest::prop_assert!((d[j] - e[j]).abs() < 0.05, "{kind:?} ({i}, {j}): {} vs {}", d[j], e[j]);
                }
            }
        }
    }

    #[test]
    fn kinds_without_a_class_matrix_have_none() {
        assert!(expected_transition(NoiseKind::Human, 0.4, 10).is_none());
        assert!(expected_transition(NoiseKind::Ambiguous, 0.4, 10).is_none());
        assert_eq!(expected_transition(NoiseKind::Pair, 0.3, 3).unwrap()[2], vec![0.3, 0.0, 0.7]);
    }

    #[test]
    fn uniform_noise_has_the_expected_transition_matrix() {
        // s = 40% over 10 classes: a picked label is uniform over all 10, so the diagonal is
        // 1 - s + s/10 = 0.64 and every other cell s/10 = 0.04.
        let clean: Vec<u32> = (0..50_000).map(|i| i % 10).collect();
        let out = corrupt(&clean, 10, &cfg(NoiseKind::Uniform, 0.4, 3));
        let m = transition_matrix(&clean, &out.labels, 10);
        for (i, row) in m.iter().enumerate() {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            for (j, &v) in row.iter().enumerate() {
                let want = if i == j { 0.64 } else { 0.04 };
                assert!((v - want).abs() < 0.012, "({i}, {j}): {v} vs {want}");
            }
        }
        // Pair noise moves mass to the next class only.
        let pair = corrupt(&clean, 10, &cfg(NoiseKind::Pair, 0.3, 3));
        let m = transition_matrix(&clean, &pair.labels, 10);
        assert!((m[2][3] - 0.3).abs() < 0.02 && m[2][4] == 0.0 && (m[2][2] - 0.7).abs() < 0.02, "{:?}", m[2]);
    }
}
