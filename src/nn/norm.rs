//! BatchNorm2d: batch statistics in training (updating running statistics with momentum),
//! running statistics in evaluation; PyTorch semantics (biased variance to normalize, unbiased
//! variance in the running estimate).

use rayon::prelude::*;

use super::{Buffer, Ctx, Module, Param, chw, par_planes};
use crate::error::{Error, Result};

/// Batch normalization over the channels of an NCHW activation.
pub struct BatchNorm2d {
    shape: Vec<usize>,
    momentum: f32,
    eps: f32,
    gamma: Param,
    beta: Param,
    running_mean: Buffer,
    running_var: Buffer,
    /// Per-channel mean and 1/σ of the last training forward (for backward).
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    /// Per-channel scale and shift applied in the last forward.
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl BatchNorm2d {
    /// A BatchNorm over `in_shape` ([C, H, W]).
    pub fn new(in_shape: &[usize], momentum: f32, eps: f32) -> Result<Self> {
        let [c, _, _] = chw(in_shape)?;
        if !(0.0..=1.0).contains(&momentum) || eps.is_nan() || eps <= 0.0 {
            return Err(Error::invalid(format!(
                "momentum must be in [0, 1] and eps > 0, got {momentum} and {eps}"
            )));
        }
        let buffer = |name, v| Buffer {
            name,
            shape: vec![c],
            value: vec![v; c],
        };
        Ok(BatchNorm2d {
            shape: in_shape.to_vec(),
            momentum,
            eps,
            gamma: Param::new("weight", &[c], || 1.0),
            beta: Param::new("bias", &[c], || 0.0),
            running_mean: buffer("running_mean", 0.0),
            running_var: buffer("running_var", 1.0),
            mean: vec![0.0; c],
            inv_std: vec![0.0; c],
            scale: vec![0.0; c],
            shift: vec![0.0; c],
        })
    }

    fn channels(&self) -> usize {
        self.shape[0]
    }

    fn plane(&self) -> usize {
        self.shape[1] * self.shape[2]
    }
}

/// Σ over images of f(plane of channel c), in f64.
fn channel_sum(
    x: &[f32],
    batch: usize,
    c: usize,
    channels: usize,
    plane: usize,
    f: impl Fn(&[f32]) -> f64,
) -> f64 {
    (0..batch)
        .map(|n| {
            let base = (n * channels + c) * plane;
            f(&x[base..base + plane])
        })
        .sum()
}

impl Module for BatchNorm2d {
    fn kind(&self) -> &'static str {
        "batchnorm2d"
    }
    fn out_shape(&self) -> &[usize] {
        &self.shape
    }
    fn forward(&mut self, ctx: &mut Ctx, batch: usize, x: &[f32], y: &mut [f32]) -> Result<()> {
        let (ch, plane) = (self.channels(), self.plane());
        if ctx.train {
            let count = (batch * plane) as f64;
            // Two passes per channel (mean, then squared deviations) for accuracy.
            let stats: Vec<(f64, f64)> = (0..ch)
                .into_par_iter()
                .map(|c| {
                    let mean = channel_sum(x, batch, c, ch, plane, |p| {
                        p.iter().map(|&v| v as f64).sum()
                    }) / count;
                    let var = channel_sum(x, batch, c, ch, plane, |p| {
                        p.iter().map(|&v| (v as f64 - mean).powi(2)).sum()
                    }) / count;
                    (mean, var)
                })
                .collect();
            let m = self.momentum;
            for (c, &(mean, var)) in stats.iter().enumerate() {
                self.mean[c] = mean as f32;
                self.inv_std[c] = (1.0 / (var + self.eps as f64).sqrt()) as f32;
                let unbiased = if count > 1.0 {
                    var * count / (count - 1.0)
                } else {
                    var
                };
                self.running_mean.value[c] =
                    (1.0 - m) * self.running_mean.value[c] + m * mean as f32;
                self.running_var.value[c] =
                    (1.0 - m) * self.running_var.value[c] + m * unbiased as f32;
            }
        } else {
            for c in 0..ch {
                self.mean[c] = self.running_mean.value[c];
                self.inv_std[c] = 1.0 / (self.running_var.value[c] + self.eps).sqrt();
            }
        }
        for c in 0..ch {
            self.scale[c] = self.gamma.value[c] * self.inv_std[c];
            self.shift[c] = self.beta.value[c] - self.mean[c] * self.scale[c];
        }
        y.copy_from_slice(x);
        let (scale, shift) = (&self.scale, &self.shift);
        par_planes(y, plane, |i, p| {
            let (a, b) = (scale[i % ch], shift[i % ch]);
            for v in p {
                *v = *v * a + b;
            }
        });
        Ok(())
    }
    fn backward(
        &mut self,
        _ctx: &mut Ctx,
        batch: usize,
        x: &[f32],
        _y: &[f32],
        gy: &[f32],
        gx: Option<&mut [f32]>,
    ) -> Result<()> {
        let (ch, plane) = (self.channels(), self.plane());
        let count = (batch * plane) as f64;
        let (mean, inv_std) = (&self.mean, &self.inv_std);
        // Per channel: Σ gy and Σ gy·x̂.
        let sums: Vec<(f64, f64)> = (0..ch)
            .into_par_iter()
            .map(|c| {
                let (mu, is) = (mean[c], inv_std[c]);
                (0..batch).fold((0.0, 0.0), |(s, sx), n| {
                    let base = (n * ch + c) * plane;
                    let (a, b) = gy[base..base + plane]
                        .iter()
                        .zip(&x[base..base + plane])
                        .fold((0.0f32, 0.0f32), |(s, sx), (&g, &v)| {
                            (s + g, sx + g * (v - mu) * is)
                        });
                    (s + a as f64, sx + b as f64)
                })
            })
            .collect();
        for (c, &(s, sx)) in sums.iter().enumerate() {
            self.beta.grad[c] = s as f32;
            self.gamma.grad[c] = sx as f32;
        }
        if let Some(gx) = gx {
            let gamma = &self.gamma.value;
            // gx = γ/σ · (gy − Σgy/N − x̂ · Σ(gy·x̂)/N)
            let coef: Vec<(f32, f32, f32)> = (0..ch)
                .map(|c| {
                    let (s, sx) = sums[c];
                    (
                        gamma[c] * inv_std[c],
                        (s / count) as f32,
                        (sx / count) as f32,
                    )
                })
                .collect();
            gx.copy_from_slice(gy);
            par_planes(gx, plane, |i, p| {
                let c = i % ch;
                let (k, mg, mgx) = coef[c];
                let (mu, is) = (mean[c], inv_std[c]);
                let xs = &x[i * plane..(i + 1) * plane];
                for (g, &v) in p.iter_mut().zip(xs) {
                    *g = k * (*g - mg - (v - mu) * is * mgx);
                }
            });
        }
        Ok(())
    }
    fn params(&mut self) -> Vec<&mut Param> {
        vec![&mut self.gamma, &mut self.beta]
    }
    fn buffers(&mut self) -> Vec<&mut Buffer> {
        vec![&mut self.running_mean, &mut self.running_var]
    }
}
