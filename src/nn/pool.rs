//! Pooling: MaxPool2d (PyTorch semantics: floor mode, padding never wins, the first maximum
//! in scan order takes the gradient on ties) and GlobalAvgPool.

use rayon::prelude::*;

use super::{Ctx, Module, chw, par_planes};
use crate::error::{Error, Result};

/// Max pooling over k×k windows.
pub struct MaxPool2d {
    in_shape: [usize; 3],
    out_shape: Vec<usize>,
    kernel: usize,
    stride: usize,
    padding: usize,
    /// For each output element, the index within its input plane of the maximum.
    argmax: Vec<u32>,
}

impl MaxPool2d {
    /// Max pooling of `in_shape` ([C, H, W]) with a `kernel`×`kernel` window.
    pub fn new(in_shape: &[usize], kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        let [c, h, w] = chw(in_shape)?;
        if kernel == 0 || stride == 0 {
            return Err(Error::invalid(
                "max pool kernel and stride must be at least 1",
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
        if h * w > u32::MAX as usize {
            return Err(Error::geometry("max pool input plane too large"));
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
}

impl Module for MaxPool2d {
    fn kind(&self) -> &'static str {
        "maxpool2d"
    }
    fn out_shape(&self) -> &[usize] {
        &self.out_shape
    }
    fn forward(&mut self, _ctx: &mut Ctx, _batch: usize, x: &[f32], y: &mut [f32]) -> Result<()> {
        let [_, h, w] = self.in_shape;
        let (oh, ow) = (self.out_shape[1], self.out_shape[2]);
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        if self.argmax.len() != y.len() {
            self.argmax.resize(y.len(), 0);
        }
        let plane_out = oh * ow;
        let min = (4096 / plane_out.max(1)).max(1);
        y.par_chunks_mut(plane_out)
            .zip(self.argmax.par_chunks_mut(plane_out))
            .with_min_len(min)
            .enumerate()
            .for_each(|(i, (yp, ap))| {
                let xp = &x[i * h * w..(i + 1) * h * w];
                for r in 0..oh {
                    for c in 0..ow {
                        let (mut best, mut at) = (f32::NEG_INFINITY, u32::MAX);
                        'window: for di in 0..k {
                            let Some(ih) = (r * s + di).checked_sub(p).filter(|&v| v < h) else {
                                continue;
                            };
                            for dj in 0..k {
                                let Some(iw) = (c * s + dj).checked_sub(p).filter(|&v| v < w)
                                else {
                                    continue;
                                };
                                let v = xp[ih * w + iw];
                                // Strictly greater: the first maximum wins ties. NaN propagates.
                                if v > best || v.is_nan() || at == u32::MAX {
                                    best = v;
                                    at = (ih * w + iw) as u32;
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
            });
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
        let Some(gx) = gx else { return Ok(()) };
        let [_, h, w] = self.in_shape;
        let plane_out = self.out_shape[1] * self.out_shape[2];
        let argmax = &self.argmax;
        par_planes(gx, h * w, |i, gp| {
            gp.fill(0.0);
            let range = i * plane_out..(i + 1) * plane_out;
            for (&g, &a) in gy[range.clone()].iter().zip(&argmax[range]) {
                gp[a as usize] += g;
            }
        });
        Ok(())
    }
}

/// Mean over each channel's plane: [C, H, W] → [C].
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
