//! BatchNorm2d: batch statistics in training (updating running statistics with momentum),
//! running statistics in evaluation; PyTorch semantics (biased variance to normalize, unbiased
//! variance in the running estimate).

use rayon::prelude::*;

use super::{Buffer, Ctx, Module, Param, Side, chw, par_planes, plane_runs};
use crate::error::{Error, Result};
use crate::kernels::elementwise::{self, ReluOfAffine};
use crate::kernels::{Exec, Isa};

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
    /// A 2 × 2 stride-2 max pool that followed the fused ReLU runs inside this layer too.
    pool: Option<FusedPool>,
}

/// The state of a max pool fused into a BatchNorm: the window position of each maximum (as
/// [`MaxPool2d`](super::MaxPool2d) keeps it). The layer's output is then the pooled one, and
/// each plane goes BatchNorm → ReLU → pool through a scratch plane that stays in L1: the
/// unpooled activation is never written, nor read back by the pool, nor its gradient written
/// by the pool's backward and read twice by the BatchNorm's. On the MNIST network's first
/// block (64 × 32 × 28 × 28), counting activation-sized reads and writes, about 34 → 21 MB
/// moved forward and 41 → 22 MB backward; measured, that block's BatchNorm and pool took
/// 1.15–1.17 → 0.71–0.75 ms of a training step (min of 150 steps, alternated 3×).
struct FusedPool {
    argmax: Vec<u8>,
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
            pool: None,
        })
    }

    fn channels(&self) -> usize {
        self.shape[0]
    }

    fn plane(&self) -> usize {
        self.shape[1] * self.shape[2]
    }
}

/// Per channel c, Σ over images of `f(c, plane range, scratch)` (K sums at once; each plane
/// reduced in f32 lanes, the planes summed in f64); each task gets its own plane of `scratch`
/// ([`scratch_pieces`]).
///
/// The activation is read in memory order, image after image, each task over its own images
/// (then the tasks' sums are added in order): going channel by channel instead jumps between
/// short planes (a 28 × 28 plane is 48 cache lines) and the prefetchers never get going
/// (the MNIST network's first BatchNorm spent 9% of the training step in such a loop).
fn channel_sums<const K: usize>(
    exec: Exec,
    batch: usize,
    channels: usize,
    plane: usize,
    scratch: &mut [f32],
    f: impl Fn(usize, std::ops::Range<usize>, &mut [f32]) -> [f32; K] + Sync,
) -> Vec<[f64; K]> {
    let tasks = exec.threads().clamp(1, batch.max(1));
    let per_task = batch.div_ceil(tasks).max(1);
    let task = |(t, buf): (usize, &mut [f32])| {
        let mut acc = vec![[0.0f64; K]; channels];
        for n in (t * per_task).min(batch)..((t + 1) * per_task).min(batch) {
            for (c, a) in acc.iter_mut().enumerate() {
                let base = (n * channels + c) * plane;
                for (sum, v) in a.iter_mut().zip(f(c, base..base + plane, buf)) {
                    *sum += v as f64;
                }
            }
        }
        acc
    };
    // One task on the calling thread, as `plane_runs` does.
    let pieces = scratch_pieces(scratch, tasks, plane);
    let partial: Vec<Vec<[f64; K]>> = if tasks == 1 {
        pieces.into_iter().enumerate().map(task).collect()
    } else {
        pieces.into_par_iter().enumerate().map(task).collect()
    };
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

/// Floats of scratch a task takes for `len` floats: whole 128-byte blocks, so that no two
/// threads write one cache line or one adjacent-line pair (the 14 × 14 planes of the MNIST
/// network's second block, 784 bytes each, shared a line: with the VM's vCPUs on different
/// dies its BatchNorm took 1.9–2.0 ms instead of 0.7).
fn scratch_stride(len: usize) -> usize {
    len.next_multiple_of(32)
}

/// Floats between two tasks' pieces of `scratch` for `len`-float planes: [`scratch_stride`], or
/// 0 where there is no scratch.
fn task_stride(scratch: &[f32], len: usize) -> usize {
    if scratch.is_empty() {
        0
    } else {
        scratch_stride(len)
    }
}

/// `tasks` pieces of `len` floats of `scratch` (which holds `tasks × scratch_stride(len)`), one
/// stride apart; empty pieces if `scratch` is empty.
fn scratch_pieces(scratch: &mut [f32], tasks: usize, len: usize) -> Vec<&mut [f32]> {
    let stride = task_stride(scratch, len);
    let mut pieces = Vec::with_capacity(tasks);
    let mut rest = scratch;
    for _ in 0..tasks {
        let (one, more) = rest.split_at_mut(stride);
        pieces.push(&mut one[..stride.min(len)]);
        rest = more;
    }
    pieces
}

/// Runs `f(plane index, plane, scratch)` over the `len`-element planes of `out`, one run of
/// consecutive planes per thread ([`plane_runs`]), each with its own plane of `scratch`
/// ([`scratch_stride`] apart).
fn planes_with_scratch(
    exec: Exec,
    out: &mut [f32],
    len: usize,
    scratch: &mut [f32],
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync + Send,
) {
    let stride = task_stride(scratch, len);
    let scratch = Side::new(scratch, stride);
    plane_runs::<u8>(
        exec,
        out,
        len,
        Side::none(),
        scratch,
        |first, run, _, buf| {
            let buf = &mut buf[..stride.min(len)];
            for (k, p) in run.chunks_exact_mut(len).enumerate() {
                f(first + k, p, buf);
            }
        },
    );
}

/// The gradient at the output of the BatchNorm (and its ReLU), plane by plane: `gy`'s planes,
/// or with a fused pool the pooled gradient routed to each window's maximum.
struct OutputGrad<'a> {
    isa: Isa,
    pool: Option<&'a FusedPool>,
    gy: &'a [f32],
    /// Elements of a plane of the BatchNorm's input, and of a pooled plane.
    plane: usize,
    pooled: usize,
    /// Width of the input planes.
    w: usize,
}

impl<'a> OutputGrad<'a> {
    /// Plane `i`: a slice of `gy`, or written into `scratch` by the pool's own backward (so the
    /// same values as unfused).
    fn plane<'s>(&self, i: usize, scratch: &'s mut [f32]) -> &'s [f32]
    where
        'a: 's,
    {
        match self.pool {
            None => &self.gy[i * self.plane..(i + 1) * self.plane],
            Some(p) => {
                let r = i * self.pooled..(i + 1) * self.pooled;
                let g = &mut scratch[..self.plane];
                elementwise::maxpool2x2_backward(
                    self.isa,
                    &self.gy[r.clone()],
                    &p.argmax[r],
                    self.w,
                    g,
                );
                g
            }
        }
    }
}

/// Elements of a 2 × 2 stride-2 pooled plane of the per-image shape [C, H, W] (floor mode).
fn pooled_plane(shape: &[usize]) -> usize {
    shape[1] / 2 * (shape[2] / 2)
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
            let (isa, exec) = (ctx.exec.isa(), ctx.exec);
            let means: Vec<f64> = channel_sums(exec, batch, ch, plane, &mut [], |_, r, _| {
                [elementwise::sum(isa, &x[r])]
            })
            .iter()
            .map(|[s]| s / count)
            .collect();
            let vars = channel_sums(exec, batch, ch, plane, &mut [], |c, r, _| {
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
        let Some(pool) = &mut self.pool else {
            par_planes(ctx.exec, y, plane, |i, p| {
                elementwise::scale_shift(
                    isa,
                    &x[i * plane..(i + 1) * plane],
                    scale[i % ch],
                    shift[i % ch],
                    relu,
                    p,
                );
            });
            return Ok(());
        };
        // BatchNorm and ReLU into a scratch plane, then the pool from it.
        let (w, pooled) = (self.shape[2], pooled_plane(&self.shape));
        let rows = self.shape[1] / 2 * 2;
        pool.argmax.resize(y.len(), 0);
        let stride = scratch_stride(plane);
        let scratch = ctx.ws.take(ctx.exec.threads() * stride)?;
        let (side, scratch) = (
            Side::new(&mut pool.argmax[..], pooled),
            Side::new(scratch, stride),
        );
        plane_runs(ctx.exec, y, pooled, side, scratch, |first, yr, ar, buf| {
            let planes = yr.chunks_exact_mut(pooled).zip(ar.chunks_exact_mut(pooled));
            for (k, (p, a)) in planes.enumerate() {
                let i = first + k;
                let xp = &x[i * plane..(i + 1) * plane];
                let buf = &mut buf[..plane];
                elementwise::scale_shift(isa, xp, scale[i % ch], shift[i % ch], true, buf);
                elementwise::maxpool2x2(isa, &buf[..rows * w], w, p, a);
            }
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
        let pool = self.pool.as_ref();
        let grad = OutputGrad {
            isa,
            pool,
            gy,
            plane,
            pooled: pooled_plane(&self.shape),
            w: self.shape[2],
        };
        let threads = ctx.exec.threads();
        // One scratch plane per task for the pooled gradient routed to the window maxima.
        let scratch = ctx.ws.take(if pool.is_some() {
            threads * scratch_stride(plane)
        } else {
            0
        })?;
        // Per channel: Σ gy and Σ gy·x̂, in one pass over each plane.
        let sums: Vec<(f64, f64)> =
            channel_sums(ctx.exec, batch, ch, plane, scratch, |c, r, buf| {
                let g = grad.plane(r.start / plane, buf);
                let (a, b) = elementwise::grad_sums(isa, g, relu_of(c), &x[r], mean[c]);
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
            planes_with_scratch(ctx.exec, gx, plane, scratch, |i, p, buf| {
                let c = i % ch;
                let g = grad.plane(i, buf);
                let xp = &x[i * plane..(i + 1) * plane];
                elementwise::batchnorm_grad_input(isa, g, relu_of(c), xp, coef[c], p);
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
    fn fuse_maxpool2x2(&mut self) -> bool {
        if !self.relu || self.shape[1] < 2 || self.shape[2] < 2 {
            return false;
        }
        self.pool = Some(FusedPool { argmax: Vec::new() });
        true
    }
    fn buffers(&mut self) -> Vec<&mut Buffer> {
        vec![&mut self.running_mean, &mut self.running_var]
    }
}
