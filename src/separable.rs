//! The two separable layers of DESIGN.md, each a pair of convolutions run in sequence:
//!
//! - depthwise-separable (Keras `SeparableConv2D`): depthwise kh×kw with depth multiplier K over
//!   M channels (stride, dilation and padding apply here, no bias), then pointwise 1×1 from M·K
//!   to N channels carrying the layer's bias;
//! - spatially separable: kh×1 from M to R channels, then 1×kw from R to N. Padding is resolved
//!   as for the full kh×kw kernel; [top, bottom] go to the first conv and [left, right] to the
//!   second; stride (sh, sw) becomes (sh, 1) then (1, sw). The pair then equals the standard
//!   convolution with kernel `column · rowᵀ` exactly.
//!
//! Both run through the same [`ConvPair`] forward and backward.

use crate::cost::ConvCost;
use crate::error::{Error, Result};
use crate::geometry::{Conv2dParams, ConvGeometry, Padding};
use crate::kernels::{self, Exec, Workspace};
use crate::memory::grow_zeroed;

/// Two convolutions in sequence; the second's input is the first's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvPair {
    /// The first convolution (depthwise, or kh×1).
    pub first: ConvGeometry,
    /// The second convolution (pointwise, or 1×kw).
    pub second: ConvGeometry,
}

/// Gradient outputs of [`ConvPair::backward`]; `None` skips a gradient.
pub struct PairGrads<'a> {
    /// ∂L/∂x.
    pub input: Option<&'a mut [f32]>,
    /// ∂L/∂(first weight).
    pub first_weight: &'a mut [f32],
    /// ∂L/∂(second weight).
    pub second_weight: &'a mut [f32],
    /// ∂L/∂bias (of the second conv).
    pub bias: Option<&'a mut [f32]>,
}

impl ConvPair {
    /// A depthwise-separable layer over `input` (`[batch, M, H, W]`) with depth `multiplier`
    /// K, `out_channels` N and a `kernel` of (kh, kw). `params.groups` must be 1 (the depthwise
    /// grouping is implied).
    pub fn depthwise_separable(
        input: [usize; 4],
        multiplier: usize,
        out_channels: usize,
        kernel: (usize, usize),
        params: &Conv2dParams,
    ) -> Result<Self> {
        if params.groups != 1 {
            return Err(Error::geometry(
                "a depthwise-separable layer sets its own groups; pass groups = 1",
            ));
        }
        if multiplier == 0 {
            return Err(Error::geometry(
                "depth multiplier must be at least 1, got 0",
            ));
        }
        let m = input[1];
        let mk = m
            .checked_mul(multiplier)
            .ok_or_else(|| Error::geometry("channels × multiplier overflows"))?;
        let first = ConvGeometry::new(
            input,
            [mk, 1, kernel.0, kernel.1],
            &Conv2dParams {
                groups: m.max(1),
                ..*params
            },
        )?;
        let second = ConvGeometry::new(
            first.output_shape(),
            [out_channels, mk, 1, 1],
            &Conv2dParams::default(),
        )?;
        Ok(ConvPair { first, second })
    }

    /// A spatially separable layer over `input` (`[batch, M, H, W]`): kh×1 from M to `mid`
    /// channels R, then 1×kw from R to `out_channels` N.
    pub fn spatially_separable(
        input: [usize; 4],
        mid: usize,
        out_channels: usize,
        kernel: (usize, usize),
        params: &Conv2dParams,
    ) -> Result<Self> {
        if params.groups != 1 {
            return Err(Error::geometry(
                "a spatially separable layer supports groups = 1 only",
            ));
        }
        // Resolve the padding of the full kh×kw kernel, then split it by axis.
        let full = ConvGeometry::new(input, [out_channels, input[1], kernel.0, kernel.1], params)?;
        let first = ConvGeometry::new(
            input,
            [mid, input[1], kernel.0, 1],
            &Conv2dParams {
                stride: (params.stride.0, 1),
                dilation: (params.dilation.0, 1),
                padding: Padding::Explicit {
                    top: full.pad_top,
                    bottom: full.pad_bottom,
                    left: 0,
                    right: 0,
                },
                groups: 1,
            },
        )?;
        let second = ConvGeometry::new(
            first.output_shape(),
            [out_channels, mid, 1, kernel.1],
            &Conv2dParams {
                stride: (1, params.stride.1),
                dilation: (1, params.dilation.1),
                padding: Padding::Explicit {
                    top: 0,
                    bottom: 0,
                    left: full.pad_left,
                    right: full.pad_right,
                },
                groups: 1,
            },
        )?;
        Ok(ConvPair { first, second })
    }

    /// Shape of the intermediate activation.
    pub fn mid_shape(&self) -> [usize; 4] {
        self.first.output_shape()
    }

    /// Shape of the output.
    pub fn output_shape(&self) -> [usize; 4] {
        self.second.output_shape()
    }

    /// Nominal forward multiply-accumulates of both convolutions.
    fn macs(&self) -> u64 {
        self.first.macs() + self.second.macs()
    }

    /// The pair's cost; the bias (if any) belongs to the second conv.
    pub fn cost(&self, has_bias: bool) -> ConvCost {
        ConvCost::of(&self.first, false).then(ConvCost::of(&self.second, has_bias))
    }

    /// Whether the pair runs fused kernels on `exec`: [`ConvPair::forward_inference`] with
    /// `training` false (every depthwise-separable pair, [`kernels::fused`]), or
    /// [`ConvPair::forward`] and [`ConvPair::backward`] with `training` true (where
    /// [`kernels::fused_training`] applies to either). Elsewhere they run the two convolutions
    /// one after the other, the intermediate through memory.
    pub fn runs_fused(&self, exec: Exec, training: bool) -> bool {
        if !training {
            return kernels::fused::applies(&self.first, &self.second);
        }
        self.forward_plan(exec).1 || self.backward_plan(exec).1
    }

    /// The forward's `Exec` (for its work) and whether it runs image by image
    /// ([`kernels::fused_training::forward_applies`]).
    fn forward_plan(&self, exec: Exec) -> (Exec, bool) {
        let exec = exec.for_work(self.macs());
        let fused = kernels::fused_training::forward_applies(exec, &self.first, &self.second);
        (exec, fused)
    }

    /// The backward's `Exec` (both gradients of both convolutions) and whether it runs image
    /// by image ([`kernels::fused_training::applies`]).
    fn backward_plan(&self, exec: Exec) -> (Exec, bool) {
        let exec = exec.for_work(2 * self.macs());
        let fused = kernels::fused_training::applies(exec, &self.first, &self.second);
        (exec, fused)
    }

    /// Forward: `mid = first(x, w1)`, `y = second(mid, w2) + bias`. `mid` is kept for backward.
    /// A depthwise-separable pair runs image by image where [`kernels::fused_training`] applies.
    pub fn forward(
        &self,
        exec: Exec,
        x: &[f32],
        w1: &[f32],
        w2: &[f32],
        bias: Option<&[f32]>,
        mid: &mut [f32],
        y: &mut [f32],
        ws: &mut Workspace,
    ) -> Result<()> {
        // The fallback sizes its own threads for the work: it is callable on its own.
        if let (fused_exec, true) = self.forward_plan(exec) {
            return kernels::fused_training::forward(
                fused_exec,
                &self.first,
                &self.second,
                x,
                w1,
                w2,
                bias,
                kernels::fused_training::Intermediate::Kept(mid),
                y,
            );
        }
        self.forward_as_two_layers(exec, x, w1, w2, bias, mid, y, ws)
    }

    /// [`ConvPair::forward`] as two layers on their own kernels whatever the pair, the
    /// intermediate written to `mid` and read back (what `sepconv bench` compares the fused
    /// passes with).
    pub fn forward_as_two_layers(
        &self,
        exec: Exec,
        x: &[f32],
        w1: &[f32],
        w2: &[f32],
        bias: Option<&[f32]>,
        mid: &mut [f32],
        y: &mut [f32],
        ws: &mut Workspace,
    ) -> Result<()> {
        let exec = exec.for_work(self.macs());
        kernels::conv2d_forward(exec, &self.first, x, w1, None, mid, ws)?;
        kernels::conv2d_forward(exec, &self.second, mid, w2, bias, y, ws)
    }

    /// Forward for inference: the same result as [`ConvPair::forward`] without keeping the
    /// intermediate. A depthwise-separable pair runs fused (the intermediate never leaves the
    /// cache, [`kernels::fused`]) and leaves `mid` alone; other pairs use it as scratch.
    pub fn forward_inference(
        &self,
        exec: Exec,
        x: &[f32],
        w1: &[f32],
        w2: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
        mid: &mut Vec<f32>,
        ws: &mut Workspace,
    ) -> Result<()> {
        let exec = exec.for_work(self.macs());
        if kernels::fused::applies(&self.first, &self.second) {
            return kernels::fused::depthwise_pointwise_forward(
                exec,
                &self.first,
                &self.second,
                x,
                w1,
                w2,
                bias,
                y,
                ws,
            );
        }
        let len = self.first.output_len();
        grow_zeroed(mid, len, "the intermediate activation")?;
        self.forward(exec, x, w1, w2, bias, &mut mid[..len], y, ws)
    }

    /// Backward from `gy`, given the forward's `x` and `mid`; `gmid` is scratch of `mid`'s size.
    /// A depthwise-separable pair runs image by image where [`kernels::fused_training`] applies
    /// (its depthwise pass's memory prefetched during the pointwise products).
    pub fn backward(
        &self,
        exec: Exec,
        x: &[f32],
        w1: &[f32],
        w2: &[f32],
        mid: &[f32],
        gy: &[f32],
        grads: PairGrads<'_>,
        gmid: &mut [f32],
        ws: &mut Workspace,
    ) -> Result<()> {
        if let (fused_exec, true) = self.backward_plan(exec) {
            return kernels::fused_training::backward(
                fused_exec,
                &self.first,
                &self.second,
                x,
                w1,
                w2,
                mid,
                gy,
                grads.input,
                grads.first_weight,
                grads.second_weight,
                grads.bias,
                ws,
            );
        }
        self.backward_as_two_layers(exec, x, w1, w2, mid, gy, grads, gmid, ws)
    }

    /// [`ConvPair::backward`] as two layers on their own kernels whatever the pair: the second
    /// convolution's gradients, its input gradient written to `gmid`, then the first's.
    pub fn backward_as_two_layers(
        &self,
        exec: Exec,
        x: &[f32],
        w1: &[f32],
        w2: &[f32],
        mid: &[f32],
        gy: &[f32],
        grads: PairGrads<'_>,
        gmid: &mut [f32],
        ws: &mut Workspace,
    ) -> Result<()> {
        let exec = exec.for_work(2 * self.macs());
        kernels::conv2d_backward(
            exec,
            &self.second,
            mid,
            gy,
            w2,
            Some(gmid),
            grads.second_weight,
            grads.bias,
            ws,
        )?;
        kernels::conv2d_backward(
            exec,
            &self.first,
            x,
            gmid,
            w1,
            grads.input,
            grads.first_weight,
            None,
            ws,
        )
    }
}
