//! The shape of one convolution, shared by the CPU and GPU kernels.

use candle_core::{Result, Shape};

/// Shape of one convolution: an N×C×H×W input, O output channels, a square k×k kernel, the same
/// stride and padding on both axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Geometry {
    /// The geometry of an NCHW input and an OIHW weight (their channel counts must agree, and the
    /// kernel be square).
    pub fn of(x: &Shape, w: &Shape, stride: usize, pad: usize) -> Result<Self> {
        let (n, c, h, wd) = x.dims4()?;
        let (o, ci, k, k2) = w.dims4()?;
        if ci != c || k != k2 {
            candle_core::bail!("conv2d: input has {c} channels, weight expects {ci} (kernel {k}x{k2})");
        }
        Ok(Geometry { n, c, h, w: wd, o, k, stride, pad })
    }

    pub fn oh(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    pub fn ow(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    /// Rows of the im2col matrix (C·k·k).
    pub fn kdim(&self) -> usize {
        self.c * self.k * self.k
    }
    /// Columns of the im2col matrix (output pixels of one image).
    pub fn pixels(&self) -> usize {
        self.oh() * self.ow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_size_and_mismatched_weights() {
        let g = Geometry::of(&Shape::from((2, 16, 32, 32)), &Shape::from((32, 16, 3, 3)), 2, 1).unwrap();
        assert_eq!((g.oh(), g.ow(), g.pixels(), g.kdim()), (16, 16, 256, 144));
        let err = Geometry::of(&Shape::from((2, 16, 8, 8)), &Shape::from((32, 8, 3, 3)), 1, 1).unwrap_err();
        assert!(err.to_string().contains("input has 16 channels, weight expects 8"), "{err}");
    }
}
