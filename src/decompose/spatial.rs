//! Spatial separability: of each 2-D kernel (rank 1 = column × row, like Sobel), and of a whole
//! layer as a kh×1 conv M→R followed by a 1×kw conv R→N, from the SVD of the (M·kh) × (N·kw)
//! matrix A[(m, i), (n, j)] = W[n, m, i, j].

use serde::Serialize;

use super::{Svd, Weight, relative_error};
use crate::error::Result;
use crate::tensor::Tensor;

/// How close a layer is to spatially separable.
#[derive(Clone, Debug)]
pub struct SpatialAnalysis {
    /// Per 2-D kernel W[n, m] (index n·M + m), its singular values.
    pub kernel_singular_values: Vec<Vec<f64>>,
    /// Per 2-D kernel, its numerical rank.
    pub kernel_ranks: Vec<usize>,
    /// The SVD of the layer matrix A.
    pub layer: Svd,
    /// Relative Frobenius error of the best rank-R layer factorization, R = 1 … min(M·kh, N·kw).
    pub errors: Vec<f64>,
}

/// One row of the error-vs-cost curve.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SpatialPoint {
    /// Middle channels R.
    pub r: usize,
    /// Relative Frobenius error of the best rank-R factorization.
    pub relative_error: f64,
    /// Share of the weight's energy kept.
    pub energy_kept: f64,
    /// MACs per output pixel: M·R·kh + R·N·kw.
    pub macs_per_pixel: u64,
}

impl SpatialAnalysis {
    /// Analyzes `w`.
    pub fn of(w: &Weight) -> Result<Self> {
        let mut kernel_singular_values = Vec::with_capacity(w.n * w.m);
        let mut kernel_ranks = Vec::with_capacity(w.n * w.m);
        for n in 0..w.n {
            for m in 0..w.m {
                let k: Vec<f64> = (0..w.taps())
                    .map(|t| w.at(n, m, t / w.kw, t % w.kw))
                    .collect();
                let svd = Svd::of(w.kh, w.kw, &k)?;
                kernel_ranks.push(svd.rank());
                kernel_singular_values.push(svd.s);
            }
        }
        let (rows, cols) = (w.m * w.kh, w.n * w.kw);
        let mut a = vec![0f64; rows * cols];
        for n in 0..w.n {
            for m in 0..w.m {
                for i in 0..w.kh {
                    for j in 0..w.kw {
                        a[(m * w.kh + i) * cols + n * w.kw + j] = w.at(n, m, i, j);
                    }
                }
            }
        }
        let layer = Svd::of(rows, cols, &a)?;
        let total = layer.energy();
        let errors = (1..=rows.min(cols))
            .map(|r| relative_error(layer.tail_energy(r), total))
            .collect();
        Ok(SpatialAnalysis {
            kernel_singular_values,
            kernel_ranks,
            layer,
            errors,
        })
    }

    /// How many of the N·M 2-D kernels are exactly rank 1 (or zero).
    pub fn separable_kernels(&self) -> usize {
        self.kernel_ranks.iter().filter(|&&r| r <= 1).count()
    }

    /// The error-vs-MACs curve of the layer factorization.
    pub fn curve(&self, w: &Weight) -> Vec<SpatialPoint> {
        self.errors
            .iter()
            .enumerate()
            .map(|(i, &e)| SpatialPoint {
                r: i + 1,
                relative_error: e,
                energy_kept: 1.0 - e * e,
                macs_per_pixel: macs_per_pixel(w, i + 1),
            })
            .collect()
    }
}

/// MACs per output pixel of kh×1 M→R then 1×kw R→N.
pub fn macs_per_pixel(w: &Weight, r: usize) -> u64 {
    (w.m * r * w.kh + r * w.n * w.kw) as u64
}

/// The factors of a spatially separable approximation.
#[derive(Clone, Debug)]
pub struct SpatialFactors {
    /// First conv weight [R, M, kh, 1].
    pub vertical: Tensor,
    /// Second conv weight [N, R, 1, kw].
    pub horizontal: Tensor,
    /// Middle channels R.
    pub r: usize,
    /// Relative Frobenius error predicted from the discarded singular values.
    pub predicted_error: f64,
}

/// The best rank-R spatially separable approximation of `w` (ranks above the matrix's size give
/// zero channels and the exact result).
pub fn decompose(w: &Weight, a: &SpatialAnalysis, r: usize) -> Result<SpatialFactors> {
    let mut v = vec![0f32; r * w.m * w.kh];
    let mut h = vec![0f32; w.n * r * w.kw];
    for (k, &s) in a.layer.s.iter().enumerate().take(r) {
        let root = s.sqrt();
        for m in 0..w.m {
            for i in 0..w.kh {
                v[(k * w.m + m) * w.kh + i] = (root * a.layer.u[k][m * w.kh + i]) as f32;
            }
        }
        for n in 0..w.n {
            for j in 0..w.kw {
                h[(n * r + k) * w.kw + j] = (root * a.layer.v[k][n * w.kw + j]) as f32;
            }
        }
    }
    Ok(SpatialFactors {
        vertical: Tensor::new(&[r, w.m, w.kh, 1], v)?,
        horizontal: Tensor::new(&[w.n, r, 1, w.kw], h)?,
        r,
        predicted_error: relative_error(a.layer.tail_energy(r), a.layer.energy()),
    })
}

/// W[n, m, i, j] = Σ_r H[n, r, 0, j]·V[r, m, i, 0]: the standard weight a spatial pair computes.
pub fn reconstruct(vertical: &Tensor, horizontal: &Tensor) -> Result<Tensor> {
    let [r, m, kh, _] = vertical.dims4("vertical weight")?;
    let [n, _, _, kw] = horizontal.dims4("horizontal weight")?;
    let (v, h) = (vertical.data(), horizontal.data());
    let mut w = vec![0f32; n * m * kh * kw];
    for no in 0..n {
        for mi in 0..m {
            for i in 0..kh {
                for j in 0..kw {
                    w[((no * m + mi) * kh + i) * kw + j] = (0..r)
                        .map(|k| h[(no * r + k) * kw + j] as f64 * v[(k * m + mi) * kh + i] as f64)
                        .sum::<f64>()
                        as f32;
                }
            }
        }
    }
    Tensor::new(&[n, m, kh, kw], w)
}
