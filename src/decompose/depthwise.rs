//! Depthwise-separable decomposition of a standard layer (Network Decoupling): per input
//! channel m, the truncated SVD of the N × (kh·kw) matrix W[:, m] gives K depthwise filters and
//! the pointwise weights that recombine them.

use serde::Serialize;

use super::{Svd, Weight, relative_error};
use crate::error::Result;
use crate::tensor::Tensor;

/// How close a layer is to depthwise separable.
#[derive(Clone, Debug)]
pub struct DepthwiseAnalysis {
    /// Per input channel, the SVD of W[:, m] (N × kh·kw).
    pub channels: Vec<Svd>,
    /// Per input channel, its numerical rank.
    pub ranks: Vec<usize>,
    /// Relative Frobenius error of the best K-term approximation, for K = 1 … min(N, kh·kw).
    pub errors: Vec<f64>,
}

/// One row of the error-vs-cost curve.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct DepthwisePoint {
    /// Depth multiplier K.
    pub k: usize,
    /// Relative Frobenius error of the best K-term approximation.
    pub relative_error: f64,
    /// Share of the weight's energy kept (1 − error²).
    pub energy_kept: f64,
    /// MACs per output pixel: M·K·kh·kw (depthwise) + M·K·N (pointwise).
    pub macs_per_pixel: u64,
}

impl DepthwiseAnalysis {
    /// Analyzes `w`.
    pub fn of(w: &Weight) -> Result<Self> {
        let taps = w.taps();
        let mut channels = Vec::with_capacity(w.m);
        for m in 0..w.m {
            let a: Vec<f64> = (0..w.n)
                .flat_map(|n| (0..taps).map(move |t| (n, t)))
                .map(|(n, t)| w.at(n, m, t / w.kw, t % w.kw))
                .collect();
            channels.push(Svd::of(w.n, taps, &a)?);
        }
        let total = w.energy();
        let kmax = w.n.min(taps);
        let errors = (1..=kmax)
            .map(|k| relative_error(channels.iter().map(|s| s.tail_energy(k)).sum(), total))
            .collect();
        // The rank tolerance is relative to the whole layer, so a channel of all-but-zero
        // weights does not count as full rank.
        let layer_max = channels
            .iter()
            .map(|s| s.s.first().copied().unwrap_or(0.0))
            .fold(0.0, f64::max);
        let tol = layer_max * w.n.max(taps) as f64 * f32::EPSILON as f64;
        let ranks = channels
            .iter()
            .map(|s| s.s.iter().filter(|&&v| v > tol).count())
            .collect();
        Ok(DepthwiseAnalysis {
            channels,
            ranks,
            errors,
        })
    }

    /// The smallest multiplier K that represents the layer exactly (the largest channel rank).
    pub fn exact_multiplier(&self) -> usize {
        self.ranks.iter().copied().max().unwrap_or(0)
    }

    /// The error-vs-MACs curve for K = 1 … min(N, kh·kw).
    pub fn curve(&self, w: &Weight) -> Vec<DepthwisePoint> {
        self.errors
            .iter()
            .enumerate()
            .map(|(i, &e)| DepthwisePoint {
                k: i + 1,
                relative_error: e,
                energy_kept: 1.0 - e * e,
                macs_per_pixel: macs_per_pixel(w, i + 1),
            })
            .collect()
    }
}

/// MACs per output pixel of the depthwise-separable form with multiplier K.
pub fn macs_per_pixel(w: &Weight, k: usize) -> u64 {
    (w.m * k * (w.taps() + w.n)) as u64
}

/// The smallest K at which the separable form costs at least as much as the standard layer:
/// K·M·(kh·kw + N) ≥ kh·kw·M·N, i.e. K ≥ kh·kw·N / (kh·kw + N).
pub fn break_even(w: &Weight) -> usize {
    let (t, n) = (w.taps(), w.n);
    (t * n).div_ceil(t + n)
}

/// The factors of a depthwise-separable approximation.
#[derive(Clone, Debug)]
pub struct DepthwiseFactors {
    /// Depthwise weight [M·K, 1, kh, kw] (groups = M, output channel m·K + k).
    pub depthwise: Tensor,
    /// Pointwise weight [N, M·K, 1, 1].
    pub pointwise: Tensor,
    /// Multiplier K.
    pub k: usize,
    /// Relative Frobenius error predicted from the discarded singular values.
    pub predicted_error: f64,
}

/// The best K-term depthwise-separable approximation of `w` (terms beyond a channel's rank are
/// zero filters, so any K ≥ 1 is valid and K ≥ the exact multiplier is exact).
pub fn decompose(w: &Weight, a: &DepthwiseAnalysis, k: usize) -> Result<DepthwiseFactors> {
    let taps = w.taps();
    let mk = w.m * k;
    let mut dw = vec![0f32; mk * taps];
    let mut pw = vec![0f32; w.n * mk];
    for (m, svd) in a.channels.iter().enumerate() {
        for (kk, &s) in svd.s.iter().enumerate().take(k) {
            // Split σ evenly between the two factors so neither carries all the scale.
            let r = s.sqrt();
            let c = m * k + kk;
            for t in 0..taps {
                dw[c * taps + t] = (r * svd.v[kk][t]) as f32;
            }
            for n in 0..w.n {
                pw[n * mk + c] = (r * svd.u[kk][n]) as f32;
            }
        }
    }
    let tail: f64 = a.channels.iter().map(|s| s.tail_energy(k)).sum();
    Ok(DepthwiseFactors {
        depthwise: Tensor::new(&[mk, 1, w.kh, w.kw], dw)?,
        pointwise: Tensor::new(&[w.n, mk, 1, 1], pw)?,
        k,
        predicted_error: relative_error(tail, w.energy()),
    })
}

/// W[n, m] = Σ_k C[n, m·K + k]·B[m·K + k]: the standard weight a depthwise-separable pair
/// computes.
pub fn reconstruct(depthwise: &Tensor, pointwise: &Tensor, m: usize) -> Result<Tensor> {
    let [mk, _, kh, kw] = depthwise.dims4("depthwise weight")?;
    let [n, _, _, _] = pointwise.dims4("pointwise weight")?;
    let (k, taps) = (mk / m, kh * kw);
    let (b, c) = (depthwise.data(), pointwise.data());
    let mut w = vec![0f32; n * m * taps];
    for no in 0..n {
        for mi in 0..m {
            for t in 0..taps {
                w[(no * m + mi) * taps + t] = (0..k)
                    .map(|kk| c[no * mk + mi * k + kk] as f64 * b[(mi * k + kk) * taps + t] as f64)
                    .sum::<f64>() as f32;
            }
        }
    }
    Tensor::new(&[n, m, kh, kw], w)
}
