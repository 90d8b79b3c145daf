//! BatchNorm2d: batch statistics in training (updating running statistics with momentum),
//! running statistics in evaluation; PyTorch semantics (biased variance to normalize, unbiased
//! variance in the running estimate).

use rayon::prelude::*;

use super::{Buffer, Ctx, Module, Param, chw, par_planes};
use crate::error::{Error, Result};
use crate::kernels::elementwise::{self, ReluOfAffine};

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

/// Per channel c, Σ over images of `f(c, plane range)` (K sums at once; each plane reduced in
/// f32 lanes, the planes summed in f64).
///
/// The activation is read in memory order, image after image, each task over its own images
/// (then the tasks' sums are added in order): going channel by channel instead jumps between
/// short planes (a 28 × 28 plane is 48 cache lines) and the prefetchers never get going
/// (the MNIST network's first BatchNorm spent 9% of the training step in such a loop).
fn channel_sums<const K: usize>(
    threads: usize,
    batch: usize,
    channels: usize,
    plane: usize,
    f: impl Fn(usize, std::ops::Range<usize>) -> [f32; K] + Sync,
) -> Vec<[f64; K]> {
    let tasks = threads.clamp(1, batch.max(1));
    let per_task = batch.div_ceil(tasks).max(1);
    let partial: Vec<Vec<[f64; K]>> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let mut acc = vec![[0.0f64; K]; channels];
            for n in (t * per_task).min(batch)..((t + 1) * per_task).min(batch) {
                for (c, a) in acc.iter_mut().enumerate() {
                    let base = (n * channels + c) * plane;
                    for (sum, v) in a.iter_mut().zip(f(c, base..base + plane)) {
                        *sum += v as f64;
                    }
                }
            }
            acc
        })
        .collect();
    let mut total = vec![[0.0f64; K]; channels];
    for part in &partial {
        for (t, p) in total.iter_mut().zip(part) {
            for (a, b) in t.iter_mut().zip(p) {
                *a += b;
            }
        }
    }
    total
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
            // Two passes (mean, then squared deviations) for accuracy.
            let (isa, threads) = (ctx.exec.isa(), ctx.exec.threads());
            let means: Vec<f64> = channel_sums(threads, batch, ch, plane, |_, r| {
                [elementwise::sum(isa, &x[r])]
            })
            .iter()
            .map(|[s]| s / count)
            .collect();
            let vars = channel_sums(threads, batch, ch, plane, |c, r| {
                [elementwise::sum_sq_dev(isa, &x[r], means[c] as f32)]
            });
            let m = self.momentum;
            for (c, (&mean, &[var])) in means.iter().zip(&vars).enumerate() {
                let var = var / count;
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
        _y: &[f32],
        gy: &[f32],
        gx: Option<&mut [f32]>,
    ) -> Result<()> {
        let (ch, plane) = (self.channels(), self.plane());
        let count = (batch * plane) as f64;
        let (mean, inv_std, isa) = (&self.mean, &self.inv_std, ctx.exec.isa());
        // With a fused ReLU, gy is the gradient at the ReLU's output: it passes where the
        // forward's x·scale + shift was positive, recomputed from x (reading y would cost one
        // more activation-sized stream per pass; the optimizer has not touched γ and β since).
        let (relu, scale, shift) = (self.relu, &self.scale, &self.shift);
        let relu_of = |c: usize| {
            relu.then(|| ReluOfAffine {
                scale: scale[c],
                shift: shift[c],
            })
        };
        // Per channel: Σ gy and Σ gy·x̂, in one pass over each plane.
        let sums: Vec<(f64, f64)> = channel_sums(ctx.exec.threads(), batch, ch, plane, |c, r| {
            let (a, b) = elementwise::grad_sums(isa, &gy[r.clone()], relu_of(c), &x[r], mean[c]);
            [a, b]
        })
        .iter()
        .enumerate()
        .map(|(c, &[s, sx])| (s, sx * inv_std[c] as f64))
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
                let (c, gy) = (i % ch, &gy[r.clone()]);
                elementwise::batchnorm_grad_input(isa, gy, relu_of(c), &x[r], coef[c], p);
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
