//! Convolution layers: standard/grouped [`Conv2d`] and the two separable layers, both run as a
//! [`ConvPair`] by [`SeparableConv2d`].

use super::{Ctx, LayerMacs, Module, Param, chw, default_init};
use crate::cost::ConvCost;
use crate::error::{Error, Result};
use crate::geometry::{Conv2dParams, ConvGeometry};
use crate::kernels;
use crate::rng::Rng;
use crate::separable::{ConvPair, PairGrads};

/// A standard or grouped 2-D convolution.
pub struct Conv2d {
    in_shape: [usize; 3],
    out_shape: Vec<usize>,
    params: Conv2dParams,
    weight: Param,
    bias: Option<Param>,
    /// Whether it is the network's first layer (no input gradient needed).
    first: bool,
}

impl Conv2d {
    /// A convolution of `in_shape` ([C, H, W]) to `out_channels` with a `kernel` of (kh, kw).
    pub fn new(
        in_shape: &[usize],
        out_channels: usize,
        kernel: (usize, usize),
        params: Conv2dParams,
        bias: bool,
        first: bool,
        rng: &mut Rng,
    ) -> Result<Self> {
        let [c, h, w] = chw(in_shape)?;
        if params.groups == 0 || c % params.groups != 0 {
            return Err(Error::geometry(format!(
                "input channels {c} are not divisible by groups {}",
                params.groups
            )));
        }
        let wshape = [out_channels, c / params.groups, kernel.0, kernel.1];
        let g = ConvGeometry::new([1, c, h, w], wshape, &params)?;
        let fan_in = wshape[1] * kernel.0 * kernel.1;
        let weight = Param::new("weight", &wshape, default_init(rng, fan_in));
        let bias = bias.then(|| Param::new("bias", &[out_channels], default_init(rng, fan_in)));
        Ok(Conv2d {
            in_shape: [c, h, w],
            out_shape: g.output_shape()[1..].to_vec(),
            params,
            weight,
            bias,
            first,
        })
    }

    fn geometry(&self, batch: usize) -> Result<ConvGeometry> {
        let [c, h, w] = self.in_shape;
        let ws = &self.weight.shape;
        ConvGeometry::new([batch, c, h, w], [ws[0], ws[1], ws[2], ws[3]], &self.params)
    }
}

impl Module for Conv2d {
    fn kind(&self) -> &'static str {
        "conv2d"
    }
    fn out_shape(&self) -> &[usize] {
        &self.out_shape
    }
    fn forward(&mut self, ctx: &mut Ctx, batch: usize, x: &[f32], y: &mut [f32]) -> Result<()> {
        let g = self.geometry(batch)?;
        let bias = self.bias.as_ref().map(|b| &b.value[..]);
        kernels::conv2d_forward(ctx.exec, &g, x, &self.weight.value, bias, y, ctx.ws)
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
        let g = self.geometry(batch)?;
        let (w, gw) = (&self.weight.value, &mut self.weight.grad);
        let gb = self.bias.as_mut().map(|b| &mut b.grad[..]);
        kernels::conv2d_backward(ctx.exec, &g, x, gy, w, gx, gw, gb, ctx.ws)
    }
    fn params(&mut self) -> Vec<&mut Param> {
        std::iter::once(&mut self.weight)
            .chain(self.bias.as_mut())
            .collect()
    }
    fn macs(&self) -> LayerMacs {
        let c = self
            .geometry(1)
            .map(|g| ConvCost::of(&g, false))
            .unwrap_or_default();
        LayerMacs {
            forward: c.forward_macs_nominal,
            grad_input: if self.first {
                0
            } else {
                c.grad_input_macs_nominal
            },
            grad_weight: c.grad_weight_macs_nominal,
        }
    }
}

/// Which factorization a [`SeparableConv2d`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeparableKind {
    /// Depthwise kh×kw (multiplier K) then pointwise 1×1.
    Depthwise {
        /// Depth multiplier K.
        multiplier: usize,
    },
    /// kh×1 to `mid` channels, then 1×kw.
    Spatial {
        /// Middle channels R.
        mid: usize,
    },
}

/// A depthwise-separable or spatially separable convolution layer.
pub struct SeparableConv2d {
    kind: SeparableKind,
    in_shape: [usize; 3],
    out_shape: Vec<usize>,
    out_channels: usize,
    kernel: (usize, usize),
    params: Conv2dParams,
    first_weight: Param,
    second_weight: Param,
    bias: Option<Param>,
    mid: Vec<f32>,
    grad_mid: Vec<f32>,
    first: bool,
}

impl SeparableConv2d {
    /// A separable layer of `in_shape` ([C, H, W]) to `out_channels`.
    pub fn new(
        kind: SeparableKind,
        in_shape: &[usize],
        out_channels: usize,
        kernel: (usize, usize),
        params: Conv2dParams,
        bias: bool,
        first: bool,
        rng: &mut Rng,
    ) -> Result<Self> {
        let [c, h, w] = chw(in_shape)?;
        let pair = Self::pair_for(kind, [1, c, h, w], out_channels, kernel, &params)?;
        let (g1, g2) = (pair.first, pair.second);
        // Each conv initialized as PyTorch initializes it on its own.
        let fan1 = g1.in_channels_per_group() * g1.kernel_h * g1.kernel_w;
        let fan2 = g2.in_channels_per_group() * g2.kernel_h * g2.kernel_w;
        let first_weight = Param::new("first.weight", &g1.weight_shape(), default_init(rng, fan1));
        let second_weight =
            Param::new("second.weight", &g2.weight_shape(), default_init(rng, fan2));
        let bias = bias.then(|| Param::new("bias", &[out_channels], default_init(rng, fan2)));
        Ok(SeparableConv2d {
            kind,
            in_shape: [c, h, w],
            out_shape: pair.output_shape()[1..].to_vec(),
            out_channels,
            kernel,
            params,
            first_weight,
            second_weight,
            bias,
            mid: Vec::new(),
            grad_mid: Vec::new(),
            first,
        })
    }

    fn pair_for(
        kind: SeparableKind,
        input: [usize; 4],
        out_channels: usize,
        kernel: (usize, usize),
        params: &Conv2dParams,
    ) -> Result<ConvPair> {
        match kind {
            SeparableKind::Depthwise { multiplier } => {
                ConvPair::depthwise_separable(input, multiplier, out_channels, kernel, params)
            }
            SeparableKind::Spatial { mid } => {
                ConvPair::spatially_separable(input, mid, out_channels, kernel, params)
            }
        }
    }

    fn pair(&self, batch: usize) -> Result<ConvPair> {
        let [c, h, w] = self.in_shape;
        Self::pair_for(
            self.kind,
            [batch, c, h, w],
            self.out_channels,
            self.kernel,
            &self.params,
        )
    }

    /// The factorization.
    pub fn kind(&self) -> SeparableKind {
        self.kind
    }
}

impl Module for SeparableConv2d {
    fn kind(&self) -> &'static str {
        match self.kind {
            SeparableKind::Depthwise { .. } => "depthwise_separable_conv2d",
            SeparableKind::Spatial { .. } => "spatially_separable_conv2d",
        }
    }
    fn out_shape(&self) -> &[usize] {
        &self.out_shape
    }
    fn forward(&mut self, ctx: &mut Ctx, batch: usize, x: &[f32], y: &mut [f32]) -> Result<()> {
        let pair = self.pair(batch)?;
        let bias = self.bias.as_ref().map(|b| &b.value[..]);
        let (w1, w2) = (&self.first_weight.value, &self.second_weight.value);
        if !ctx.train {
            return pair.forward_inference(ctx.exec, x, w1, w2, bias, y, &mut self.mid, ctx.ws);
        }
        super::resize(&mut self.mid, pair.first.output_len())?;
        pair.forward(ctx.exec, x, w1, w2, bias, &mut self.mid, y, ctx.ws)
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
        let pair = self.pair(batch)?;
        super::resize(&mut self.grad_mid, self.mid.len())?;
        let grads = PairGrads {
            input: gx,
            first_weight: &mut self.first_weight.grad,
            second_weight: &mut self.second_weight.grad,
            bias: self.bias.as_mut().map(|b| &mut b.grad[..]),
        };
        pair.backward(
            ctx.exec,
            x,
            &self.first_weight.value,
            &self.second_weight.value,
            &self.mid,
            gy,
            grads,
            &mut self.grad_mid,
            ctx.ws,
        )
    }
    fn params(&mut self) -> Vec<&mut Param> {
        [&mut self.first_weight, &mut self.second_weight]
            .into_iter()
            .chain(self.bias.as_mut())
            .collect()
    }
    fn macs(&self) -> LayerMacs {
        let Ok(pair) = self.pair(1) else {
            return LayerMacs::default();
        };
        let (c1, c2) = (
            ConvCost::of(&pair.first, false),
            ConvCost::of(&pair.second, false),
        );
        LayerMacs {
            forward: c1.forward_macs_nominal + c2.forward_macs_nominal,
            grad_input: c2.grad_input_macs_nominal
                + if self.first {
                    0
                } else {
                    c1.grad_input_macs_nominal
                },
            grad_weight: c1.grad_weight_macs_nominal + c2.grad_weight_macs_nominal,
        }
    }
}
