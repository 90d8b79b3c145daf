//! Flatten and Linear (fully connected, PyTorch layout: weight [out, in]).

use super::{Ctx, LayerMacs, Module, Param, default_init};
use crate::error::{Error, Result};
use crate::kernels::dense;
use crate::kernels::gemm::{MatView, gemm};

/// [C, H, W] → [C·H·W]: row-major, the same memory (a [`Network`](super::Network) gives it its
/// input's buffer; run on its own, it copies).
pub struct Flatten {
    out_shape: Vec<usize>,
}

impl Flatten {
    /// Flattens `in_shape`.
    pub fn new(in_shape: &[usize]) -> Self {
        Flatten {
            out_shape: vec![in_shape.iter().product()],
        }
    }
}

impl Module for Flatten {
    fn kind(&self) -> &'static str {
        "flatten"
    }
    fn out_shape(&self) -> &[usize] {
        &self.out_shape
    }
    fn is_view(&self) -> bool {
        true
    }
    /// The copy, for a caller that runs the layer on its own (a [`Network`](super::Network)
    /// shares the buffer instead, see [`Module::is_view`]).
    fn forward(&mut self, _ctx: &mut Ctx, _batch: usize, x: &[f32], y: &mut [f32]) -> Result<()> {
        y.copy_from_slice(x);
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
            gx.copy_from_slice(gy);
        }
        Ok(())
    }
}

/// y = x·Wᵀ + b.
pub struct Linear {
    in_features: usize,
    out_shape: Vec<usize>,
    weight: Param,
    bias: Option<Param>,
    first: bool,
}

impl Linear {
    /// A linear layer from a flat `in_shape` to `out_features`.
    pub fn new(
        in_shape: &[usize],
        out_features: usize,
        bias: bool,
        first: bool,
        rng: &mut crate::rng::Rng,
    ) -> Result<Self> {
        let [in_features] = in_shape[..] else {
            return Err(Error::geometry(format!(
                "expects a flat [features] input, got {in_shape:?} (add a flatten layer before it)"
            )));
        };
        if out_features == 0 {
            return Err(Error::invalid("out_features must be at least 1"));
        }
        let weight = Param::new(
            "weight",
            &[out_features, in_features],
            default_init(rng, in_features),
        );
        let bias =
            bias.then(|| Param::new("bias", &[out_features], default_init(rng, in_features)));
        Ok(Linear {
            in_features,
            out_shape: vec![out_features],
            weight,
            bias,
            first,
        })
    }

    /// Multiply-accumulates of the forward product over `batch` rows.
    fn batch_macs(&self, batch: usize) -> u64 {
        (batch * self.in_features * self.out_shape[0]) as u64
    }
}

impl Module for Linear {
    fn kind(&self) -> &'static str {
        "linear"
    }
    fn out_shape(&self) -> &[usize] {
        &self.out_shape
    }
    fn forward(&mut self, ctx: &mut Ctx, batch: usize, x: &[f32], y: &mut [f32]) -> Result<()> {
        debug_assert_eq!(x.len(), batch * self.in_features);
        let bias = self.bias.as_ref().map(|b| &b.value[..]);
        let exec = ctx.exec.for_work(self.batch_macs(batch));
        dense::forward(exec, x, &self.weight.value, bias, self.in_features, y);
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
        let (i, o) = (self.in_features, self.out_shape[0]);
        // Each of the two products takes the forward's multiply-accumulates.
        let exec = ctx.exec.for_work(self.batch_macs(batch));
        let t = exec.threads();
        let gy_m = MatView::dense(gy, batch, o);
        gemm(
            &mut self.weight.grad,
            i,
            gy_m.t(),
            MatView::dense(x, batch, i),
            false,
            t,
        );
        if let Some(b) = &mut self.bias {
            b.grad.fill(0.0);
            for row in gy.chunks_exact(o) {
                for (g, &v) in b.grad.iter_mut().zip(row) {
                    *g += v;
                }
            }
        }
        if let Some(gx) = gx {
            dense::grad_input(exec, gy, &self.weight.value, i, gx);
        }
        Ok(())
    }
    fn params(&mut self) -> Vec<&mut Param> {
        std::iter::once(&mut self.weight)
            .chain(self.bias.as_mut())
            .collect()
    }
    fn macs(&self) -> LayerMacs {
        let m = (self.in_features * self.out_shape[0]) as u64;
        LayerMacs {
            forward: m,
            grad_input: if self.first { 0 } else { m },
            grad_weight: m,
        }
    }
}
