//! `shapes`: ten procedural shape classes on 32x32 RGB, generated from a seed in milliseconds.
//!
//! Colour, size, position, a small rotation, a background gradient, a distractor stroke and pixel noise
//! vary per image, so a small ResNet needs several epochs to learn it and can over-fit noisy labels.

use super::{RawDataset, Split};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const CLASSES: [&str; 10] =
    ["disk", "square", "triangle", "plus", "ring", "diamond", "cross", "h-bar", "v-bar", "dots"];
pub const SIDE: usize = 32;
pub const DEFAULT_TRAIN: usize = 5000;
pub const DEFAULT_TEST: usize = 1000;

/// Generates `n_train` + `n_test` images, classes balanced, deterministic in `seed`.
pub fn generate(n_train: usize, n_test: usize, seed: u64) -> RawDataset {
    RawDataset {
        task: super::Task::Classify,
        name: "shapes".into(),
        classes: CLASSES.iter().map(|s| s.to_string()).collect(),
        shape: [3, SIDE, SIDE],
        train: split(n_train, seed),
        test: split(n_test, seed ^ 0x7e57),
    }
}

fn split(n: usize, seed: u64) -> Split {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut images = Vec::with_capacity(n * 3 * SIDE * SIDE);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = (i % CLASSES.len()) as u32;
        images.extend(render(class, &mut rng));
        labels.push(class);
    }
    Split { images, labels, ..Default::default() }
}

/// Whether local coordinates (u, v) in [-1, 1]² lie inside the shape of `class`.
fn inside(class: u32, u: f32, v: f32) -> bool {
    let r2 = u * u + v * v;
    match class {
        0 => r2 < 0.81,
        1 => u.abs().max(v.abs()) < 0.75,
        2 => v > -0.65 && v < 0.8 && u.abs() < (0.8 - v) * 0.62,
        3 => (u.abs() < 0.22 && v.abs() < 0.9) || (v.abs() < 0.22 && u.abs() < 0.9),
        4 => r2 > 0.36 && r2 < 0.9,
        5 => u.abs() + v.abs() < 0.95,
        6 => ((u - v).abs() < 0.3 || (u + v).abs() < 0.3) && u.abs() < 0.75 && v.abs() < 0.75,
        7 => u.abs() < 0.95 && v.abs() < 0.28,
        8 => u.abs() < 0.28 && v.abs() < 0.95,
        _ => (u - 0.5).powi(2) + v * v < 0.16 || (u + 0.5).powi(2) + v * v < 0.16,
    }
}

fn render(class: u32, rng: &mut impl Rng) -> Vec<f32> {
    let bg0: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..1.0));
    let bg1: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..1.0));
    // Foreground far enough from the background to stay visible.
    let fg: [f32; 3] = loop {
        let c: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..1.0));
        let d: f32 = (0..3).map(|k| (c[k] - (bg0[k] + bg1[k]) / 2.0).abs()).sum();
        if d > 0.6 {
            break c;
        }
    };
    let scale = rng.random_range(6.0..13.0f32);
    let cx = rng.random_range(scale..SIDE as f32 - scale);
    let cy = rng.random_range(scale..SIDE as f32 - scale);
    let angle = rng.random_range(-0.3..0.3f32);
    let (sin, cos) = angle.sin_cos();
    let noise = rng.random_range(0.02..0.12f32);
    // A distractor stroke: a thin line somewhere in the image.
    let (lx, ly, ldx, ldy) = (
        rng.random_range(0.0..32.0f32),
        rng.random_range(0.0..32.0f32),
        rng.random_range(-1.0..1.0f32),
        rng.random_range(-1.0..1.0f32),
    );
    let lnorm = (ldx * ldx + ldy * ldy).sqrt().max(1e-3);
    let lcol: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..1.0));

    let mut out = vec![0f32; 3 * SIDE * SIDE];
    for y in 0..SIDE {
        for x in 0..SIDE {
            // 2x2 supersampling for anti-aliased edges.
            let mut cover = 0.0;
            for (ox, oy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                let dx = (x as f32 + ox - cx) / scale;
                let dy = (y as f32 + oy - cy) / scale;
                let (u, v) = (cos * dx + sin * dy, -sin * dx + cos * dy);
                if inside(class, u, v) {
                    cover += 0.25;
                }
            }
            let t = (x + y) as f32 / (2 * SIDE) as f32;
            let dist = ((x as f32 - lx) * ldy - (y as f32 - ly) * ldx).abs() / lnorm;
            let stroke = if dist < 0.6 { 0.7 } else { 0.0 };
            for k in 0..3 {
                let bg = bg0[k] * (1.0 - t) + bg1[k] * t;
                let bg = bg * (1.0 - stroke) + lcol[k] * stroke;
                let v = bg * (1.0 - cover) + fg[k] * cover + rng.random_range(-noise..noise);
                out[k * SIDE * SIDE + y * SIDE + x] = v.clamp(0.0, 1.0);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_balanced_and_in_range() {
        let a = generate(50, 20, 9);
        let b = generate(50, 20, 9);
        assert_eq!(a.train.images, b.train.images);
        assert_eq!(a.train.len(), 50);
        assert_eq!(a.test.len(), 20);
        for c in 0..10 {
            assert_eq!(a.train.labels.iter().filter(|&&l| l == c).count(), 5);
        }
        assert!(a.train.images.iter().all(|v| (0.0..=1.0).contains(v)));
        assert_ne!(a.train.images, generate(50, 20, 10).train.images);
    }

    #[test]
    fn every_class_draws_a_visible_shape() {
        for c in 0..10 {
            let mut hits = 0;
            for i in 0..40 {
                for j in 0..40 {
                    if inside(c, i as f32 / 20.0 - 1.0, j as f32 / 20.0 - 1.0) {
                        hits += 1;
                    }
                }
            }
            assert!(hits > 100, "class {c} covers {hits} of 1600 sample points");
        }
    }
}
