//! `faces`: procedurally drawn faces whose 12 Action Units (BP4D's: 1, 2, 4, 6, 7, 10, 12, 14, 15, 17,
//! 23, 24) move the parts they move on a real face, each with an intensity.
//!
//! Expressions are mixtures of prototypes (happiness = 6 + 12, sadness = 1 + 4 + 15 + 17, anger =
//! 4 + 7 + 23 + 24, ...), so AUs co-occur as they do in BP4D and their base rates differ; a few AUs also fire on
//! their own. Identity (face shape, feature placement, skin and background colours), pose, lighting and
//! pixel noise vary as nuisances. An AU is present when its activation exceeds
//! [`super::noise::PRESENCE_THRESHOLD`]; the activation is kept as the intensity, which the `ambiguous`
//! annotation noise uses (disagreement concentrates on weak activations).

use super::noise::PRESENCE_THRESHOLD;
use super::{RawDataset, Split, Task};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The 12 AUs of the paper's Table 1, in order.
pub const AUS: [u32; 12] = [1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24];
pub const SIDE: usize = 40;
pub const DEFAULT_TRAIN: usize = 4000;
pub const DEFAULT_TEST: usize = 1000;

// Indices into AUS.
const AU1: usize = 0;
const AU2: usize = 1;
const AU4: usize = 2;
const AU6: usize = 3;
const AU7: usize = 4;
const AU10: usize = 5;
const AU12: usize = 6;
const AU14: usize = 7;
const AU15: usize = 8;
const AU17: usize = 9;
const AU23: usize = 10;
const AU24: usize = 11;

/// Expression prototypes: (probability of appearing, AU activations).
const PROTOTYPES: [(f64, &[(usize, f32)]); 7] = [
    (0.40, &[(AU6, 0.8), (AU12, 1.0), (AU10, 0.3), (AU14, 0.2)]), // happiness
    (0.15, &[(AU1, 0.8), (AU4, 0.6), (AU15, 0.9), (AU17, 0.5)]),  // sadness
    (0.12, &[(AU1, 0.9), (AU2, 0.9)]),                            // surprise
    (0.12, &[(AU4, 0.9), (AU7, 0.8), (AU23, 0.7), (AU24, 0.6), (AU17, 0.3)]), // anger
    (0.15, &[(AU10, 0.9), (AU4, 0.4), (AU17, 0.5), (AU7, 0.3)]),  // disgust
    (0.18, &[(AU6, 0.7), (AU7, 0.9), (AU10, 0.6), (AU4, 0.5)]),   // pain / effort
    (0.15, &[(AU14, 0.9), (AU12, 0.3)]),                          // contempt / dimpling
];

/// AU names as shown on screen and in tables.
pub fn au_names() -> Vec<String> {
    AUS.iter().map(|a| format!("AU{a}")).collect()
}

/// Generates `n_train` + `n_test` faces, deterministic in `seed`.
pub fn generate(n_train: usize, n_test: usize, seed: u64) -> RawDataset {
    RawDataset {
        name: "faces".into(),
        task: Task::MultiLabel,
        classes: au_names(),
        shape: [3, SIDE, SIDE],
        train: split(n_train, seed),
        test: split(n_test, seed ^ 0xface),
    }
}

fn split(n: usize, seed: u64) -> Split {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut s = Split::default();
    for i in 0..n {
        let act = activations(&mut rng);
        let face = Identity::draw(&mut rng);
        s.images.extend(render(&face, &act, &mut rng));
        s.labels.push(0);
        s.targets.extend(act.iter().map(|&a| if a > PRESENCE_THRESHOLD { 1.0 } else { 0.0 }));
        s.intensity.extend_from_slice(&act);
        // 40 synthetic "subjects", so subject-exclusive logic can be exercised on faces too.
        s.subjects.push(format!("S{:02}", i % 40));
    }
    s
}

/// AU activations in [0, 1] for one face.
fn activations(rng: &mut impl Rng) -> [f32; 12] {
    let mut a = [0f32; 12];
    for (p, aus) in PROTOTYPES {
        if rng.random_bool(p) {
            let strength = rng.random_range(0.25..1.15f32);
            for &(au, w) in aus {
                a[au] += w * strength;
            }
        }
    }
    for v in a.iter_mut() {
        if rng.random_bool(0.06) {
            *v += rng.random_range(0.2..0.9f32);
        }
        *v = (*v + rng.random_range(-0.06..0.06f32)).clamp(0.0, 1.0);
    }
    a
}

/// What stays the same for one person.
struct Identity {
    face_w: f32,
    face_h: f32,
    eye_dx: f32,
    eye_y: f32,
    brow_gap: f32,
    brow_thick: f32,
    mouth_y: f32,
    mouth_w: f32,
    skin: [f32; 3],
    background: [f32; 3],
}

impl Identity {
    fn draw(rng: &mut impl Rng) -> Self {
        let tone = rng.random_range(0.25..0.95f32);
        Self {
            face_w: rng.random_range(0.70..0.84),
            face_h: rng.random_range(0.86..0.97),
            eye_dx: rng.random_range(0.27..0.35),
            eye_y: rng.random_range(-0.22..-0.12),
            brow_gap: rng.random_range(0.15..0.21),
            brow_thick: rng.random_range(0.055..0.08),
            mouth_y: rng.random_range(0.40..0.50),
            mouth_w: rng.random_range(0.26..0.34),
            skin: [tone, tone * rng.random_range(0.72..0.85), tone * rng.random_range(0.58..0.75)],
            background: {
                let g = rng.random_range(0.2..0.8);
                std::array::from_fn(|_| g + rng.random_range(-0.12..0.12))
            },
        }
    }
}

fn seg_dist(p: (f32, f32), a: (f32, f32), b: (f32, f32)) -> f32 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let t = (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / (dx * dx + dy * dy).max(1e-9)).clamp(0.0, 1.0);
    ((p.0 - a.0 - t * dx).powi(2) + (p.1 - a.1 - t * dy).powi(2)).sqrt()
}

/// Anti-aliased coverage of a stroke of half-width `w` at distance `d`, for pixels of size `px`.
fn cover(d: f32, w: f32, px: f32) -> f32 {
    ((w - d) / px + 0.5).clamp(0.0, 1.0)
}

fn render(f: &Identity, a: &[f32; 12], rng: &mut impl Rng) -> Vec<f32> {
    let angle = rng.random_range(-0.1..0.1f32);
    let scale = rng.random_range(1.0..1.12f32);
    let (tx, ty) = (rng.random_range(-0.05..0.05f32), rng.random_range(-0.05..0.05f32));
    let (light_x, light_y) = (rng.random_range(-0.35..0.35f32), rng.random_range(-0.25..0.25f32));
    let noise = rng.random_range(0.015..0.05f32);
    let (sin, cos) = angle.sin_cos();
    let px = 2.0 / SIDE as f32 / scale;

    // Geometry after the AUs.
    let brow_y = f.eye_y - f.brow_gap + 0.09 * a[AU4];
    let inner_x = 0.11 - 0.06 * a[AU4];
    let inner_y = brow_y - 0.18 * a[AU1];
    let outer_x = f.eye_dx + 0.17;
    let outer_y = brow_y - 0.18 * a[AU2] + 0.03 * a[AU1];
    let eye_h = (0.08 * (1.0 + 0.4 * (a[AU1] + a[AU2]) - 0.6 * a[AU7] - 0.35 * a[AU6])).max(0.012);
    let cheek_y = f.eye_y + 0.24 - 0.12 * a[AU6];
    let mouth_w = f.mouth_w * (1.0 + 0.4 * a[AU12] - 0.22 * a[AU14] - 0.2 * a[AU23] - 0.15 * a[AU24]);
    let corner_y = f.mouth_y - 0.16 * a[AU12] + 0.15 * a[AU15];
    let centre_y = f.mouth_y - 0.07 * a[AU17] - 0.02 * a[AU24];
    let lip = 0.045 * (1.0 - 0.6 * a[AU23] - 0.5 * a[AU24]).max(0.2);
    let upper_lift = 0.09 * a[AU10];
    let chin_y = f.mouth_y + 0.30 - 0.07 * a[AU17];

    let mut out = vec![0f32; 3 * SIDE * SIDE];
    for y in 0..SIDE {
        for x in 0..SIDE {
            // Image coordinates in [-1, 1], then undo the pose to get face coordinates.
            let (ix, iy) =
                ((x as f32 + 0.5) / SIDE as f32 * 2.0 - 1.0 - tx, (y as f32 + 0.5) / SIDE as f32 * 2.0 - 1.0 - ty);
            let (u, v) = ((cos * ix + sin * iy) / scale, (-sin * ix + cos * iy) / scale);
            let p = (u, v);
            let inside = (u / f.face_w).powi(2) + (v / f.face_h).powi(2);
            let mut c = if inside < 1.0 { f.skin } else { f.background };
            if inside < 1.0 {
                let mut dark = 0.0f32;
                let mut red = 0.0f32;
                for side in [-1.0f32, 1.0] {
                    let m = |pt: (f32, f32)| (pt.0 * side, pt.1);
                    // Brows.
                    let d = seg_dist(p, m((inner_x, inner_y)), m((outer_x, outer_y)));
                    dark = dark.max(0.75 * cover(d, f.brow_thick, px));
                    // Eyes: white, iris, lid line.
                    let (ex, ey) = (f.eye_dx * side, f.eye_y);
                    let e = ((u - ex) / 0.14).powi(2) + ((v - ey) / eye_h).powi(2);
                    if e < 1.0 {
                        let iris = ((u - ex).powi(2) + (v - ey).powi(2)).sqrt();
                        dark = dark.max(if iris < eye_h.min(0.05) { 0.85 } else { -0.5 });
                    }
                    // Crow's feet (AU6) and cheeks raised (AU6).
                    let crow = seg_dist(p, m((f.eye_dx + 0.13, f.eye_y + 0.02)), m((f.eye_dx + 0.2, f.eye_y + 0.07)));
                    dark = dark.max(0.7 * a[AU6] * cover(crow, 0.025, px));
                    let cheek = ((u - (f.eye_dx + 0.02) * side).powi(2) + (v - cheek_y).powi(2)).sqrt();
                    red = red.max(0.3 * a[AU6] * (1.0 - cheek / 0.14).max(0.0));
                    // Nasolabial folds, deepened by AU10.
                    let fold = seg_dist(p, m((0.1, f.mouth_y - 0.2 - 0.03 * a[AU10])), m((mouth_w + 0.03, corner_y)));
                    dark = dark.max((0.12 + 0.5 * a[AU10]) * cover(fold, 0.018, px));
                    // Dimples (AU14).
                    let dimple = ((u - (mouth_w + 0.05) * side).powi(2) + (v - corner_y).powi(2)).sqrt();
                    dark = dark.max(0.8 * a[AU14] * cover(dimple, 0.035, px));
                }
                // Brow furrow (AU4).
                for side in [-1.0f32, 1.0] {
                    let d = seg_dist(p, (0.035 * side, brow_y - 0.04), (0.035 * side, brow_y + 0.06));
                    dark = dark.max(0.7 * a[AU4] * cover(d, 0.022, px));
                }
                // Nose.
                let nose = seg_dist(p, (0.0, f.eye_y + 0.05), (0.02, f.mouth_y - 0.2));
                dark = dark.max(0.25 * cover(nose, 0.018, px));
                // Mouth: a parabola through the corners and the centre; lips above and below it.
                if u.abs() < mouth_w + px {
                    let t = (u / mouth_w).clamp(-1.0, 1.0);
                    let line = centre_y + (corner_y - centre_y) * t * t;
                    let dv = v - line;
                    if u.abs() < mouth_w {
                        if dv < 0.0 && dv > -(lip + upper_lift) {
                            // Upper lip, lifted by AU10 to show the teeth.
                            if dv > -upper_lift {
                                dark = dark.max(-0.6);
                            } else {
                                red = red.max(0.55 + 0.3 * a[AU24]);
                            }
                        } else if dv >= 0.0 && dv < lip * 1.3 {
                            red = red.max(0.55 + 0.3 * a[AU24]);
                        }
                    }
                    dark = dark.max(0.8 * cover(dv.abs(), 0.016, px));
                }
                // Chin boss pushed up with a dimpled texture (AU17).
                let chin = (u / 0.16).powi(2) + ((v - chin_y) / 0.08).powi(2);
                if chin < 1.0 {
                    dark = dark.max(a[AU17] * (0.2 + 0.35 * rng.random_range(0.0..1.0f32)));
                }
                c = if dark >= 0.0 {
                    [c[0] * (1.0 - dark), c[1] * (1.0 - dark), c[2] * (1.0 - dark)]
                } else {
                    let w = -dark; // toward white (eye whites, teeth)
                    [c[0] + (0.95 - c[0]) * w, c[1] + (0.95 - c[1]) * w, c[2] + (0.95 - c[2]) * w]
                };
                c = [c[0] + (0.75 - c[0]) * red, c[1] * (1.0 - 0.6 * red), c[2] * (1.0 - 0.6 * red)];
            }
            let light = 1.0 + light_x * ix + light_y * iy;
            for k in 0..3 {
                out[k * SIDE * SIDE + y * SIDE + x] = (c[k] * light + rng.random_range(-noise..noise)).clamp(0.0, 1.0);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_in_range() {
        let a = generate(30, 10, 5);
        let b = generate(30, 10, 5);
        assert_eq!(a.train.images, b.train.images);
        assert_eq!(a.train.targets, b.train.targets);
        assert_eq!(a.train.targets.len(), 30 * 12);
        assert!(a.train.images.iter().all(|v| (0.0..=1.0).contains(v)));
        assert_ne!(a.train.images, generate(30, 10, 6).train.images);
    }

    #[test]
    fn base_rates_differ_per_au_and_6_co_occurs_with_12() {
        let d = generate(3000, 1, 1);
        let n = 3000.0;
        let rate = |j: usize| d.train.targets.iter().skip(j).step_by(12).sum::<f32>() as f64 / n;
        let rates: Vec<f64> = (0..12).map(rate).collect();
        let (lo, hi) = rates.iter().fold((1.0f64, 0.0f64), |(l, h), &r| (l.min(r), h.max(r)));
        assert!(lo > 0.05 && hi < 0.8, "every AU occurs, none always: {rates:?}");
        assert!(hi - lo > 0.2, "base rates differ: {rates:?}");
        let both =
            (0..3000).filter(|i| d.train.targets[i * 12 + AU6] > 0.5 && d.train.targets[i * 12 + AU12] > 0.5).count();
        let p_both = both as f64 / n;
        assert!(
            p_both > 1.5 * rates[AU6] * rates[AU12],
            "AU6 and AU12 co-occur: {p_both} vs {}",
            rates[AU6] * rates[AU12]
        );
    }

    #[test]
    fn an_au_visibly_changes_the_image() {
        // Same face and pose, AU12 off vs fully on: the mouth region must differ.
        let make = |au12: f32| {
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let face = Identity::draw(&mut rng);
            let mut a = [0f32; 12];
            a[AU12] = au12;
            render(&face, &a, &mut ChaCha8Rng::seed_from_u64(4))
        };
        let (off, on) = (make(0.0), make(1.0));
        let diff: f32 = off.iter().zip(&on).map(|(a, b)| (a - b).abs()).sum();
        assert!(diff > 8.0, "{diff}");
    }
}
