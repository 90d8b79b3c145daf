//! The ground truth: grouped 2-D convolution in plain loops with f64 accumulation.
//!
//! Written straight from the definition (cross-correlation, zero padding, groups, stride,
//! dilation) with no cleverness, so that every fast kernel can be tested against it. Each
//! function returns the number of multiplications it executed; taps that fall on padding are
//! skipped, so the count is the *executed* MAC count of [`crate::cost`].

use crate::geometry::ConvGeometry;

/// Visits every (image, group, out-channel, in-channel-in-group, out pixel, tap) whose tap lands
/// inside the input, passing flat indices (input, weight, output).
#[inline]
fn for_each_tap(g: &ConvGeometry, mut f: impl FnMut(usize, usize, usize)) {
    let (cig, cog) = (g.in_channels_per_group(), g.out_channels_per_group());
    for n in 0..g.batch {
        for grp in 0..g.groups {
            for oc in 0..cog {
                let co = grp * cog + oc;
                for ic in 0..cig {
                    let ci = grp * cig + ic;
                    for oh in 0..g.out_h {
                        for ow in 0..g.out_w {
                            let y = ((n * g.out_channels + co) * g.out_h + oh) * g.out_w + ow;
                            for i in 0..g.kernel_h {
                                let Some(ih) = g.input_row(oh, i) else {
                                    continue;
                                };
                                for j in 0..g.kernel_w {
                                    let Some(iw) = g.input_col(ow, j) else {
                                        continue;
                                    };
                                    let x = ((n * g.in_channels + ci) * g.in_h + ih) * g.in_w + iw;
                                    let w = ((co * cig + ic) * g.kernel_h + i) * g.kernel_w + j;
                                    f(x, w, y);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// y = conv(x, w) + b. Returns the multiplications executed.
pub fn conv2d_forward(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> u64 {
    assert_lengths(g, x.len(), w.len(), y.len());
    let mut acc = vec![0f64; y.len()];
    let mut count = 0u64;
    for_each_tap(g, |xi, wi, yi| {
        acc[yi] += x[xi] as f64 * w[wi] as f64;
        count += 1;
    });
    let plane = g.out_pixels();
    for (idx, (out, a)) in y.iter_mut().zip(&acc).enumerate() {
        let b = bias.map_or(0.0, |b| b[(idx / plane) % g.out_channels] as f64);
        *out = (a + b) as f32;
    }
    count
}

/// grad_x = ∂L/∂x given gy = ∂L/∂y. Returns the multiplications executed.
pub fn conv2d_grad_input(g: &ConvGeometry, gy: &[f32], w: &[f32], gx: &mut [f32]) -> u64 {
    assert_lengths(g, gx.len(), w.len(), gy.len());
    let mut acc = vec![0f64; gx.len()];
    let mut count = 0u64;
    for_each_tap(g, |xi, wi, yi| {
        acc[xi] += gy[yi] as f64 * w[wi] as f64;
        count += 1;
    });
    for (o, a) in gx.iter_mut().zip(acc) {
        *o = a as f32;
    }
    count
}

/// grad_w = ∂L/∂w given x and gy. Returns the multiplications executed.
pub fn conv2d_grad_weight(g: &ConvGeometry, x: &[f32], gy: &[f32], gw: &mut [f32]) -> u64 {
    assert_lengths(g, x.len(), gw.len(), gy.len());
    let mut acc = vec![0f64; gw.len()];
    let mut count = 0u64;
    for_each_tap(g, |xi, wi, yi| {
        acc[wi] += gy[yi] as f64 * x[xi] as f64;
        count += 1;
    });
    for (o, a) in gw.iter_mut().zip(acc) {
        *o = a as f32;
    }
    count
}

/// `grad_b[c] = Σ over images and pixels of gy[·, c, ·, ·]`. Returns the additions executed.
pub fn conv2d_grad_bias(g: &ConvGeometry, gy: &[f32], gb: &mut [f32]) -> u64 {
    assert_eq!(gy.len(), g.output_len());
    assert_eq!(gb.len(), g.out_channels);
    let plane = g.out_pixels();
    for (c, out) in gb.iter_mut().enumerate() {
        let mut s = 0f64;
        for n in 0..g.batch {
            let base = (n * g.out_channels + c) * plane;
            s += gy[base..base + plane]
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>();
        }
        *out = s as f32;
    }
    (g.batch * plane * g.out_channels) as u64
}

fn assert_lengths(g: &ConvGeometry, x: usize, w: usize, y: usize) {
    assert_eq!(x, g.input_len(), "input length");
    assert_eq!(w, g.weight_len(), "weight length");
    assert_eq!(y, g.output_len(), "output length");
}
