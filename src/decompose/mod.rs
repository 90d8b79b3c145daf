//! When is a convolution separable, and what is the best separable approximation when it is
//! not? Both questions are answered by singular value decompositions (Eckart–Young: the
//! truncated SVD is the best rank-r approximation in the Frobenius norm).
//!
//! - [`spatial`]: a 2-D kernel is spatially separable (column × row) iff it has rank 1; a whole
//!   layer W[N, M, kh, kw] factors into kh×1 M→R then 1×kw R→N iff the (M·kh) × (N·kw) matrix
//!   A[(m, i), (n, j)] = W[n, m, i, j] has rank ≤ R.
//! - [`depthwise`]: a layer is exactly depthwise separable with multiplier K iff, for every input
//!   channel m, the N × (kh·kw) matrix W[:, m] has rank ≤ K (the Network Decoupling
//!   construction: K depthwise filters per channel, recombined by a pointwise conv).
//!
//! SVDs run in f64 (faer) on f32 weights.

pub mod depthwise;
pub mod network;
pub mod spatial;

use faer::Mat;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The thin SVD of a matrix: `a = u · diag(s) · vᵀ`, singular values in decreasing order.
#[derive(Clone, Debug)]
pub struct Svd {
    /// Rows of the matrix.
    pub rows: usize,
    /// Columns of the matrix.
    pub cols: usize,
    /// Singular values, decreasing.
    pub s: Vec<f64>,
    /// Left singular vectors, `u[k][row]`.
    pub u: Vec<Vec<f64>>,
    /// Right singular vectors, `v[k][col]`.
    pub v: Vec<Vec<f64>>,
}

impl Svd {
    /// The SVD of the row-major `rows × cols` matrix `a`.
    pub fn of(rows: usize, cols: usize, a: &[f64]) -> Result<Svd> {
        let m = Mat::from_fn(rows, cols, |i, j| a[i * cols + j]);
        let svd = m
            .thin_svd()
            .map_err(|e| Error::Runtime(format!("SVD did not converge: {e:?}")))?;
        let k = rows.min(cols);
        let s: Vec<f64> = (0..k).map(|i| svd.S().column_vector()[i]).collect();
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
        Ok(Svd {
            rows,
            cols,
            s: order.iter().map(|&i| s[i].max(0.0)).collect(),
            u: order
                .iter()
                .map(|&i| (0..rows).map(|r| svd.U()[(r, i)]).collect())
                .collect(),
            v: order
                .iter()
                .map(|&i| (0..cols).map(|c| svd.V()[(c, i)]).collect())
                .collect(),
        })
    }

    /// Numerical rank: singular values above [`Svd::tolerance`].
    pub fn rank(&self) -> usize {
        let tol = self.tolerance();
        self.s.iter().filter(|&&s| s > tol).count()
    }

    /// The rank tolerance: σ_max · max(rows, cols) · ε(f32), NumPy's `matrix_rank` rule with the
    /// precision of the f32 weights the matrix came from.
    pub fn tolerance(&self) -> f64 {
        self.s.first().copied().unwrap_or(0.0)
            * self.rows.max(self.cols) as f64
            * f32::EPSILON as f64
    }

    /// Σ σ².
    pub fn energy(&self) -> f64 {
        self.s.iter().map(|s| s * s).sum()
    }

    /// Σ of σ² beyond the first `k` terms (what a rank-k truncation discards).
    pub fn tail_energy(&self, k: usize) -> f64 {
        self.s.iter().skip(k).map(|s| s * s).sum()
    }
}

/// A weight [N, M, kh, kw] as f64, with its sizes.
#[derive(Clone, Debug)]
pub struct Weight {
    /// Output channels N.
    pub n: usize,
    /// Input channels M.
    pub m: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Values, OIHW order.
    pub data: Vec<f64>,
}

impl Weight {
    /// Checks a tensor is a usable conv weight (4-D, no zero size, finite).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let [n, m, kh, kw] = t.dims4("weight")?;
        for (name, v) in [
            ("N (out-channels)", n),
            ("M (in-channels)", m),
            ("kh", kh),
            ("kw", kw),
        ] {
            if v == 0 {
                return Err(Error::geometry(format!(
                    "weight {name} is 0 in shape {:?}",
                    t.shape()
                )));
            }
        }
        if let Some(i) = t.data().iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(format!(
                "weight element {i} is {}",
                t.data()[i]
            )));
        }
        Ok(Weight {
            n,
            m,
            kh,
            kw,
            data: t.data().iter().map(|&v| v as f64).collect(),
        })
    }

    /// W[n, m, i, j].
    pub fn at(&self, n: usize, m: usize, i: usize, j: usize) -> f64 {
        self.data[((n * self.m + m) * self.kh + i) * self.kw + j]
    }

    /// ‖W‖_F².
    pub fn energy(&self) -> f64 {
        self.data.iter().map(|v| v * v).sum()
    }

    /// Taps per 2-D kernel.
    pub fn taps(&self) -> usize {
        self.kh * self.kw
    }

    /// Standard-conv MACs per output pixel: N·M·kh·kw.
    pub fn standard_macs_per_pixel(&self) -> u64 {
        (self.n * self.m * self.taps()) as u64
    }
}

/// Relative Frobenius error of an approximation, from discarded and total energy.
pub fn relative_error(tail: f64, total: f64) -> f64 {
    if total > 0.0 {
        (tail / total).max(0.0).sqrt()
    } else {
        0.0
    }
}

/// Relative Frobenius distance ‖a − b‖ / ‖b‖.
pub fn relative_distance(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    relative_error(num, den)
}

/// How many terms to keep: an exact count, or the fewest whose relative error is at most E.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Truncation {
    /// Keep exactly this many terms (K or R, at least 1).
    Rank(usize),
    /// Keep the fewest terms with relative Frobenius error ≤ this (in (0, 1)).
    MaxError(f64),
}

impl Truncation {
    /// Checks the ranges: K ≥ 1, E in (0, 1).
    pub fn validate(&self) -> Result<()> {
        match *self {
            Truncation::Rank(0) => Err(Error::invalid("--rank must be at least 1")),
            Truncation::MaxError(e) if !(e > 0.0 && e < 1.0) => Err(Error::invalid(format!(
                "--max-error must be in (0, 1), got {e}"
            ))),
            _ => Ok(()),
        }
    }

    /// The number of terms for an error curve `errors[k - 1]` = error with k terms.
    pub fn pick(&self, errors: &[f64]) -> usize {
        match *self {
            Truncation::Rank(k) => k,
            Truncation::MaxError(e) => errors
                .iter()
                .position(|&err| err <= e)
                .map_or(errors.len(), |i| i + 1),
        }
    }
}
