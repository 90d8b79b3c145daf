//! # sepconv
//!
//! Separable convolutions for convolutional neural networks: compute them fast (standard,
//! grouped/depthwise, pointwise and spatially separable, forward and backward), count what they
//! cost, and check them against a plain-loop reference.
//!
//! Conventions (DESIGN.md): f32; activations NCHW; weights OIHW
//! `[out, in / groups, kh, kw]` as in PyTorch and ONNX; depthwise with multiplier K has
//! groups = M and output channel `m·K + k`.
//!
//! ```
//! use sepconv::{conv2d, Conv2dParams, Padding, Tensor};
//!
//! // A 3×3 "same" convolution of one 1×1×4×4 image with a kernel that sums its neighbourhood.
//! let x = Tensor::new(&[1, 1, 4, 4], vec![1.0; 16])?;
//! let w = Tensor::new(&[1, 1, 3, 3], vec![1.0; 9])?;
//! let y = conv2d(&x, &w, None, &Conv2dParams::with_padding(Padding::Same))?;
//! assert_eq!(y.shape(), &[1, 1, 4, 4]);
//! assert_eq!(y.data()[0], 4.0); // a corner sees 4 input pixels
//! assert_eq!(y.data()[5], 9.0); // an inner pixel sees 9
//! # Ok::<(), sepconv::Error>(())
//! ```
//!
//! The slice-level kernels live in [`kernels`]; [`separable::ConvPair`] runs the two separable
//! layers; [`cost::ConvCost`] states what any of them costs.

// Kernels are plain functions over slices (DESIGN.md): their argument lists are the shapes and
// buffers they touch, which is clearer than bundling them into single-use structs.
#![allow(clippy::too_many_arguments)]

pub mod bench;
pub mod cost;
pub mod decompose;
pub mod error;
pub mod geometry;
pub mod io;
pub mod kernels;
pub mod memory;
pub mod nn;
pub mod rng;
pub mod separable;
pub mod tensor;
pub mod train;

/// The README's Rust example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use cost::ConvCost;
pub use error::{Error, Result};
pub use geometry::{Conv2dParams, ConvGeometry, Padding};
pub use kernels::{Exec, Isa, Workspace};
pub use separable::ConvPair;
pub use tensor::Tensor;

/// Validates `x`, `w` and `bias` against `params`, returning the resolved geometry.
pub fn conv2d_geometry(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    params: &Conv2dParams,
) -> Result<ConvGeometry> {
    let g = ConvGeometry::new(x.dims4("input")?, w.dims4("weight")?, params)?;
    if let Some(b) = bias
        && (b.shape().len() != 1 || b.len() != g.out_channels)
    {
        return Err(Error::geometry(format!(
            "bias must have shape [{}] (one value per output channel), got {:?}",
            g.out_channels,
            b.shape()
        )));
    }
    Ok(g)
}

/// `y = conv2d(x, w) + bias` on all threads of the current rayon pool.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    params: &Conv2dParams,
) -> Result<Tensor> {
    let g = conv2d_geometry(x, w, bias, params)?;
    let mut y = Tensor::zeros(&g.output_shape())?;
    kernels::conv2d_forward(
        Exec::default(),
        &g,
        x.data(),
        w.data(),
        bias.map(|b| b.data()),
        y.data_mut(),
        &mut Workspace::new(),
    )?;
    Ok(y)
}

/// Gradients of a convolution with respect to its input, weight and (optional) bias.
#[derive(Clone, Debug)]
pub struct Conv2dGrads {
    /// ∂L/∂x, shaped like the input.
    pub input: Tensor,
    /// ∂L/∂w, shaped like the weight.
    pub weight: Tensor,
    /// ∂L/∂b, if a bias gradient was asked for.
    pub bias: Option<Tensor>,
}

/// The backward pass of [`conv2d`]: gradients given `gy = ∂L/∂y`.
pub fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    params: &Conv2dParams,
    with_bias: bool,
) -> Result<Conv2dGrads> {
    let g = conv2d_geometry(x, w, None, params)?;
    if gy.shape() != g.output_shape() {
        return Err(Error::geometry(format!(
            "grad-output must have the output's shape {:?}, got {:?}",
            g.output_shape(),
            gy.shape()
        )));
    }
    let exec = Exec::default();
    let mut ws = Workspace::new();
    let mut gx = Tensor::zeros(x.shape())?;
    let mut gw = Tensor::zeros(w.shape())?;
    let mut bias = if with_bias {
        Some(Tensor::zeros(&[g.out_channels])?)
    } else {
        None
    };
    kernels::conv2d_backward(
        exec,
        &g,
        x.data(),
        gy.data(),
        w.data(),
        Some(gx.data_mut()),
        gw.data_mut(),
        bias.as_mut().map(|b| b.data_mut()),
        &mut ws,
    )?;
    Ok(Conv2dGrads {
        input: gx,
        weight: gw,
        bias,
    })
}
