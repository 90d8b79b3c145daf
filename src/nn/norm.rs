//! BatchNorm2d: batch statistics in training (updating running statistics with momentum),
//! running statistics in evaluation; PyTorch semantics (biased variance to normalize, unbiased
//! variance in the running estimate).

use rayon::prelude::*;

use super::{Buffer, Ctx, Module, Param, chw, par_planes};
use crate::error::{Error, Result};
use crate::kernels::elementwise;

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
    /// A ReLU that followed this layer in the spec runs inside it (the network skips the ReLU
    /// layer): one pass over the activation instead of two, forward and backward.
    relu: bool,
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
            relu: false,
        })
    }

    fn channels(&self) -> usize {
        self.shape[0]
    }

    fn plane(&self) -> usize {
        self.shape[1] * self.shape[2]
    }
}

/// Σ over images of f(plane of channel c), each plane reduced in f32 lanes, summed in f64.
fn channel_sum(
    batch: usize,
    c: usize,
    channels: usize,
    plane: usize,
    f: impl Fn(std::ops::Range<usize>) -> f32,
) -> f64 {
    (0..batch)
        .map(|n| {
            let base = (n * channels + c) * plane;
            f(base..base + plane) as f64
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
            let isa = ctx.exec.isa();
            // Two passes per channel (mean, then squared deviations) for accuracy.
            let stats: Vec<(f64, f64)> = (0..ch)
                .into_par_iter()
                .map(|c| {
                    let mean =
                        channel_sum(batch, c, ch, plane, |r| elementwise::sum(isa, &x[r])) / count;
                    let var = channel_sum(batch, c, ch, plane, |r| {
                        elementwise::sum_sq_dev(isa, &x[r], mean as f32)
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
        let (scale, shift, isa, relu) = (&self.scale, &self.shift, ctx.exec.isa(), self.relu);
        par_planes(y, plane, |i, p| {
            elementwise::scale_shift(
                isa,
                &x[i * plane..(i + 1) * plane],
                scale[i % ch],
                shift[i % ch],
                relu,
                p,
            );
        });
        Ok(())
    }
    fn backward(
        &mut self,
        ctx: &mut Ctx,
        batch: usize,
        x: &[f32],
        y: &[f32],
        gy: &[f32],
        gx: Option<&mut [f32]>,
    ) -> Result<()> {
        let (ch, plane) = (self.channels(), self.plane());
        let count = (batch * plane) as f64;
        let (mean, inv_std, isa) = (&self.mean, &self.inv_std, ctx.exec.isa());
        // With a fused ReLU, gy is the gradient at the ReLU's output: it passes where y > 0.
        let mask = self.relu.then_some(y);
        // Per channel: Σ gy and Σ gy·x̂, in one pass over each plane.
        let sums: Vec<(f64, f64)> = (0..ch)
            .into_par_iter()
            .map(|c| {
                let (mut s, mut sx) = (0.0f64, 0.0f64);
                for n in 0..batch {
                    let r = (n * ch + c) * plane..(n * ch + c + 1) * plane;
                    let m = mask.map(|m| &m[r.clone()]);
                    let (a, b) = elementwise::grad_sums(isa, &gy[r.clone()], m, &x[r], mean[c]);
                    s += a as f64;
                    sx += b as f64;
                }
                (s, sx * inv_std[c] as f64)
            })
            .collect();
        for (c, &(s, sx)) in sums.iter().enumerate() {
            self.beta.grad[c] = s as f32;
            self.gamma.grad[c] = sx as f32;
        }
        if let Some(gx) = gx {
            let gamma = &self.gamma.value;
            // gx = γ/σ · (gy − Σgy/N − x̂ · Σ(gy·x̂)/N)
            let coef: Vec<[f32; 5]> = (0..ch)
                .map(|c| {
                    let (s, sx) = sums[c];
                    [
                        gamma[c] * inv_std[c],
                        (s / count) as f32,
                        mean[c],
                        inv_std[c],
                        (sx / count) as f32,
                    ]
                })
                .collect();
            par_planes(gx, plane, |i, p| {
                let r = i * plane..(i + 1) * plane;
                let m = mask.map(|m| &m[r.clone()]);
                elementwise::batchnorm_grad_input(isa, &gy[r.clone()], m, &x[r], coef[i % ch], p);
            });
        }
        Ok(())
    }
    fn params(&mut self) -> Vec<&mut Param> {
        vec![&mut self.gamma, &mut self.beta]
    }
    fn fuse_relu(&mut self) -> bool {
        self.relu = true;
        true
    }
    fn buffers(&mut self) -> Vec<&mut Buffer> {
        vec![&mut self.running_mean, &mut self.running_var]
    }
}
