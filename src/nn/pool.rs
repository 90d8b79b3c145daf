//! Pooling: MaxPool2d (PyTorch semantics: floor mode, padding never wins, the first maximum
//! in scan order takes the gradient on ties) and GlobalAvgPool.

use super::{Ctx, Module, Side, chw, par_planes, plane_runs};
use crate::error::{Error, Result};
use crate::kernels::elementwise;

/// Max pooling over k×k windows.
pub struct MaxPool2d {
    in_shape: [usize; 3],
    out_shape: Vec<usize>,
    kernel: usize,
    stride: usize,
    padding: usize,
    /// For each output element, the position of the maximum within its window (row-major).
    argmax: Vec<u8>,
}

impl MaxPool2d {
    /// Max pooling of `in_shape` ([C, H, W]) with a `kernel`×`kernel` window (at most 16).
    pub fn new(in_shape: &[usize], kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        let [c, h, w] = chw(in_shape)?;
        if kernel == 0 || stride == 0 || kernel > 16 {
            return Err(Error::invalid(
                "max pool kernel must be 1 to 16 and stride at least 1",
            ));
        }
        if padding * 2 > kernel {
            return Err(Error::invalid(format!(
                "max pool padding {padding} must be at most half the kernel {kernel}"
            )));
        }
        if h + 2 * padding < kernel || w + 2 * padding < kernel {
            return Err(Error::geometry(format!(
                "max pool kernel {kernel} is larger than the input {h}×{w}"
            )));
        }
        let (oh, ow) = (
            (h + 2 * padding - kernel) / stride + 1,
            (w + 2 * padding - kernel) / stride + 1,
        );
        Ok(MaxPool2d {
            in_shape: [c, h, w],
            out_shape: vec![c, oh, ow],
            kernel,
            stride,
            padding,
            argmax: Vec::new(),
        })
    }

    /// The common 2×2, stride 2, unpadded case has its own vectorized kernel.
    fn is_2x2(&self) -> bool {
        self.kernel == 2 && self.stride == 2 && self.padding == 0
    }

    /// Any window: scalar, skipping taps on padding (padding never wins).
    fn forward_plane(&self, xp: &[f32], yp: &mut [f32], ap: &mut [u8]) {
        let [_, h, w] = self.in_shape;
        let (oh, ow) = (self.out_shape[1], self.out_shape[2]);
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        for r in 0..oh {
            for c in 0..ow {
                let (mut best, mut at, mut found) = (f32::NEG_INFINITY, 0u8, false);
                'window: for di in 0..k {
                    let Some(ih) = (r * s + di).checked_sub(p).filter(|&v| v < h) else {
                        continue;
                    };
                    for dj in 0..k {
                        let Some(iw) = (c * s + dj).checked_sub(p).filter(|&v| v < w) else {
                            continue;
                        };
                        let v = xp[ih * w + iw];
                        // Strictly greater: the first maximum wins ties. NaN propagates.
                        if v > best || v.is_nan() || !found {
                            (best, at, found) = (v, (di * k + dj) as u8, true);
                            if v.is_nan() {
                                break 'window;
                            }
                        }
                    }
                }
                yp[r * ow + c] = best;
                ap[r * ow + c] = at;
            }
        }
    }

    fn backward_plane(&self, gyp: &[f32], ap: &[u8], gp: &mut [f32]) {
        let w = self.in_shape[2];
        let ow = self.out_shape[2];
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        gp.fill(0.0);
        for (o, (&g, &a)) in gyp.iter().zip(ap).enumerate() {
            let (r, c) = (o / ow, o % ow);
            let (di, dj) = (a as usize / k, a as usize % k);
            // The recorded tap was inside the input, so these do not underflow.
            gp[(r * s + di - p) * w + (c * s + dj - p)] += g;
        }
    }
}

impl Module for MaxPool2d {
    fn kind(&self) -> &'static str {
        "maxpool2d"
    }
    fn out_shape(&self) -> &[usize] {
        &self.out_shape
    }
    fn is_maxpool2x2(&self) -> bool {
        self.is_2x2()
    }
    fn forward(&mut self, ctx: &mut Ctx, _batch: usize, x: &[f32], y: &mut [f32]) -> Result<()> {
        let [_, h, w] = self.in_shape;
        let plane_out = self.out_shape[1] * self.out_shape[2];
        if self.argmax.len() != y.len() {
            self.argmax.resize(y.len(), 0);
        }
        let mut argmax = std::mem::take(&mut self.argmax);
        let isa = ctx.exec.isa();
        let this = &*self;
        let side = Side::new(&mut argmax[..], plane_out);
        plane_runs(
            ctx.exec,
            y,
            plane_out,
            side,
            Side::none(),
            |first, yr, ar, _| {
                let planes = yr
                    .chunks_exact_mut(plane_out)
                    .zip(ar.chunks_exact_mut(plane_out));
                for (k, (yp, ap)) in planes.enumerate() {
                    let i = first + k;
                    let xp = &x[i * h * w..(i + 1) * h * w];
                    if this.is_2x2() {
                        let rows = this.out_shape[1] * 2;
                        elementwise::maxpool2x2(isa, &xp[..rows * w], w, yp, ap);
                    } else {
                        this.forward_plane(xp, yp, ap);
                    }
                }
            },
        );
        self.argmax = argmax;
        Ok(())
    }
    fn backward(
        &mut self,
        ctx: &mut Ctx,
        _batch: usize,
        _x: &[f32],
        _y: &[f32],
        gy: &[f32],
        gx: Option<&mut [f32]>,
    ) -> Result<()> {
        let Some(gx) = gx else { return Ok(()) };
        let [_, h, w] = self.in_shape;
        let plane_out = self.out_shape[1] * self.out_shape[2];
        let (argmax, isa) = (&self.argmax, ctx.exec.isa());
        par_planes(ctx.exec, gx, h * w, |i, gp| {
            let r = i * plane_out..(i + 1) * plane_out;
            if self.is_2x2() {
                elementwise::maxpool2x2_backward(isa, &gy[r.clone()], &argmax[r], w, gp);
            } else {
                self.backward_plane(&gy[r.clone()], &argmax[r], gp);
            }
        });
        Ok(())
    }
}

/// Mean over each channel's plane: `[C, H, W]` → `[C]`.
pub struct GlobalAvgPool {
    in_shape: [usize; 3],
    out_shape: Vec<usize>,
}

impl GlobalAvgPool {
    /// Global average pooling of `in_shape` ([C, H, W]).
    pub fn new(in_shape: &[usize]) -> Result<Self> {
        let [c, h, w] = chw(in_shape)?;
        Ok(GlobalAvgPool {
            in_shape: [c, h, w],
            out_shape: vec![c],
        })
    }
}

impl Module for GlobalAvgPool {
    fn kind(&self) -> &'static str {
        "global_avg_pool"
    }
    fn out_shape(&self) -> &[usize] {
        &self.out_shape
    }
    fn forward(&mut self, _ctx: &mut Ctx, _batch: usize, x: &[f32], y: &mut [f32]) -> Result<()> {
        let plane = self.in_shape[1] * self.in_shape[2];
        for (o, p) in y.iter_mut().zip(x.chunks_exact(plane)) {
            *o = (p.iter().map(|&v| v as f64).sum::<f64>() / plane as f64) as f32;
        }
        Ok(())
    }
    fn backward(
        &mut self,
        _ctx: &mut Ctx,
        _batch: usize,
        _x: &[f32],
        _y: &[f32],
        gy: &[f32],
        gx: Option<&mut [f32]>,
    ) -> Result<()> {
        if let Some(gx) = gx {
            let plane = self.in_shape[1] * self.in_shape[2];
            for (p, &g) in gx.chunks_exact_mut(plane).zip(gy) {
                p.fill(g / plane as f32);
            }
        }
        Ok(())
    }
}
