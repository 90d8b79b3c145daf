//! Element-wise layers: ReLU and Dropout.

use super::{Ctx, Module, Side, plane_runs};
use crate::error::{Error, Result};
use crate::kernels::elementwise;

/// max(x, 0).
pub struct Relu {
    shape: Vec<usize>,
}

impl Relu {
    /// A ReLU over activations of `shape`.
    pub fn new(shape: &[usize]) -> Self {
        Relu {
            shape: shape.to_vec(),
        }
    }
}

impl Module for Relu {
    fn kind(&self) -> &'static str {
        "relu"
    }
    fn out_shape(&self) -> &[usize] {
        &self.shape
    }
    fn forward(&mut self, ctx: &mut Ctx, _batch: usize, x: &[f32], y: &mut [f32]) -> Result<()> {
        let isa = ctx.exec.isa();
        // Elements as planes of one: a run of them per thread.
        plane_runs::<u8>(ctx.exec, y, 1, Side::none(), Side::none(), |i, y, _, _| {
            elementwise::relu(isa, &x[i..i + y.len()], y)
        });
        Ok(())
    }
    fn backward(
        &mut self,
        ctx: &mut Ctx,
        _batch: usize,
        _x: &[f32],
        y: &[f32],
        gy: &[f32],
        gx: Option<&mut [f32]>,
    ) -> Result<()> {
        if let Some(gx) = gx {
            let isa = ctx.exec.isa();
            plane_runs::<u8>(
                ctx.exec,
                gx,
                1,
                Side::none(),
                Side::none(),
                |i, gx, _, _| {
                    let r = i..i + gx.len();
                    elementwise::relu_backward(isa, &y[r.clone()], &gy[r], gx)
                },
            );
        }
        Ok(())
    }
}

/// Zeroes each element with probability p in training and scales the rest by 1/(1 − p)
/// (inverted dropout, as PyTorch); the identity in evaluation.
pub struct Dropout {
    shape: Vec<usize>,
    p: f32,
    /// The factor each element was multiplied by in the last training forward (0 or 1/(1−p)).
    mask: Vec<f32>,
}

impl Dropout {
    /// Dropout with probability `p` in [0, 1).
    pub fn new(shape: &[usize], p: f32) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid(format!(
                "dropout p must be in [0, 1), got {p}"
            )));
        }
        Ok(Dropout {
            shape: shape.to_vec(),
            p,
            mask: Vec::new(),
        })
    }
}

impl Module for Dropout {
    fn kind(&self) -> &'static str {
        "dropout"
    }
    fn out_shape(&self) -> &[usize] {
        &self.shape
    }
    fn forward(&mut self, ctx: &mut Ctx, _batch: usize, x: &[f32], y: &mut [f32]) -> Result<()> {
        if !ctx.train || self.p == 0.0 {
            y.copy_from_slice(x);
            self.mask.clear();
            return Ok(());
        }
        let keep = 1.0 - self.p;
        super::resize(&mut self.mask, x.len())?;
        for m in self.mask.iter_mut() {
            *m = if ctx.rng.next_f32() < keep {
                1.0 / keep
            } else {
                0.0
            };
        }
        for ((o, &v), &m) in y.iter_mut().zip(x).zip(&self.mask) {
            *o = v * m;
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
            if self.mask.is_empty() {
                gx.copy_from_slice(gy);
            } else {
                for ((o, &g), &m) in gx.iter_mut().zip(gy).zip(&self.mask) {
                    *o = g * m;
                }
            }
        }
        Ok(())
    }
}
