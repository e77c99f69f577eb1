//! Standard CIFAR augmentation: random crop with 4-pixel zero padding, then a random horizontal flip.

use rand::Rng;

/// Augments a batch in place. `images` is NCHW with `shape` = (C, H, W) per image.
pub fn crop_flip(images: &mut [f32], shape: [usize; 3], rng: &mut impl Rng) {
    const PAD: i64 = 4;
    let [c, h, w] = shape;
    let len = c * h * w;
    let mut src = vec![0f32; len];
    for img in images.chunks_exact_mut(len) {
        src.copy_from_slice(img);
        let dy = rng.random_range(-PAD..=PAD);
        let dx = rng.random_range(-PAD..=PAD);
        let flip = rng.random_bool(0.5);
        for ch in 0..c {
            for y in 0..h as i64 {
                for x in 0..w as i64 {
                    let sx = if flip { w as i64 - 1 - x } else { x } + dx;
                    let sy = y + dy;
                    let v = if sy < 0 || sy >= h as i64 || sx < 0 || sx >= w as i64 {
                        0.0
                    } else {
                        src[ch * h * w + sy as usize * w + sx as usize]
                    };
                    img[ch * h * w + y as usize * w + x as usize] = v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    proptest! {
        #[test]
        fn crop_flip_keeps_values_from_the_source_or_zero(seed in 0u64..500) {
            let shape = [2, 6, 5];
            let orig: Vec<f32> = (0..60).map(|i| i as f32 + 1.0).collect();
            let mut img = orig.clone();
            crop_flip(&mut img, shape, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
            for (i, v) in img.iter().enumerate() {
                let ch = i / 30;
                prop_assert!(*v == 0.0 || orig[ch * 30..(ch + 1) * 30].contains(v));
            }
            // at least (6-4)*(5-4) pixels survive per channel
            prop_assert!(img.iter().filter(|v| **v != 0.0).count() >= 2 * 2);
        }
    }
}
